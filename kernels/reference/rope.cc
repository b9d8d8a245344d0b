#include "kernels/reference/rope.h"

#include <cmath>

namespace kvq::kernels {

std::vector<double> RopeInvFreq(const RopeParams& p) {
  const int half = p.head_dim / 2;
  std::vector<double> inv(half);
  for (int i = 0; i < half; ++i) {
    // Hugging Face computes base ** (arange(0, dim, 2) / dim) in float32; keep that rounding so
    // that logits match it, then work in double from here on.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(p.head_dim);
    inv[i] = 1.0 / static_cast<double>(std::pow(static_cast<float>(p.theta), exponent));
  }
  if (p.llama3_scaling) {
    const double low_wavelen = p.original_max_position / p.low_freq_factor;
    const double high_wavelen = p.original_max_position / p.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = f / p.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (p.original_max_position / wavelen - p.low_freq_factor) /
                              (p.high_freq_factor - p.low_freq_factor);
        f = (1.0 - smooth) * f / p.factor + smooth * f;
      }
    }
  }
  return inv;
}

void ApplyRopeReference(float* x, int n_heads, int head_dim, int64_t pos,
                        const std::vector<double>& inv_freq) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const double angle = static_cast<double>(pos) * inv_freq[i];
    const double c = std::cos(angle), s = std::sin(angle);
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + static_cast<int64_t>(h) * head_dim;
      const double a = v[i], b = v[i + half];
      v[i] = static_cast<float>(a * c - b * s);
      v[i + half] = static_cast<float>(b * c + a * s);
    }
  }
}

}  // namespace kvq::kernels
