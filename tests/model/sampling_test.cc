// model::Sampler against the whole-vocabulary-sort rule it replaced (model::SampleByWholeSort):
// the same tokens for the same seed and logits over random configurations, and the filters'
// edge cases (ties, top-k, min-p, top-p, a flat distribution that the draw walks to its end).
#include "model/sampling.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/reference/dense_ops.h"

namespace kvq::model {
namespace {

TEST(Sampler, SameTokensAsTheWholeVocabularySort) {
  std::mt19937 gen(7);
  int same = 0, total = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const int vocab = trial % 4 == 0 ? 49152 : 1 + static_cast<int>(gen() % 3000);
    SamplerConfig c;
    c.temperature = std::array<float, 5>{0.3f, 0.7f, 1.0f, 1.5f, 4.0f}[trial % 5];
    c.top_p = std::array<float, 4>{1.0f, 0.9f, 0.5f, 0.999f}[(trial / 5) % 4];
    c.top_k = std::array<int, 4>{0, 0, 40, 1}[(trial / 20) % 4];
    c.min_p = std::array<float, 3>{0.0f, 0.0f, 0.05f}[(trial / 80) % 3];
    c.seed = trial;
    std::normal_distribution<float> nd(0.0f, 1.0f + (trial % 7));
    std::vector<float> logits(vocab);
    for (float& x : logits) x = nd(gen);
    if (trial % 3 == 0) {  // ties, quantized logits
      for (float& x : logits) x = std::round(x * 2.0f) / 2.0f;
    }
    if (trial % 11 == 0) std::fill(logits.begin(), logits.end(), 0.5f);  // flat: the draw walks far
    Sampler s(c);
    std::mt19937_64 rng(c.seed);
    for (int step = 0; step < 3; ++step) {
      std::vector<float> a = logits, b = logits;
      const int32_t got = s.Sample(a.data(), vocab, {});
      const int32_t want = SampleByWholeSort(c, rng, b.data(), vocab);
      ASSERT_GE(got, 0);
      ASSERT_LT(got, vocab);
      same += got == want;
      ++total;
      // Only the whole-vocabulary sum (no top-k, no min-p) is formed in another order: a draw
      // may differ only when it lands within rounding of a boundary.
      if (c.top_k > 0 || c.min_p > 0.0f) EXPECT_EQ(got, want) << "trial " << trial << " step " << step;
    }
  }
  std::printf("[sampler] %d/%d draws equal to the whole-sort rule\n", same, total);
  EXPECT_GE(same, total - 2);
}

// The serving path's rule on the CPU (SampleByDeviceRule, what the CPU forward pass draws
// ForwardItem::Output::kSample tokens with) against kernels::SampleReference, the rule's plain
// statement (whole sort, kept mass summed largest first): the same tokens over random logits,
// temperatures and filters, ties and flat rows included.
TEST(SampleByDeviceRule, SameTokensAsTheReference) {
  std::mt19937 gen(11);
  int same = 0, total = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int vocab = trial % 5 == 0 ? 49152 : 1 + static_cast<int>(gen() % 4000);
    const float temperature = std::array<float, 4>{0.5f, 0.8f, 1.0f, 2.0f}[trial % 4];
    const float top_p = std::array<float, 4>{1.0f, 0.9f, 0.5f, 0.99f}[(trial / 4) % 4];
    const int top_k = std::array<int, 3>{0, 40, 1}[(trial / 16) % 3];
    const float min_p = trial % 7 == 0 ? 0.05f : 0.0f;
    std::normal_distribution<float> nd(0.0f, 1.0f + (trial % 5));
    std::vector<float> logits(vocab);
    for (float& x : logits) x = nd(gen);
    if (trial % 3 == 0) {
      for (float& x : logits) x = std::round(x * 2.0f) / 2.0f;  // ties
    }
    if (trial % 13 == 0) std::fill(logits.begin(), logits.end(), 0.25f);  // flat
    for (uint64_t step = 0; step < 3; ++step) {
      const uint64_t seed = 1000 + trial;
      const int32_t got = SampleByDeviceRule(logits.data(), vocab, temperature, top_k, top_p, min_p, seed, step);
      const int32_t want = kernels::SampleReference(
          logits.data(), vocab, kernels::SamplingRefConfig{temperature, top_k, top_p, min_p, seed, step});
      ASSERT_GE(got, 0);
      ASSERT_LT(got, vocab);
      same += got == want;
      ++total;
    }
  }
  std::printf("[device-rule] %d/%d draws equal to kernels::SampleReference\n", same, total);
  // Only a boundary within double rounding may differ (the kept mass is summed in another order).
  EXPECT_GE(same, total - 1);
  EXPECT_EQ(SampleByDeviceRule(std::vector<float>{1.0f, 3.0f, 3.0f}.data(), 3, 0.0f, 0, 1.0f, 0.0f, 0, 0), 1);
}

TEST(Sampler, FiltersKeepWhatTheyPromise) {
  const int vocab = 1000;
  std::vector<float> logits(vocab, -5.0f);
  logits[10] = 4.0f;
  logits[20] = 4.0f;  // a tie with 10: 10 comes first
  logits[30] = 3.0f;
  SamplerConfig c;
  c.temperature = 1.0f;
  c.top_k = 1;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    c.seed = seed;
    Sampler s(c);
    std::vector<float> l = logits;
    EXPECT_EQ(s.Sample(l.data(), vocab, {}), 10);
  }
  c.top_k = 0;
  c.top_p = 0.5f;  // 10 alone holds ~36% of the mass, 10 and 20 ~73%
  for (uint64_t seed = 0; seed < 50; ++seed) {
    c.seed = seed;
    Sampler s(c);
    std::vector<float> l = logits;
    const int32_t t = s.Sample(l.data(), vocab, {});
    EXPECT_TRUE(t == 10 || t == 20) << t;
  }
  c.top_p = 1.0f;
  c.min_p = 0.3f;  // keeps 10, 20 (p = 1) and 30 (p = e^-1 = 0.37)
  for (uint64_t seed = 0; seed < 50; ++seed) {
    c.seed = seed;
    Sampler s(c);
    std::vector<float> l = logits;
    const int32_t t = s.Sample(l.data(), vocab, {});
    EXPECT_TRUE(t == 10 || t == 20 || t == 30) << t;
  }
}

}  // namespace
}  // namespace kvq::model
