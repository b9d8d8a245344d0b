#include "kernels/gemm.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/cublas_api.h"
#include "kernels/cuda_check.h"
#include "kernels/row_gemv.h"

namespace kvq::kernels {
namespace {

cudaDataType_t CudaType(DType t) {
  switch (t) {
    case DType::kF32: return CUDA_R_32F;
    case DType::kF16: return CUDA_R_16F;
    case DType::kBF16: return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

}  // namespace

absl::Status Gemm(cublasHandle_t handle, const GemmParams& p, cudaStream_t stream) {
  const int64_t lda = p.lda > 0 ? p.lda : p.k, ldb = p.ldb > 0 ? p.ldb : p.k,
                ldc = p.ldc > 0 ? p.ldc : p.n;
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  if (p.m < 0 || p.n < 0 || p.k < 0 || lda < p.k || ldb < p.k || ldc < p.n || lda > kMaxInt ||
      ldb > kMaxInt || ldc > kMaxInt) {
    return absl::InvalidArgumentError(absl::StrCat("Gemm: m ", p.m, ", n ", p.n, ", k ", p.k,
                                                   ", lda ", lda, ", ldb ", ldb, ", ldc ", ldc));
  }
  if (p.m == 0 || p.n == 0) return absl::OkStatus();
  if (p.a == nullptr || p.b == nullptr || p.c == nullptr || handle == nullptr) {
    return absl::InvalidArgumentError("Gemm: null pointer or handle");
  }
  // GEMMs of one or two rows (decode steps at batch 1 and 2): the bandwidth-bound row GEMV
  // (kernels/row_gemv.h) where it applies; at four rows it was slower than cuBLAS.
  if (RowGemv() && p.m <= RowGemvRows() && p.alpha == 1.0f) {
    const RowGemvParams r{.m = p.m, .n = p.n, .k = p.k, .ab_dtype = p.ab_dtype, .c_dtype = p.c_dtype, .a = p.a,
                          .lda = lda, .w = p.b, .ldw = ldb, .c = p.c, .ldc = ldc, .beta = p.beta};
    if (RowGemvApplies(r)) return LaunchRowGemv(r, stream);
  }
  KVQ_RETURN_IF_CUBLAS_ERROR(cublas::SetStream(handle, stream));
  // Row-major C = A B^T is column-major C^T (n x m) = B_cm^T (n x k) . A_cm (k x m), where the
  // row-major [n][ldb] B is the column-major k x n matrix with leading dimension ldb.
  KVQ_RETURN_IF_CUBLAS_ERROR(cublas::GemmEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, p.n, p.m, p.k, &p.alpha, p.b, CudaType(p.ab_dtype),
      static_cast<int>(ldb), p.a, CudaType(p.ab_dtype), static_cast<int>(lda), &p.beta, p.c,
      CudaType(p.c_dtype), static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

}  // namespace kvq::kernels
