// model::KvCache over kvstore's KVQuant cache: what the CPU engine, the perplexity evaluation and
// the calibration tool use for quantized KV formats.
#pragma once

#include <memory>

#include "kvstore/quantized_kv_cache.h"
#include "model/forward.h"

namespace kvq::sharding {

class QuantizedCache : public model::KvCache {
 public:
  QuantizedCache(std::unique_ptr<kvstore::QuantizedKvCache> cache, int n_heads);
  int64_t length() const override { return cache_->length(); }
  absl::Status Append(int layer, const float* k, const float* v, int n) override;
  void Commit(int n) override;
  void DiscardStaged() override;
  // Dequantizes the keys and values in range (staged ones included), rotates the keys at their
  // positions and runs the dense attention math (OpenBLAS). Equal to kvstore's double-precision
  // AttendPast up to fp32 rounding; tests/sharding check it.
  void Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
              float* lse) const override;
  int64_t bytes() const override { return cache_->Bytes().total_bytes; }
  std::unique_ptr<model::KvCache> Clone() const override;
  absl::StatusOr<std::string> Serialize() const override { return cache_->Serialize(); }

  absl::Status ReadDequantized(int layer, int64_t end, std::vector<float>* k,
                               std::vector<float>* v) const override {
    return cache_->ReadBack(layer, 0, end, k, v, /*include_staged=*/true);
  }
  int64_t first_position() const override { return cache_->first_position(); }

  const kvstore::QuantizedKvCache& cache() const { return *cache_; }

 private:
  std::unique_ptr<kvstore::QuantizedKvCache> cache_;
  int n_heads_;
  std::vector<double> inv_freq_;
};

}  // namespace kvq::sharding
