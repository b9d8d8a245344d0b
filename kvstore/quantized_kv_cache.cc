#include "kvstore/quantized_kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "kvstore/bit_packing.h"
#include "kvstore/byte_io.h"
#include "kvstore/lut_codec.h"

namespace kvq::kvstore {
namespace {

constexpr char kCacheMagic[8] = {'K', 'V', 'Q', 'C', 'A', 'C', 'H', 'E'};
// Version 4: value_outlier_head_start at the end of each layer section where the layout has it
// (block_layout.h). Version 3: 2- and 3-bit codes bit-sliced (kernels/code_layout.h). Version 1
// had every width as an LSB-first stream, version 2 the 2-bit codes. Older versions are converted
// on load.
constexpr uint32_t kCacheVersion = 4;

// A block's code rows written as LSB-first streams of lay.bits-bit codes, rewritten in place in
// today's layout.
void RepackLsbFirst(const BlockLayout& lay, uint8_t* fixed) {
  const int bits = lay.bits;
  std::vector<uint8_t> codes(lay.head_dim);
  std::vector<uint32_t> row(lay.key_words_per_token);
  for (int l = 0; l < lay.n_layers; ++l) {
    for (int h = 0; h < lay.n_kv_heads; ++h) {
      for (int t = 0; t < kBlockTokens; ++t) {
        for (const int64_t at : {lay.KeyCodesAt(l, h, t), lay.ValueCodesAt(l, h, t)}) {
          std::memcpy(row.data(), fixed + at, row.size() * 4);
          for (int c = 0; c < lay.head_dim; ++c) codes[c] = static_cast<uint8_t>(GetStreamCode(row.data(), c, bits));
          PackCodes(codes.data(), lay.head_dim, bits, row.data());
          std::memcpy(fixed + at, row.data(), row.size() * 4);
        }
      }
    }
  }
}
constexpr int64_t kFramingBytes = 8 + 4 + 4 + 8 + 8;  // magic, version, reserved, length, checksum

inline uint16_t Load16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline void Store16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
inline void Store32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// value_outlier_head_start of token t in layer `layer` (block_layout.h), from the token's value
// outlier indices already in `fixed` (ascending).
void WriteValueOutlierHeadStarts(const BlockLayout& lay, int layer, int t, uint8_t* fixed) {
  const int k = lay.value_outliers_per_token, ib = lay.value_outlier_index_bytes;
  const uint8_t* idx = fixed + lay.ValueOutlierIndexAt(layer, t);
  int o = 0;
  for (int h = 0; h < lay.n_kv_heads; ++h) {
    while (o < k && (ib == 1 ? idx[o] : Load16(idx + 2 * o)) < h * lay.head_dim) ++o;
    fixed[lay.ValueOutlierHeadStartAt(layer, h, t)] = static_cast<uint8_t>(o);
  }
}

// A block's fixed section read from a version < 4 file, whose layer sections end where
// value_outlier_head_start begins, moved into today's layout and the head starts of its first
// `filled` tokens computed from their value-outlier indices (the later slots stay zero).
void AddValueOutlierHeadStarts(const BlockLayout& lay, const uint8_t* old_fixed, int filled,
                               uint8_t* fixed) {
  const int64_t old_lb = lay.value_outlier_head_start_offset;
  for (int l = 0; l < lay.n_layers; ++l) {
    std::memcpy(fixed + lay.LayerOffset(l), old_fixed + l * old_lb, old_lb);
    std::memset(fixed + lay.LayerOffset(l) + old_lb, 0, lay.layer_bytes - old_lb);
    for (int t = 0; t < filled; ++t) WriteValueOutlierHeadStarts(lay, l, t, fixed);
  }
}

// Per-layer-section byte counts by category (identical for every layer and block).
struct SectionBytes {
  int64_t key_codes, value_codes, scales, value_outliers, key_dir, padding;
};
SectionBytes SectionBreakdown(const BlockLayout& b) {
  SectionBytes s;
  s.key_codes = static_cast<int64_t>(b.n_kv_heads) * kBlockTokens * b.key_words_per_token * 4;
  s.value_codes = static_cast<int64_t>(b.n_kv_heads) * kBlockTokens * b.value_words_per_token * 4;
  s.scales = (b.key_scales_offset >= 0 ? kBlockTokens * 4 : 0) +
             (b.value_scales_offset >= 0 ? kBlockTokens * 4 : 0);
  s.value_outliers = static_cast<int64_t>(kBlockTokens) * b.value_outliers_per_token *
                     (b.value_outlier_index_bytes + 2) +
                     (b.value_outlier_head_start_offset >= 0 ? static_cast<int64_t>(b.n_kv_heads) * kBlockTokens : 0);
  s.key_dir = b.has_key_outliers ? static_cast<int64_t>(b.n_kv_heads) * 8 : 0;
  s.padding = b.layer_bytes - s.key_codes - s.value_codes - s.scales - s.value_outliers - s.key_dir;
  return s;
}

}  // namespace

double ExpectedBytesPerToken(const KvFormat& format, const KvShape& shape) {
  const BlockLayout b = ComputeBlockLayout(format, shape);
  double bytes = static_cast<double>(b.fixed_bytes) / kBlockTokens;
  if (b.has_key_outliers) {
    bytes += format.outlier_fraction * static_cast<double>(shape.n_layers) *
             shape.ElementsPerTokenPerLayer() * kKeyOutlierEntryBytes;
  }
  return bytes;
}

QuantizedKvCache::QuantizedKvCache(const KvShape& shape, const KvFormat& format,
                                   std::shared_ptr<const Quantizer> quantizer,
                                   const kernels::RopeParams& rope, int64_t first_position)
    : shape_(shape),
      format_(format),
      layout_(ComputeBlockLayout(format, shape)),
      quantizer_(std::move(quantizer)),
      rope_(rope),
      inv_freq_(kernels::RopeInvFreq(rope)),
      first_position_(first_position),
      n_sink_(static_cast<int>(
          std::clamp<int64_t>(format.sink_tokens - first_position, 0, format.sink_tokens))),
      k_v_(ValueOutliersPerToken(format, shape)),
      appended_(shape.n_layers, false) {
  const size_t sink_halves =
      static_cast<size_t>(shape.n_layers) * n_sink_ * shape.n_kv_heads * shape.head_dim;
  sink_k_.assign(sink_halves, 0);
  sink_v_.assign(sink_halves, 0);
  if (format.quantized()) {
    codecs_.resize(shape.n_layers);
    for (int l = 0; l < shape.n_layers; ++l) {
      LayerCodec& c = codecs_[l];
      c.key_lut = quantizer_->EffectiveKeyLut(l, format.qnorm);
      c.value_lut = quantizer_->EffectiveValueLut(l, format.qnorm);
      c.key_mids = LutMidpoints(c.key_lut);
      c.value_mids = LutMidpoints(c.value_lut);
    }
  }
}

absl::StatusOr<std::unique_ptr<QuantizedKvCache>> QuantizedKvCache::Create(
    const KvShape& shape, const KvFormat& format, std::shared_ptr<const Quantizer> quantizer,
    const kernels::RopeParams& rope, int64_t first_position) {
  KVQ_RETURN_IF_ERROR(shape.Validate());
  KVQ_RETURN_IF_ERROR(format.Validate());
  if (first_position < 0) return absl::InvalidArgumentError("first_position must be >= 0");
  kernels::RopeParams r = rope;
  if (r.head_dim == 0) r.head_dim = shape.head_dim;
  if (r.head_dim != shape.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("RoPE head_dim ", r.head_dim,
                                                   " != cache head_dim ", shape.head_dim));
  }
  if (quantizer == nullptr && format.quantized()) {
    KVQ_ASSIGN_OR_RETURN(Quantizer q, Quantizer::Uncalibrated(shape, format, ""));
    quantizer = std::make_shared<const Quantizer>(std::move(q));
  } else if (quantizer != nullptr && format.quantized()) {
    if (!(quantizer->shape() == shape)) {
      KVQ_RETURN_IF_ERROR(quantizer->CheckCompatible(shape.n_layers, shape.n_kv_heads,
                                                     shape.head_dim, quantizer->fingerprint()));
    }
    KVQ_RETURN_IF_ERROR(quantizer->CheckFormat(format));
  }
  return std::unique_ptr<QuantizedKvCache>(
      new QuantizedKvCache(shape, format, std::move(quantizer), r, first_position));
}

QuantizedKvCache::Block* QuantizedKvCache::WritableBlock(int64_t b) {
  while (static_cast<int64_t>(blocks_.size()) <= b) {
    auto blk = std::make_shared<Block>();
    blk->fixed.assign(layout_.fixed_bytes, 0);
    blk->key_outliers.resize(static_cast<size_t>(shape_.n_layers) * shape_.n_kv_heads);
    blocks_.push_back(std::move(blk));
  }
  if (blocks_[b].use_count() > 1) blocks_[b] = std::make_shared<Block>(*blocks_[b]);
  return blocks_[b].get();
}

absl::Status QuantizedKvCache::Append(int layer, const float* k_prerope, const float* v, int n) {
  if (layer < 0 || layer >= shape_.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range [0, ",
                                                   shape_.n_layers, ")"));
  }
  if (n <= 0) return absl::InvalidArgumentError("Append needs n > 0 tokens");
  if (pending_n_ != 0 && n != pending_n_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "layer ", layer, " appends ", n, " tokens but this step appends ", pending_n_));
  }
  if (appended_[layer]) {
    return absl::FailedPreconditionError(
        absl::StrCat("layer ", layer, " already appended in this step; Commit() first"));
  }
  pending_n_ = n;
  appended_[layer] = true;
  const int64_t L = shape_.ElementsPerTokenPerLayer();
  for (int j = 0; j < n; ++j) AppendToken(layer, length_ + j, k_prerope + j * L, v + j * L);
  return absl::OkStatus();
}

absl::Status QuantizedKvCache::Commit() {
  if (pending_n_ == 0) return absl::FailedPreconditionError("Commit without an appended step");
  for (int l = 0; l < shape_.n_layers; ++l) {
    if (!appended_[l]) {
      return absl::FailedPreconditionError(absl::StrCat("Commit: layer ", l, " did not append"));
    }
  }
  length_ += pending_n_;
  pending_n_ = 0;
  std::fill(appended_.begin(), appended_.end(), false);
  return absl::OkStatus();
}

void QuantizedKvCache::AbortStep() {
  if (pending_n_ == 0) return;
  const int64_t L = shape_.ElementsPerTokenPerLayer();
  for (int64_t i = length_; i < length_ + pending_n_ && i < n_sink_; ++i) {
    for (int l = 0; l < shape_.n_layers; ++l) {
      const size_t off = (static_cast<size_t>(l) * n_sink_ + i) * L;
      std::fill(sink_k_.begin() + off, sink_k_.begin() + off + L, 0);
      std::fill(sink_v_.begin() + off, sink_v_.begin() + off + L, 0);
    }
  }
  const int64_t first = std::max<int64_t>(length_, n_sink_) - n_sink_;  // first staged block slot
  const int64_t keep_blocks = (first + kBlockTokens - 1) / kBlockTokens;
  if (static_cast<int64_t>(blocks_.size()) > keep_blocks) blocks_.resize(keep_blocks);
  const int t0 = static_cast<int>(first % kBlockTokens);
  if (t0 != 0 && static_cast<int64_t>(blocks_.size()) == keep_blocks && keep_blocks > 0) {
    // The committed tail block got staged tokens in slots [t0, 256): it was made writable (copied
    // if shared) by the append, so it is ours to clear.
    Block* blk = blocks_[keep_blocks - 1].get();
    uint8_t* base = blk->fixed.data();
    const int n = kBlockTokens - t0;
    for (int l = 0; l < shape_.n_layers; ++l) {
      for (int h = 0; h < shape_.n_kv_heads; ++h) {
        std::memset(base + layout_.KeyCodesAt(l, h, t0), 0, n * layout_.key_words_per_token * 4);
        std::memset(base + layout_.ValueCodesAt(l, h, t0), 0, n * layout_.value_words_per_token * 4);
        auto& e = blk->key_outliers[static_cast<size_t>(l) * shape_.n_kv_heads + h];
        e.erase(std::lower_bound(e.begin(), e.end(), t0,
                                 [](uint32_t en, int tok) { return KeyOutlierToken(en) < tok; }),
                e.end());
      }
      if (layout_.key_scales_offset >= 0) std::memset(base + layout_.KeyScalesAt(l, t0), 0, n * 4);
      if (layout_.value_scales_offset >= 0) std::memset(base + layout_.ValueScalesAt(l, t0), 0, n * 4);
      if (k_v_ > 0) {
        std::memset(base + layout_.ValueOutlierIndexAt(l, t0), 0,
                    static_cast<size_t>(n) * k_v_ * layout_.value_outlier_index_bytes);
        std::memset(base + layout_.ValueOutlierValueAt(l, t0), 0, static_cast<size_t>(n) * k_v_ * 2);
      }
      if (layout_.value_outlier_head_start_offset >= 0) {
        for (int h = 0; h < shape_.n_kv_heads; ++h) std::memset(base + layout_.ValueOutlierHeadStartAt(l, h, t0), 0, n);
      }
    }
  }
  pending_n_ = 0;
  std::fill(appended_.begin(), appended_.end(), false);
}

void QuantizedKvCache::AppendToken(int layer, int64_t i, const float* k, const float* v) {
  const int H = shape_.n_kv_heads, D = shape_.head_dim;
  const int L = H * D;
  if (i < n_sink_) {
    const size_t off = (static_cast<size_t>(layer) * n_sink_ + i) * L;
    for (int e = 0; e < L; ++e) {
      sink_k_[off + e] = FloatToHalfBits(k[e]);
      sink_v_[off + e] = FloatToHalfBits(v[e]);
    }
    return;
  }
  const int64_t j = i - n_sink_;
  const int t = static_cast<int>(j % kBlockTokens);
  Block* blk = WritableBlock(j / kBlockTokens);
  uint8_t* base = blk->fixed.data();
  if (!format_.quantized()) {
    for (int h = 0; h < H; ++h) {
      uint8_t* kd = base + layout_.KeyCodesAt(layer, h, t);
      uint8_t* vd = base + layout_.ValueCodesAt(layer, h, t);
      for (int d = 0; d < D; ++d) {
        Store16(kd + 2 * d, FloatToHalfBits(k[h * D + d]));
        Store16(vd + 2 * d, FloatToHalfBits(v[h * D + d]));
      }
    }
    return;
  }
  const LayerCodec& c = codecs_[layer];
  const int bits = format_.bits;
  const int n_mids = static_cast<int>(c.key_mids.size());
  std::vector<float> kx(k, k + L);
  if (format_.keys_post_rope()) {
    kernels::ApplyRopeReference(kx.data(), H, D, Position(i), inv_freq_);
  }
  std::vector<uint32_t> words(layout_.key_words_per_token);
  std::vector<int> outliers, order;
  auto store_words = [&](int64_t at) {
    std::memcpy(base + at, words.data(), words.size() * 4);
  };
  if (format_.keys_per_channel()) {
    const float* zp = quantizer_->KeyZeroPoint(layer);
    const float* r = quantizer_->KeyRange(layer);
    for (int h = 0; h < H; ++h) {
      std::fill(words.begin(), words.end(), 0u);
      std::vector<uint32_t>& entries = blk->key_outliers[static_cast<size_t>(layer) * H + h];
      for (int d = 0; d < D; ++d) {
        const int e = h * D + d;
        const float xn = Normalize(kx[e], zp[e], r[e]);
        if (layout_.has_key_outliers && std::fabs(xn) > 1.0f) {
          entries.push_back(PackKeyOutlier(t, d, FloatToHalfBits(kx[e])));
        }
        SetPackedCode(words.data(), d, bits, EncodeNearest(xn, c.key_mids.data(), n_mids));
      }
      store_words(layout_.KeyCodesAt(layer, h, t));
    }
  } else {
    const TokenScaling s = ComputeTokenScaling(kx.data(), L, 0, &outliers, &order);
    Store16(base + layout_.KeyScalesAt(layer, t), s.zero_point_half);
    Store16(base + layout_.KeyScalesAt(layer, t) + 2, s.range_half);
    const float zp = s.zero_point(), r = s.range();
    for (int h = 0; h < H; ++h) {
      std::fill(words.begin(), words.end(), 0u);
      for (int d = 0; d < D; ++d) {
        const float xn = Normalize(kx[h * D + d], zp, r);
        SetPackedCode(words.data(), d, bits, EncodeNearest(xn, c.key_mids.data(), n_mids));
      }
      store_words(layout_.KeyCodesAt(layer, h, t));
    }
  }
  // Values: online per-token scaling with k_v fixed outliers.
  const TokenScaling s = ComputeTokenScaling(v, L, k_v_, &outliers, &order);
  Store16(base + layout_.ValueScalesAt(layer, t), s.zero_point_half);
  Store16(base + layout_.ValueScalesAt(layer, t) + 2, s.range_half);
  for (int o = 0; o < k_v_; ++o) {
    uint8_t* idx = base + layout_.ValueOutlierIndexAt(layer, t) + o * layout_.value_outlier_index_bytes;
    if (layout_.value_outlier_index_bytes == 1) {
      *idx = static_cast<uint8_t>(outliers[o]);
    } else {
      Store16(idx, static_cast<uint16_t>(outliers[o]));
    }
    Store16(base + layout_.ValueOutlierValueAt(layer, t) + 2 * o, FloatToHalfBits(v[outliers[o]]));
  }
  if (layout_.value_outlier_head_start_offset >= 0) WriteValueOutlierHeadStarts(layout_, layer, t, base);
  const float zp = s.zero_point(), r = s.range();
  for (int h = 0; h < H; ++h) {
    std::fill(words.begin(), words.end(), 0u);
    for (int d = 0; d < D; ++d) {
      const float xn = Normalize(v[h * D + d], zp, r);
      SetPackedCode(words.data(), d, bits, EncodeNearest(xn, c.value_mids.data(), n_mids));
    }
    std::memcpy(base + layout_.ValueCodesAt(layer, h, t), words.data(), words.size() * 4);
  }
}

void QuantizedKvCache::DecodeToken(int layer, int64_t i, float* k, float* v) const {
  const int H = shape_.n_kv_heads, D = shape_.head_dim;
  const int L = H * D;
  if (i < n_sink_) {
    const size_t off = (static_cast<size_t>(layer) * n_sink_ + i) * L;
    for (int e = 0; e < L; ++e) {
      k[e] = HalfBitsToFloat(sink_k_[off + e]);
      v[e] = HalfBitsToFloat(sink_v_[off + e]);
    }
    return;
  }
  const int64_t j = i - n_sink_;
  const int t = static_cast<int>(j % kBlockTokens);
  const Block& blk = *blocks_[j / kBlockTokens];
  const uint8_t* base = blk.fixed.data();
  if (!format_.quantized()) {
    for (int h = 0; h < H; ++h) {
      const uint8_t* kd = base + layout_.KeyCodesAt(layer, h, t);
      const uint8_t* vd = base + layout_.ValueCodesAt(layer, h, t);
      for (int d = 0; d < D; ++d) {
        k[h * D + d] = HalfBitsToFloat(Load16(kd + 2 * d));
        v[h * D + d] = HalfBitsToFloat(Load16(vd + 2 * d));
      }
    }
    return;
  }
  const LayerCodec& c = codecs_[layer];
  const int bits = format_.bits;
  std::vector<uint32_t> words(layout_.key_words_per_token);
  if (format_.keys_per_channel()) {
    const float* zp = quantizer_->KeyZeroPoint(layer);
    const float* r = quantizer_->KeyRange(layer);
    for (int h = 0; h < H; ++h) {
      std::memcpy(words.data(), base + layout_.KeyCodesAt(layer, h, t), words.size() * 4);
      for (int d = 0; d < D; ++d) {
        const int e = h * D + d;
        k[e] = Dequantize(GetPackedCode(words.data(), d, bits), c.key_lut.data(), zp[e], r[e]);
      }
      const std::vector<uint32_t>& entries = blk.key_outliers[static_cast<size_t>(layer) * H + h];
      auto it = std::lower_bound(entries.begin(), entries.end(), t, [](uint32_t en, int tok) {
        return KeyOutlierToken(en) < tok;
      });
      for (; it != entries.end() && KeyOutlierToken(*it) == t; ++it) {
        k[h * D + KeyOutlierChannel(*it)] = HalfBitsToFloat(KeyOutlierHalf(*it));
      }
    }
  } else {
    const float zp = HalfBitsToFloat(Load16(base + layout_.KeyScalesAt(layer, t)));
    const float r = HalfBitsToFloat(Load16(base + layout_.KeyScalesAt(layer, t) + 2));
    for (int h = 0; h < H; ++h) {
      std::memcpy(words.data(), base + layout_.KeyCodesAt(layer, h, t), words.size() * 4);
      for (int d = 0; d < D; ++d) {
        k[h * D + d] = Dequantize(GetPackedCode(words.data(), d, bits), c.key_lut.data(), zp, r);
      }
    }
  }
  const float zp = HalfBitsToFloat(Load16(base + layout_.ValueScalesAt(layer, t)));
  const float r = HalfBitsToFloat(Load16(base + layout_.ValueScalesAt(layer, t) + 2));
  for (int h = 0; h < H; ++h) {
    std::memcpy(words.data(), base + layout_.ValueCodesAt(layer, h, t), words.size() * 4);
    for (int d = 0; d < D; ++d) {
      v[h * D + d] = Dequantize(GetPackedCode(words.data(), d, bits), c.value_lut.data(), zp, r);
    }
  }
  for (int o = 0; o < k_v_; ++o) {
    const uint8_t* idx =
        base + layout_.ValueOutlierIndexAt(layer, t) + o * layout_.value_outlier_index_bytes;
    const int e = layout_.value_outlier_index_bytes == 1 ? *idx : Load16(idx);
    v[e] = HalfBitsToFloat(Load16(base + layout_.ValueOutlierValueAt(layer, t) + 2 * o));
  }
}

absl::Status QuantizedKvCache::ReadBack(int layer, int64_t begin, int64_t end, std::vector<float>* k,
                                        std::vector<float>* v, bool include_staged) const {
  const int64_t limit =
      length_ + ((include_staged && layer >= 0 && layer < shape_.n_layers && appended_[layer])
                     ? pending_n_
                     : 0);
  if (layer < 0 || layer >= shape_.n_layers || begin < 0 || begin > end || end > limit) {
    return absl::OutOfRangeError(absl::StrCat("ReadBack(layer ", layer, ", [", begin, ", ", end,
                                              ")) outside ", shape_.n_layers, " layers x ",
                                              length_, " tokens"));
  }
  const int64_t L = shape_.ElementsPerTokenPerLayer();
  k->assign((end - begin) * L, 0.0f);
  v->assign((end - begin) * L, 0.0f);
  for (int64_t i = begin; i < end; ++i) {
    float* kp = k->data() + (i - begin) * L;
    DecodeToken(layer, i, kp, v->data() + (i - begin) * L);
    if (format_.keys_post_rope() && i >= n_sink_) {  // stored rotated: undo for pre-RoPE output
      kernels::ApplyRopeReference(kp, shape_.n_kv_heads, shape_.head_dim, -Position(i), inv_freq_);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<AttentionPartial> QuantizedKvCache::AttendPast(int layer, const float* q, int n_q,
                                                              int n_heads, int64_t begin,
                                                              int64_t end, double scale) const {
  const int H = shape_.n_kv_heads, D = shape_.head_dim;
  if (layer < 0 || layer >= shape_.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (n_q < 0 || n_heads <= 0 || n_heads % H != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AttendPast: n_heads ", n_heads, " must be a positive multiple of n_kv_heads ", H));
  }
  if (begin < 0 || begin > end || end > length_) {
    return absl::OutOfRangeError(absl::StrCat("AttendPast range [", begin, ", ", end,
                                              ") outside the ", length_, " committed tokens"));
  }
  AttentionPartial out = AttentionPartial::Empty(n_q, n_heads, D);
  if (begin == end || n_q == 0) return out;
  if (scale <= 0.0) scale = 1.0 / std::sqrt(static_cast<double>(D));
  const int group = n_heads / H;
  const int64_t L = static_cast<int64_t>(H) * D;
  const size_t rows = static_cast<size_t>(n_q) * n_heads;
  std::vector<double> m(rows, -std::numeric_limits<double>::infinity()), s(rows, 0.0);
  std::vector<double> acc(rows * D, 0.0);
  constexpr int64_t kChunk = kBlockTokens;
  std::vector<float> kc(kChunk * L), vc(kChunk * L);
  std::vector<double> score(kChunk);
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t n = std::min(kChunk, end - c0);
    for (int64_t i = 0; i < n; ++i) {
      float* kp = kc.data() + i * L;
      DecodeToken(layer, c0 + i, kp, vc.data() + i * L);
      if (!format_.keys_post_rope() || c0 + i < n_sink_) {
        kernels::ApplyRopeReference(kp, H, D, Position(c0 + i), inv_freq_);
      }
    }
    for (int qi = 0; qi < n_q; ++qi) {
      for (int hq = 0; hq < n_heads; ++hq) {
        const size_t row = static_cast<size_t>(qi) * n_heads + hq;
        const float* qv = q + row * D;
        const int hk = hq / group;
        double mx = m[row];
        for (int64_t i = 0; i < n; ++i) {
          const float* kv = kc.data() + i * L + hk * D;
          double dot = 0.0;
          for (int d = 0; d < D; ++d) dot += static_cast<double>(qv[d]) * kv[d];
          score[i] = dot * scale;
          mx = std::max(mx, score[i]);
        }
        const double corr = std::exp(m[row] - mx);  // exp(-inf) = 0 on the first chunk
        double* a = acc.data() + row * D;
        for (int d = 0; d < D; ++d) a[d] *= corr;
        s[row] *= corr;
        for (int64_t i = 0; i < n; ++i) {
          const double p = std::exp(score[i] - mx);
          s[row] += p;
          const float* vv = vc.data() + i * L + hk * D;
          for (int d = 0; d < D; ++d) a[d] += p * vv[d];
        }
        m[row] = mx;
      }
    }
  }
  for (size_t row = 0; row < rows; ++row) {
    for (int d = 0; d < D; ++d) out.o[row * D + d] = static_cast<float>(acc[row * D + d] / s[row]);
    out.lse[row] = static_cast<float>(m[row] + std::log(s[row]));
  }
  return out;
}

KvBytes QuantizedKvCache::Bytes() const {
  KvBytes b;
  b.tokens = length_;
  b.sink_tokens = std::min<int64_t>(length_, n_sink_);
  b.blocks = (length_ - b.sink_tokens + kBlockTokens - 1) / kBlockTokens;
  const SectionBytes sec = SectionBreakdown(layout_);
  const int64_t sections = b.blocks * shape_.n_layers;
  b.key_code_bytes = sec.key_codes * sections;
  b.value_code_bytes = sec.value_codes * sections;
  b.scale_bytes = sec.scales * sections;
  b.value_outlier_bytes = sec.value_outliers * sections;
  b.padding_bytes = sec.padding * sections;
  for (int64_t i = 0; i < b.blocks; ++i) {
    for (const auto& e : blocks_[i]->key_outliers) b.key_outlier_entries += e.size();
  }
  b.key_outlier_bytes = sec.key_dir * sections + b.key_outlier_entries * kKeyOutlierEntryBytes;
  b.sink_bytes = b.sink_tokens * shape_.n_layers * 2 * shape_.ElementsPerTokenPerLayer() * 2;
  b.total_bytes = b.key_code_bytes + b.value_code_bytes + b.scale_bytes + b.value_outlier_bytes +
                  b.key_outlier_bytes + b.padding_bytes + b.sink_bytes;
  b.block_fixed_bytes = layout_.fixed_bytes;
  b.quantizer_device_bytes = quantizer_ ? quantizer_->DeviceBytes() : 0;
  if (length_ > 0) {
    b.bytes_per_token = static_cast<double>(b.total_bytes) / length_;
    b.bits_per_element = 8.0 * b.total_bytes /
                         (static_cast<double>(length_) * shape_.n_layers * 2 *
                          shape_.ElementsPerTokenPerLayer());
    b.compression_vs_fp16 = 16.0 / b.bits_per_element;
  }
  return b;
}

int64_t QuantizedKvCache::SerializationOverheadBytes() const {
  const int64_t blocks = Bytes().blocks;
  return kFramingBytes + 4 + static_cast<int64_t>(format_.ToString().size()) + 3 * 4 + 3 * 8 +
         blocks * 8;
}

std::string QuantizedKvCache::ExportBlock(int64_t b) const {
  const Block& blk = *blocks_[b];
  std::string out(reinterpret_cast<const char*>(blk.fixed.data()), blk.fixed.size());
  if (!layout_.has_key_outliers) return out;
  uint32_t first = 0;
  const int H = shape_.n_kv_heads;
  for (int l = 0; l < shape_.n_layers; ++l) {
    for (int h = 0; h < H; ++h) {
      const auto& e = blk.key_outliers[static_cast<size_t>(l) * H + h];
      uint8_t* dir = reinterpret_cast<uint8_t*>(out.data()) + layout_.KeyOutlierDirAt(l, h);
      Store32(dir, first);
      Store32(dir + 4, static_cast<uint32_t>(e.size()));
      first += static_cast<uint32_t>(e.size());
    }
  }
  for (const auto& e : blk.key_outliers) {
    out.append(reinterpret_cast<const char*>(e.data()), e.size() * 4);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<QuantizedKvCache>> QuantizedKvCache::Clone() const {
  if (pending_n_ != 0) return absl::FailedPreconditionError("Clone during an open step");
  return std::unique_ptr<QuantizedKvCache>(new QuantizedKvCache(*this));
}

absl::StatusOr<std::string> QuantizedKvCache::Serialize() const {
  if (pending_n_ != 0) return absl::FailedPreconditionError("Serialize during an open step");
  const KvBytes bytes = Bytes();
  std::vector<std::string> blocks;
  blocks.reserve(static_cast<size_t>(bytes.blocks));
  for (int64_t b = 0; b < bytes.blocks; ++b) blocks.push_back(ExportBlock(b));
  return SerializeParts(format_, shape_, first_position_, length_, n_sink_, sink_k_, sink_v_,
                        blocks);
}

std::string QuantizedKvCache::SerializeParts(const KvFormat& format, const KvShape& shape,
                                             int64_t first_position, int64_t length,
                                             int sink_capacity,
                                             const std::vector<uint16_t>& sink_k,
                                             const std::vector<uint16_t>& sink_v,
                                             const std::vector<std::string>& blocks,
                                             uint32_t version) {
  if (version == 0) version = kCacheVersion;
  const BlockLayout layout = ComputeBlockLayout(format, shape);
  const int64_t fixed_bytes = version < 4 && layout.value_outlier_head_start_offset >= 0
                                  ? layout.n_layers * layout.value_outlier_head_start_offset
                                  : layout.fixed_bytes;
  const int64_t sink_tokens = std::min<int64_t>(length, sink_capacity);
  internal::ByteWriter p;
  p.PutString(format.ToString());
  p.Put<uint32_t>(shape.n_layers);
  p.Put<uint32_t>(shape.n_kv_heads);
  p.Put<uint32_t>(shape.head_dim);
  p.Put<int64_t>(first_position);
  p.Put<int64_t>(length);
  p.Put<uint64_t>(blocks.size());
  const int64_t L = shape.ElementsPerTokenPerLayer();
  for (const std::vector<uint16_t>* sink : {&sink_k, &sink_v}) {
    for (int l = 0; l < shape.n_layers; ++l) {
      p.PutBytes(sink->data() + static_cast<size_t>(l) * sink_capacity * L, sink_tokens * L * 2);
    }
  }
  for (const std::string& blk : blocks) {
    p.Put<uint64_t>((blk.size() - fixed_bytes) / kKeyOutlierEntryBytes);
    p.PutBytes(blk.data(), blk.size());
  }
  internal::ByteWriter f;
  f.PutBytes(kCacheMagic, 8);
  f.Put<uint32_t>(version);
  f.Put<uint32_t>(0);
  f.Put<uint64_t>(p.str().size());
  f.PutBytes(p.str().data(), p.str().size());
  f.Put<uint64_t>(internal::Fnv1a64(p.str()));
  return std::move(f.str());
}

absl::StatusOr<std::unique_ptr<QuantizedKvCache>> QuantizedKvCache::Deserialize(
    std::string_view bytes, std::shared_ptr<const Quantizer> quantizer,
    const kernels::RopeParams& rope) {
  constexpr size_t kHeader = 24;
  if (bytes.size() < kHeader || std::memcmp(bytes.data(), kCacheMagic, 8) != 0) {
    return absl::InvalidArgumentError("not a serialized kvq cache (bad magic)");
  }
  internal::ByteReader h(bytes.substr(8, 16));
  const uint32_t version = h.Get<uint32_t>();
  h.Get<uint32_t>();
  const uint64_t len = h.Get<uint64_t>();
  if (version < 1 || version > kCacheVersion) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported cache version ", version));
  }
  if (len > bytes.size() || bytes.size() != kHeader + len + 8) {
    return absl::DataLossError("serialized cache truncated or has trailing bytes");
  }
  const std::string_view payload = bytes.substr(kHeader, len);
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + kHeader + len, 8);
  if (stored != internal::Fnv1a64(payload)) {
    return absl::DataLossError("serialized cache checksum mismatch (corrupted)");
  }
  internal::ByteReader r(payload);
  const std::string format_name = r.GetString(256);
  KvShape shape;
  shape.n_layers = static_cast<int>(r.Get<uint32_t>());
  shape.n_kv_heads = static_cast<int>(r.Get<uint32_t>());
  shape.head_dim = static_cast<int>(r.Get<uint32_t>());
  const int64_t first_position = r.Get<int64_t>();
  const int64_t length = r.Get<int64_t>();
  const uint64_t n_blocks = r.Get<uint64_t>();
  if (r.failed()) return absl::DataLossError("serialized cache header is malformed");
  KVQ_ASSIGN_OR_RETURN(KvFormat format, KvFormat::Parse(format_name));
  KVQ_ASSIGN_OR_RETURN(auto cache,
                       Create(shape, format, std::move(quantizer), rope, first_position));
  const int64_t sink_tokens = std::min<int64_t>(length, cache->n_sink_);
  const int64_t expect_blocks = (length - sink_tokens + kBlockTokens - 1) / kBlockTokens;
  if (length < 0 || static_cast<int64_t>(n_blocks) != expect_blocks) {
    return absl::DataLossError("serialized cache: block count does not match its length");
  }
  const int64_t L = shape.ElementsPerTokenPerLayer();
  for (std::vector<uint16_t>* sink : {&cache->sink_k_, &cache->sink_v_}) {
    for (int l = 0; l < shape.n_layers; ++l) {
      r.GetBytes(sink->data() + static_cast<size_t>(l) * cache->n_sink_ * L, sink_tokens * L * 2);
    }
  }
  const BlockLayout& lay = cache->layout_;
  for (uint64_t b = 0; b < n_blocks; ++b) {
    const uint64_t n_entries = r.Get<uint64_t>();
    if (r.failed() || n_entries * 4 > r.remaining()) {
      return absl::DataLossError("serialized cache: block is truncated");
    }
    Block* blk = cache->WritableBlock(static_cast<int64_t>(b));
    if (version < 4 && lay.value_outlier_head_start_offset >= 0) {
      std::vector<uint8_t> old(static_cast<size_t>(lay.n_layers) * lay.value_outlier_head_start_offset);
      r.GetBytes(old.data(), old.size());
      const int64_t filled = std::min<int64_t>(kBlockTokens, length - sink_tokens - static_cast<int64_t>(b) * kBlockTokens);
      if (!r.failed()) AddValueOutlierHeadStarts(lay, old.data(), static_cast<int>(filled), blk->fixed.data());
    } else {
      r.GetBytes(blk->fixed.data(), lay.fixed_bytes);
    }
    const bool stream = (lay.bits == 3 && version < 2) || (lay.bits == 2 && version < 3);
    if (stream && !r.failed()) RepackLsbFirst(lay, blk->fixed.data());
    std::vector<uint32_t> entries(n_entries);
    r.GetBytes(entries.data(), n_entries * 4);
    if (r.failed()) return absl::DataLossError("serialized cache: block is truncated");
    if (!lay.has_key_outliers) {
      if (n_entries != 0) return absl::DataLossError("serialized cache: unexpected key outliers");
      continue;
    }
    for (int l = 0; l < shape.n_layers; ++l) {
      for (int hh = 0; hh < shape.n_kv_heads; ++hh) {
        const uint8_t* dir = blk->fixed.data() + lay.KeyOutlierDirAt(l, hh);
        const uint64_t first = Load32(dir), count = Load32(dir + 4);
        if (first + count > n_entries) {
          return absl::DataLossError("serialized cache: key outlier directory out of range");
        }
        auto& dst = blk->key_outliers[static_cast<size_t>(l) * shape.n_kv_heads + hh];
        dst.assign(entries.begin() + first, entries.begin() + first + count);
        for (size_t x = 0; x < dst.size(); ++x) {
          if (KeyOutlierChannel(dst[x]) >= shape.head_dim ||
              (x > 0 && KeyOutlierToken(dst[x]) < KeyOutlierToken(dst[x - 1]))) {
            return absl::DataLossError("serialized cache: malformed key outlier entry");
          }
        }
      }
    }
  }
  if (r.remaining() != 0) return absl::DataLossError("serialized cache has trailing payload");
  cache->length_ = length;
  return cache;
}

}  // namespace kvq::kvstore
