// Builds the device view (kernels::PagedKvCache) of a batch of kvstore::QuantizedKvCache objects:
// blocks exported in their canonical bytes into one pool (in reverse order, so the block table
// really indirects), fp16 sink buffers rebuilt from ReadBack, quantizer tensors uploaded.
#pragma once

#include <algorithm>
#include <memory>
#include <random>
#include <vector>

#include "common/half.h"
#include "kernels/decode_attention.h"
#include "kernels/paged_kv.h"
#include "kernels/reference/rope.h"
#include "kvstore/block_layout.h"
#include "kvstore/kernel_geometry.h"
#include "kvstore/quantized_kv_cache.h"
#include "kvstore/quantizer.h"
#include "tests/kernels/cuda_test_util.h"

namespace kvq::testing {

using kvstore::ToKernelGeometry;

inline kernels::KvCodec CodecOf(const kvstore::KvFormat& f) {
  return f.quantized() ? static_cast<kernels::KvCodec>(f.bits) : kernels::KvCodec::kFp16;
}

// Device copy of a batch of caches (all with the same shape, format and quantizer).
struct DevicePagedKv {
  DeviceBuffer<uint8_t> pool;
  DeviceBuffer<int32_t> block_table, seq_lens;
  DeviceBuffer<int64_t> first_positions;
  std::vector<std::unique_ptr<DeviceBuffer<uint16_t>>> sinks;
  DeviceBuffer<const uint16_t*> sink_ptrs;
  DeviceBuffer<float> key_zp, key_range, key_lut, value_lut;
  DeviceBuffer<double> inv_freq;
  DeviceBuffer<uint8_t> rope_steps;  // kernels::LaunchRopeStepTable of inv_freq
  DeviceBuffer<uint8_t> rope_anchors;  // kernels::LaunchRopeAnchorTable of inv_freq
  kernels::PagedKvCache view;
  int max_seq_len = 0;
};

inline std::unique_ptr<DevicePagedKv> UploadCaches(
    const std::vector<const kvstore::QuantizedKvCache*>& caches, const kvstore::Quantizer* quant,
    const kernels::RopeParams& rope) {
  auto d = std::make_unique<DevicePagedKv>();
  const kvstore::QuantizedKvCache& c0 = *caches[0];
  const kvstore::KvShape& shape = c0.shape();
  const kvstore::KvFormat& format = c0.format();
  const kvstore::BlockLayout& lay = c0.layout();
  std::vector<std::string> blocks;
  std::vector<std::vector<int32_t>> ids(caches.size());
  int max_blocks = 1;
  for (size_t s = 0; s < caches.size(); ++s) {
    const int64_t nb = caches[s]->Bytes().blocks;
    max_blocks = std::max<int>(max_blocks, static_cast<int>(nb));
    for (int64_t b = 0; b < nb; ++b) blocks.push_back(caches[s]->ExportBlock(b));
  }
  size_t stride = static_cast<size_t>(lay.fixed_bytes);
  for (const auto& b : blocks) stride = std::max(stride, b.size());
  stride = (stride + 15) / 16 * 16;
  // Reverse order in the pool: block i of the flat list goes to slot n-1-i.
  const size_t n = blocks.size();
  std::vector<uint8_t> pool(std::max<size_t>(n, 1) * stride, 0);
  std::vector<int32_t> table(caches.size() * max_blocks, 0);
  size_t flat = 0;
  for (size_t s = 0; s < caches.size(); ++s) {
    const int64_t nb = caches[s]->Bytes().blocks;
    for (int64_t b = 0; b < nb; ++b, ++flat) {
      const size_t slot = n - 1 - flat;
      std::copy(blocks[flat].begin(), blocks[flat].end(), pool.begin() + slot * stride);
      table[s * max_blocks + b] = static_cast<int32_t>(slot);
    }
  }
  d->pool.Upload(pool);
  d->block_table.Upload(table);
  std::vector<int32_t> lens;
  std::vector<int64_t> firsts;
  std::vector<const uint16_t*> sink_ptrs;
  const int64_t L = shape.ElementsPerTokenPerLayer();
  for (const auto* c : caches) {
    lens.push_back(static_cast<int32_t>(c->length()));
    d->max_seq_len = std::max<int>(d->max_seq_len, static_cast<int>(c->length()));
    firsts.push_back(c->first_position());
    const int cap = c->sink_capacity();
    const int64_t have = std::min<int64_t>(cap, c->length());
    std::vector<uint16_t> sink(static_cast<size_t>(shape.n_layers) * cap * L * 2, 0);
    for (int l = 0; l < shape.n_layers && have > 0; ++l) {
      std::vector<float> k, v;
      EXPECT_TRUE(c->ReadBack(l, 0, have, &k, &v).ok());
      for (int64_t i = 0; i < have * L; ++i) {
        sink[static_cast<size_t>(l) * cap * L + i] = FloatToHalfBits(k[i]);
        sink[(static_cast<size_t>(shape.n_layers) * cap + static_cast<size_t>(l) * cap) * L + i] =
            FloatToHalfBits(v[i]);
      }
    }
    d->sinks.push_back(std::make_unique<DeviceBuffer<uint16_t>>(sink));
    sink_ptrs.push_back(d->sinks.back()->get());
  }
  d->seq_lens.Upload(lens);
  d->first_positions.Upload(firsts);
  d->sink_ptrs.Upload(sink_ptrs);
  d->inv_freq.Upload(kernels::RopeInvFreq(rope));

  kernels::PagedKvCache& v = d->view;
  v.geom = ToKernelGeometry(lay);
  v.codec = CodecOf(format);
  v.pool = d->pool.get();
  v.block_stride_bytes = static_cast<int64_t>(stride);
  v.block_table = d->block_table.get();
  v.max_blocks_per_seq = max_blocks;
  v.seq_lens = d->seq_lens.get();
  v.first_positions = d->first_positions.get();
  v.sink_tokens = format.sink_tokens;
  v.sink = d->sink_ptrs.get();
  v.keys_rotated = format.keys_post_rope();
  v.rope_inv_freq = d->inv_freq.get();
  d->rope_steps.Resize(kernels::RopeStepTableBytes(shape.head_dim));
  if (kernels::LaunchRopeStepTable(d->inv_freq.get(), shape.head_dim, d->rope_steps.get(), nullptr).ok()) {
    v.rope_steps = d->rope_steps.get();
  }
  d->rope_anchors.Resize(kernels::RopeAnchorTableBytes(shape.head_dim, kernels::kRopeAnchorDefaultCount));
  if (kernels::LaunchRopeAnchorTable(d->inv_freq.get(), shape.head_dim, kernels::kRopeAnchorDefaultCount,
                                     d->rope_anchors.get(), nullptr).ok()) {
    v.rope_anchors = d->rope_anchors.get();
    v.rope_anchor_count = kernels::kRopeAnchorDefaultCount;
  }
  if (format.quantized()) {
    const int C = format.num_centroids();
    std::vector<float> klut, vlut;
    for (int l = 0; l < shape.n_layers; ++l) {
      const auto kl = quant->EffectiveKeyLut(l, format.qnorm);
      const auto vl = quant->EffectiveValueLut(l, format.qnorm);
      klut.insert(klut.end(), kl.begin(), kl.begin() + C);
      vlut.insert(vlut.end(), vl.begin(), vl.begin() + C);
    }
    d->key_lut.Upload(klut);
    d->value_lut.Upload(vlut);
    const size_t nk = static_cast<size_t>(shape.n_layers) * L;
    if (format.keys_per_channel()) {
      d->key_zp.Upload(std::vector<float>(quant->KeyZeroPoint(0), quant->KeyZeroPoint(0) + nk));
      d->key_range.Upload(std::vector<float>(quant->KeyRange(0), quant->KeyRange(0) + nk));
    }
    v.key_lut = d->key_lut.get();
    v.value_lut = d->value_lut.get();
    v.key_zero_point = d->key_zp.get();
    v.key_range = d->key_range.get();
  }
  return d;
}

// One QuantizedKvCache per entry of `lens` (that many committed tokens, the first at
// first_position) of random pre-RoPE keys (N(0, 1.2^2), every 97th element 4x so that per-channel
// outliers exist even at 0.1%) and values (N(0, 1)), appended in steps of up to 300 tokens; the
// numbers come from rng through nd, in order. Appends to *caches and *ptrs.
inline void MakeRandomCaches(const kvstore::KvShape& shape, const kvstore::KvFormat& format,
                             const std::shared_ptr<const kvstore::Quantizer>& quant, const kernels::RopeParams& rope,
                             const std::vector<int>& lens, int64_t first_position, std::mt19937& rng,
                             std::normal_distribution<float>& nd,
                             std::vector<std::unique_ptr<kvstore::QuantizedKvCache>>* caches,
                             std::vector<const kvstore::QuantizedKvCache*>* ptrs,
                             int value_skew_head = -1) {
  const int64_t L = shape.ElementsPerTokenPerLayer();
  for (int len : lens) {
    auto cache = kvstore::QuantizedKvCache::Create(shape, format, quant, rope, first_position);
    ASSERT_TRUE(cache.ok()) << cache.status();
    std::vector<float> k(static_cast<size_t>(len) * L), v(k.size());
    for (float& x : k) x = nd(rng) * 1.2f;
    for (float& x : v) x = nd(rng);
    for (size_t i = 0; i < k.size(); i += 97) k[i] *= 4.0f;
    // Values of one head 8x larger: every token's value outliers (the extremes of its layer
    // vector) fall in that head.
    if (value_skew_head >= 0) {
      for (size_t i = 0; i < v.size(); ++i) {
        if ((static_cast<int64_t>(i) % L) / shape.head_dim == value_skew_head) v[i] *= 8.0f;
      }
    }
    for (int at = 0; at < len; at += 300) {
      const int n = std::min(300, len - at);
      for (int l = 0; l < shape.n_layers; ++l) {
        ASSERT_TRUE((*cache)->Append(l, k.data() + at * L, v.data() + at * L, n).ok());
      }
      ASSERT_TRUE((*cache)->Commit().ok());
    }
    ptrs->push_back(cache->get());
    caches->push_back(std::move(cache).value());
  }
}

// A calibrated quantizer with random (but plausible) thresholds and strictly ascending LUTs, for
// the attention kernels' tests (decode and prefill).
inline std::shared_ptr<const kvstore::Quantizer> MakeRandomQuantizer(const kvstore::KvShape& shape,
                                                                     const kvstore::KvFormat& format,
                                                                     std::mt19937& rng) {
  if (!format.quantized()) return nullptr;
  kvstore::QuantizerData d;
  d.shape = shape;
  d.format = format;
  d.fingerprint = "test";
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  const size_t nk = static_cast<size_t>(shape.n_layers) * shape.ElementsPerTokenPerLayer();
  if (format.keys_per_channel()) {
    for (size_t i = 0; i < nk; ++i) {
      const float center = 0.5f * (u(rng) - 0.5f);
      const float half = 0.8f + 1.5f * u(rng);
      d.key_lower.push_back(center - half);
      d.key_upper.push_back(center + half);
    }
  }
  const int C = format.num_centroids();
  for (int l = 0; l < shape.n_layers; ++l) {
    for (auto* lut : {&d.key_lut, &d.value_lut}) {
      for (int j = 0; j < C; ++j) {
        // Evenly spaced with jitter below half a step: still strictly ascending in [-1, 1].
        const float base = -1.0f + 2.0f * j / (C - 1);
        const float jitter = (j == 0 || j == C - 1) ? 0.0f : (u(rng) - 0.5f) * (0.8f / (C - 1));
        lut->push_back(base + jitter);
      }
    }
    d.key_qnorm_scale.push_back(format.qnorm ? 0.9f : 1.0f);
    d.key_qnorm_offset.push_back(format.qnorm ? 0.01f : 0.0f);
    d.value_qnorm_scale.push_back(format.qnorm ? 0.95f : 1.0f);
    d.value_qnorm_offset.push_back(0.0f);
  }
  auto q = kvstore::Quantizer::Create(std::move(d));
  EXPECT_TRUE(q.ok()) << q.status();
  return std::make_shared<const kvstore::Quantizer>(std::move(q).value());
}

}  // namespace kvq::testing
