// Device RoPE of one rotate-half pair (x_lo, x_hi) = (x[i], x[i + head_dim / 2]) at an absolute
// position: angle and rotation in double, each output rounded once to f32 (positions up to 10M+
// keep full precision). The one definition for the kernels that rotate a step's queries and keys
// (LaunchRopeQuery and the decode GEMV's epilogue), so that they agree to the bit.
#pragma once

#include <cstdint>

namespace kvq::kernels {

__device__ __forceinline__ void RopeRotatePair(float x_lo, float x_hi, int64_t position, double inv_freq,
                                               float* lo, float* hi) {
  double s, c;
  sincos(static_cast<double>(position) * inv_freq, &s, &c);
  const double a = x_lo, b = x_hi;
  *lo = static_cast<float>(a * c - b * s);
  *hi = static_cast<float>(b * c + a * s);
}

}  // namespace kvq::kernels
