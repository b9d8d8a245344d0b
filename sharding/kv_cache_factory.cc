#include "sharding/kv_cache_factory.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantized_kv_cache.h"
#include "kvstore/quantizer.h"
#include "sharding/quantized_cache.h"

namespace kvq::sharding {
namespace {

class DenseFactory : public KvCacheFactory {
 public:
  DenseFactory(const model::ModelConfig& c, bool fp32) : c_(c), fp32_(fp32), name_(fp32 ? "fp32" : "fp16") {}
  absl::StatusOr<std::unique_ptr<model::KvCache>> Make(int64_t offset) const override {
    return std::make_unique<model::DenseKvCache>(c_, fp32_, offset);
  }
  absl::StatusOr<std::unique_ptr<model::KvCache>> Deserialize(const std::string& b) const override {
    KVQ_ASSIGN_OR_RETURN(auto c, model::DenseKvCache::Deserialize(c_, b));
    return std::unique_ptr<model::KvCache>(std::move(c));
  }
  double BytesPerToken() const override {
    return 2.0 * c_.n_layers * c_.kv_dim() * (fp32_ ? 4 : 2);
  }
  double EffectiveBitsPerElement() const override { return fp32_ ? 32.0 : 16.0; }
  const std::string& format() const override { return name_; }

 private:
  model::ModelConfig c_;
  bool fp32_;
  std::string name_;
};

class QuantizedFactory : public KvCacheFactory {
 public:
  QuantizedFactory(const model::ModelConfig& c, kvstore::KvFormat f,
                   std::shared_ptr<const kvstore::Quantizer> q)
      : c_(c), format_(f), q_(std::move(q)), name_(f.ToString()),
        shape_{c.n_layers, c.n_kv_heads, c.head_dim} {}
  absl::StatusOr<std::unique_ptr<model::KvCache>> Make(int64_t offset) const override {
    KVQ_ASSIGN_OR_RETURN(auto cache, kvstore::QuantizedKvCache::Create(
                                         shape_, format_, q_, model::RopeParamsFor(c_), offset));
    return std::unique_ptr<model::KvCache>(new QuantizedCache(std::move(cache), c_.n_heads));
  }
  absl::StatusOr<std::unique_ptr<model::KvCache>> Deserialize(const std::string& b) const override {
    KVQ_ASSIGN_OR_RETURN(auto cache, kvstore::QuantizedKvCache::Deserialize(b, q_, model::RopeParamsFor(c_)));
    return std::unique_ptr<model::KvCache>(new QuantizedCache(std::move(cache), c_.n_heads));
  }
  double BytesPerToken() const override { return kvstore::ExpectedBytesPerToken(format_, shape_); }
  double EffectiveBitsPerElement() const override {
    return 8.0 * BytesPerToken() / (2.0 * c_.n_layers * c_.kv_dim());
  }
  double OutlierFraction() const override { return format_.outlier_fraction; }
  const std::string& format() const override { return name_; }

 private:
  model::ModelConfig c_;
  kvstore::KvFormat format_;
  std::shared_ptr<const kvstore::Quantizer> q_;
  std::string name_;
  kvstore::KvShape shape_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<KvCacheFactory>> KvCacheFactory::Create(
    const model::ModelConfig& config, const std::string& format, const std::string& quantizer_path,
    const std::string& fingerprint) {
  if (format == "fp32" || format == "fp16") {
    return std::unique_ptr<KvCacheFactory>(new DenseFactory(config, format == "fp32"));
  }
  kvstore::KvFormat parsed;
  std::shared_ptr<const kvstore::Quantizer> q;
  KVQ_RETURN_IF_ERROR(ResolveKvFormat(config, format, quantizer_path, fingerprint, &parsed, &q));
  return std::unique_ptr<KvCacheFactory>(new QuantizedFactory(config, parsed, std::move(q)));
}

absl::Status ResolveKvFormat(const model::ModelConfig& config, const std::string& format,
                             const std::string& quantizer_path, const std::string& fingerprint,
                             kvstore::KvFormat* parsed_out,
                             std::shared_ptr<const kvstore::Quantizer>* quantizer_out) {
  auto parsed = kvstore::KvFormat::Parse(format);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown KV format '", format, "': ",
                                                   parsed.status().message(),
                                                   " (use fp32, fp16, int4, nuq3-1%, ...)"));
  }
  const kvstore::KvShape shape{config.n_layers, config.n_kv_heads, config.head_dim};
  std::shared_ptr<const kvstore::Quantizer> q;
  if (!quantizer_path.empty()) {
    KVQ_ASSIGN_OR_RETURN(kvstore::Quantizer loaded, kvstore::Quantizer::Load(quantizer_path));
    KVQ_RETURN_IF_ERROR(loaded.CheckCompatible(config.n_layers, config.n_kv_heads, config.head_dim,
                                               fingerprint.empty() ? loaded.fingerprint() : fingerprint));
    KVQ_RETURN_IF_ERROR(loaded.CheckFormat(*parsed));
    q = std::make_shared<const kvstore::Quantizer>(std::move(loaded));
  } else if (parsed->keys_per_channel() || parsed->uses_lut_from_quantizer()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV format ", format, " needs a calibrated quantizer: pass --quantizer (made by kvq calibrate)"));
  } else {
    KVQ_ASSIGN_OR_RETURN(kvstore::Quantizer u, kvstore::Quantizer::Uncalibrated(shape, *parsed, fingerprint));
    q = std::make_shared<const kvstore::Quantizer>(std::move(u));
  }
  *parsed_out = *parsed;
  *quantizer_out = std::move(q);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<model::KvCache>> MakeKvCache(const model::ModelConfig& config,
                                                            const std::string& format,
                                                            const std::string& quantizer_path) {
  KVQ_ASSIGN_OR_RETURN(auto f, KvCacheFactory::Create(config, format, quantizer_path, ""));
  return f->Make(0);
}

}  // namespace kvq::sharding
