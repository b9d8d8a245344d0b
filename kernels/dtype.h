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

#include <type_traits>
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
__device__ __forceinline__ float2 ToFloat2(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 ToFloat2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
// The pair type of T (f16 or bf16).
template <typename T>
using Pair2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
// Eight elements of T (f16 or bf16; a 16-byte load) as floats.
template <typename T>
__device__ __forceinline__ void ToFloat8(const uint4& v, float (&f)[8]) {
  const Pair2<T>* h = reinterpret_cast<const Pair2<T>*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = ToFloat2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}
}  // namespace kvq::kernels::internal
#endif
