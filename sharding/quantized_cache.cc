#include "sharding/quantized_cache.h"

#include <algorithm>

#include "common/status.h"

namespace kvq::sharding {

QuantizedCache::QuantizedCache(std::unique_ptr<kvstore::QuantizedKvCache> cache, int n_heads)
    : cache_(std::move(cache)), n_heads_(n_heads) {}

absl::Status QuantizedCache::Append(int layer, const float* k, const float* v, int n) {
  return cache_->Append(layer, k, v, n);
}

void QuantizedCache::Commit(int n) {
  absl::Status s = cache_->Commit();
  KVQ_CHECK(s.ok());
  (void)n;
}

void QuantizedCache::DiscardStaged() { cache_->AbortStep(); }

void QuantizedCache::Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
                            float* lse) const {
  const kvstore::KvShape& s = cache_->shape();
  int64_t max_end = 0;
  for (int i = 0; i < n_q; ++i) max_end = std::max(max_end, key_end[i]);
  std::vector<float> k, v;
  absl::Status st = cache_->ReadBack(layer, 0, max_end, &k, &v, /*include_staged=*/true);
  KVQ_CHECK(st.ok());
  const int64_t row = static_cast<int64_t>(s.n_kv_heads) * s.head_dim;
  const std::vector<double>& inv = cache_->inv_freq();
  for (int64_t t = 0; t < max_end; ++t) {
    kernels::ApplyRopeReference(k.data() + t * row, s.n_kv_heads, s.head_dim,
                                cache_->first_position() + t, inv);
  }
  model::AttendDense(q, n_q, n_heads_, k.data(), v.data(), max_end, s.n_kv_heads, s.head_dim,
                     key_end, o, lse);
}

std::unique_ptr<model::KvCache> QuantizedCache::Clone() const {
  auto c = cache_->Clone();
  KVQ_CHECK(c.ok());
  return std::make_unique<QuantizedCache>(std::move(*c), n_heads_);
}

}  // namespace kvq::sharding
