// cuBLAS, loaded on first use (dlopen of libcublas.so.13) instead of linked: a process that never
// runs a GEMM on the GPU (kvqd on the CPU backend, the tests in CI) never loads it. Measured
// reason: merely loading libcublas/libcublasLt 13 into a process makes civetweb's start fail
// ("null context when constructing CivetServer"), i.e. kvqd's Prometheus endpoint; see
// RESULTS.md. Only the functions kvq uses; same signatures as cublas_v2.h. Host code.
#pragma once

#include <cublas_v2.h>

#include "absl/status/status.h"

namespace kvq::kernels::cublas {

// Loads the library and resolves every function (once; thread-safe). Error if missing.
absl::Status Load();

cublasStatus_t Create(cublasHandle_t* handle);
cublasStatus_t Destroy(cublasHandle_t handle);
cublasStatus_t SetStream(cublasHandle_t handle, cudaStream_t stream);
cublasStatus_t SetMathMode(cublasHandle_t handle, cublasMath_t mode);
cublasStatus_t GemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                      int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                      cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                      cublasComputeType_t computeType, cublasGemmAlgo_t algo);
const char* GetStatusName(cublasStatus_t status);
const char* GetStatusString(cublasStatus_t status);

}  // namespace kvq::kernels::cublas
