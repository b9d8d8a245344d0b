// Kernels of the dense layers that are not GEMMs (kernels/dense_ops.cu): RMSNorm, RoPE of the
// queries, SwiGLU, embedding gather, residual add. Activations are f32, f16 or bf16; all math is
// fp32. References: kernels/reference/dense_ops.h (and reference/rope.h for RoPE).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace kvq::kernels {

// y[r][i] = x[r][i] / sqrt(mean_i x[r][i]^2 + eps) * weight[i].
struct RmsNormParams {
  int rows = 0;
  int dim = 0;
  float eps = 1e-5f;
  DType dtype = DType::kF16;  // of x, weight and y
  const void* x = nullptr;       // [rows][dim]
  const void* weight = nullptr;  // [dim]
  void* y = nullptr;             // [rows][dim] (may alias x)
};
absl::Status LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream);

// Rotates each head of q (f32), rotate-half convention, at positions[row]: the angle
// positions[row] * inv_freq[i] is formed and reduced in double (exact for positions up to 1e7+).
// In place, or into `out` (same layout) leaving q as it is.
struct RopeQueryParams {
  int rows = 0;                     // tokens
  int n_heads = 0;
  int head_dim = 0;                 // even, <= 512
  float* q = nullptr;               // [rows][n_heads][head_dim] f32
  const int64_t* positions = nullptr;  // [rows]
  const double* inv_freq = nullptr;    // [head_dim / 2], kernels::RopeInvFreq()
  float* out = nullptr;             // null: rotate q in place
  // Optional: a second set of rows rotated in the same launch at the same positions (a step's
  // keys next to its queries): k [rows][k_heads][head_dim], written to k_out (null: in place).
  // Each element is computed exactly as by a launch of its own.
  const float* k = nullptr;
  int k_heads = 0;
  float* k_out = nullptr;
  // Floats from one row of q (and of k) to the next in the input; 0: n_heads (k_heads) *
  // head_dim. A stride reads q and k where a stacked q/k/v projection wrote them; the rotated
  // rows are then written packed to out (and k_out), which must be set.
  int64_t in_row_stride = 0;
};
absl::Status LaunchRopeQuery(const RopeQueryParams& p, cudaStream_t stream);

// out[r][i] = silu(gate[r][i]) * up[r][i], silu(x) = x / (1 + exp(-x)).
struct SwiGluParams {
  int rows = 0;
  int dim = 0;
  DType dtype = DType::kF16;  // of gate, up and out
  const void* gate = nullptr;  // row r at gate + r * in_row_stride elements
  const void* up = nullptr;    // row r at up + r * in_row_stride (a fused [rows][2*dim] works)
  int64_t in_row_stride = 0;   // elements; 0 means dim
  void* out = nullptr;         // [rows][dim]
};
absl::Status LaunchSwiGlu(const SwiGluParams& p, cudaStream_t stream);

// out[r][:] = table[ids[r]][:]; ids outside [0, vocab) give zero rows.
struct EmbeddingParams {
  int rows = 0;
  int dim = 0;
  int vocab = 0;
  DType table_dtype = DType::kF16;
  DType out_dtype = DType::kF32;
  const void* table = nullptr;   // [vocab][dim]
  const int32_t* ids = nullptr;  // [rows]
  void* out = nullptr;           // [rows][dim]
};
absl::Status LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream);

// x[i] += y[i] for n elements (x is the residual stream).
struct ResidualAddParams {
  int64_t n = 0;
  DType x_dtype = DType::kF32;
  DType y_dtype = DType::kF16;
  void* x = nullptr;
  const void* y = nullptr;
};
absl::Status LaunchResidualAdd(const ResidualAddParams& p, cudaStream_t stream);

}  // namespace kvq::kernels
