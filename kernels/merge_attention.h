// Merge of partial attention results (split-KV partials on one GPU, or per-rank partials):
//   lse = log sum_r exp(lse_r),  o = sum_r exp(lse_r - lse) * o_r.
// Computed as m = max_r lse_r, w_r = exp(lse_r - m), S = sum w_r, o = sum (w_r / S) o_r,
// lse = m + log S (the order of kvstore/attention_merge.h). Partials with lse = -inf contribute
// nothing; if all are -inf: o = 0, lse = -inf.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace kvq::kernels {

// A partial that is not in memory: each row's score against one key of its own, outside the
// cache the other partials came from (a decode step's new token): lse = scale * q . k, o = v.
// Row i is (sequence i / n_heads, query head i % n_heads); its k and v are those of KV head
// (i % n_heads) / (n_heads / n_kv_heads) of that sequence. q, k: RoPE already applied.
struct SelfKeyPartial {
  const float* q = nullptr;  // [rows][head_dim]; null: no such partial
  const float* k = nullptr;  // sequence s, KV head h: k[s * k_seq_stride + h * head_dim + d]
  const float* v = nullptr;  // v[s * v_seq_stride + h * head_dim + d]
  int64_t k_seq_stride = 0;
  int64_t v_seq_stride = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  float scale = 0.0f;  // softmax scale (> 0)
};

struct MergeAttentionParams {
  int rows = 0;       // (sequence, head) rows
  int n_parts = 0;    // partials per row, >= 1
  int head_dim = 0;   // <= 1024
  // Partial r of row i: o_parts[i * o_row_stride + r * o_part_stride + d],
  // lse_parts[i * lse_row_stride + r * lse_part_stride] (strides in elements), so both
  // [rows][n_parts][hd] (split-KV workspace) and [n_parts][rows][hd] (gathered ranks) work.
  const float* o_parts = nullptr;
  int64_t o_row_stride = 0;
  int64_t o_part_stride = 0;
  const float* lse_parts = nullptr;
  int64_t lse_row_stride = 0;
  int64_t lse_part_stride = 0;
  // May alias partial 0 when o_row_stride == head_dim and lse_row_stride == 1 (each element is
  // read by the thread that writes it; the lse after a barrier): a running merge in place.
  float* o = nullptr;    // [rows][head_dim]
  float* lse = nullptr;  // [rows]
  // Optional: o also written converted to o_cast_dtype, [rows][head_dim] (the GEMM input of the
  // output projection, so that no separate conversion kernel runs between the two).
  void* o_cast = nullptr;
  DType o_cast_dtype = DType::kF16;
  // Optional: one more partial per row, computed here (SelfKeyPartial). Merged like the others;
  // rows keep their own k and v, so this costs no memory traffic beyond q, k, v.
  SelfKeyPartial self;
};

absl::Status LaunchMergeAttention(const MergeAttentionParams& p, cudaStream_t stream);

}  // namespace kvq::kernels
