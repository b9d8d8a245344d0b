// Builds a sequence's KV cache for a KV format name: "fp32" and "fp16" are dense; every other name
// is a KVQuant format from kvstore/ (which needs the quantizer file of the model).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantizer.h"
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
  // Bytes a cache of `tokens` tokens will hold (what admission reserves): BytesPerToken() * tokens
  // here; a paged GPU pool counts whole blocks.
  virtual int64_t BytesForTokens(int64_t tokens) const {
    return static_cast<int64_t>(static_cast<double>(tokens) * BytesPerToken() + 0.5);
  }
  virtual double EffectiveBitsPerElement() const = 0;
  virtual double OutlierFraction() const { return 0.0; }
  virtual const std::string& format() const = 0;
};

// A KVQuant format name bound to a model: the parsed format and its quantizer (loaded from
// quantizer_path and checked against the model, or uncalibrated where the format needs none).
absl::Status ResolveKvFormat(const model::ModelConfig& config, const std::string& format,
                             const std::string& quantizer_path, const std::string& fingerprint,
                             kvstore::KvFormat* parsed_out,
                             std::shared_ptr<const kvstore::Quantizer>* quantizer_out);

// Convenience: one cache from a format name.
absl::StatusOr<std::unique_ptr<model::KvCache>> MakeKvCache(const model::ModelConfig& config,
                                                            const std::string& format,
                                                            const std::string& quantizer_path);

}  // namespace kvq::sharding
