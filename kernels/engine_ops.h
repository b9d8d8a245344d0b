// Small kernels the GPU engine's forward pass needs besides the dense ops, GEMMs and the paged
// attention/append kernels (kernels/engine_ops.cu):
//   RmsNormF32     RMSNorm of an f32 residual stream into f32/f16/bf16 (the GEMM input dtype).
//   AddBias        x[r][i] += bias[i] (Qwen2-style q/k/v biases).
//   ChunkAttention causal attention of a prefill chunk (or a decode token) over the chunk's own
//                  full-precision keys/values: the part of a step that is not in the cache yet.
//   GatherRows     dst[i] = src[idx[i]] (rows that need logits).
//   InitKvBlocks   zero-fills fresh pool blocks and sets their key-outlier directories.
// References: model/forward.cc (RmsNorm, AttendDense) and kvstore/block_layout.h (directories).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace kvq::kernels {

// y[r][i] = x[r][i] / sqrt(mean_i x[r][i]^2 + eps) * weight[i]; x, weight f32; y in y_dtype.
absl::Status LaunchRmsNormF32(int rows, int dim, float eps, const float* x, const float* weight,
                              void* y, DType y_dtype, cudaStream_t stream);

// x[r][i] += bias[i], x f32 with row stride `stride` elements (>= dim).
absl::Status LaunchAddBias(int rows, int dim, int64_t stride, float* x, const float* bias,
                           cudaStream_t stream);

// Causal attention inside chunks. Row r (a token) of head h attends the rows
// [row_begin[r], r + key_offset] of k/v (its chunk, up to itself), softmax scale `scale`.
// q [rows][n_heads][head_dim] (rotated), k [rows][n_kv_heads][head_dim] (rotated),
// v [rows][n_kv_heads][head_dim]; o [rows][n_heads][head_dim] normalized, lse [rows][n_heads]
// natural log, so the result merges with the cache's partial (kernels/merge_attention.h).
struct ChunkAttentionParams {
  int rows = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;  // multiple of 32, <= 256
  float scale = 0.0f;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const int32_t* row_begin = nullptr;  // [rows], device; null: every row starts at key 0
  // Query row r's own key is k row r + key_offset: it attends k rows [row_begin[r], r + key_offset]
  // (0 within a chunk; the chunk's start position when k holds the whole sequence).
  int key_offset = 0;
  float* o = nullptr;
  float* lse = nullptr;
};
absl::Status LaunchChunkAttention(const ChunkAttentionParams& p, cudaStream_t stream);

// out[i] = in[i] converted to out_dtype (f32 -> f16/bf16/f32), n elements.
absl::Status LaunchConvertF32(int64_t n, const float* in, void* out, DType out_dtype,
                              cudaStream_t stream);

// out[i] ~ Normal(mean, std), counter-based (splitmix64 of seed and i, Box-Muller): the same
// values for the same (seed, i) on any GPU. For synthetic weights and synthetic KV fills.
absl::Status LaunchFillNormal(int64_t n, uint64_t seed, float mean, float std, void* out, DType dtype,
                              cudaStream_t stream);

// x[i] = value for n elements.
absl::Status LaunchFillF32(int64_t n, float value, float* x, cudaStream_t stream);

// dst[i][:] = src[idx[i]][:] for i < n, rows of `dim` f32.
absl::Status LaunchGatherRows(int n, int dim, const float* src, const int32_t* idx, float* dst,
                              cudaStream_t stream);

// Fresh blocks of a paged pool: every byte of block ids[i] (stride bytes) zeroed, then the
// key-outlier directory of each (layer, head) set to {first = header_words + (layer * n_kv +
// head) * capacity, count = 0} and, with growable lists, the header (kernels/paged_kv.h).
// dir_offset < 0: the format has no key outliers.
struct InitKvBlocksParams {
  uint8_t* pool = nullptr;
  int64_t block_stride_bytes = 0;
  const int32_t* ids = nullptr;  // [n], device
  int n = 0;
  int n_layers = 0;
  int n_kv_heads = 0;
  int64_t layer_bytes = 0;
  int64_t fixed_bytes = 0;
  int64_t dir_offset = -1;
  int key_outlier_capacity = 0;
  // Growable lists (kernels/paged_kv.h): the header (this many words) gets its bump pointer at
  // the header's end and zero capacities. 0: fixed reservations of key_outlier_capacity.
  int key_outlier_header_words = 0;
};
absl::Status LaunchInitKvBlocks(const InitKvBlocksParams& p, cudaStream_t stream);

}  // namespace kvq::kernels
