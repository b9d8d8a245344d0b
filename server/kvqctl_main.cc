// kvqctl: the command-line client of kvqd.
//
//   kvqctl generate "prompt"               stream a completion to the terminal
//   kvqctl chat                            interactive chat (the conversation is resent each turn)
//   kvqctl session create ID FILE          upload a document, with a progress bar
//   kvqctl session ask ID "question"       ask against a session (the document is not prefilled again)
//   kvqctl session list | get ID | delete ID | save ID [NAME] | restore ID [NAME]
//   kvqctl info                            model, KV format, capacity, shard layout
//   kvqctl tokenize "text"                 token ids and pieces
//   kvqctl abort REQUEST_ID
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "grpcpp/grpcpp.h"
#include "kvq/v1/kvq_service.grpc.pb.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "kvqd address");
ABSL_FLAG(double, timeout, 0, "Deadline in seconds for the call; 0: none");
ABSL_FLAG(int, max_tokens, 256, "Tokens to generate at most");
ABSL_FLAG(double, temperature, 0, "Sampling temperature; 0: greedy");
ABSL_FLAG(double, top_p, 1, "Nucleus sampling threshold in (0, 1]");
ABSL_FLAG(int, top_k, 0, "Top-k sampling; 0: off");
ABSL_FLAG(double, min_p, 0, "Min-p filter in [0, 1): keep tokens with probability >= min_p times the largest; 0: off");
ABSL_FLAG(double, repetition_penalty, 1, "Repetition penalty > 0 over the context and the output; 1: off");
ABSL_FLAG(uint64_t, seed, 0, "Sampling seed");
ABSL_FLAG(int, top_logprobs, -1,
          "Print each generated token's log-probability to stderr after the text, with this many "
          "alternatives (0 to 20); -1: off");
ABSL_FLAG(std::vector<std::string>, stop, {}, "Stop strings (comma-separated)");
ABSL_FLAG(bool, raw, false, "generate/ask: send the prompt as raw text instead of a chat message");
ABSL_FLAG(std::string, system, "", "chat/generate: a system message");
ABSL_FLAG(int64_t, ttl, -1, "session create: TTL in seconds; -1: the server's default");
ABSL_FLAG(int, chunk_bytes, 64 << 10, "session create: bytes per uploaded chunk");
ABSL_FLAG(bool, stats, true, "Print usage (tokens, TTFT, speed) after a generation, to stderr");

namespace {

using kvq::v1::Kvq;

std::unique_ptr<Kvq::Stub> Connect() {
  return Kvq::NewStub(grpc::CreateChannel(absl::GetFlag(FLAGS_server), grpc::InsecureChannelCredentials()));
}

void SetDeadline(grpc::ClientContext* ctx) {
  const double t = absl::GetFlag(FLAGS_timeout);
  if (t > 0) ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(t * 1000)));
}

int Fail(const grpc::Status& s) {
  std::fprintf(stderr, "kvqctl: %s: %s\n", s.error_code() == grpc::StatusCode::UNAVAILABLE ? "unavailable" : "error",
               s.error_message().c_str());
  return 1;
}

void FillSampling(kvq::v1::SamplingParams* p) {
  p->set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  p->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  p->set_top_p(static_cast<float>(absl::GetFlag(FLAGS_top_p)));
  p->set_top_k(absl::GetFlag(FLAGS_top_k));
  p->set_seed(absl::GetFlag(FLAGS_seed));
  // Only what was asked for: unset fields take the server's documented defaults.
  if (absl::GetFlag(FLAGS_min_p) != 0) p->set_min_p(static_cast<float>(absl::GetFlag(FLAGS_min_p)));
  if (absl::GetFlag(FLAGS_repetition_penalty) != 1) {
    p->set_repetition_penalty(static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty)));
  }
  if (absl::GetFlag(FLAGS_top_logprobs) >= 0) {
    p->set_logprobs(true);
    p->set_top_logprobs(absl::GetFlag(FLAGS_top_logprobs));
  }
  for (const std::string& s : absl::GetFlag(FLAGS_stop)) p->add_stop(s);
}

// Streams one generation to stdout; returns the text and the exit code.
int StreamGenerate(Kvq::Stub& stub, const kvq::v1::GenerateRequest& req, std::string* text = nullptr) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  auto reader = stub.Generate(&ctx, req);
  kvq::v1::GenerateResponse msg;
  kvq::v1::Finished fin;
  bool progress_shown = false;
  std::vector<kvq::v1::TokenLogprobs> logprobs;
  while (reader->Read(&msg)) {
    if (msg.has_prefill_progress() && msg.prefill_progress().tokens_total() > 512) {
      std::fprintf(stderr, "\rprefill %lld/%lld", static_cast<long long>(msg.prefill_progress().tokens_done()),
                   static_cast<long long>(msg.prefill_progress().tokens_total()));
      progress_shown = true;
    } else if (msg.has_delta()) {
      if (progress_shown) {
        std::fprintf(stderr, "\r\033[K");
        progress_shown = false;
      }
      std::fwrite(msg.delta().text().data(), 1, msg.delta().text().size(), stdout);
      std::fflush(stdout);
      if (text) *text += msg.delta().text();
      for (const auto& lp : msg.delta().logprobs()) logprobs.push_back(lp);
    } else if (msg.has_finished()) {
      fin = msg.finished();
    }
  }
  std::printf("\n");
  std::fflush(stdout);  // before the usage line on stderr (stdout is fully buffered in a pipe)
  grpc::Status s = reader->Finish();
  if (!s.ok()) return Fail(s);
  // --top_logprobs: one line per generated token: id, log-probability, then the alternatives.
  for (size_t i = 0; i < logprobs.size(); ++i) {
    const auto& lp = logprobs[i];
    std::string line = absl::StrFormat("%4zu  id %6d", i, lp.token_id());
    if (lp.has_logprob()) absl::StrAppendFormat(&line, "  logprob %9.4f", lp.logprob());
    for (const auto& t : lp.top()) absl::StrAppendFormat(&line, "  | %6d %9.4f %s", t.token_id(), t.logprob(), absl::CHexEscape(t.text()));
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  if (absl::GetFlag(FLAGS_stats)) {
    const auto& u = fin.usage();
    const double decode = u.total_seconds() - u.time_to_first_token_seconds();
    std::fprintf(stderr, "[%s; prompt %lld, cached %lld, generated %lld tokens; TTFT %.3f s; %.1f tokens/s]\n",
                 kvq::v1::FinishReason_Name(fin.reason()).c_str(), static_cast<long long>(u.prompt_tokens()),
                 static_cast<long long>(u.cached_tokens()), static_cast<long long>(u.generated_tokens()),
                 u.time_to_first_token_seconds(),
                 decode > 0 && u.generated_tokens() > 1 ? (u.generated_tokens() - 1) / decode : 0.0);
  }
  return 0;
}

void AddChat(kvq::v1::ChatPrompt* chat, const std::string& role, const std::string& content) {
  auto* m = chat->add_messages();
  m->set_role(role);
  m->set_content(content);
}

int Generate(const std::string& prompt, const std::string& session = "") {
  auto stub = Connect();
  kvq::v1::GenerateRequest req;
  if (absl::GetFlag(FLAGS_raw) || !session.empty()) {
    req.set_text(prompt);
  } else {
    if (!absl::GetFlag(FLAGS_system).empty()) AddChat(req.mutable_chat(), "system", absl::GetFlag(FLAGS_system));
    AddChat(req.mutable_chat(), "user", prompt);
  }
  req.set_session_id(session);
  FillSampling(req.mutable_sampling());
  return StreamGenerate(*stub, req);
}

int Chat() {
  auto stub = Connect();
  kvq::v1::ChatPrompt history;
  if (!absl::GetFlag(FLAGS_system).empty()) AddChat(&history, "system", absl::GetFlag(FLAGS_system));
  std::string line;
  while (true) {
    std::fprintf(stderr, "> ");
    if (!std::getline(std::cin, line)) break;
    if (line.empty()) continue;
    AddChat(&history, "user", line);
    kvq::v1::GenerateRequest req;
    *req.mutable_chat() = history;
    FillSampling(req.mutable_sampling());
    std::string answer;
    if (int rc = StreamGenerate(*stub, req, &answer); rc != 0) return rc;
    AddChat(&history, "assistant", answer);
  }
  return 0;
}

void DrawBar(double fraction, const std::string& label) {
  const int width = 30;
  const int filled = static_cast<int>(std::lround(std::clamp(fraction, 0.0, 1.0) * width));
  std::fprintf(stderr, "\r[%s%s] %5.1f%% %s\033[K", std::string(filled, '#').c_str(),
               std::string(width - filled, '.').c_str(), 100 * fraction, label.c_str());
}

int SessionCreate(const std::string& id, const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "kvqctl: cannot read %s\n", path.c_str());
    return 1;
  }
  f.seekg(0, std::ios::end);
  const int64_t size = f.tellg();
  f.seekg(0);
  auto stub = Connect();
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  auto stream = stub->CreateSession(&ctx);
  kvq::v1::Session session;
  // Responses arrive while we upload: progress for the bar, then the session.
  std::thread reader([&] {
    kvq::v1::CreateSessionResponse resp;
    while (stream->Read(&resp)) {
      if (resp.has_progress()) {
        const auto& p = resp.progress();
        // Prefill dominates: estimate its total from the tokens per byte seen so far.
        const double est_total = p.bytes_received() > 0
                                     ? static_cast<double>(p.tokens_received()) * size / p.bytes_received()
                                     : 0;
        DrawBar(est_total > 0 ? p.tokens_prefilled() / est_total : 0,
                absl::StrFormat("%lld tokens prefilled, %.1f/%.1f MiB sent",
                                static_cast<long long>(p.tokens_prefilled()), p.bytes_received() / 1048576.0,
                                size / 1048576.0));
      } else if (resp.has_session()) {
        session = resp.session();
      }
    }
  });
  const int chunk = std::max(1, absl::GetFlag(FLAGS_chunk_bytes));
  std::string buf(chunk, '\0');
  bool first = true;
  while (true) {
    f.read(buf.data(), chunk);
    const std::streamsize n = f.gcount();
    if (n <= 0 && !first) break;
    kvq::v1::CreateSessionRequest req;
    if (first) {
      req.set_session_id(id);
      if (absl::GetFlag(FLAGS_ttl) >= 0) req.set_ttl_seconds(absl::GetFlag(FLAGS_ttl));
    }
    first = false;
    req.set_text(buf.substr(0, n));
    if (!stream->Write(req)) break;  // the server ended the stream; Finish says why
    if (n < chunk) break;
  }
  stream->WritesDone();
  reader.join();
  grpc::Status s = stream->Finish();
  std::fprintf(stderr, "\n");
  if (!s.ok()) return Fail(s);
  std::printf("session %s: %lld tokens, %.1f MiB of KV\n", session.session_id().c_str(),
              static_cast<long long>(session.tokens()), session.kv_bytes() / 1048576.0);
  return 0;
}

void PrintSession(const kvq::v1::Session& s) {
  std::printf("%-24s %10lld tokens %10.1f MiB  ttl %llds\n", s.session_id().c_str(), static_cast<long long>(s.tokens()),
              s.kv_bytes() / 1048576.0, static_cast<long long>(s.ttl_seconds()));
}

int Session(const std::vector<char*>& args) {
  if (args.size() < 3) {
    std::fprintf(stderr, "usage: kvqctl session create|ask|list|get|delete|save|restore ...\n");
    return 2;
  }
  const std::string verb = args[2];
  const std::string id = args.size() > 3 ? args[3] : "";
  const std::string arg = args.size() > 4 ? args[4] : "";
  if (verb == "create") {
    if (args.size() < 5) return std::fprintf(stderr, "usage: kvqctl session create ID FILE\n"), 2;
    return SessionCreate(id, arg);
  }
  if (verb == "ask") {
    if (args.size() < 5) return std::fprintf(stderr, "usage: kvqctl session ask ID QUESTION\n"), 2;
    return Generate(arg, id);
  }
  auto stub = Connect();
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  grpc::Status s;
  if (verb == "list") {
    kvq::v1::ListSessionsResponse resp;
    s = stub->ListSessions(&ctx, {}, &resp);
    for (const auto& session : resp.sessions()) PrintSession(session);
  } else if (verb == "get") {
    kvq::v1::GetSessionRequest req;
    req.set_session_id(id);
    kvq::v1::Session resp;
    s = stub->GetSession(&ctx, req, &resp);
    if (s.ok()) PrintSession(resp);
  } else if (verb == "delete") {
    kvq::v1::DeleteSessionRequest req;
    req.set_session_id(id);
    kvq::v1::DeleteSessionResponse resp;
    s = stub->DeleteSession(&ctx, req, &resp);
  } else if (verb == "save") {
    kvq::v1::SaveSessionRequest req;
    req.set_session_id(id);
    req.set_name(arg);
    kvq::v1::SaveSessionResponse resp;
    s = stub->SaveSession(&ctx, req, &resp);
    if (s.ok()) std::printf("saved to %s (%.1f MiB)\n", resp.path().c_str(), resp.file_bytes() / 1048576.0);
  } else if (verb == "restore") {
    kvq::v1::RestoreSessionRequest req;
    req.set_session_id(id);
    req.set_name(arg);
    kvq::v1::Session resp;
    s = stub->RestoreSession(&ctx, req, &resp);
    if (s.ok()) PrintSession(resp);
  } else {
    std::fprintf(stderr, "kvqctl: unknown session command '%s'\n", verb.c_str());
    return 2;
  }
  return s.ok() ? 0 : Fail(s);
}

int Info() {
  auto stub = Connect();
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  kvq::v1::ModelInfo m;
  grpc::Status s = stub->GetModelInfo(&ctx, {}, &m);
  if (!s.ok()) return Fail(s);
  std::printf("model        %s (%s): %d layers, hidden %d, %d heads / %d KV heads x %d, vocab %d\n",
              m.name().c_str(), m.arch().c_str(), m.layers(), m.hidden(), m.heads(), m.kv_heads(), m.head_dim(),
              m.vocab_size());
  std::printf("kv format    %s%s%s (%.2f bits/element, %.2f%% outliers)\n", m.kv_format().c_str(),
              m.quantizer().empty() ? "" : ", quantizer ", m.quantizer().c_str(), m.effective_bits_per_element(),
              100 * m.outlier_fraction());
  std::printf("kv cache     %.1f / %.1f MiB used; largest context that fits now: %lld tokens\n",
              m.kv_bytes_used() / 1048576.0, m.kv_bytes_capacity() / 1048576.0,
              static_cast<long long>(m.max_context_tokens()));
  std::printf("batching     max batch %d, prefill chunk %d; %d sessions\n", m.max_batch(), m.prefill_chunk(),
              m.sessions());
  for (const auto& r : m.ranks()) {
    std::printf("rank %-7d %s: %.1f / %.1f MiB KV\n", r.rank(), r.device().c_str(), r.kv_bytes_used() / 1048576.0,
                r.kv_bytes_capacity() / 1048576.0);
  }
  return 0;
}

int Tokenize(const std::string& text) {
  auto stub = Connect();
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  kvq::v1::TokenizeRequest req;
  req.set_text(text);
  req.set_return_pieces(true);
  kvq::v1::TokenizeResponse resp;
  grpc::Status s = stub->Tokenize(&ctx, req, &resp);
  if (!s.ok()) return Fail(s);
  std::printf("%d tokens\n", resp.token_ids_size());
  for (int i = 0; i < resp.token_ids_size(); ++i) {
    std::printf("%8d  %s\n", resp.token_ids(i), resp.pieces(i).c_str());
  }
  return 0;
}

int Abort(const std::string& id) {
  auto stub = Connect();
  grpc::ClientContext ctx;
  kvq::v1::AbortRequest req;
  req.set_request_id(std::stoull(id));
  kvq::v1::AbortResponse resp;
  grpc::Status s = stub->Abort(&ctx, req, &resp);
  return s.ok() ? 0 : Fail(s);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvqctl [--server=HOST:PORT] generate PROMPT | chat | session create ID FILE | session ask ID QUESTION |\n"
      "       session list|get|delete|save|restore ... | info | tokenize TEXT | abort REQUEST_ID");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  const std::string cmd = args.size() > 1 ? args[1] : "";
  if (cmd == "generate" && args.size() > 2) return Generate(args[2]);
  if (cmd == "chat") return Chat();
  if (cmd == "session") return Session(args);
  if (cmd == "info") return Info();
  if (cmd == "tokenize" && args.size() > 2) return Tokenize(args[2]);
  if (cmd == "abort" && args.size() > 2) return Abort(args[2]);
  std::fprintf(stderr, "%s\n", absl::ProgramUsageMessage().data());
  return 2;
}
