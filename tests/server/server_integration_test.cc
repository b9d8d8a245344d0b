// kvqd in-process on loopback with the real CPU engine and SmolLM2-135M: streamed output against
// the engine's own greedy output, concurrency, sessions, cancellation, bad input, /metrics.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <future>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kvq/v1/kvq_service.grpc.pb.h"
#include "server/server.h"
#include "sharding/engine.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/server/server_test_util.h"
#include "tests/test_util.h"

namespace kvq::testing {
namespace {

using kvq::v1::GenerateRequest;

// Collects one request run directly on the engine (the reference the stream must reproduce).
class CollectSink : public engine::TokenSink {
 public:
  void OnToken(const engine::TokenEvent& e) override { ids.push_back(e.token); }
  void OnFinish(engine::FinishReason r, const absl::Status& s, const engine::Usage&) override {
    reason = r;
    done.set_value(s);
  }
  std::vector<int32_t> ids;
  engine::FinishReason reason = engine::FinishReason::kError;
  std::promise<absl::Status> done;
};

constexpr int64_t kKvCapacity = int64_t{96} << 20;  // ~4300 fp16 tokens of SmolLM2

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!FileExists(ModelPath())) return;
    server::ServerOptions o;
    o.listen = "127.0.0.1:0";
    o.metrics_listen = "127.0.0.1:0";
    o.engine.model = ModelPath();
    o.engine.max_batch = 16;
    o.engine.prefill_chunk = 128;
    o.engine.kv_capacity_bytes = kKvCapacity;
    o.service.max_batch = 16;
    o.service.prefill_chunk = 128;
    auto s = server::KvqServer::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s).release();
    absl::Status loaded = server_->LoadEngine();
    ASSERT_TRUE(loaded.ok()) << loaded;
    channel_ = grpc::CreateChannel(absl_addr(), grpc::InsecureChannelCredentials());
  }
  static void TearDownTestSuite() {
    channel_.reset();
    delete server_;
    server_ = nullptr;
  }
  static std::string absl_addr() { return "127.0.0.1:" + std::to_string(server_->port()); }

  void SetUp() override {
    KVQ_REQUIRE_MODEL();
    ASSERT_NE(server_, nullptr);
    stub_ = kvq::v1::Kvq::NewStub(channel_);
  }

  engine::Engine& engine() { return *server_->engine(); }

  // Greedy ids straight from the engine.
  std::vector<int32_t> EngineGreedy(std::vector<int32_t> prompt, int max_tokens, const std::string& session = "") {
    auto sink = std::make_shared<CollectSink>();
    engine::GenerateRequest req;
    req.prompt = std::move(prompt);
    req.session_id = session;
    req.sampling.max_tokens = max_tokens;
    req.sink = sink;
    auto fut = sink->done.get_future();
    auto id = engine().Enqueue(std::move(req));
    EXPECT_TRUE(id.ok()) << id.status();
    if (!id.ok()) return {};
    EXPECT_TRUE(fut.get().ok());
    return sink->ids;
  }

  std::vector<int32_t> Tokenize(const std::string& text, bool add_bos) {
    kvq::v1::TokenizeRequest req;
    req.set_text(text);
    req.set_add_bos(add_bos);
    kvq::v1::TokenizeResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = stub_->Tokenize(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return {resp.token_ids().begin(), resp.token_ids().end()};
  }

  // Waits (bounded) for the engine's KV bytes to come back to `want`: cancellation is applied by
  // the scheduler thread between steps and there is no client-visible event for it.
  bool WaitForKvBytes(int64_t want) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      if (engine().Stats().kv_bytes_used == want) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }

  static server::KvqServer* server_;
  static inline std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kvq::v1::Kvq::Stub> stub_;
};

server::KvqServer* ServerTest::server_ = nullptr;

TEST_F(ServerTest, HealthIsServingAndReflectionAnswers) {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  for (const char* service : {"", "kvq.v1.Kvq"}) {
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    grpc::ClientContext ctx;
    ASSERT_TRUE(health->Check(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  kvq::v1::ModelInfo info;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, {}, &info).ok());
  EXPECT_EQ(info.layers(), 30);
  EXPECT_EQ(info.kv_heads(), 3);
  EXPECT_EQ(info.kv_format(), "fp16");
  EXPECT_GT(info.max_context_tokens(), 1000);
  ASSERT_EQ(info.ranks_size(), 1);
  EXPECT_EQ(info.ranks(0).device(), "cpu");
}

TEST_F(ServerTest, StreamedTextEqualsEngineGreedyOutput) {
  GenerateRequest req = ChatRequest("What is the capital of France?", 24);
  StreamResult r = RunGenerate(*stub_, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_TRUE(r.started_first);
  EXPECT_TRUE(r.finished_last);
  EXPECT_GT(r.request_id, 0u);
  // The same prompt tokens straight into the engine.
  kvq::v1::TokenizeRequest treq;
  *treq.mutable_chat() = req.chat();
  kvq::v1::TokenizeResponse tresp;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->Tokenize(&ctx, treq, &tresp).ok());
  const std::vector<int32_t> prompt(tresp.token_ids().begin(), tresp.token_ids().end());
  const std::vector<int32_t> want = EngineGreedy(prompt, 24);
  ASSERT_FALSE(want.empty());
  EXPECT_EQ(r.ids, want);
  EXPECT_EQ(r.text, engine().tokenizer().Decode(want, /*skip_special=*/true));
  EXPECT_EQ(r.finished.usage().prompt_tokens(), static_cast<int64_t>(prompt.size()));
  EXPECT_EQ(r.finished.usage().generated_tokens(), static_cast<int64_t>(want.size()));
  EXPECT_GT(r.finished.usage().kv_bytes(), 0);
  std::printf("greedy: %s\n", r.text.c_str());
}

TEST_F(ServerTest, StopStringIsNeverEmitted) {
  GenerateRequest req = ChatRequest("Count from 1 to 10, separated by commas.", 40);
  StreamResult base = RunGenerate(*stub_, req);
  ASSERT_TRUE(base.status.ok()) << base.status.error_message();
  ASSERT_GE(base.text.size(), 6u) << base.text;
  // Stop on a piece of the greedy text that straddles tokens.
  const std::string stop = base.text.substr(3, 3);
  req.mutable_sampling()->add_stop(stop);
  StreamResult r = RunGenerate(*stub_, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text, base.text.substr(0, base.text.find(stop)));
  EXPECT_EQ(r.finished.reason(), kvq::v1::FINISH_REASON_STOP);
  EXPECT_EQ(r.finished.stop_string(), stop);
}

// Sampling over gRPC: with a seed, the same stream again; asking for log-probabilities returns
// them (one per token, each <= 0, the chosen token among its top alternatives' ids when it is the
// most likely) and does not change the tokens; another seed, other tokens.
TEST_F(ServerTest, SeededSamplingRepeatsAndLogprobsDoNotChangeIt) {
  GenerateRequest req = ChatRequest("Write a short poem about the sea.", 24);
  auto* sp = req.mutable_sampling();
  sp->set_temperature(1.1f);
  sp->set_top_p(0.95f);
  sp->set_seed(20261202);
  sp->set_ignore_eos(true);
  const StreamResult a = RunGenerate(*stub_, req);
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  ASSERT_EQ(a.ids.size(), 24u);
  EXPECT_TRUE(a.logprobs.empty());
  const StreamResult again = RunGenerate(*stub_, req);
  EXPECT_EQ(again.ids, a.ids);
  EXPECT_EQ(again.text, a.text);
  GenerateRequest with_lp = req;
  with_lp.mutable_sampling()->set_logprobs(true);
  with_lp.mutable_sampling()->set_top_logprobs(3);
  const StreamResult b = RunGenerate(*stub_, with_lp);
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_EQ(b.ids, a.ids);
  ASSERT_EQ(b.logprobs.size(), b.ids.size());
  for (size_t i = 0; i < b.ids.size(); ++i) {
    EXPECT_EQ(b.logprobs[i].token_id(), b.ids[i]);
    ASSERT_TRUE(b.logprobs[i].has_logprob());
    EXPECT_LE(b.logprobs[i].logprob(), 0.0f);
    ASSERT_EQ(b.logprobs[i].top_size(), 3);
    EXPECT_GE(b.logprobs[i].top(0).logprob(), b.logprobs[i].logprob());
  }
  GenerateRequest other = req;
  other.mutable_sampling()->set_seed(7);
  const StreamResult c = RunGenerate(*stub_, other);
  ASSERT_TRUE(c.status.ok());
  EXPECT_NE(c.ids, a.ids);
}

TEST_F(ServerTest, SixteenConcurrentStreamsEqualSequentialRuns) {
  std::vector<GenerateRequest> reqs;
  for (int i = 0; i < 16; ++i) {
    reqs.push_back(TextRequest("The number " + std::to_string(i * 7 + 3) + " is", 10));
  }
  std::vector<StreamResult> seq;
  for (const auto& r : reqs) seq.push_back(RunGenerate(*stub_, r));
  std::vector<StreamResult> par(reqs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back([&, i] { par[i] = RunGenerate(*stub_, reqs[i]); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_TRUE(seq[i].status.ok()) << seq[i].status.error_message();
    ASSERT_TRUE(par[i].status.ok()) << par[i].status.error_message();
    EXPECT_EQ(par[i].ids, seq[i].ids) << "stream " << i;
    EXPECT_EQ(par[i].text, seq[i].text) << "stream " << i;
  }
}

TEST_F(ServerTest, SessionAnswerEqualsFullPromptAnswerWithLowerTtft) {
  std::string passage;
  const std::string corpus = ReadFileOrDie(CorpusPath("austen.test.txt"));
  passage = corpus.substr(0, std::min<size_t>(corpus.size(), 3000));
  passage = passage.substr(0, passage.rfind('\n') + 1);  // ends with "\n": a clean token boundary
  const std::string doc = "<|im_start|>system\nAnswer questions about this text.<|im_end|>\n<|im_start|>user\n" + passage;
  const std::string question = "Who is the text about? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n";
  const std::vector<int32_t> doc_ids = Tokenize(doc, true);
  std::vector<int32_t> joined = doc_ids;
  const std::vector<int32_t> q_ids = Tokenize(question, false);
  joined.insert(joined.end(), q_ids.begin(), q_ids.end());
  ASSERT_EQ(Tokenize(doc + question, true), joined) << "the test needs a clean token boundary";

  // Upload in small chunks, some splitting words.
  grpc::ClientContext ctx;
  auto stream = stub_->CreateSession(&ctx);
  int64_t last_prefilled = -1;
  std::thread reader([&] {
    kvq::v1::CreateSessionResponse resp;
    while (stream->Read(&resp)) {
      if (resp.has_progress()) last_prefilled = resp.progress().tokens_prefilled();
      if (resp.has_session()) EXPECT_EQ(resp.session().tokens(), static_cast<int64_t>(doc_ids.size()));
    }
  });
  for (size_t off = 0; off < doc.size(); off += 97) {
    kvq::v1::CreateSessionRequest req;
    if (off == 0) req.set_session_id("austen");
    req.set_text(doc.substr(off, 97));
    ASSERT_TRUE(stream->Write(req));
  }
  stream->WritesDone();
  reader.join();
  grpc::Status s = stream->Finish();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(last_prefilled, static_cast<int64_t>(doc_ids.size()));

  GenerateRequest ask = TextRequest(question, 20);
  ask.set_session_id("austen");
  StreamResult with_session = RunGenerate(*stub_, ask);
  ASSERT_TRUE(with_session.status.ok()) << with_session.status.error_message();
  GenerateRequest full = TextRequest(doc + question, 20);
  StreamResult with_prompt = RunGenerate(*stub_, full);
  ASSERT_TRUE(with_prompt.status.ok()) << with_prompt.status.error_message();

  EXPECT_EQ(with_session.text, with_prompt.text);
  EXPECT_EQ(with_session.ids, with_prompt.ids);
  EXPECT_EQ(with_session.finished.usage().cached_tokens(), static_cast<int64_t>(doc_ids.size()) - 1);
  const double ttft_session = with_session.finished.usage().time_to_first_token_seconds();
  const double ttft_full = with_prompt.finished.usage().time_to_first_token_seconds();
  std::printf("document %zu tokens; TTFT with session %.3f s, with the whole prompt %.3f s\nanswer: %s\n",
              doc_ids.size(), ttft_session, ttft_full, with_session.text.c_str());
  EXPECT_LT(ttft_session * 3, ttft_full);

  // List, save needs --session_dir (off here), delete.
  kvq::v1::ListSessionsResponse list;
  grpc::ClientContext c1;
  ASSERT_TRUE(stub_->ListSessions(&c1, {}, &list).ok());
  ASSERT_EQ(list.sessions_size(), 1);
  EXPECT_EQ(list.sessions(0).session_id(), "austen");
  kvq::v1::SaveSessionRequest save;
  save.set_session_id("austen");
  kvq::v1::SaveSessionResponse saved;
  grpc::ClientContext c2;
  EXPECT_EQ(stub_->SaveSession(&c2, save, &saved).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  kvq::v1::DeleteSessionRequest del;
  del.set_session_id("austen");
  kvq::v1::DeleteSessionResponse deleted;
  grpc::ClientContext c3;
  ASSERT_TRUE(stub_->DeleteSession(&c3, del, &deleted).ok());
  EXPECT_EQ(engine().Stats().sessions, 0);
}

TEST_F(ServerTest, ClientCancellationFreesKv) {
  const int64_t before = engine().Stats().kv_bytes_used;
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, ChatRequest("Tell me a long story about a dragon.", 400));
  kvq::v1::GenerateResponse msg;
  int deltas = 0;
  while (deltas < 3 && reader->Read(&msg)) deltas += msg.has_delta();
  ASSERT_EQ(deltas, 3);
  EXPECT_GT(engine().Stats().kv_bytes_used, before);
  ctx.TryCancel();
  while (reader->Read(&msg)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitForKvBytes(before)) << engine().Stats().kv_bytes_used << " vs " << before;
}

TEST_F(ServerTest, DeadlineMidPrefillStopsWorkAndFreesKv) {
  const int64_t before = engine().Stats().kv_bytes_used;
  const std::string corpus = ReadFileOrDie(CorpusPath("kjv.test.txt"));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  StreamResult r = RunGenerate(*stub_, TextRequest(corpus.substr(0, 8000), 8), &ctx);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << r.status.error_message();
  EXPECT_TRUE(r.ids.empty()) << "the deadline should expire during prefill";
  EXPECT_TRUE(WaitForKvBytes(before)) << engine().Stats().kv_bytes_used << " vs " << before;
}

TEST_F(ServerTest, AbortByRequestId) {
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, ChatRequest("Write a poem about the sea.", 300));
  kvq::v1::GenerateResponse msg;
  ASSERT_TRUE(reader->Read(&msg));
  ASSERT_TRUE(msg.has_started());
  kvq::v1::AbortRequest abort;
  abort.set_request_id(msg.started().request_id());
  kvq::v1::AbortResponse aborted;
  grpc::ClientContext actx;
  ASSERT_TRUE(stub_->Abort(&actx, abort, &aborted).ok());
  kvq::v1::Finished fin;
  while (reader->Read(&msg)) {
    if (msg.has_finished()) fin = msg.finished();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(fin.reason(), kvq::v1::FINISH_REASON_CANCELLED);
  grpc::ClientContext actx2;
  EXPECT_EQ(stub_->Abort(&actx2, abort, &aborted).error_code(), grpc::StatusCode::NOT_FOUND);
}

struct BadInput {
  std::string name;
  GenerateRequest request;
  grpc::StatusCode code;
  std::string message_part;  // what the message must mention
};

std::vector<BadInput> BadInputs() {
  std::vector<BadInput> v;
  auto with = [](auto&& edit) {
    GenerateRequest r = TextRequest("Hello", 8);
    edit(r);
    return r;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  v.push_back({"empty_text", with([](auto& r) { r.set_text(""); }), grpc::StatusCode::INVALID_ARGUMENT, "empty"});
  v.push_back({"no_prompt", with([](auto& r) { r.clear_prompt(); }), grpc::StatusCode::INVALID_ARGUMENT, "empty"});
  v.push_back({"invalid_utf8", with([](auto& r) { r.set_text("caf\xC3(\xFF"); }), grpc::StatusCode::INVALID_ARGUMENT,
               "UTF-8"});
  v.push_back({"beyond_context", with([](auto& r) { r.mutable_sampling()->set_max_tokens(200000); }),
               grpc::StatusCode::RESOURCE_EXHAUSTED, "largest context"});
  v.push_back({"nan_temperature", with([&](auto& r) { r.mutable_sampling()->set_temperature(nan); }),
               grpc::StatusCode::INVALID_ARGUMENT, "temperature"});
  v.push_back({"inf_temperature", with([&](auto& r) { r.mutable_sampling()->set_temperature(inf); }),
               grpc::StatusCode::INVALID_ARGUMENT, "temperature"});
  v.push_back({"negative_temperature", with([](auto& r) { r.mutable_sampling()->set_temperature(-0.5f); }),
               grpc::StatusCode::INVALID_ARGUMENT, "temperature"});
  v.push_back({"top_p_zero", with([](auto& r) { r.mutable_sampling()->set_top_p(0.0f); }),
               grpc::StatusCode::INVALID_ARGUMENT, "top_p"});
  v.push_back({"top_p_above_one", with([](auto& r) { r.mutable_sampling()->set_top_p(1.5f); }),
               grpc::StatusCode::INVALID_ARGUMENT, "top_p"});
  v.push_back({"negative_top_k", with([](auto& r) { r.mutable_sampling()->set_top_k(-1); }),
               grpc::StatusCode::INVALID_ARGUMENT, "top_k"});
  v.push_back({"zero_max_tokens", with([](auto& r) { r.mutable_sampling()->set_max_tokens(0); }),
               grpc::StatusCode::INVALID_ARGUMENT, "max_tokens"});
  v.push_back({"absurd_max_tokens", with([](auto& r) { r.mutable_sampling()->set_max_tokens(2000000000); }),
               grpc::StatusCode::INVALID_ARGUMENT, "max_tokens"});
  v.push_back({"unknown_session", with([](auto& r) { r.set_session_id("no-such-session"); }),
               grpc::StatusCode::NOT_FOUND, "no-such-session"});
  v.push_back({"token_outside_vocab", with([](auto& r) { r.mutable_token_ids()->add_ids(1 << 20); }),
               grpc::StatusCode::INVALID_ARGUMENT, "vocabulary"});
  v.push_back({"negative_token", with([](auto& r) { r.mutable_token_ids()->add_ids(-3); }),
               grpc::StatusCode::INVALID_ARGUMENT, "vocabulary"});
  v.push_back({"empty_stop_string", with([](auto& r) { r.mutable_sampling()->add_stop(""); }),
               grpc::StatusCode::INVALID_ARGUMENT, "stop"});
  v.push_back({"bad_chat_role", with([](auto& r) {
                 auto* m = r.mutable_chat()->add_messages();
                 m->set_role("wizard");
                 m->set_content("hi");
               }),
               grpc::StatusCode::INVALID_ARGUMENT, "role"});
  v.push_back({"oversized_message", with([](auto& r) { r.set_text(std::string(5 << 20, 'a')); }),
               grpc::StatusCode::RESOURCE_EXHAUSTED, "larger than max"});
  return v;
}

TEST_F(ServerTest, BadInputTableWhileAnotherStreamRuns) {
  // A stream that must come out exactly as it does alone.
  const GenerateRequest bystander = ChatRequest("Name three colors.", 32);
  const StreamResult alone = RunGenerate(*stub_, bystander);
  ASSERT_TRUE(alone.status.ok());
  StreamResult during;
  std::thread t([&] { during = RunGenerate(*stub_, bystander); });
  for (const BadInput& c : BadInputs()) {
    SCOPED_TRACE(c.name);
    StreamResult r = RunGenerate(*stub_, c.request);
    EXPECT_EQ(r.status.error_code(), c.code) << r.status.error_message();
    EXPECT_NE(r.status.error_message().find(c.message_part), std::string::npos) << r.status.error_message();
    EXPECT_TRUE(r.ids.empty());
    std::printf("%-22s %-20s %s\n", c.name.c_str(), std::to_string(r.status.error_code()).c_str(),
                r.status.error_message().c_str());
  }
  // Sessions: unknown id, a document that is not UTF-8, a stream without an id.
  kvq::v1::GetSessionRequest get;
  get.set_session_id("missing");
  kvq::v1::Session session;
  grpc::ClientContext gctx;
  EXPECT_EQ(stub_->GetSession(&gctx, get, &session).error_code(), grpc::StatusCode::NOT_FOUND);
  {
    grpc::ClientContext ctx;
    auto stream = stub_->CreateSession(&ctx);
    kvq::v1::CreateSessionRequest req;
    req.set_session_id("bad-doc");
    req.set_text("fine so far \xFF\xFE then not");
    stream->Write(req);
    stream->WritesDone();
    kvq::v1::CreateSessionResponse resp;
    while (stream->Read(&resp)) {
    }
    grpc::Status s = stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_NE(s.error_message().find("UTF-8"), std::string::npos) << s.error_message();
  }
  {
    grpc::ClientContext ctx;
    auto stream = stub_->CreateSession(&ctx);
    kvq::v1::CreateSessionRequest req;
    req.set_text("no id");
    stream->Write(req);
    stream->WritesDone();
    grpc::Status s = stream->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  }
  t.join();
  ASSERT_TRUE(during.status.ok()) << during.status.error_message();
  EXPECT_EQ(during.ids, alone.ids);
  EXPECT_EQ(during.text, alone.text);
  // The failed upload left no session behind.
  const auto sessions = engine().ListSessions();
  EXPECT_TRUE(std::none_of(sessions.begin(), sessions.end(), [](const auto& s) { return s.id == "bad-doc"; }));
}

TEST_F(ServerTest, MetricsScrapePassesPromtool) {
  ASSERT_TRUE(RunGenerate(*stub_, TextRequest("Metrics please", 4)).status.ok());
  ASSERT_EQ(RunGenerate(*stub_, TextRequest("", 4)).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const std::string body = HttpGet("http://127.0.0.1:" + std::to_string(server_->metrics_port()) + "/metrics");
  ASSERT_FALSE(body.empty());
  for (const char* family : {"kvq_requests", "kvq_time_to_first_token_seconds_bucket",
                             "kvq_inter_token_latency_seconds_bucket", "kvq_request_duration_seconds_bucket",
                             "kvq_prompt_tokens_total", "kvq_generated_tokens_total",
                             "kvq_prefill_tokens_per_second", "kvq_kv_cache_used_bytes{rank=\"0\"}",
                             "kvq_kv_cache_capacity_bytes{rank=\"0\"}", "kvq_kv_element_size_bytes",
                             "kvq_kv_outlier_ratio", "kvq_attention_merge_seconds",
                             "kvq_engine_graph_steps_total 0", "kvq_kv_key_outlier_overflow_steps_total 0",
                             "kvq_requests_finished_total{reason=\"length\"}",
                             "kvq_request_errors_total{code=\"INVALID_ARGUMENT\",method=\"Generate\"}"}) {
    EXPECT_NE(body.find(family), std::string::npos) << family;
  }
  const std::string path = ::testing::TempDir() + "/kvq_metrics.txt";
  {
    FILE* f = std::fopen(path.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fwrite(body.data(), 1, body.size(), f);
    std::fclose(f);
  }
  if (!FileExists("/usr/bin/promtool")) GTEST_SKIP() << "promtool not installed";
  const std::string cmd = "/usr/bin/promtool check metrics < " + path + " 2>&1";
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  EXPECT_EQ(pclose(p), 0) << out;
  EXPECT_EQ(out, "") << out;
}

}  // namespace
}  // namespace kvq::testing
