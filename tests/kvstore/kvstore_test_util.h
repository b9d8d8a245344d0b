// Synthetic activations for kvstore tests: keys with a few large-magnitude channels (the reason
// for per-channel key scaling), values with heavy-ish tails (a Student-t-like mix), fixed seeds.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "kvstore/calibration.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantizer.h"

namespace kvq::kvstore::testing {

// [n_tokens][n_kv][hd]: channel c of head h has offset and scale depending on (layer, h, c).
inline std::vector<float> SyntheticKeys(int64_t n_tokens, const KvShape& s, int layer,
                                        uint32_t seed) {
  std::mt19937 rng(seed * 7919u + static_cast<uint32_t>(layer));
  std::normal_distribution<float> g(0.0f, 1.0f);
  const int64_t L = s.ElementsPerTokenPerLayer();
  std::vector<float> scale(L), offset(L);
  std::mt19937 chan_rng(1000u + static_cast<uint32_t>(layer));  // channel stats fixed per layer
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (int64_t c = 0; c < L; ++c) {
    const bool big = u(chan_rng) < 0.06f;
    scale[c] = big ? 6.0f + 4.0f * u(chan_rng) : 0.5f + u(chan_rng);
    offset[c] = (u(chan_rng) - 0.5f) * (big ? 8.0f : 1.0f);
  }
  std::vector<float> k(n_tokens * L);
  for (int64_t i = 0; i < n_tokens; ++i) {
    for (int64_t c = 0; c < L; ++c) k[i * L + c] = offset[c] + scale[c] * g(rng);
  }
  return k;
}

inline std::vector<float> SyntheticValues(int64_t n_tokens, const KvShape& s, int layer,
                                          uint32_t seed) {
  std::mt19937 rng(seed * 104729u + 17u + static_cast<uint32_t>(layer));
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  const int64_t L = s.ElementsPerTokenPerLayer();
  std::vector<float> v(n_tokens * L);
  for (float& x : v) x = g(rng) * (u(rng) < 0.02f ? 5.0f : 1.0f);
  return v;
}

// A quantizer for `format` calibrated on n_tokens synthetic tokens per layer.
inline std::shared_ptr<const Quantizer> CalibratedQuantizer(const KvShape& shape,
                                                            const KvFormat& format,
                                                            int64_t n_tokens = 1024,
                                                            uint32_t seed = 1) {
  if (!format.keys_per_channel() && format.kind != KvFormatKind::kNuq) {
    auto q = Quantizer::Uncalibrated(shape, format, "synthetic");
    return q.ok() ? std::make_shared<const Quantizer>(*std::move(q)) : nullptr;
  }
  std::vector<std::vector<float>> keys, values;
  std::vector<LayerCalibrationData> layers;
  for (int l = 0; l < shape.n_layers; ++l) {
    keys.push_back(SyntheticKeys(n_tokens, shape, l, seed));
    values.push_back(SyntheticValues(n_tokens, shape, l, seed));
  }
  for (int l = 0; l < shape.n_layers; ++l) {
    LayerCalibrationData d;
    d.n_tokens = n_tokens;
    d.keys = keys[l].data();
    d.values = values[l].data();
    layers.push_back(d);
  }
  auto q = Calibrate(shape, format, "synthetic", layers);
  return q.ok() ? std::make_shared<const Quantizer>(*std::move(q)) : nullptr;
}

}  // namespace kvq::kvstore::testing
