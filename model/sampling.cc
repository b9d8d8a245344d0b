#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace kvq::model {

Sampler::Sampler(const SamplerConfig& config) : config_(config), rng_(config.seed) {}

int32_t Argmax(const float* logits, int vocab) {
  int32_t best = 0;
  for (int i = 1; i < vocab; ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

static double LogSumExp(const float* logits, int vocab) {
  float m = logits[0];
  for (int i = 1; i < vocab; ++i) m = std::max(m, logits[i]);
  double s = 0.0;
  for (int i = 0; i < vocab; ++i) s += std::exp(static_cast<double>(logits[i]) - m);
  return m + std::log(s);
}

float LogProb(const float* logits, int vocab, int32_t token) {
  return static_cast<float>(logits[token] - LogSumExp(logits, vocab));
}

std::vector<std::pair<int32_t, float>> TopLogProbs(const float* logits, int vocab, int n) {
  const double lse = LogSumExp(logits, vocab);
  std::vector<int32_t> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  n = std::min(n, vocab);
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<std::pair<int32_t, float>> out;
  for (int i = 0; i < n; ++i) out.emplace_back(idx[i], static_cast<float>(logits[idx[i]] - lse));
  return out;
}

int32_t Sampler::Sample(float* logits, int vocab, const std::vector<int32_t>& history) {
  if (config_.repetition_penalty != 1.0f) {
    // CTRL-style penalty, as Hugging Face applies it: divide positive logits, multiply negative.
    std::vector<bool> seen(vocab, false);
    for (int32_t t : history) {
      if (t >= 0 && t < vocab && !seen[t]) {
        seen[t] = true;
        logits[t] = logits[t] > 0 ? logits[t] / config_.repetition_penalty
                                  : logits[t] * config_.repetition_penalty;
      }
    }
  }
  if (config_.temperature <= 0.0f) return Argmax(logits, vocab);
  // Candidates sorted by logit, then filtered by top-k, min-p, top-p.
  std::vector<int32_t> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = idx.size();
  if (config_.top_k > 0) keep = std::min<size_t>(keep, config_.top_k);
  const double inv_t = 1.0 / config_.temperature;
  const double m = logits[idx[0]] * inv_t;
  std::vector<double> p(keep);
  double sum = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    p[i] = std::exp(logits[idx[i]] * inv_t - m);
    sum += p[i];
  }
  if (config_.min_p > 0.0f) {
    const double floor = config_.min_p * p[0];  // relative to the most likely token
    size_t k = 1;
    while (k < keep && p[k] >= floor) ++k;
    keep = k;
  }
  sum = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  if (config_.top_p < 1.0f) {
    double acc = 0.0;
    size_t k = 0;
    while (k < keep) {
      acc += p[k] / sum;
      ++k;
      if (acc >= config_.top_p) break;
    }
    keep = k;
    sum = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  }
  // Inverse-CDF draw with a 53-bit uniform from the seeded generator (portable, deterministic).
  const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * sum;
  double acc = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (u < acc) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace kvq::model
