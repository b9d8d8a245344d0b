// Element types of dense activations and weights, and their device load/store helpers.
#pragma once

#include <cstdint>
#include <string>

namespace kvq::kernels {

enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline std::string DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
  }
  return "dtype?";
}
inline int DTypeBytes(DType t) { return t == DType::kF32 ? 4 : 2; }

}  // namespace kvq::kernels

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
namespace kvq::kernels::internal {
template <DType T> struct DTypeTraits;
template <> struct DTypeTraits<DType::kF32> { using type = float; };
template <> struct DTypeTraits<DType::kF16> { using type = __half; };
template <> struct DTypeTraits<DType::kBF16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T FromFloat(float x);
template <> __device__ __forceinline__ float FromFloat<float>(float x) { return x; }
template <> __device__ __forceinline__ __half FromFloat<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
}  // namespace kvq::kernels::internal
#endif
