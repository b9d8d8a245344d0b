#include "kvstore/lut_codec.h"

#include <algorithm>

namespace kvq::kvstore {

std::vector<float> UniformLut(int bits) {
  const int n = 1 << bits;
  std::vector<float> lut(n);
  for (int j = 0; j < n; ++j) lut[j] = static_cast<float>(-1.0 + 2.0 * j / (n - 1));
  return lut;
}

std::vector<float> LutMidpoints(const std::vector<float>& lut) {
  std::vector<float> mids(lut.size() > 0 ? lut.size() - 1 : 0);
  for (size_t j = 0; j + 1 < lut.size(); ++j) mids[j] = 0.5f * (lut[j] + lut[j + 1]);
  return mids;
}

TokenScaling ComputeTokenScaling(const float* x, int L, int k, std::vector<int>* outliers,
                                 std::vector<int>* order) {
  outliers->clear();
  float lower, upper;
  if (k == 0) {
    lower = upper = x[0];
    for (int i = 1; i < L; ++i) {
      lower = std::min(lower, x[i]);
      upper = std::max(upper, x[i]);
    }
  } else {
    order->resize(L);
    for (int i = 0; i < L; ++i) (*order)[i] = i;
    auto less = [x](int a, int b) { return x[a] < x[b] || (x[a] == x[b] && a < b); };
    std::sort(order->begin(), order->end(), less);
    const int k_lo = k / 2, k_hi = k - k_lo;
    lower = x[(*order)[k_lo]];
    upper = x[(*order)[L - k_hi - 1]];
    outliers->insert(outliers->end(), order->begin(), order->begin() + k_lo);
    outliers->insert(outliers->end(), order->end() - k_hi, order->end());
    std::sort(outliers->begin(), outliers->end());
  }
  TokenScaling s;
  s.zero_point_half = FloatToHalfBits(0.5f * (upper + lower));
  float r = HalfBitsToFloat(FloatToHalfBits(0.5f * (upper - lower)));
  if (!(r >= kMinTokenRange)) r = kMinTokenRange;
  s.range_half = FloatToHalfBits(r);
  return s;
}

}  // namespace kvq::kvstore
