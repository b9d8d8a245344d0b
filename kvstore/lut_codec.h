// Scalar quantization primitives shared by every quantized format (uniform intB formats are LUTs
// of evenly spaced centroids, so one code path serves int and nuq): nearest-centroid encode
// against a sorted LUT, fused dequantization, and the online per-token scaling of values.
// The arithmetic is the contract of block_layout.h section 4; the CUDA kernels must match it.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/half.h"

namespace kvq::kvstore {

// Evenly spaced centroids in [-1, 1]: lut[j] = -1 + 2j / (2^bits - 1), computed in double.
std::vector<float> UniformLut(int bits);

// Decision boundaries mid_j = 0.5f * (lut[j] + lut[j + 1]) for a strictly ascending LUT.
std::vector<float> LutMidpoints(const std::vector<float>& lut);

// Code of the nearest centroid to clamp(x_norm, -1, 1): the number of midpoints strictly below
// it, so ties go to the lower centroid. NaN encodes as 0.
inline uint32_t EncodeNearest(float x_norm, const float* mids, int n_mids) {
  const float x = std::fmin(std::fmax(x_norm, -1.0f), 1.0f);
  uint32_t code = 0;
  for (int j = 0; j < n_mids; ++j) code += (x > mids[j]) ? 1u : 0u;
  return code;
}

inline float Normalize(float x, float zero_point, float range) { return (x - zero_point) / range; }

inline float Dequantize(uint32_t code, const float* lut, float zero_point, float range) {
  return std::fmaf(lut[code], range, zero_point);
}

// Online per-token scaling of one vector of L elements with k fixed outliers (block_layout.h
// section 4): zero-point and range as fp16 bits, and the outlier element indices (ascending).
struct TokenScaling {
  uint16_t zero_point_half = 0;
  uint16_t range_half = 0;
  float zero_point() const { return HalfBitsToFloat(zero_point_half); }
  float range() const { return HalfBitsToFloat(range_half); }
};
// `order` is scratch. outliers receives k indices (ascending). Requires 0 <= k < L.
TokenScaling ComputeTokenScaling(const float* x, int L, int k, std::vector<int>* outliers,
                                 std::vector<int>* order);

// Smallest fp16 range used for per-token scaling (normal fp16 minimum, 2^-14).
inline constexpr float kMinTokenRange = 6.103515625e-05f;

}  // namespace kvq::kvstore
