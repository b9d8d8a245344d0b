// The CPU engine with the real SmolLM2: continuous batching gives the same tokens as running
// requests alone, sessions answer like the full prompt without prefilling the document again,
// cancellation frees KV at once, saved sessions restore exactly, and impossible requests are
// refused before anything is queued.
#include <chrono>
#include <condition_variable>
#include <thread>
#include <filesystem>
#include <mutex>

#include "gtest/gtest.h"
#include "sharding/engine.h"
#include "tests/test_util.h"

namespace kvq::engine {
namespace {

class CollectingSink : public TokenSink {
 public:
  void OnPrefillProgress(int64_t done, int64_t total) override {
    std::lock_guard<std::mutex> l(mu_);
    progress_.push_back(done);
    total_ = total;
  }
  void OnToken(const TokenEvent& e) override {
    std::lock_guard<std::mutex> l(mu_);
    tokens_.push_back(e.token);
    if (on_token_) on_token_(tokens_.size());
  }
  void OnFinish(FinishReason r, const absl::Status& s, const Usage& u) override {
    std::lock_guard<std::mutex> l(mu_);
    reason_ = r;
    status_ = s;
    usage_ = u;
    done_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return done_; });
  }
  std::vector<int32_t> tokens() {
    std::lock_guard<std::mutex> l(mu_);
    return tokens_;
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int32_t> tokens_;
  std::vector<int64_t> progress_;
  int64_t total_ = 0;
  FinishReason reason_ = FinishReason::kError;
  absl::Status status_;
  Usage usage_;
  bool done_ = false;
  std::function<void(size_t)> on_token_;
};

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KVQ_REQUIRE_MODEL();
    EngineOptions o;
    o.model = testing::ModelPath();
    o.max_batch = 8;
    o.prefill_chunk = 32;  // several chunks per prompt: exercises chunk/decode interleaving
    o.kv_capacity_bytes = int64_t{256} << 20;
    auto e = Engine::Create(o);
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(*e);
  }

  std::vector<int32_t> Chat(const std::string& text) {
    auto r = engine_->tokenizer().ApplyChatTemplate({{"user", text}}, true);
    EXPECT_TRUE(r.ok());
    return engine_->tokenizer().Encode(*r, true, true);
  }

  // Enqueues a request (not waited for).
  std::shared_ptr<CollectingSink> Submit(std::vector<int32_t> prompt, const SamplingParams& sampling,
                                         const std::string& session = "") {
    auto sink = std::make_shared<CollectingSink>();
    GenerateRequest r;
    r.prompt = std::move(prompt);
    r.session_id = session;
    r.sampling = sampling;
    r.sink = sink;
    auto id = engine_->Enqueue(std::move(r));
    EXPECT_TRUE(id.ok()) << id.status();
    return sink;
  }
  std::shared_ptr<CollectingSink> Run(std::vector<int32_t> prompt, int max_tokens,
                                      const std::string& session = "") {
    SamplingParams sp;
    sp.max_tokens = max_tokens;
    return Submit(std::move(prompt), sp, session);
  }

  std::unique_ptr<Engine> engine_;
};

TEST_F(EngineTest, ConcurrentRequestsGiveTheSameTokensAsSequentialOnes) {
  const std::vector<std::string> prompts = {"Name three colours.", "What is 2+2?",
                                            "Write a sentence about the moon.",
                                            "Who wrote Pride and Prejudice?"};
  std::vector<std::vector<int32_t>> alone;
  for (const auto& p : prompts) {
    auto s = Run(Chat(p), 12);
    s->Wait();
    alone.push_back(s->tokens());
  }
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  for (const auto& p : prompts) sinks.push_back(Run(Chat(p), 12));
  for (size_t i = 0; i < sinks.size(); ++i) {
    sinks[i]->Wait();
    EXPECT_EQ(sinks[i]->tokens(), alone[i]) << prompts[i];
    EXPECT_TRUE(sinks[i]->status_.ok());
  }
  EXPECT_EQ(engine_->Stats().kv_bytes_used, 0);
}

// Sampled requests (temperature > 0, no repetition penalty) draw with the Philox uniform of
// (seed, token index): run again, the same tokens; beside a copy of itself that asks for
// log-probabilities (the row is copied too, the draw must not change), the same tokens; another
// seed, other tokens. (Short prompts: each is prefilled in one chunk of the same step, so the rows
// of one batch see the same arithmetic.)
TEST_F(EngineTest, SampledTokensDependOnTheSeedNotOnLogprobs) {
  auto sampled = [&](const std::string& p, uint64_t seed, bool logprobs) {
    SamplingParams sp;
    sp.max_tokens = 16;
    sp.temperature = 1.2f;
    sp.top_p = 0.95f;
    sp.seed = seed;
    sp.logprobs = logprobs;
    sp.ignore_eos = true;
    return Submit(engine_->tokenizer().Encode(p, true, false), sp);
  };
  const std::string prompt = "The sea at night is";
  std::vector<std::vector<int32_t>> runs;
  for (int rep = 0; rep < 2; ++rep) {
    std::vector<std::shared_ptr<CollectingSink>> batch = {sampled(prompt, 42, false), sampled(prompt, 42, true),
                                                          sampled(prompt, 43, false), sampled("Two plus two", 7, false)};
    for (auto& s : batch) s->Wait();
    ASSERT_EQ(batch[0]->tokens().size(), 16u);
    EXPECT_EQ(batch[1]->tokens(), batch[0]->tokens()) << "with logprobs";
    EXPECT_NE(batch[2]->tokens(), batch[0]->tokens()) << "another seed";
    runs.push_back(batch[0]->tokens());
  }
  EXPECT_EQ(runs[1], runs[0]) << "run again";
  EXPECT_EQ(engine_->Stats().kv_bytes_used, 0);
}

// A repetition penalty (applied by the pass before its pick, on the device in a GPU pass): again
// the same tokens for a seed, with and without logprobs; greedy with a strong penalty repeats
// itself less than greedy without.
TEST_F(EngineTest, RepetitionPenaltyIsSeededAndReducesRepeats) {
  auto run = [&](float temperature, float penalty, bool logprobs) {
    SamplingParams sp;
    sp.max_tokens = 24;
    sp.temperature = temperature;
    sp.repetition_penalty = penalty;
    sp.seed = 99;
    sp.logprobs = logprobs;
    sp.ignore_eos = true;
    auto sink = Submit(engine_->tokenizer().Encode("one two one two one two one two", true, false), sp);
    sink->Wait();
    return sink->tokens();
  };
  const auto a = run(0.9f, 1.3f, false);
  EXPECT_EQ(run(0.9f, 1.3f, false), a);
  EXPECT_EQ(run(0.9f, 1.3f, true), a) << "with logprobs";
  auto repeats = [](const std::vector<int32_t>& t) {
    int n = 0;
    for (size_t i = 1; i < t.size(); ++i) {
      for (size_t j = 0; j < i; ++j) n += t[j] == t[i] ? 1 : 0;
    }
    return n;
  };
  const auto greedy = run(0.0f, 1.0f, false), penalised = run(0.0f, 2.0f, false);
  std::printf("[engine] greedy: %d repeated pairs in 24 tokens; with repetition penalty 2: %d\n", repeats(greedy),
              repeats(penalised));
  EXPECT_LT(repeats(penalised), repeats(greedy));
  EXPECT_EQ(engine_->Stats().kv_bytes_used, 0);
}

TEST_F(EngineTest, PrefillProgressIsReportedPerChunk) {
  auto s = Run(Chat("Tell me about the sea in one sentence."), 2);
  s->Wait();
  ASSERT_GE(s->progress_.size(), 2u);
  EXPECT_EQ(s->progress_.back(), s->total_);
  EXPECT_EQ(s->progress_.front(), 32);
}

TEST_F(EngineTest, SessionAnswerEqualsFullPromptAnswerWithoutPrefillingAgain) {
  const std::string doc =
      "<|im_start|>user\nIt is a truth universally acknowledged, that a single man in possession of "
      "a good fortune, must be in want of a wife. However little known the feelings or views of "
      "such a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
      "minds of the surrounding families.";
  const std::string question = " What must a single man with a fortune want?<|im_end|>\n<|im_start|>assistant\n";
  const auto doc_ids = engine_->tokenizer().Encode(doc, true, true);
  const auto q_ids = engine_->tokenizer().Encode(question, false, true);
  std::vector<int32_t> full = doc_ids;
  full.insert(full.end(), q_ids.begin(), q_ids.end());
  auto direct = Run(full, 10);
  direct->Wait();

  ASSERT_TRUE(engine_->CreateSession("doc").ok());
  // Upload in pieces, as the server's client-streaming upload does.
  const size_t half = doc_ids.size() / 2;
  ASSERT_TRUE(engine_->ExtendSession("doc", {doc_ids.begin(), doc_ids.begin() + half}).ok());
  auto info = engine_->ExtendSession("doc", {doc_ids.begin() + half, doc_ids.end()});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->tokens, static_cast<int64_t>(doc_ids.size()));
  auto via = Run(q_ids, 10, "doc");
  via->Wait();
  EXPECT_EQ(via->tokens(), direct->tokens());
  // Only the question (plus the session's pending last token) was prefilled.
  EXPECT_EQ(via->usage_.cached_tokens, static_cast<int64_t>(doc_ids.size()) - 1);
  EXPECT_EQ(via->total_, static_cast<int64_t>(q_ids.size()) + 1);
  // Asking twice gives the same answer; the session is unchanged.
  auto again = Run(q_ids, 10, "doc");
  again->Wait();
  EXPECT_EQ(again->tokens(), direct->tokens());
  EXPECT_EQ(engine_->GetSession("doc")->tokens, static_cast<int64_t>(doc_ids.size()));
}

// A repetition penalty covers the whole context: a question asked through a session is penalised
// for the session's tokens as a request carrying the full prompt is (the engine seeds a request's
// history from the session's tokens and its prompt).
TEST_F(EngineTest, RepetitionPenaltyCoversTheSessionsTokens) {
  const auto doc_ids = engine_->tokenizer().Encode(
      "<|im_start|>user\nThe lighthouse keeper counted the ships: one ship, two ships, three ships, four "
      "ships, five ships.",
      true, true);
  const auto q_ids = engine_->tokenizer().Encode(
      " Count the ships again.<|im_end|>\n<|im_start|>assistant\n", false, true);
  std::vector<int32_t> full = doc_ids;
  full.insert(full.end(), q_ids.begin(), q_ids.end());
  auto run = [&](const std::vector<int32_t>& prompt, float penalty, const std::string& session) {
    SamplingParams sp;
    sp.max_tokens = 12;
    sp.repetition_penalty = penalty;
    sp.ignore_eos = true;
    auto sink = Submit(prompt, sp, session);
    sink->Wait();
    return sink->tokens();
  };
  const auto plain = run(full, 1.0f, ""), direct = run(full, 1.8f, "");
  EXPECT_NE(direct, plain) << "the penalty should change this answer";
  ASSERT_TRUE(engine_->CreateSession("ships").ok());
  ASSERT_TRUE(engine_->ExtendSession("ships", doc_ids).ok());
  EXPECT_EQ(run(q_ids, 1.8f, "ships"), direct);
  EXPECT_EQ(run(q_ids, 1.0f, "ships"), plain);
}

TEST_F(EngineTest, SavedSessionRestoresAndAnswersIdentically) {
  const auto ids = Chat("Remember the word 'lighthouse'. What word should you remember?");
  ASSERT_TRUE(engine_->CreateSession("s").ok());
  ASSERT_TRUE(engine_->ExtendSession("s", {ids.begin(), ids.end() - 1}).ok());
  const std::string path = std::filesystem::temp_directory_path() / "kvq_engine_test_session.kvqs";
  ASSERT_TRUE(engine_->SaveSession("s", path).ok());
  auto a = Run({ids.back()}, 8, "s");
  a->Wait();
  auto restored = engine_->LoadSession("r", path);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto b = Run({ids.back()}, 8, "r");
  b->Wait();
  EXPECT_EQ(a->tokens(), b->tokens());
  EXPECT_EQ(engine_->LoadSession("r", path).status().code(), absl::StatusCode::kAlreadyExists);
  std::filesystem::remove(path);
}

TEST_F(EngineTest, CancellationFreesKvAtOnce) {
  const int64_t before = engine_->Stats().kv_bytes_used;
  auto sink = std::make_shared<CollectingSink>();
  uint64_t id = 0;
  std::mutex m;
  sink->on_token_ = [&](size_t n) {
    if (n == 3) {
      std::lock_guard<std::mutex> l(m);
      engine_->Cancel(id);
    }
  };
  GenerateRequest r;
  r.prompt = Chat("Count from one to one hundred.");
  r.sampling.max_tokens = 500;
  r.sink = sink;
  {
    std::lock_guard<std::mutex> l(m);
    id = *engine_->Enqueue(std::move(r));
  }
  sink->Wait();
  EXPECT_EQ(sink->reason_, FinishReason::kCancelled);
  EXPECT_LT(sink->tokens().size(), 500u);
  EXPECT_EQ(engine_->Stats().kv_bytes_used, before);
}

TEST_F(EngineTest, BadRequestsAreRefusedWithClearErrors) {
  auto sink = std::make_shared<CollectingSink>();
  auto enqueue = [&](GenerateRequest r) {
    r.sink = sink;
    return engine_->Enqueue(std::move(r)).status();
  };
  GenerateRequest empty;
  EXPECT_EQ(enqueue(empty).code(), absl::StatusCode::kInvalidArgument);
  GenerateRequest oov;
  oov.prompt = {1, 49152};
  absl::Status s = enqueue(oov);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("outside the vocabulary"), std::string::npos);
  GenerateRequest hot;
  hot.prompt = {1};
  hot.sampling.temperature = std::nanf("");
  EXPECT_EQ(enqueue(hot).code(), absl::StatusCode::kInvalidArgument);
  GenerateRequest huge;
  huge.prompt = {1};
  huge.sampling.max_tokens = 10000000;  // 10M tokens of fp16 KV do not fit in 256 MiB
  s = enqueue(huge);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("largest context that fits"), std::string::npos) << s;
  GenerateRequest nosession;
  nosession.prompt = {1};
  nosession.session_id = "nope";
  EXPECT_EQ(enqueue(nosession).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_->Stats().waiting, 0);
}

TEST(EngineQuantizedTest, Int4PerTokenKvGeneratesAndAccountsFewerBytes) {
  KVQ_REQUIRE_MODEL();
  EngineOptions o;
  o.model = testing::ModelPath();
  o.kv_format = "int4";  // needs no calibration file
  auto e = Engine::Create(o);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)->kv_format(), "int4");
  EXPECT_LT((*e)->Stats().effective_bits_per_element, 5.0);
  auto sink = std::make_shared<CollectingSink>();
  GenerateRequest r;
  auto text = (*e)->tokenizer().ApplyChatTemplate({{"user", "What is the capital of France?"}}, true);
  r.prompt = (*e)->tokenizer().Encode(*text, true, true);
  r.sampling.max_tokens = 8;
  r.sampling.ignore_eos = true;
  r.sink = sink;
  ASSERT_TRUE((*e)->Enqueue(std::move(r)).ok());
  sink->Wait();
  EXPECT_TRUE(sink->status_.ok()) << sink->status_;
  EXPECT_EQ(sink->tokens().size(), 8u);
  EXPECT_GT(sink->usage_.kv_bytes, 0);
}

}  // namespace
}  // namespace kvq::engine

namespace kvq::engine {
namespace {

std::unique_ptr<Engine> SmallEngine(int64_t capacity_bytes) {
  EngineOptions o;
  o.model = testing::ModelPath();
  o.kv_capacity_bytes = capacity_bytes;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

// fp16 KV of SmolLM2: 2 * 30 layers * 192 * 2 bytes per token.
constexpr int64_t kFp16BytesPerToken = 23040;

TEST(EngineSessionsTest, IdleSessionsAreEvictedWhenARequestNeedsTheirMemory) {
  KVQ_REQUIRE_MODEL();
  auto engine = SmallEngine(300 * kFp16BytesPerToken);
  ASSERT_NE(engine, nullptr);
  std::vector<int32_t> doc(200);
  for (size_t i = 0; i < doc.size(); ++i) doc[i] = 100 + static_cast<int32_t>(i);
  ASSERT_TRUE(engine->CreateSession("old").ok());
  ASSERT_TRUE(engine->ExtendSession("old", doc).ok());
  EXPECT_GT(engine->Stats().kv_bytes_used, 190 * kFp16BytesPerToken);
  // 150 prompt tokens + 50 generated do not fit next to the idle session: it is evicted.
  auto sink = std::make_shared<CollectingSink>();
  GenerateRequest r;
  r.prompt.assign(doc.begin(), doc.begin() + 150);
  r.sampling.max_tokens = 50;
  r.sampling.ignore_eos = true;
  r.sink = sink;
  ASSERT_TRUE(engine->Enqueue(std::move(r)).ok());
  sink->Wait();
  EXPECT_TRUE(sink->status_.ok()) << sink->status_;
  EXPECT_EQ(engine->GetSession("old").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine->Stats().kv_bytes_used, 0);
}

TEST(EngineSessionsTest, SessionsExpireAfterTheirTimeToLive) {
  KVQ_REQUIRE_MODEL();
  auto engine = SmallEngine(int64_t{64} << 20);
  ASSERT_NE(engine, nullptr);
  ASSERT_TRUE(engine->CreateSession("short", /*ttl_seconds=*/1).ok());
  ASSERT_TRUE(engine->CreateSession("forever", /*ttl_seconds=*/0).ok());
  ASSERT_TRUE(engine->ExtendSession("short", {1, 2, 3, 4}).ok());
  // Expiry is time-based by definition: poll (bounded) until the scheduler's sweep removes it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (engine->GetSession("short").ok() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(engine->GetSession("short").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(engine->GetSession("forever").ok());
}

}  // namespace
}  // namespace kvq::engine
