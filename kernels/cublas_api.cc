#include "kernels/cublas_api.h"

#include <dlfcn.h>

#include <mutex>
#include <type_traits>

#include "absl/strings/str_cat.h"

namespace kvq::kernels::cublas {
namespace {

struct Api {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetMathMode) set_math_mode = nullptr;
  using GemmExFn = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                                      const void*, const void*, cudaDataType, int, const void*, cudaDataType, int,
                                      const void*, void*, cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
  GemmExFn gemm_ex = nullptr;
  decltype(&cublasGetStatusName) status_name = nullptr;
  decltype(&cublasGetStatusString) status_string = nullptr;
  absl::Status status = absl::OkStatus();
};

const Api& TheApi() {
  static Api* api = [] {
    auto* a = new Api();
    void* h = nullptr;
    for (const char* name : {"libcublas.so.13", "libcublas.so"}) {
      h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (h != nullptr) break;
    }
    if (h == nullptr) {
      a->status = absl::FailedPreconditionError(absl::StrCat("cannot load cuBLAS (libcublas.so.13): ", dlerror(),
                                                             "; put the CUDA 13 libraries on LD_LIBRARY_PATH"));
      return a;
    }
    auto sym = [&](auto* fn, const char* name) {
      *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(dlsym(h, name));
      if (*fn == nullptr && a->status.ok()) a->status = absl::FailedPreconditionError(absl::StrCat("cuBLAS lacks ", name));
    };
    sym(&a->create, "cublasCreate_v2");
    sym(&a->destroy, "cublasDestroy_v2");
    sym(&a->set_stream, "cublasSetStream_v2");
    sym(&a->set_math_mode, "cublasSetMathMode");
    sym(&a->gemm_ex, "cublasGemmEx");
    sym(&a->status_name, "cublasGetStatusName");
    sym(&a->status_string, "cublasGetStatusString");
    return a;
  }();
  return *api;
}

}  // namespace

absl::Status Load() { return TheApi().status; }

cublasStatus_t Create(cublasHandle_t* handle) {
  return Load().ok() ? TheApi().create(handle) : CUBLAS_STATUS_NOT_INITIALIZED;
}
cublasStatus_t Destroy(cublasHandle_t handle) {
  return Load().ok() ? TheApi().destroy(handle) : CUBLAS_STATUS_NOT_INITIALIZED;
}
cublasStatus_t SetStream(cublasHandle_t handle, cudaStream_t stream) {
  return Load().ok() ? TheApi().set_stream(handle, stream) : CUBLAS_STATUS_NOT_INITIALIZED;
}
cublasStatus_t SetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  return Load().ok() ? TheApi().set_math_mode(handle, mode) : CUBLAS_STATUS_NOT_INITIALIZED;
}
cublasStatus_t GemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                      int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                      cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                      cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  if (!Load().ok()) return CUBLAS_STATUS_NOT_INITIALIZED;
  return TheApi().gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
                          computeType, algo);
}
const char* GetStatusName(cublasStatus_t status) {
  return Load().ok() ? TheApi().status_name(status) : "CUBLAS_NOT_LOADED";
}
const char* GetStatusString(cublasStatus_t status) {
  return Load().ok() ? TheApi().status_string(status) : "cuBLAS could not be loaded";
}

}  // namespace kvq::kernels::cublas
