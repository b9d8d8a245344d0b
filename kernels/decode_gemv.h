// Linear layers of decode steps (a few rows): C[m][n] = sum_k a(m, k) W[n][k] (+ C[m][n] when
// beta = 1), W a weight [N][K] (PyTorch Linear layout) in f16 or bf16, fp32 accumulation, with
// the input a produced on the fly so that the small kernel before the layer leaves the step:
//   kPlain:   a(m, k) = A[m * lda + k]                         (A in the weight dtype)
//   kRmsNorm: a(m, k) = T(x[m][k] * inv_rms(x[m]) * g[k])      (x f32; the same bits as
//                                                              LaunchRmsNormF32 writes)
//   kSwiGlu:  a(m, k) = T(silu(G[m][k]) * G[m][K + k])         (G in the weight dtype, lda >= 2K;
//                                                              the same bits as LaunchSwiGlu)
// Output columns go to up to three segments, so the stacked q/k/v weight writes the step's q, k
// and v rows where the rest of the pass reads them, q and k rotated by RoPE if asked (a warp's
// four columns of such a segment are two rotate-half pairs of one head).
//
// Shape of the work: one CTA of 8 warps per 32 output columns, each warp 4 columns; the CTA
// stages a(m, k) for a chunk of K in shared memory (in the weight dtype), each lane reads 16-byte
// pieces of the warp's 4 weight rows and all rows' inputs. Memory-bound like cuBLAS at one row;
// what it saves is the separate norm / SwiGLU kernel (a graph node each, per layer).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace kvq::kernels {

enum class GemvInput : uint8_t { kPlain = 0, kRmsNorm = 1, kSwiGlu = 2 };

// Columns [previous n_end, n_end) go to c + m * ldc + (n - previous n_end). A segment of heads
// may also, or only, be written rotated by RoPE (rotate-half pairs of each rope_head_dim-wide
// head, at row m's position, kernels/rope_device.cuh: the bits of LaunchRopeQuery) into
// rot + m * ld_rot + (n - previous n_end); its start and width are multiples of rope_head_dim.
struct GemvSegment {
  int n_end = 0;
  void* c = nullptr;     // may be null when rot is set
  int64_t ldc = 0;       // elements
  float* rot = nullptr;  // optional; needs an f32 output and beta 0
  int64_t ld_rot = 0;
};

inline constexpr int kDecodeGemvMaxRows = 8;

struct DecodeGemvParams {
  int m = 0;  // rows, 1..kDecodeGemvMaxRows
  int n = 0;  // output columns (== the last segment's n_end)
  int k = 0;  // input columns, a multiple of 8
  DType w_dtype = DType::kF16;  // f16 or bf16
  const void* w = nullptr;      // [n][k], 16-byte aligned
  GemvInput input = GemvInput::kPlain;
  const void* a = nullptr;      // kPlain / kSwiGlu: the weight dtype; kRmsNorm: f32
  int64_t lda = 0;              // elements; 0 means k (kSwiGlu: 2k)
  const float* norm_weight = nullptr;  // kRmsNorm: g [k]
  float eps = 0.0f;                    // kRmsNorm
  DType c_dtype = DType::kF32;  // f32, or the weight dtype (then beta must be 0)
  float beta = 0.0f;            // 0 or 1
  GemvSegment seg[3];
  int n_segs = 1;
  // Segments with rot: the positions of the rows, RopeInvFreq, the head dim (a multiple of 4).
  const int64_t* rope_positions = nullptr;
  const double* rope_inv_freq = nullptr;
  int rope_head_dim = 0;
};

absl::Status LaunchDecodeGemv(const DecodeGemvParams& p, cudaStream_t stream);

}  // namespace kvq::kernels
