// Host-side fp16 / bf16 vectors and normal samples for the CUDA kernel tests.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace kvq::testing {

inline std::vector<uint16_t> ToHalf(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = __half_as_ushort(__float2half_rn(x[i]));
  return h;
}
inline std::vector<float> FromHalf(const std::vector<uint16_t>& h) {
  std::vector<float> x(h.size());
  for (size_t i = 0; i < h.size(); ++i) x[i] = __half2float(__ushort_as_half(h[i]));
  return x;
}
inline std::vector<uint16_t> ToBf16(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
  return h;
}
inline std::vector<float> FromBf16(const std::vector<uint16_t>& h) {
  std::vector<float> x(h.size());
  for (size_t i = 0; i < h.size(); ++i) x[i] = __bfloat162float(__ushort_as_bfloat16(h[i]));
  return x;
}
inline std::vector<float> Randn(size_t n, uint32_t seed, float s = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, s);
  std::vector<float> x(n);
  for (float& v : x) v = nd(rng);
  return x;
}

}  // namespace kvq::testing
