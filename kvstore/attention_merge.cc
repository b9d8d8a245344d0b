#include "kvstore/attention_merge.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace kvq::kvstore {

AttentionPartial AttentionPartial::Empty(int n_q, int n_heads, int head_dim) {
  AttentionPartial p;
  p.n_q = n_q;
  p.n_heads = n_heads;
  p.head_dim = head_dim;
  p.o.assign(static_cast<size_t>(n_q) * n_heads * head_dim, 0.0f);
  p.lse.assign(static_cast<size_t>(n_q) * n_heads, -std::numeric_limits<float>::infinity());
  return p;
}

absl::StatusOr<AttentionPartial> MergePartials(absl::Span<const AttentionPartial> partials) {
  if (partials.empty()) return absl::InvalidArgumentError("MergePartials: no partials");
  const AttentionPartial& first = partials[0];
  for (const AttentionPartial& p : partials) {
    if (p.n_q != first.n_q || p.n_heads != first.n_heads || p.head_dim != first.head_dim ||
        p.o.size() != static_cast<size_t>(p.n_q) * p.n_heads * p.head_dim ||
        p.lse.size() != static_cast<size_t>(p.n_q) * p.n_heads) {
      return absl::InvalidArgumentError(absl::StrCat(
          "MergePartials: partial of shape [", p.n_q, ", ", p.n_heads, ", ", p.head_dim,
          "] does not match [", first.n_q, ", ", first.n_heads, ", ", first.head_dim, "]"));
    }
  }
  AttentionPartial out = AttentionPartial::Empty(first.n_q, first.n_heads, first.head_dim);
  const int D = first.head_dim;
  std::vector<double> acc(D);
  for (size_t row = 0; row < first.lse.size(); ++row) {
    double m = -std::numeric_limits<double>::infinity();
    for (const AttentionPartial& p : partials) m = std::fmax(m, static_cast<double>(p.lse[row]));
    if (m == -std::numeric_limits<double>::infinity()) continue;
    double s = 0.0;
    for (const AttentionPartial& p : partials) s += std::exp(static_cast<double>(p.lse[row]) - m);
    std::fill(acc.begin(), acc.end(), 0.0);
    for (const AttentionPartial& p : partials) {
      const double w = std::exp(static_cast<double>(p.lse[row]) - m) / s;
      if (w == 0.0) continue;
      const float* o = p.o.data() + row * D;
      for (int d = 0; d < D; ++d) acc[d] += w * o[d];
    }
    for (int d = 0; d < D; ++d) out.o[row * D + d] = static_cast<float>(acc[d]);
    out.lse[row] = static_cast<float>(m + std::log(s));
  }
  return out;
}

}  // namespace kvq::kvstore
