// Partial attention results and their merge: the rule that combines split-KV partials inside one
// device and per-rank partials across ranks (DESIGN.md, step 5):
//   lse = log sum_r exp(lse_r);  o = sum_r exp(lse_r - lse) * o_r.
// Computed in double as m = max_r lse_r, e_r = exp(lse_r - m), S = sum e_r, o = sum (e_r / S) o_r,
// lse = m + log S, so partials with equal lse and integer outputs merge exactly. A partial with
// lse = -inf (empty range) contributes nothing; if all are -inf the result is o = 0, lse = -inf.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvq::kvstore {

struct AttentionPartial {
  int n_q = 0;
  int n_heads = 0;
  int head_dim = 0;
  std::vector<float> o;    // [n_q][n_heads][head_dim]
  std::vector<float> lse;  // [n_q][n_heads], natural log of the softmax denominator

  static AttentionPartial Empty(int n_q, int n_heads, int head_dim);
};

// All partials must have the same dimensions (and there must be at least one).
absl::StatusOr<AttentionPartial> MergePartials(absl::Span<const AttentionPartial> partials);

}  // namespace kvq::kvstore
