#include "model/fingerprint.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_format.h"

namespace kvq::model {
namespace {

struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void Bytes(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) {
      h ^= b[i];
      h *= 1099511628211ull;
    }
  }
  // Size plus up to 1024 evenly spaced elements: cheap on 7B weights, still weight-specific.
  void Sample(const std::vector<float>& v) {
    const uint64_t n = v.size();
    Bytes(&n, sizeof(n));
    if (v.empty()) return;
    const size_t step = std::max<size_t>(1, v.size() / 1024);
    for (size_t i = 0; i < v.size(); i += step) Bytes(&v[i], sizeof(float));
  }
};

}  // namespace

std::string ModelFingerprint(const LlamaWeights& w) {
  const ModelConfig& c = w.config;
  Fnv f;
  const std::string shape = absl::StrFormat("%s %d %d %d %d %d %d %d %g %g", c.arch, c.n_layers,
                                            c.hidden, c.n_heads, c.n_kv_heads, c.head_dim,
                                            c.intermediate, c.vocab_size, c.rope_theta, c.rms_norm_eps);
  f.Bytes(shape.data(), shape.size());
  f.Sample(w.tok_embd);
  f.Sample(w.output);
  for (const LayerWeights& l : w.layers) {
    f.Sample(l.wq);
    f.Sample(l.wk);
    f.Sample(l.wv);
    f.Sample(l.w_down);
  }
  return absl::StrFormat("%s-%dx%dx%d:%016x", c.arch, c.n_layers, c.n_kv_heads, c.head_dim, f.h);
}

}  // namespace kvq::model
