#include "kernels/reference/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/reference/rope.h"

namespace kvq::kernels {

void DecodeAttentionReference(const DecodeAttentionRefInput& in, float* o, float* lse) {
  const int D = in.head_dim, H = in.n_kv_heads;
  const int group = in.n_heads / H;
  const double scale = in.scale > 0.0 ? in.scale : 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t L = static_cast<int64_t>(H) * D;
  std::vector<float> k(in.n_tokens * L);
  std::copy(in.k, in.k + k.size(), k.begin());
  if (!in.keys_rotated) {
    for (int64_t t = 0; t < in.n_tokens; ++t) {
      ApplyRopeReference(k.data() + t * L, H, D, in.first_position + t, *in.inv_freq);
    }
  }
  std::vector<double> score(in.n_tokens), acc(D);
  for (int h = 0; h < in.n_heads; ++h) {
    const int hk = h / group;
    const float* q = in.q + static_cast<int64_t>(h) * D;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t t = 0; t < in.n_tokens; ++t) {
      const float* kt = k.data() + t * L + hk * D;
      double dot = 0.0;
      for (int d = 0; d < D; ++d) dot += static_cast<double>(q[d]) * kt[d];
      score[t] = dot * scale;
      mx = std::max(mx, score[t]);
    }
    std::fill(acc.begin(), acc.end(), 0.0);
    double sum = 0.0;
    for (int64_t t = 0; t < in.n_tokens; ++t) {
      const double p = std::exp(score[t] - mx);
      sum += p;
      const float* vt = in.v + t * L + hk * D;
      for (int d = 0; d < D; ++d) acc[d] += p * vt[d];
    }
    for (int d = 0; d < D; ++d) {
      o[static_cast<int64_t>(h) * D + d] = sum > 0.0 ? static_cast<float>(acc[d] / sum) : 0.0f;
    }
    lse[h] = sum > 0.0 ? static_cast<float>(mx + std::log(sum))
                       : -std::numeric_limits<float>::infinity();
  }
}

void MergeAttentionReference(int rows, int n_parts, int head_dim, const float* o_parts,
                             const float* lse_parts, float* o, float* lse) {
  std::vector<double> acc(head_dim);
  for (int row = 0; row < rows; ++row) {
    const float* l = lse_parts + static_cast<int64_t>(row) * n_parts;
    double m = -std::numeric_limits<double>::infinity();
    for (int r = 0; r < n_parts; ++r) m = std::max(m, static_cast<double>(l[r]));
    float* out = o + static_cast<int64_t>(row) * head_dim;
    if (m == -std::numeric_limits<double>::infinity()) {
      std::fill(out, out + head_dim, 0.0f);
      lse[row] = -std::numeric_limits<float>::infinity();
      continue;
    }
    double s = 0.0;
    for (int r = 0; r < n_parts; ++r) s += std::exp(l[r] - m);
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int r = 0; r < n_parts; ++r) {
      const double w = std::exp(l[r] - m) / s;
      if (w == 0.0) continue;
      const float* op = o_parts + (static_cast<int64_t>(row) * n_parts + r) * head_dim;
      for (int d = 0; d < head_dim; ++d) acc[d] += w * op[d];
    }
    for (int d = 0; d < head_dim; ++d) out[d] = static_cast<float>(acc[d]);
    lse[row] = static_cast<float>(m + std::log(s));
  }
}

}  // namespace kvq::kernels
