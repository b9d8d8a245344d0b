// Serving load benchmark: N concurrent clients send Generate requests to kvqd for a fixed time
// over loopback; reports throughput, latency percentiles (TTFT, inter-token, end to end) and errors.
//
//   serving_load_bench --model=.cache/SmolLM2-135M-Instruct.Q4_1.gguf --clients=8 --seconds=30
//   serving_load_bench --server=127.0.0.1:50051 --clients=32 --seconds=60 --json=out.json
//
// Without --server it starts kvqd in-process on a free loopback port (same code path as kvqd).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "grpcpp/grpcpp.h"
#include "kvq/v1/kvq_service.grpc.pb.h"
#include "server/server.h"

ABSL_FLAG(std::string, server, "", "kvqd address; empty: start one in-process with --model");
ABSL_FLAG(std::string, model, ".cache/SmolLM2-135M-Instruct.Q4_1.gguf", "Model for the in-process server");
ABSL_FLAG(std::string, kv_format, "fp16", "KV format for the in-process server");
ABSL_FLAG(std::string, quantizer, "", "Quantizer for the in-process server");
ABSL_FLAG(int, max_batch, 16, "In-process server: max batch");
ABSL_FLAG(int, clients, 8, "Concurrent clients, each with one stream at a time");
ABSL_FLAG(double, seconds, 20, "How long to send requests (in-flight ones then finish)");
ABSL_FLAG(int, max_tokens, 32, "Tokens per request");
ABSL_FLAG(int, prompt_words, 40, "Approximate prompt length in words");
ABSL_FLAG(std::string, json, "", "Also write the results here as JSON");

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * (v.size() - 1) + 0.5));
  return v[i];
}

struct Results {
  std::mutex mu;
  std::vector<double> ttft, itl, e2e;
  int64_t requests = 0, tokens = 0;
  std::map<std::string, int64_t> errors;  // by status code name
};

std::string Prompt(int client, int n, int words) {
  static const char* kWords[] = {"river", "stone", "lantern", "winter", "harbor", "meadow", "signal", "copper"};
  std::string p = absl::StrFormat("Request %d-%d. Continue the story:", client, n);
  for (int i = 0; i < words; ++i) p += std::string(" ") + kWords[(client * 7 + n * 3 + i) % 8];
  return p;
}

void Client(kvq::v1::Kvq::Stub* stub, int id, Clock::time_point end, Results* out) {
  for (int n = 0; Clock::now() < end; ++n) {
    kvq::v1::GenerateRequest req;
    req.set_text(Prompt(id, n, absl::GetFlag(FLAGS_prompt_words)));
    req.mutable_sampling()->set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
    req.mutable_sampling()->set_ignore_eos(true);
    grpc::ClientContext ctx;
    const auto t0 = Clock::now();
    auto reader = stub->Generate(&ctx, req);
    kvq::v1::GenerateResponse msg;
    std::vector<double> itl;
    double ttft = -1;
    Clock::time_point last = t0;
    int64_t tokens = 0;
    while (reader->Read(&msg)) {
      if (!msg.has_delta() || msg.delta().token_ids_size() == 0) continue;
      const auto now = Clock::now();
      if (ttft < 0) {
        ttft = Seconds(now - t0);
      } else {
        // Coalesced deltas: spread the gap over the tokens they carry.
        const int k = msg.delta().token_ids_size();
        for (int i = 0; i < k; ++i) itl.push_back(Seconds(now - last) / k);
      }
      last = now;
      tokens += msg.delta().token_ids_size();
    }
    grpc::Status s = reader->Finish();
    std::lock_guard<std::mutex> lock(out->mu);
    if (!s.ok()) {
      ++out->errors[std::to_string(s.error_code()) + " " + s.error_message().substr(0, 60)];
      continue;
    }
    ++out->requests;
    out->tokens += tokens;
    if (ttft >= 0) out->ttft.push_back(ttft);
    out->itl.insert(out->itl.end(), itl.begin(), itl.end());
    out->e2e.push_back(Seconds(Clock::now() - t0));
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::string address = absl::GetFlag(FLAGS_server);
  std::unique_ptr<kvq::server::KvqServer> server;
  if (address.empty()) {
    kvq::server::ServerOptions o;
    o.listen = "127.0.0.1:0";
    o.engine.model = absl::GetFlag(FLAGS_model);
    o.engine.kv_format = absl::GetFlag(FLAGS_kv_format);
    o.engine.quantizer = absl::GetFlag(FLAGS_quantizer);
    o.engine.max_batch = absl::GetFlag(FLAGS_max_batch);
    o.drain_grace = absl::Seconds(5);
    auto s = kvq::server::KvqServer::Start(o);
    if (!s.ok()) return std::fprintf(stderr, "%s\n", s.status().ToString().c_str()), 1;
    server = *std::move(s);
    if (absl::Status st = server->LoadEngine(); !st.ok()) return std::fprintf(stderr, "%s\n", st.ToString().c_str()), 1;
    address = "127.0.0.1:" + std::to_string(server->port());
  }
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  auto stub = kvq::v1::Kvq::NewStub(channel);
  const int clients = absl::GetFlag(FLAGS_clients);
  Results results;
  const auto start = Clock::now();
  const auto end = start + std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_seconds) * 1000));
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i) threads.emplace_back(Client, stub.get(), i, end, &results);
  for (auto& t : threads) t.join();
  const double wall = Seconds(Clock::now() - start);
  int64_t errors = 0;
  for (const auto& [k, n] : results.errors) errors += n;

  std::printf("\nerrors:\n");
  for (const auto& [k, n] : results.errors) std::printf("  %6lld  %s\n", static_cast<long long>(n), k.c_str());
  std::printf("\n%-8s %-8s %-9s %-10s %-12s | %-21s | %-21s | %-21s\n", "clients", "requests", "errors", "req/s",
              "tokens/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "e2e p50/p90/p99 s");
  auto trio = [](const std::vector<double>& v, double scale) {
    return absl::StrFormat("%6.1f %6.1f %6.1f", Percentile(v, 50) * scale, Percentile(v, 90) * scale,
                           Percentile(v, 99) * scale);
  };
  std::printf("%-8d %-8lld %-9lld %-10.2f %-12.1f | %-21s | %-21s | %-21s\n", clients,
              static_cast<long long>(results.requests), static_cast<long long>(errors), results.requests / wall,
              results.tokens / wall, trio(results.ttft, 1e3).c_str(), trio(results.itl, 1e3).c_str(),
              trio(results.e2e, 1).c_str());
  if (!absl::GetFlag(FLAGS_json).empty()) {
    std::ofstream f(absl::GetFlag(FLAGS_json));
    f << absl::StrFormat(
        "{\"clients\": %d, \"seconds\": %.3f, \"requests\": %lld, \"errors\": %lld, \"requests_per_second\": %.4f, "
        "\"tokens_per_second\": %.3f, \"ttft_p50_s\": %.6f, \"ttft_p99_s\": %.6f, \"itl_p50_s\": %.6f, "
        "\"itl_p99_s\": %.6f, \"e2e_p50_s\": %.6f, \"e2e_p99_s\": %.6f}\n",
        clients, wall, static_cast<long long>(results.requests), static_cast<long long>(errors),
        results.requests / wall, results.tokens / wall, Percentile(results.ttft, 50), Percentile(results.ttft, 99),
        Percentile(results.itl, 50), Percentile(results.itl, 99), Percentile(results.e2e, 50),
        Percentile(results.e2e, 99));
  }
  if (server) server->Drain();
  return errors == 0 ? 0 : 1;
}
