// The engine on the GPU against the CPU engine, on the real SmolLM2 (runs on a machine with a CUDA
// device; elsewhere every test skips and says why): it batches, serves sessions (saved on the GPU,
// loaded on the CPU), and its block pool returns to empty after thousands of requests, with the
// GPU's free memory flat. The forward pass and KV cache alone: gpu_forward_test.cc.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "model/tokenizer.h"
#include "sharding/engine.h"
#include "tests/test_util.h"

#if KVQ_HAVE_CUDA
#include <cuda_runtime.h>

#include "tests/sharding/gpu_test_util.h"
#endif

namespace kvq::sharding {
namespace {

#if KVQ_HAVE_CUDA

using gpu_test::BookTokens;
using gpu_test::HaveGpu;
using gpu_test::QuantizerFor;
using gpu_test::SamePrefix;
using gpu_test::Tok;

class Sink : public engine::TokenSink {
 public:
  void OnToken(const engine::TokenEvent& e) override {
    std::lock_guard<std::mutex> l(mu);
    tokens.push_back(e.token);
  }
  void OnFinish(engine::FinishReason r, const absl::Status& s, const engine::Usage&) override {
    std::lock_guard<std::mutex> l(mu);
    reason = r;
    status = s;
    done = true;
    cv.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return done; });
  }
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> tokens;
  engine::FinishReason reason = engine::FinishReason::kError;
  absl::Status status;
  bool done = false;
};

std::shared_ptr<Sink> Submit(engine::Engine& e, std::vector<int32_t> prompt, int max_tokens,
                             const std::string& session = "") {
  auto s = std::make_shared<Sink>();
  engine::GenerateRequest r;
  r.prompt = std::move(prompt);
  r.session_id = session;
  r.sampling.max_tokens = max_tokens;
  r.sampling.ignore_eos = true;
  r.sink = s;
  auto id = e.Enqueue(std::move(r));
  EXPECT_TRUE(id.ok()) << id.status();
  if (!id.ok()) s->done = true;
  return s;
}

engine::EngineOptions Options(const std::string& device, const std::string& fmt = "nuq3-1%") {
  engine::EngineOptions o;
  o.model = testing::ModelPath();
  o.device = device;
  o.weights_dtype = "f32";
  o.kv_format = fmt;
  o.quantizer = QuantizerFor(fmt);
  o.max_batch = 32;
  o.prefill_chunk = 128;
  o.kv_capacity_bytes = int64_t{512} << 20;
  return o;
}

// Continuous batching on the GPU (fp16 KV, f32 weights) gives the CPU engine's tokens, prompt by
// prompt, with long prompts prefilled in chunks between decode steps. A quantized (nuq3-1%)
// session on the GPU answers like the full prompt on the same GPU, survives save and load into a
// second GPU engine unchanged, and loads into the CPU engine (the same file format).
TEST(GpuEngineTest, BatchesSessionsAndSavedSessionsMatchTheCpuEngine) {
  KVQ_REQUIRE_GPU();
  auto ge = engine::Engine::Create(Options("cuda", "fp16"));
  ASSERT_TRUE(ge.ok()) << ge.status();
  auto ce = engine::Engine::Create(Options("cpu", "fp16"));
  ASSERT_TRUE(ce.ok()) << ce.status();
  engine::Engine& gpu = **ge;
  engine::Engine& cpu = **ce;
  std::vector<std::vector<int32_t>> prompts;
  for (const char* p : {"Name three colours.", "What is 2+2?", "Write a sentence about the moon.",
                        "Who wrote Pride and Prejudice?", "Describe a cat in one line."}) {
    prompts.push_back(Tok().Encode(*Tok().ApplyChatTemplate({{"user", p}}, true), true, true));
  }
  prompts.push_back(BookTokens(700));  // several prefill chunks interleaved with decode steps
  std::vector<std::shared_ptr<Sink>> gs, cs;
  for (const auto& p : prompts) gs.push_back(Submit(gpu, p, 16));
  for (const auto& p : prompts) {
    cs.push_back(Submit(cpu, p, 16));
    cs.back()->Wait();  // one at a time on the CPU: the reference
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    gs[i]->Wait();
    EXPECT_TRUE(gs[i]->status.ok()) << gs[i]->status;
    EXPECT_EQ(gs[i]->tokens, cs[i]->tokens) << "prompt " << i;
  }
  EXPECT_EQ(gpu.Stats().kv_bytes_used, 0);

  auto qe = engine::Engine::Create(Options("cuda"));
  ASSERT_TRUE(qe.ok()) << qe.status();
  engine::Engine& q = **qe;
  const std::vector<int32_t> doc = BookTokens(600);
  ASSERT_TRUE(q.CreateSession("doc").ok());
  ASSERT_TRUE(q.ExtendSession("doc", doc).ok());
  const auto question = Tok().Encode("\nWho is speaking here?", false, false);
  auto s_ans = Submit(q, question, 12, "doc");
  s_ans->Wait();
  std::vector<int32_t> full = doc;
  full.insert(full.end(), question.begin(), question.end());
  auto f_ans = Submit(q, full, 12);
  f_ans->Wait();
  std::printf("[gpu-engine] nuq3-1%% session answer vs full prompt: %d/12 tokens agree\n",
              SamePrefix(s_ans->tokens, f_ans->tokens));
  EXPECT_EQ(s_ans->tokens, f_ans->tokens);
  const std::string path = ::testing::TempDir() + "/gpu_session.kvqs";
  ASSERT_TRUE(q.SaveSession("doc", path).ok());
  auto q2 = engine::Engine::Create(Options("cuda"));
  ASSERT_TRUE(q2.ok());
  auto loaded = (*q2)->LoadSession("doc", path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto l_ans = Submit(**q2, question, 12, "doc");
  l_ans->Wait();
  EXPECT_EQ(l_ans->tokens, s_ans->tokens);
  auto cq = engine::Engine::Create(Options("cpu"));
  ASSERT_TRUE(cq.ok());
  auto cl = (*cq)->LoadSession("doc", path);
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->tokens, static_cast<int64_t>(doc.size()));
  auto c_ans = Submit(**cq, question, 12, "doc");
  c_ans->Wait();
  std::printf("[gpu-engine] the GPU-saved session on the CPU engine: %d/12 tokens agree with the GPU's answer\n",
              SamePrefix(c_ans->tokens, s_ans->tokens));
  ASSERT_TRUE(q.DeleteSession("doc").ok());
  EXPECT_EQ(q.Stats().kv_bytes_used, 0);
}

TEST(GpuEngineTest, MemoryStaysFlatOverManyRequestsOfMixedLengths) {
  KVQ_REQUIRE_GPU();
  auto ge = engine::Engine::Create(Options("cuda"));
  ASSERT_TRUE(ge.ok()) << ge.status();
  engine::Engine& gpu = **ge;
  const char* env = std::getenv("KVQ_GPU_REQUESTS");
  const int total = env ? std::atoi(env) : 10000;
  const std::vector<int32_t> book = BookTokens(1500);
  std::mt19937 rng(11);
  size_t free_before = 0, free_after = 0, tot = 0;
  // Warm-up wave sizes every step buffer, then memory must not move.
  auto wave = [&](int n) {
    std::vector<std::shared_ptr<Sink>> sinks;
    for (int i = 0; i < n; ++i) {
      // Mostly short prompts, every tenth a long one (several prefill chunks).
      const int len = 1 + static_cast<int>(rng() % (i % 10 == 0 ? 1200 : 200));
      const int off = static_cast<int>(rng() % (book.size() - len));
      std::vector<int32_t> p(book.begin() + off, book.begin() + off + len);
      sinks.push_back(Submit(gpu, p, 1 + static_cast<int>(rng() % 8)));
    }
    int ok = 0;
    for (auto& s : sinks) {
      s->Wait();
      ok += s->status.ok();
    }
    return ok;
  };
  // Once idle, the engine drops its captured CUDA graphs; memory is compared when idle.
  auto idle_free = [&]() {  // free memory once it has not moved for 0.5 s (at most 5 s)
    size_t f = 0, last = 0;
    int stable = 0;
    for (int i = 0; i < 100 && stable < 10; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      EXPECT_EQ(cudaMemGetInfo(&f, &tot), cudaSuccess);
      stable = f == last ? stable + 1 : 0;
      last = f;
    }
    return f;
  };
  ASSERT_EQ(wave(64), 64);
  free_before = idle_free();
  const auto t0 = std::chrono::steady_clock::now();
  int ok = 0;
  size_t free_mid = 0;
  for (int done = 0; done < total; done += 500) {
    ok += wave(std::min(500, total - done));
    if (done < total / 2 && done + 500 >= total / 2) free_mid = idle_free();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  free_after = idle_free();
  const auto st = gpu.Stats();
  std::printf("[gpu-mem] %d requests (%d ok) in %.1f s: engine KV used %lld bytes after, GPU free memory "
              "%zu -> %zu (half-way) -> %zu bytes\n", total, ok, secs, static_cast<long long>(st.kv_bytes_used),
              free_before, free_mid, free_after);
  EXPECT_EQ(ok, total);
  EXPECT_EQ(st.kv_bytes_used, 0);
  // No growth with the number of requests. What the GPU's free memory may still lose is the CUDA
  // driver's: it keeps 2 MiB pages it used for decode graphs of batch shapes the warm-up wave had
  // not seen (up to DecodeGraphs::kMax graphs live between idle points, destroyed when idle). That
  // is bounded, not proportional to the requests: on H200s, 2026-12-02, 0-8 MiB over a run, at most
  // one page in its second half, the same with builds before and after the engine's own warm-up
  // (10,000 requests: -2, -2, -6 MiB, second half 0; 4,000: -8 / -6 MiB, second half -2). A leak
  // of 2 KB per request would take 20 MB over 10,000. The KV pool's own accounting is exact (above).
  const int64_t first_half = static_cast<int64_t>(free_before) - static_cast<int64_t>(free_mid);
  const int64_t second_half = static_cast<int64_t>(free_mid) - static_cast<int64_t>(free_after);
  EXPECT_LE(second_half, int64_t{4} << 20) << "first half " << first_half;
  EXPECT_LE(first_half + second_half, int64_t{16} << 20);
}

#else

TEST(GpuEngineTest, Skipped) { GTEST_SKIP() << "built without CUDA"; }

#endif

}  // namespace
}  // namespace kvq::sharding
