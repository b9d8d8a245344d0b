// Builds a sequence's KV cache for a KV format name: "fp32" and "fp16" are dense; every other name
// is a KVQuant format from kvstore/ (which needs the quantizer file of the model).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/forward.h"

namespace kvq::sharding {

// A format bound to a model (and, for KVQuant formats, its loaded quantizer): makes caches.
class KvCacheFactory {
 public:
  // fingerprint: model::ModelFingerprint of the weights; a quantizer made for another model is
  // refused with the mismatch named (empty: shape checks only).
  static absl::StatusOr<std::unique_ptr<KvCacheFactory>> Create(const model::ModelConfig& config,
                                                                const std::string& format,
                                                                const std::string& quantizer_path,
                                                                const std::string& fingerprint);
  virtual ~KvCacheFactory() = default;
  // A new empty cache whose first token sits at RoPE position `position_offset`.
  virtual absl::StatusOr<std::unique_ptr<model::KvCache>> Make(int64_t position_offset = 0) const = 0;
  virtual absl::StatusOr<std::unique_ptr<model::KvCache>> Deserialize(const std::string& bytes) const = 0;
  // Bytes one token occupies in this format (all layers, K and V, outliers and scales included).
  virtual double BytesPerToken() const = 0;
  virtual double EffectiveBitsPerElement() const = 0;
  virtual double OutlierFraction() const { return 0.0; }
  virtual const std::string& format() const = 0;
};

// Convenience: one cache from a format name.
absl::StatusOr<std::unique_ptr<model::KvCache>> MakeKvCache(const model::ModelConfig& config,
                                                            const std::string& format,
                                                            const std::string& quantizer_path);

}  // namespace kvq::sharding
