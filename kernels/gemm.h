// Thin cuBLAS GEMM wrapper for the dense layers: row-major C[m][n] = alpha * A[m][k] . B[n][k]^T
// + beta * C (B is a weight in PyTorch Linear layout [out][in]); f16/bf16 inputs with fp32
// accumulation (CUBLAS_COMPUTE_32F), or f32 inputs in full fp32 (no TF32: the exactness mode);
// C in f16, bf16 or f32. Calls with one or two rows (RowGemvRows()) of f16/bf16 and alpha 1 go to
// the row GEMV (kernels/row_gemv.h: one warp per weight row, near the read bandwidth) where it
// applies. B must be a weight in that sense: not written by the kernel just before the call in the
// stream (the row GEMV's early start reads its first pieces of B before waiting for that kernel).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace kvq::kernels {

struct GemmParams {
  int m = 0, n = 0, k = 0;
  DType ab_dtype = DType::kF16;  // f16, bf16 or f32
  DType c_dtype = DType::kF32;
  const void* a = nullptr;  // [m][lda], row-major
  int64_t lda = 0;          // 0 means k
  const void* b = nullptr;  // [n][ldb], row-major
  int64_t ldb = 0;          // 0 means k
  void* c = nullptr;        // [m][ldc], row-major
  int64_t ldc = 0;          // 0 means n
  float alpha = 1.0f;
  float beta = 0.0f;
};

// `handle` must be bound to `stream` by the caller or is bound here (cublasSetStream).
absl::Status Gemm(cublasHandle_t handle, const GemmParams& p, cudaStream_t stream);

}  // namespace kvq::kernels
