// Token sampling on the CPU. The serving path (the engine, kvqd, `kvq generate`) picks tokens by
// one rule, kernels/sampling.h's: on the GPU by its kernels (the repetition penalty too), on the CPU
// pass by SampleByDeviceRule below (after ApplyRepetitionPenalty), with the Philox uniform of
// (seed, index of the token). Sampler is the engine's earlier host sampler (its own
// mt19937_64 stream per request; sorted-order draw), kept as the "host" side of
// `engine_bench --ab=pick` and with its tests; it is not on the serving path.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "absl/types/span.h"

namespace kvq::model {

struct SamplerConfig {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;
  int top_k = 0;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& config);
  // Picks the next token from logits [vocab] (modified in place by the penalty); `history` is the
  // tokens seen so far (for the repetition penalty).
  int32_t Sample(float* logits, int vocab, const std::vector<int32_t>& history);

 private:
  SamplerConfig config_;
  std::mt19937_64 rng_;
};

// The rule Sampler replaced (2026-12-01), for tests and benchmarks: the same filters and draw
// over a stable sort of the whole vocabulary, `rng` seeded like a Sampler's generator.
int32_t SampleByWholeSort(const SamplerConfig& config, std::mt19937_64& rng, float* logits, int vocab);

// The rule of kernels/sampling.h (the serving path's: temperature, top-k with ties kept, top-p,
// min-p, a draw in id order with the Philox uniform of (seed, step)), in double like
// kernels::SampleReference but without its whole-vocabulary sort: the k-th largest value by
// selection, the top-p prefix sorted only as far as it reaches, the kept mass summed in id order
// (the reference sums it largest first: the two differ only when a threshold or the draw lands
// within double rounding of a boundary). The CPU forward pass draws ForwardItem::Output::kSample
// tokens with it. temperature <= 0: Argmax.
int32_t SampleByDeviceRule(const float* logits, int vocab, float temperature, int top_k, float top_p, float min_p,
                           uint64_t seed, uint64_t step);

// The repetition penalty's history as the serving path keeps it: the distinct token ids seen so far
// (context and output), in first-seen order (ForwardItem::Sample::penalized). Holds nothing for
// vocab 0 (a request without a penalty); ids outside [0, vocab) are ignored.
class SeenTokens {
 public:
  explicit SeenTokens(int vocab = 0) : seen_(vocab, false) {}
  void Add(int32_t t) {
    if (t >= 0 && static_cast<size_t>(t) < seen_.size() && !seen_[t]) {
      seen_[t] = true;
      ids_.push_back(t);
    }
  }
  absl::Span<const int32_t> ids() const { return ids_; }

 private:
  std::vector<bool> seen_;
  std::vector<int32_t> ids_;
};

// CTRL-style repetition penalty as Hugging Face applies it, in place: each distinct token of
// `history` has its logit divided by `penalty` when positive, multiplied when not (ids outside
// [0, vocab) are ignored). kernels::LaunchRepetitionPenalty follows the same rule on the GPU.
void ApplyRepetitionPenalty(float* logits, int vocab, absl::Span<const int32_t> history, float penalty);

// Index of the largest logit (lowest index on ties; NaN is never taken; 0 when every logit is NaN).
// kernels::LaunchArgmaxRows follows the same rule on the GPU.
int32_t Argmax(const float* logits, int vocab);
// log-softmax of the chosen token, and the top-n (token, logprob) pairs, best first.
float LogProb(const float* logits, int vocab, int32_t token);
std::vector<std::pair<int32_t, float>> TopLogProbs(const float* logits, int vocab, int n);

}  // namespace kvq::model
