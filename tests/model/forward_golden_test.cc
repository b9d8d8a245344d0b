// The CPU forward pass against golden outputs of an independent implementation: Hugging Face
// transformers 5.x in fp32 on the same GGUF file (tools/make_golden.py wrote the fixtures).
#include <algorithm>
#include <cmath>
#include <memory>

#include "gtest/gtest.h"
#include "model/forward.h"
#include "model/sampling.h"
#include "model/weights.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace kvq::model {
namespace {

// Tolerances, all relative to the largest |logit| at the position (logits of this model reach
// ~20-30; relative-to-max is the scale that decides sampling):
//  - vs transformers fp32: 1e-3. Both sides dequantize the same Q4_1/Q8_0 blocks exactly; the
//    remaining difference is fp32 summation order in GEMMs (OpenBLAS vs PyTorch/MKL) over 30
//    layers, measured ~1e-5 relative.
//  - chunked vs one-shot prefill, batched vs alone (fp32 KV): 1e-4, summation order only.
constexpr double kGoldenTol = 1e-3;
constexpr double kSelfTol = 1e-4;

class GoldenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!testing::FileExists(testing::ModelPath())) return;
    auto w = LoadGgufWeights(testing::ModelPath());
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = new LlamaWeights(std::move(*w));
    golden_ = new nlohmann::json(
        nlohmann::json::parse(testing::ReadFileOrDie(testing::FixturePath("golden/golden.json"))));
    full_ = new std::string(testing::ReadFileOrDie(testing::FixturePath("golden/golden_full.bin")));
  }
  static void TearDownTestSuite() {
    delete weights_;
    delete golden_;
    delete full_;
  }
  void SetUp() override { KVQ_REQUIRE_MODEL(); }

  std::vector<float> AllLogits(const std::vector<int32_t>& ids, bool fp32_kv = true) {
    Forward fwd(*weights_);
    DenseKvCache cache(weights_->config, fp32_kv);
    ForwardItem item{&cache, ids, true};
    std::vector<float> logits;
    EXPECT_TRUE(fwd.Run(absl::MakeSpan(&item, 1), {}, &logits).ok());
    return logits;
  }

  static LlamaWeights* weights_;
  static nlohmann::json* golden_;
  static std::string* full_;
};
LlamaWeights* GoldenTest::weights_ = nullptr;
nlohmann::json* GoldenTest::golden_ = nullptr;
std::string* GoldenTest::full_ = nullptr;

double MaxRelDiff(const float* a, const float* b, int n) {
  double max_abs = 0.0, max_diff = 0.0;
  for (int i = 0; i < n; ++i) {
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(b[i])));
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  return max_diff / max_abs;
}

TEST_F(GoldenTest, FullLogitsMatchTransformersAtFirstAndLastPosition) {
  const int vocab = weights_->config.vocab_size;
  const float* full = reinterpret_cast<const float*>(full_->data());
  ASSERT_EQ(full_->size(), golden_->at("cases").size() * 2 * vocab * sizeof(float));
  int k = 0;
  double worst = 0.0;
  for (const auto& c : golden_->at("cases")) {
    const std::vector<int32_t> ids = c.at("ids").get<std::vector<int32_t>>();
    const std::vector<float> logits = AllLogits(ids);
    for (size_t pos : {size_t{0}, ids.size() - 1}) {
      const double rel = MaxRelDiff(logits.data() + pos * vocab, full + static_cast<size_t>(k) * vocab, vocab);
      worst = std::max(worst, rel);
      EXPECT_LE(rel, kGoldenTol) << "case '" << c.at("text").get<std::string>().substr(0, 30)
                                 << "' position " << pos;
      ++k;
    }
  }
  std::printf("worst max|diff|/max|logit| vs transformers fp32 (full vocab): %.3g\n", worst);
}

TEST_F(GoldenTest, TopLogitsMatchTransformersAtEveryPosition) {
  const int vocab = weights_->config.vocab_size;
  double worst = 0.0;
  for (const auto& c : golden_->at("cases")) {
    const std::vector<int32_t> ids = c.at("ids").get<std::vector<int32_t>>();
    const std::vector<float> logits = AllLogits(ids);
    const auto& top_ids = c.at("top_ids");
    const auto& top_vals = c.at("top_logits");
    const auto& max_abs = c.at("max_abs_logit");
    for (size_t pos = 0; pos < ids.size(); ++pos) {
      const float* row = logits.data() + pos * vocab;
      EXPECT_EQ(Argmax(row, vocab), top_ids[pos][0].get<int32_t>()) << "position " << pos;
      for (size_t r = 0; r < top_ids[pos].size(); ++r) {
        const double rel = std::fabs(row[top_ids[pos][r].get<int>()] - top_vals[pos][r].get<double>()) /
                           max_abs[pos].get<double>();
        worst = std::max(worst, rel);
        ASSERT_LE(rel, kGoldenTol) << "position " << pos << " rank " << r;
      }
    }
  }
  std::printf("worst relative error on top-20 logits, all positions: %.3g\n", worst);
}

// Greedy decoding through the cache, one token per step, as the engine runs it.
std::vector<int32_t> Greedy(const LlamaWeights& w, const std::vector<int32_t>& ids, int n,
                            bool fp32_kv) {
  Forward fwd(w);
  DenseKvCache cache(w.config, fp32_kv);
  std::vector<int32_t> out, step = ids;
  std::vector<float> logits;
  for (int i = 0; i < n; ++i) {
    ForwardItem item{&cache, step, false};
    EXPECT_TRUE(fwd.Run(absl::MakeSpan(&item, 1), {}, &logits).ok());
    const int32_t t = Argmax(logits.data(), w.config.vocab_size);
    out.push_back(t);
    step.assign(1, t);
  }
  return out;
}

TEST_F(GoldenTest, GreedyContinuationsAreIdenticalWithFp32AndFp16Kv) {
  for (const auto& c : golden_->at("cases")) {
    const std::vector<int32_t> ids = c.at("ids").get<std::vector<int32_t>>();
    const std::vector<int32_t> want = c.at("greedy").get<std::vector<int32_t>>();
    EXPECT_EQ(Greedy(*weights_, ids, static_cast<int>(want.size()), /*fp32_kv=*/true), want)
        << c.at("text").get<std::string>();
    EXPECT_EQ(Greedy(*weights_, ids, static_cast<int>(want.size()), /*fp32_kv=*/false), want)
        << c.at("text").get<std::string>();
  }
}

TEST_F(GoldenTest, ChunkedPrefillAndBatchingMatchOneShot) {
  const int vocab = weights_->config.vocab_size;
  const auto& cases = golden_->at("cases");
  const std::vector<int32_t> a = cases[1].at("ids").get<std::vector<int32_t>>();
  const std::vector<int32_t> b = cases[4].at("ids").get<std::vector<int32_t>>();
  const std::vector<float> ref_a = AllLogits(a), ref_b = AllLogits(b);
  Forward fwd(*weights_);
  // a in chunks of 7 (113 would exceed the prompt), b as one chunk, in the same batches.
  DenseKvCache ca(weights_->config, true), cb(weights_->config, true);
  std::vector<float> logits;
  size_t done = 0;
  bool b_done = false;
  while (done < a.size()) {
    const size_t n = std::min<size_t>(7, a.size() - done);
    std::vector<ForwardItem> items;
    items.push_back({&ca, absl::Span<const int32_t>(a.data() + done, n), true});
    if (!b_done) items.push_back({&cb, b, true});
    ASSERT_TRUE(fwd.Run(absl::MakeSpan(items), {}, &logits).ok());
    for (size_t j = 0; j < n; ++j) {
      EXPECT_LE(MaxRelDiff(logits.data() + j * vocab, ref_a.data() + (done + j) * vocab, vocab), kSelfTol)
          << "chunked position " << done + j;
    }
    if (!b_done) {
      for (size_t j = 0; j < b.size(); ++j) {
        EXPECT_LE(MaxRelDiff(logits.data() + (n + j) * vocab, ref_b.data() + j * vocab, vocab), kSelfTol)
            << "batched position " << j;
      }
      b_done = true;
    }
    done += n;
  }
}

TEST_F(GoldenTest, ThroughCacheEvaluationEqualsServingPathForDenseKv) {
  // With fp32 storage, attending through the cache equals full-precision in-chunk attention.
  const int vocab = weights_->config.vocab_size;
  const std::vector<int32_t> ids = golden_->at("cases")[2].at("ids").get<std::vector<int32_t>>();
  const std::vector<float> ref = AllLogits(ids);
  Forward fwd(*weights_);
  DenseKvCache cache(weights_->config, true);
  ForwardItem item{&cache, ids, true};
  std::vector<float> logits;
  ForwardOptions o;
  o.chunk_through_cache = true;
  ASSERT_TRUE(fwd.Run(absl::MakeSpan(&item, 1), o, &logits).ok());
  for (size_t p = 0; p < ids.size(); ++p) {
    EXPECT_LE(MaxRelDiff(logits.data() + p * vocab, ref.data() + p * vocab, vocab), kSelfTol);
  }
}

TEST_F(GoldenTest, TokenIdsOutsideTheVocabularyAreRejectedAndNothingIsCommitted) {
  Forward fwd(*weights_);
  DenseKvCache cache(weights_->config, true);
  std::vector<int32_t> bad = {1, 2, weights_->config.vocab_size};
  ForwardItem item{&cache, bad, false};
  std::vector<float> logits;
  absl::Status s = fwd.Run(absl::MakeSpan(&item, 1), {}, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("outside the vocabulary"), std::string::npos) << s;
  EXPECT_EQ(cache.length(), 0);
}

// The pass's own token choice (ForwardItem::Output::kGreedy / kSample, the serving path's), with
// and without a repetition penalty: each token is the rule applied to the row the same step
// returns with kLogits, penalised first when asked; rows that also come back (also_logits) are the
// logits before the penalty, to the bit.
TEST_F(GoldenTest, TokensPickedByThePassFollowTheirRulesOnThePenalisedRow) {
  const int vocab = weights_->config.vocab_size;
  const auto& cases = golden_->at("cases");
  const std::vector<int32_t> a = cases[1].at("ids").get<std::vector<int32_t>>();
  const std::vector<int32_t> b = cases[4].at("ids").get<std::vector<int32_t>>();
  Forward fwd(*weights_);
  const std::vector<std::vector<int32_t>> prompts = {a, b, a};
  std::vector<std::unique_ptr<DenseKvCache>> ref, dev;
  for (size_t i = 0; i < prompts.size(); ++i) {
    ref.push_back(std::make_unique<DenseKvCache>(weights_->config, true));
    dev.push_back(std::make_unique<DenseKvCache>(weights_->config, true));
  }
  // Penalised ids: each prompt's distinct tokens.
  std::vector<std::vector<int32_t>> seen(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (int32_t t : prompts[i]) {
      if (std::find(seen[i].begin(), seen[i].end(), t) == seen[i].end()) seen[i].push_back(t);
    }
  }
  std::vector<ForwardItem> ri, di;
  for (size_t i = 0; i < prompts.size(); ++i) {
    ri.push_back({ref[i].get(), prompts[i], false});
    di.push_back({dev[i].get(), prompts[i], false});
  }
  // Row 0: greedy with a penalty of 1.5 and its row back; row 1: sampled with a penalty of 1.3
  // and its row back; row 2: greedy, no penalty.
  di[0].output = ForwardItem::Output::kGreedy;
  di[0].sample.repetition_penalty = 1.5f;
  di[0].sample.penalized = seen[0];
  di[0].also_logits = true;
  di[1].output = ForwardItem::Output::kSample;
  di[1].sample = {0.9f, 0, 0.95f, 0.0f, 42, 3, 1.3f, seen[1]};
  di[1].also_logits = true;
  di[2].output = ForwardItem::Output::kGreedy;
  std::vector<float> lr, ld;
  ASSERT_TRUE(fwd.Run(absl::MakeSpan(ri), {}, &lr).ok());
  ASSERT_TRUE(fwd.Run(absl::MakeSpan(di), {}, &ld).ok());
  int changed = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const float* row = lr.data() + i * vocab;
    std::vector<float> pen(row, row + vocab);
    ApplyRepetitionPenalty(pen.data(), vocab, di[i].sample.penalized, di[i].sample.repetition_penalty);
    const ForwardItem::Sample& sp = di[i].sample;
    const int32_t want = di[i].output == ForwardItem::Output::kSample
                             ? SampleByDeviceRule(pen.data(), vocab, sp.temperature, sp.top_k, sp.top_p, sp.min_p,
                                                  sp.seed, sp.step)
                             : Argmax(pen.data(), vocab);
    EXPECT_EQ(di[i].token, want) << "row " << i;
    changed += want != Argmax(row, vocab);
    if (di[i].also_logits) {
      EXPECT_TRUE(std::equal(row, row + vocab, ld.data() + i * vocab)) << "row " << i << " is not the raw row";
    }
  }
  // The penalty of 1.5 on the prompt's own tokens moves this prompt's greedy token.
  std::printf("[golden] tokens picked by the pass: %d of 3 differ from the unpenalised argmax\n", changed);
}

}  // namespace
}  // namespace kvq::model
