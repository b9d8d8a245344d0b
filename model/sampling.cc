#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/reference/dense_ops.h"

namespace kvq::model {

Sampler::Sampler(const SamplerConfig& config) : config_(config), rng_(config.seed) {}

int32_t Argmax(const float* logits, int vocab) {
  int32_t best = -1;
  for (int i = 0; i < vocab; ++i) {
    if (!std::isnan(logits[i]) && (best < 0 || logits[i] > logits[best])) best = i;
  }
  return best < 0 ? 0 : best;
}

int32_t SampleByDeviceRule(const float* logits, int vocab, float temperature, int top_k, float top_p, float min_p,
                           uint64_t seed, uint64_t step) {
  if (!(temperature > 0.0f)) return Argmax(logits, vocab);
  const float mx = logits[Argmax(logits, vocab)];
  std::vector<double> e(vocab);
  for (int i = 0; i < vocab; ++i) e[i] = std::exp((static_cast<double>(logits[i]) - mx) / temperature);
  double tau = 0.0;
  if (top_k > 0 && top_k < vocab) {
    // The k-th largest value (ties at it are all kept below): e of the k-th largest logit, as e is
    // monotone in the logit (and logits that round to one e are ties either way).
    std::vector<float> c(logits, logits + vocab);
    std::nth_element(c.begin(), c.begin() + (top_k - 1), c.end(), std::greater<float>());
    tau = std::exp((static_cast<double>(c[top_k - 1]) - mx) / temperature);
  }
  if (top_p < 1.0f) {
    double kept = 0.0;
    std::vector<int32_t> idx;
    for (int i = 0; i < vocab; ++i) {
      if (e[i] >= tau) {
        kept += e[i];
        idx.push_back(i);
      }
    }
    const double target = top_p * kept;
    // Largest values first, sorted in growing prefixes until their mass reaches the target.
    const auto larger = [&](int32_t a, int32_t b) { return e[a] > e[b]; };
    double run = 0.0;
    size_t sorted = 0;
    for (size_t n = 0; n < idx.size(); ++n) {
      if (n == sorted) {
        const size_t want = std::min(idx.size(), std::max<size_t>({2 * sorted, sorted + 256}));
        std::partial_sort(idx.begin() + sorted, idx.begin() + want, idx.end(), larger);
        sorted = want;
      }
      run += e[idx[n]];
      if (run >= target) {
        tau = e[idx[n]];
        break;
      }
    }
  }
  return kernels::SampleDrawReference(e, std::max(tau, static_cast<double>(min_p)), seed, step);
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

void ApplyRepetitionPenalty(float* logits, int vocab, absl::Span<const int32_t> history, float penalty) {
  if (penalty == 1.0f) return;
  std::vector<bool> seen(vocab, false);
  for (int32_t t : history) {
    if (t >= 0 && t < vocab && !seen[t]) {
      seen[t] = true;
      logits[t] = logits[t] > 0 ? logits[t] / penalty : logits[t] * penalty;
    }
  }
}

int32_t Sampler::Sample(float* logits, int vocab, const std::vector<int32_t>& history) {
  ApplyRepetitionPenalty(logits, vocab, history, config_.repetition_penalty);
  if (config_.temperature <= 0.0f) return Argmax(logits, vocab);
  // Candidates in the order of a stable sort by logit (logit descending, index ascending), sorted
  // only as far as the filters and the draw look at them: a whole-vocabulary sort per token took
  // 4.8 ms at 49,152 tokens and 13.9 ms at 128,256 on one core (2026-12-01), several GPU decode
  // steps, and the draw almost always ends within the first few hundred candidates. Every filter
  // and the draw see the same candidates, probabilities and sums as with the whole sort, except
  // the sum over the whole vocabulary (no top-k, no min-p), which is taken in index order.
  const auto before = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const double inv_t = 1.0 / config_.temperature;
  const double m = logits[Argmax(logits, vocab)] * inv_t;  // the first candidate's
  auto prob = [&](int32_t t) { return std::exp(logits[t] * inv_t - m); };
  std::vector<int32_t> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  std::vector<double> p;  // p[i] = prob(idx[i]) over the sorted prefix
  auto sorted_to = [&](size_t n) {  // idx[0, n) in candidate order, their p
    const size_t sorted = p.size();
    if (n <= sorted) return;
    const size_t want = std::min<size_t>(vocab, std::max<size_t>({n, 2 * sorted, 256}));
    std::partial_sort(idx.begin() + sorted, idx.begin() + want, idx.end(), before);
    for (size_t i = sorted; i < want; ++i) p.push_back(prob(idx[i]));
  };
  size_t keep = idx.size();
  if (config_.top_k > 0) keep = std::min<size_t>(keep, config_.top_k);
  if (config_.min_p > 0.0f) {
    // p falls along the candidate order: the candidates kept are those with p >= floor (at least
    // the first). Logits clearly below the floor are skipped without an exp.
    const double floor = config_.min_p * 1.0;  // relative to the most likely token (p = 1)
    const double cut = std::log(floor) - 1e-9;
    size_t n = 0;
    for (int t = 0; t < vocab; ++t) {
      if (logits[t] * inv_t - m >= cut && prob(t) >= floor) ++n;
    }
    keep = std::max<size_t>(1, std::min(keep, n));
  }
  double sum = 0.0;
  if (keep < idx.size()) {
    sorted_to(keep);
    for (size_t i = 0; i < keep; ++i) sum += p[i];
  } else {
    for (int t = 0; t < vocab; ++t) sum += prob(t);
  }
  if (config_.top_p < 1.0f) {
    double acc = 0.0;
    size_t k = 0;
    while (k < keep) {
      sorted_to(k + 1);
      acc += p[k] / sum;
      ++k;
      if (acc >= config_.top_p) break;
    }
    keep = k;
    sum = 0.0;
    for (size_t i = 0; i < keep; ++i) sum += p[i];
  }
  // Inverse-CDF draw with a 53-bit uniform from the seeded generator (portable, deterministic).
  const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * sum;
  double acc = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    sorted_to(i + 1);
    acc += p[i];
    if (u < acc) return idx[i];
  }
  return idx[keep - 1];  // sorted by the loop above
}

int32_t SampleByWholeSort(const SamplerConfig& c, std::mt19937_64& rng, float* logits, int vocab) {
  if (c.temperature <= 0.0f) return Argmax(logits, vocab);
  std::vector<int32_t> idx(vocab);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  size_t keep = idx.size();
  if (c.top_k > 0) keep = std::min<size_t>(keep, c.top_k);
  const double inv_t = 1.0 / c.temperature;
  const double m = logits[idx[0]] * inv_t;
  std::vector<double> p(keep);
  for (size_t i = 0; i < keep; ++i) p[i] = std::exp(logits[idx[i]] * inv_t - m);
  if (c.min_p > 0.0f) {
    const double floor = c.min_p * p[0];
    size_t k = 1;
    while (k < keep && p[k] >= floor) ++k;
    keep = k;
  }
  double sum = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  if (c.top_p < 1.0f) {
    double acc = 0.0;
    size_t k = 0;
    while (k < keep) {
      acc += p[k] / sum;
      ++k;
      if (acc >= c.top_p) break;
    }
    keep = k;
    sum = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  }
  const double u = static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0) * sum;
  double acc = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (u < acc) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace kvq::model
