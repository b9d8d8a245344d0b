// The real kvqd binary: health while loading and serving, a Prometheus server scraping /metrics,
// and SIGTERM draining (in-flight streams finish, new ones are refused, exit code 0).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvq/v1/kvq_service.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/server/server_test_util.h"
#include "tests/test_util.h"

namespace kvq::testing {
namespace {

using Clock = std::chrono::steady_clock;

// A child process with its stdout on a pipe; killed (SIGKILL) if still running at destruction.
class Child {
 public:
  explicit Child(const std::vector<std::string>& argv, bool capture_stdout) {
    int fds[2] = {-1, -1};
    if (capture_stdout && pipe(fds) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      if (capture_stdout) {
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
      }
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execv(args[0], args.data());
      _exit(127);
    }
    if (capture_stdout) {
      close(fds[1]);
      out_ = fdopen(fds[0], "r");
    }
  }
  ~Child() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_) std::fclose(out_);
  }
  // The next line of the child's stdout ("" at EOF). Blocks until the child writes it.
  std::string ReadLine() {
    char buf[1024];
    if (out_ == nullptr || std::fgets(buf, sizeof buf, out_) == nullptr) return "";
    return buf;
  }
  void Signal(int sig) { kill(pid_, sig); }
  // Exit code after waiting at most `timeout`, or -1.
  int Wait(std::chrono::seconds timeout) {
    const auto deadline = Clock::now() + timeout;
    int status = 0;
    while (Clock::now() < deadline) {
      // Only a poll works here: there is no portable wait-with-timeout for a child.
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  bool exited_ = false;
};

int FreeLoopbackPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// `kvqd --plan`: the capacity plan without a model file or a GPU (synthetic shape, memory given),
// exit 0; a context that does not fit exits 1; bad flags exit 2 with a message.
TEST(KvqdPlanTest, PrintsThePlanAndExits) {
  const std::string bin = std::string(KVQ_BINARY_DIR) + "/server/kvqd";
  ASSERT_TRUE(std::filesystem::exists(bin)) << bin;
  const std::vector<std::string> base = {bin, "--plan", "--model=synthetic:llama-3-8b", "--kv_format=nuq3-1%",
                                         "--plan_gpus=4", "--plan_gpu_memory=143771MiB"};
  {
    auto argv = base;
    argv.push_back("--plan_context=10000000");
    Child c(argv, /*capture_stdout=*/true);
    std::string all, line;
    while (!(line = c.ReadLine()).empty()) all += line;
    EXPECT_EQ(c.Wait(std::chrono::seconds(30)), 0) << all;
    // sharding/capacity_plan_test.cc has the arithmetic; here, that kvqd prints it.
    EXPECT_NE(all.find("max context  16877824 tokens"), std::string::npos) << all;
    EXPECT_NE(all.find("context      10000000 tokens on 4 rank(s)"), std::string::npos) << all;
  }
  {
    auto argv = base;
    argv.push_back("--plan_context=99000000");
    Child c(argv, /*capture_stdout=*/true);
    while (!c.ReadLine().empty()) {
    }
    EXPECT_EQ(c.Wait(std::chrono::seconds(30)), 1);
  }
  {
    Child c({bin, "--plan", "--model=synthetic:llama-3-8b", "--kv_format=nuq9", "--plan_gpu_memory=80GB"},
            /*capture_stdout=*/true);
    while (!c.ReadLine().empty()) {
    }
    EXPECT_EQ(c.Wait(std::chrono::seconds(30)), 2);
  }
}

class KvqdProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KVQ_REQUIRE_MODEL();
    const std::string bin = std::string(KVQ_BINARY_DIR) + "/server/kvqd";
    ASSERT_TRUE(std::filesystem::exists(bin)) << bin;
    dir_ = std::filesystem::path(::testing::TempDir()) / ("kvqd_test_" + std::to_string(getpid()));
    std::filesystem::create_directories(dir_);
    kvqd_ = std::make_unique<Child>(
        std::vector<std::string>{bin, "--model=" + ModelPath(), "--listen=127.0.0.1:0",
                                 "--metrics_listen=127.0.0.1:0", "--kv_capacity_bytes=67108864",
                                 "--session_dir=" + dir_.string(), "--drain_grace_seconds=20"},
        /*capture_stdout=*/true);
    // "kvqd: listening on port P (metrics port M); loading ..." comes before the model loads.
    const std::string line = kvqd_->ReadLine();
    ASSERT_EQ(std::sscanf(line.c_str(), "kvqd: listening on port %d (metrics port %d)", &port_, &metrics_port_), 2)
        << line;
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials());
    stub_ = kvq::v1::Kvq::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
  }
  void TearDown() override {
    kvqd_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // Follows grpc.health.v1 Watch until `want` (an event, not a poll); false on timeout.
  bool WatchHealthUntil(grpc::health::v1::HealthCheckResponse::ServingStatus want, std::chrono::seconds timeout,
                        std::vector<int>* seen = nullptr) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + timeout);
    grpc::health::v1::HealthCheckRequest req;
    req.set_service("kvq.v1.Kvq");
    auto reader = health_->Watch(&ctx, req);
    grpc::health::v1::HealthCheckResponse resp;
    while (reader->Read(&resp)) {
      if (seen) seen->push_back(resp.status());
      if (resp.status() == want) {
        ctx.TryCancel();
        reader->Finish();
        return true;
      }
    }
    reader->Finish();
    return false;
  }

  std::filesystem::path dir_;
  std::unique_ptr<Child> kvqd_;
  int port_ = 0;
  int metrics_port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kvq::v1::Kvq::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

TEST_F(KvqdProcessTest, PrometheusScrapesKvqd) {
  ASSERT_TRUE(WatchHealthUntil(grpc::health::v1::HealthCheckResponse::SERVING, std::chrono::seconds(60)));
  ASSERT_TRUE(RunGenerate(*stub_, TextRequest("Once upon a time", 6)).status.ok());
  if (!FileExists("/usr/bin/prometheus")) GTEST_SKIP() << "prometheus not installed (scripts/setup.sh)";
  const int prom_port = FreeLoopbackPort();
  const std::string config = (dir_ / "prometheus.yml").string();
  {
    std::ofstream f(config);
    f << "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
      << "scrape_configs:\n  - job_name: kvqd\n    static_configs:\n      - targets: ['127.0.0.1:" << metrics_port_
      << "']\n";
  }
  Child prometheus({"/usr/bin/prometheus", "--config.file=" + config, "--storage.tsdb.path=" + (dir_ / "tsdb").string(),
                    "--web.listen-address=127.0.0.1:" + std::to_string(prom_port), "--log.level=warn"},
                   /*capture_stdout=*/false);
  const std::string api = "http://127.0.0.1:" + std::to_string(prom_port) + "/api/v1/query?query=";
  // Prometheus has no push notification for "scraped": poll its API, bounded.
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  double capacity = -1;
  bool up = false;
  while (Clock::now() < deadline && capacity < 0) {
    const std::string body = HttpGet(api + "kvq_kv_cache_capacity_bytes%7Bjob%3D%22kvqd%22%7D");
    if (!body.empty()) {
      auto j = nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j["status"] == "success" && !j["data"]["result"].empty()) {
        capacity = std::stod(j["data"]["result"][0]["value"][1].get<std::string>());
        const std::string up_body = HttpGet(api + "up%7Bjob%3D%22kvqd%22%7D");
        auto u = nlohmann::json::parse(up_body, nullptr, false);
        up = u.is_object() && !u["data"]["result"].empty() && u["data"]["result"][0]["value"][1] == "1";
        break;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  EXPECT_TRUE(up);
  EXPECT_EQ(capacity, 67108864.0);
  const std::string gen = HttpGet(api + "kvq_generated_tokens_total");
  std::printf("prometheus: kvq_generated_tokens_total -> %s\n", gen.c_str());
  prometheus.Signal(SIGTERM);
  EXPECT_EQ(prometheus.Wait(std::chrono::seconds(20)), 0);
}

TEST_F(KvqdProcessTest, SigtermDrainsInFlightStreamsAndExitsZero) {
  std::vector<int> seen;
  ASSERT_TRUE(WatchHealthUntil(grpc::health::v1::HealthCheckResponse::SERVING, std::chrono::seconds(60), &seen));
  std::printf("health while starting:");
  for (int s : seen) std::printf(" %s", grpc::health::v1::HealthCheckResponse::ServingStatus_Name(s).c_str());
  std::printf("\n");

  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, ChatRequest("Tell me about the moon.", 24));
  kvq::v1::GenerateResponse msg;
  int deltas = 0;
  while (deltas == 0 && reader->Read(&msg)) deltas += msg.has_delta();
  ASSERT_EQ(deltas, 1);
  kvqd_->Signal(SIGTERM);
  ASSERT_TRUE(WatchHealthUntil(grpc::health::v1::HealthCheckResponse::NOT_SERVING, std::chrono::seconds(20)));
  // New work is refused while the old stream finishes.
  StreamResult refused = RunGenerate(*stub_, TextRequest("Hello", 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.status.error_message();
  kvq::v1::Finished fin;
  while (reader->Read(&msg)) {
    if (msg.has_finished()) fin = msg.finished();
  }
  grpc::Status s = reader->Finish();
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_NE(fin.reason(), kvq::v1::FINISH_REASON_CANCELLED);
  EXPECT_EQ(kvqd_->Wait(std::chrono::seconds(30)), 0);
}

// The kvqctl client's sampling flags reach the server: --top_logprobs prints one line per token
// with its alternatives, --repetition_penalty changes a greedy generation, and a bad value comes
// back as the server's INVALID_ARGUMENT message with exit code 1.
TEST_F(KvqdProcessTest, KvqctlSamplingFlags) {
  ASSERT_TRUE(WatchHealthUntil(grpc::health::v1::HealthCheckResponse::SERVING, std::chrono::seconds(60)));
  const std::string ctl = std::string(KVQ_BINARY_DIR) + "/server/kvqctl";
  ASSERT_TRUE(std::filesystem::exists(ctl)) << ctl;
  // kvqctl writes the text to stdout and the log-probabilities and errors to stderr: both here.
  auto run = [&](const std::string& args, int* rc) {
    Child c({"/bin/sh", "-c", ctl + " --server 127.0.0.1:" + std::to_string(port_) + " --stats=false " + args + " 2>&1"},
            /*capture_stdout=*/true);
    std::string all, line;
    while (!(line = c.ReadLine()).empty()) all += line;
    *rc = c.Wait(std::chrono::seconds(60));
    return all;
  };
  int rc = -1;
  const std::string lp = run("--max_tokens 4 --top_logprobs 2 generate Hello", &rc);
  EXPECT_EQ(rc, 0) << lp;
  int token_lines = 0;
  for (size_t at = 0; (at = lp.find("  id ", at)) != std::string::npos; ++at) {
    const std::string line = lp.substr(at, lp.find('\n', at) - at);
    EXPECT_NE(line.find("logprob"), std::string::npos) << line;
    size_t alts = 0;
    for (size_t b = line.find(" | "); b != std::string::npos; b = line.find(" | ", b + 1)) ++alts;
    EXPECT_EQ(alts, 2u) << line;
    ++token_lines;
  }
  EXPECT_EQ(token_lines, 4) << lp;

  const std::string plain = run("--max_tokens 32 generate \"Write a short poem about the sea.\"", &rc);
  EXPECT_EQ(rc, 0) << plain;
  const std::string penalised =
      run("--max_tokens 32 --repetition_penalty 1.3 generate \"Write a short poem about the sea.\"", &rc);
  EXPECT_EQ(rc, 0) << penalised;
  EXPECT_NE(plain, penalised) << "the penalty changed nothing";

  const std::string bad = run("--max_tokens 4 --repetition_penalty 0 generate Hello", &rc);
  EXPECT_EQ(rc, 1) << bad;
  EXPECT_NE(bad.find("repetition_penalty must be > 0"), std::string::npos) << bad;
  const std::string bad_min_p = run("--max_tokens 4 --min_p 1.5 generate Hello", &rc);
  EXPECT_EQ(rc, 1) << bad_min_p;
  EXPECT_NE(bad_min_p.find("min_p"), std::string::npos) << bad_min_p;
}

}  // namespace
}  // namespace kvq::testing
