#include "kernels/reference/dense_ops.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "kernels/philox.h"

namespace kvq::kernels {

void RmsNormReference(const float* x, const float* weight, int rows, int dim, float eps, float* y) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<int64_t>(r) * dim;
    double ss = 0.0;
    for (int i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const double inv = 1.0 / std::sqrt(ss / dim + eps);
    for (int i = 0; i < dim; ++i) y[static_cast<int64_t>(r) * dim + i] = static_cast<float>(xr[i] * inv * weight[i]);
  }
}

void SwiGluReference(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const double g = gate[i];
    out[i] = static_cast<float>(g / (1.0 + std::exp(-g)) * up[i]);
  }
}

void EmbeddingReference(const float* table, int vocab, int dim, const int32_t* ids, int rows,
                        float* out) {
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < dim; ++i) {
      out[static_cast<int64_t>(r) * dim + i] =
          ids[r] >= 0 && ids[r] < vocab ? table[static_cast<int64_t>(ids[r]) * dim + i] : 0.0f;
    }
  }
}

void GemmReference(const float* a, const float* b, int m, int n, int k, float* c) {
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double s = 0.0;
      for (int t = 0; t < k; ++t) {
        s += static_cast<double>(a[static_cast<int64_t>(i) * k + t]) * b[static_cast<int64_t>(j) * k + t];
      }
      c[static_cast<int64_t>(i) * n + j] = static_cast<float>(s);
    }
  }
}

int32_t SampleReference(const float* logits, int vocab, const SamplingRefConfig& c) {
  const float mx = *std::max_element(logits, logits + vocab);
  if (!(c.temperature > 0.0f)) {
    return static_cast<int32_t>(std::find(logits, logits + vocab, mx) - logits);
  }
  std::vector<double> e(vocab);
  for (int i = 0; i < vocab; ++i) e[i] = std::exp((static_cast<double>(logits[i]) - mx) / c.temperature);
  std::vector<double> sorted(e);
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  double tau = 0.0;
  if (c.top_k > 0 && c.top_k < vocab) tau = sorted[c.top_k - 1];
  if (c.top_p < 1.0f) {
    double kept = 0.0;
    for (double x : sorted) kept += x >= tau ? x : 0.0;
    const double target = c.top_p * kept;
    double run = 0.0;
    for (double x : sorted) {  // largest first; ties enter together
      if (x < tau) break;
      run += x;
      if (run >= target) { tau = x; break; }
    }
  }
  tau = std::max(tau, static_cast<double>(c.min_p));
  return SampleDrawReference(e, tau, c.seed, c.step);
}

int32_t SampleDrawReference(const std::vector<double>& e, double tau, uint64_t seed, uint64_t step) {
  const int vocab = static_cast<int>(e.size());
  double total = 0.0;
  int last = 0;
  for (int i = 0; i < vocab; ++i) {
    if (e[i] >= tau) { total += e[i]; last = i; }
  }
  const double target = static_cast<double>(SamplingUniform(seed, step)) * total;
  double run = 0.0;
  for (int i = 0; i < vocab; ++i) {
    if (e[i] >= tau) {
      run += e[i];
      if (run > target) return i;
    }
  }
  return last;
}

}  // namespace kvq::kernels
