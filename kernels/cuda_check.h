// CUDA / cuBLAS error to absl::Status, with file:line. Host code only.
#pragma once

#include <cublas_v2.h>
#include <cstdint>
#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cublas_api.h"

namespace kvq::kernels::internal {
// Launchers' alignment check for pointers read or written 16 bytes at a time.
inline bool Aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
inline absl::Status CudaErrorToStatus(cudaError_t e, const char* expr, const char* file, int line) {
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", expr, " failed: ",
                                          cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}
inline absl::Status CublasErrorToStatus(cublasStatus_t e, const char* expr, const char* file,
                                        int line) {
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", expr, " failed: ",
                                          ::kvq::kernels::cublas::GetStatusName(e), " (", ::kvq::kernels::cublas::GetStatusString(e),
                                          ")"));
}
}  // namespace kvq::kernels::internal

// Returns a Status from the enclosing function when `expr` (a cudaError_t) is not cudaSuccess.
#define KVQ_RETURN_IF_CUDA_ERROR(expr)                                                      \
  do {                                                                                      \
    const cudaError_t kvq_cuda_err_ = (expr);                                               \
    if (kvq_cuda_err_ != cudaSuccess) {                                                     \
      return ::kvq::kernels::internal::CudaErrorToStatus(kvq_cuda_err_, #expr, __FILE__,    \
                                                         __LINE__);                         \
    }                                                                                       \
  } while (0)

// Same for a kernel launch just issued: picks up launch-configuration errors.
#define KVQ_RETURN_IF_LAUNCH_ERROR() KVQ_RETURN_IF_CUDA_ERROR(cudaGetLastError())

#define KVQ_RETURN_IF_CUBLAS_ERROR(expr)                                                    \
  do {                                                                                      \
    const cublasStatus_t kvq_cublas_err_ = (expr);                                          \
    if (kvq_cublas_err_ != CUBLAS_STATUS_SUCCESS) {                                         \
      return ::kvq::kernels::internal::CublasErrorToStatus(kvq_cublas_err_, #expr, __FILE__, \
                                                           __LINE__);                       \
    }                                                                                       \
  } while (0)
