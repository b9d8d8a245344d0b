// The memory layout of the compressed KV cache: the contract between the CPU reference
// (kvstore/quantized_kv_cache.cc, the oracle) and the CUDA append/attention kernels.
// Everything here is a pure function of (KvFormat, KvShape); host code computes a BlockLayout once
// and passes its offsets to the kernels, so CPU and GPU address bytes identically.
//
// ---------------------------------------------------------------------------------------------
// 1. Tokens, sink, blocks
// ---------------------------------------------------------------------------------------------
// A cache holds the tokens of one sequence (or one rank's contiguous shard of it) starting at RoPE
// position `first_position`. Local token i sits at position first_position + i.
// Sink: tokens at absolute positions < format.sink_tokens stay fp16, outside blocks, so a cache
// holds n_sink = clamp(sink_tokens - first_position, 0, sink_tokens) sink tokens (only the shard
// that starts at position 0 has any). Sink buffer (SinkLayout): fp16, K pre-RoPE,
//   sink_k [n_layers][n_sink][n_kv_heads][head_dim], then sink_v with the same shape.
// Every later token goes to block b = (i - n_sink) / kBlockTokens, slot t = (i - n_sink) %
// kBlockTokens; its position is first_position + n_sink + b * kBlockTokens + t. Positions are
// implicit; nothing position-related is stored.
//
// ---------------------------------------------------------------------------------------------
// 2. One block = fixed section (BlockLayout::fixed_bytes) + variable key-outlier section
// ---------------------------------------------------------------------------------------------
// Fixed section: n_layers layer sections of layer_bytes each (layer l at l * layer_bytes). Inside
// a layer section, arrays start at the *_offset fields below (each 16-byte aligned, -1 if absent):
//
//   key_codes    uint32 [n_kv_heads][kBlockTokens][key_words_per_token]
//   value_codes  uint32 [n_kv_heads][kBlockTokens][value_words_per_token]
//       Token-major per head: the head_dim codes of one token are contiguous (head_dim * bits / 32
//       words, e.g. 12 words = 48 B for hd 128 at 3 bits), so consecutive threads reading
//       consecutive tokens issue wide (uint2/uint4) loads. The codes of a token are packed as
//       kvstore/bit_packing.h says (kernels/code_layout.h): 2 and 3 bits bit-sliced groups of 32
//       codes in B words, 4 bits an LSB-first bit stream (code c at bits [c*B, c*B + B), bit k of
//       the stream being bit k % 32 of word k / 32). So 32 codes = B words.
//       fp16 format: the "codes" are fp16 bits, channel c in the low (c even) or high (c odd) half
//       of word c / 2, i.e. plain little-endian half arrays.
//   key_scales   fp16 [kBlockTokens][2] = {zero_point, range}; int per-token formats only (the
//                scaling vector of a token is all kv heads of the layer, post-RoPE).
//   value_scales fp16 [kBlockTokens][2] = {zero_point, range}; every quantized format. The
//                scaling vector of a token is all n_kv_heads*head_dim values of the layer.
//   value_outlier_index  uint8 or uint16 (value_outlier_index_bytes) [kBlockTokens][k_v]: element
//                index e = head * head_dim + channel in the token's layer vector, ascending.
//   value_outlier_value  fp16 [kBlockTokens][k_v]: the exact values (fp16-rounded).
//                k_v = value_outliers_per_token is fixed (ValueOutliersPerToken()).
//   key_outlier_dir  uint32 [n_kv_heads][2] = {first_entry, count}: the key outliers of (layer,
//                head) are entries [first_entry, first_entry + count) of the block's variable
//                section. The canonical (CPU / serialized) form packs them densely in (layer,
//                head) order; a GPU pool may reserve capacity per (layer, head) instead: readers
//                must only use first_entry/count.
//   value_outlier_head_start  uint8 [n_kv_heads][kBlockTokens], only when n_kv_heads < k_v <= 255
//                (more than one value outlier per head and token on average;
//                HasValueOutlierHeadStarts):
//                entry [h][t] = how many of token t's k_v outliers have element index < h *
//                head_dim, i.e. the first of the token's entries that falls in head h (the
//                indices are ascending, so head h's entries are [start[h][t], start[h+1][t]),
//                start[n_kv_heads][t] being k_v). A redundant index over value_outlier_index that
//                lets a reader of one head skip the other heads' entries (decode attention reads
//                one head per warp; without it each warp scans all k_v entries of every token).
//                Last in the layer section, so the layout without it (serialized versions < 4)
//                is a prefix of each layer section.
// Variable section (per block, after the fixed section in the serialized form): key outlier
// entries, uint32 each: token_in_block | channel << 8 | fp16_bits << 16, sorted by (token,
// channel) within one (layer, head). Slots of a partly filled block (tokens not yet appended)
// hold zero bytes and no entries.
//
// ---------------------------------------------------------------------------------------------
// 3. Quantizer tensors the kernels read (fp32, from kvstore/quantizer.h)
// ---------------------------------------------------------------------------------------------
//   key_zero_point, key_range  [n_layers][n_kv_heads][head_dim]   per-channel formats only
//   key_lut, value_lut         [n_layers][2^B], strictly ascending; Q-Norm already applied when
//                              the format has qnorm (Quantizer::EffectiveKeyLut()/ValueLut()).
//                              Uniform formats: lut[j] = -1 + 2j / (2^B - 1).
//
// ---------------------------------------------------------------------------------------------
// 4. Arithmetic (bit-exact between CPU and GPU: fp32, IEEE division, no fast-math)
// ---------------------------------------------------------------------------------------------
// Encode one element with scaling (zp, r) (keys per channel: fp32 from the quantizer; values and
// per-token keys: the fp16-stored zp/range converted to fp32):
//   x_n  = (x - zp) / r                           fp32
//   keys per channel: outlier iff |x_n| > 1       (outlier: entry with fp16(x) in the sparse store)
//   dense code = #{ j in [0, 2^B - 1) : clamp(x_n, -1, 1) > mid_j },  mid_j = 0.5f * (lut[j] +
//   lut[j+1]) in fp32. Ties go to the lower centroid. Outliers also get a dense code (that of the
//   clamped value) so a reader that skipped outliers would still see a bounded value.
// Decode:
//   x = fmaf(lut[code], r, zp)                    fp32 fused multiply-add
//   if (token, element) has an outlier entry: x = half_to_float(entry)   (replace, not add)
//   keys: if the format is pre-RoPE, rotate x by RoPE at the token's position
//   (kernels/reference/rope.h, rotate-half convention); post-RoPE formats are stored rotated.
// Per-token scaling (values; keys of int per-token formats, which have no outliers), over the L =
// n_kv_heads * head_dim elements of one token and layer, with k = k_v outliers:
//   sort (value, element index) ascending; the k_lo = floor(k/2) first and k_hi = k - k_lo last
//   are outliers (fixed count: the percentile rule with t = 1 - (1-s)/2 split evenly between both
//   tails); lower = min and upper = max of the rest;
//   zp = fp16(0.5f * (upper + lower)), r = fp16(0.5f * (upper - lower)), r = max(r, 2^-14).
// Effective bits for nuqB-1%: keys B + ~0.32 (1% entries x 32 bits), values
//   B + (k_v * (8|16 + 16) + 32 [+ 8 n_kv_heads]) / L; e.g. SmolLM2 (3 x 64, k_v = 2, 8-bit index,
//   no head starts) B + 0.417, Llama-3 (8 x 128, k_v = 10, 16-bit index, head starts) B + 0.406.
#pragma once

#include <cstdint>

#include "kvstore/kv_format.h"

namespace kvq::kvstore {

inline constexpr int kBlockTokens = 256;  // tokens per block; token_in_block fits in 8 bits
inline constexpr int kLayoutAlign = 16;   // every array in a layer section starts 16-aligned

// Bytes of one key outlier entry in the variable section.
inline constexpr int kKeyOutlierEntryBytes = 4;

inline constexpr int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

struct BlockLayout {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int bits = 16;                       // code width of keys and values (16: fp16 halves)
  int key_words_per_token = 0;         // per head: head_dim * bits / 32
  int value_words_per_token = 0;
  int value_outliers_per_token = 0;    // k_v
  int value_outlier_index_bytes = 0;   // 1 if n_kv*head_dim <= 256, else 2 (0 if k_v == 0)
  bool has_key_outliers = false;       // per-channel formats with outlier_fraction > 0

  // Offsets inside one layer section, in bytes; -1 where the array is absent.
  int64_t key_codes_offset = -1;
  int64_t value_codes_offset = -1;
  int64_t key_scales_offset = -1;
  int64_t value_scales_offset = -1;
  int64_t value_outlier_index_offset = -1;
  int64_t value_outlier_value_offset = -1;
  int64_t key_outlier_dir_offset = -1;
  int64_t value_outlier_head_start_offset = -1;
  int64_t layer_bytes = 0;
  int64_t fixed_bytes = 0;  // n_layers * layer_bytes

  int64_t LayerOffset(int layer) const { return layer * layer_bytes; }
  // Byte offset (from the block start) of the first code word of (layer, head, token).
  int64_t KeyCodesAt(int layer, int head, int token) const {
    return LayerOffset(layer) + key_codes_offset +
           (static_cast<int64_t>(head) * kBlockTokens + token) * key_words_per_token * 4;
  }
  int64_t ValueCodesAt(int layer, int head, int token) const {
    return LayerOffset(layer) + value_codes_offset +
           (static_cast<int64_t>(head) * kBlockTokens + token) * value_words_per_token * 4;
  }
  int64_t KeyScalesAt(int layer, int token) const {
    return LayerOffset(layer) + key_scales_offset + static_cast<int64_t>(token) * 4;
  }
  int64_t ValueScalesAt(int layer, int token) const {
    return LayerOffset(layer) + value_scales_offset + static_cast<int64_t>(token) * 4;
  }
  int64_t ValueOutlierIndexAt(int layer, int token) const {
    return LayerOffset(layer) + value_outlier_index_offset +
           static_cast<int64_t>(token) * value_outliers_per_token * value_outlier_index_bytes;
  }
  int64_t ValueOutlierValueAt(int layer, int token) const {
    return LayerOffset(layer) + value_outlier_value_offset +
           static_cast<int64_t>(token) * value_outliers_per_token * 2;
  }
  int64_t KeyOutlierDirAt(int layer, int head) const {
    return LayerOffset(layer) + key_outlier_dir_offset + static_cast<int64_t>(head) * 8;
  }
  int64_t ValueOutlierHeadStartAt(int layer, int head, int token) const {
    return LayerOffset(layer) + value_outlier_head_start_offset +
           static_cast<int64_t>(head) * kBlockTokens + token;
  }
};

// Whether blocks carry value_outlier_head_start (section 2): when the k_v value outliers of a
// token outnumber its heads, and the starts fit in a byte (k_v <= 255: e.g. 1% of up to 25,500
// elements per token and layer; larger k_v keep the scan).
inline bool HasValueOutlierHeadStarts(int value_outliers_per_token, int n_kv_heads) {
  return value_outliers_per_token > n_kv_heads && value_outliers_per_token <= 255;
}

// The layout of a block. The format and shape must be valid (KvFormat/KvShape::Validate()).
inline BlockLayout ComputeBlockLayout(const KvFormat& format, const KvShape& shape) {
  BlockLayout b;
  b.n_layers = shape.n_layers;
  b.n_kv_heads = shape.n_kv_heads;
  b.head_dim = shape.head_dim;
  b.bits = format.quantized() ? format.bits : 16;
  b.key_words_per_token = shape.head_dim * b.bits / 32;
  b.value_words_per_token = b.key_words_per_token;
  b.value_outliers_per_token = format.quantized() ? ValueOutliersPerToken(format, shape) : 0;
  b.value_outlier_index_bytes =
      b.value_outliers_per_token == 0 ? 0 : (shape.ElementsPerTokenPerLayer() <= 256 ? 1 : 2);
  b.has_key_outliers = format.keys_per_channel() && format.outlier_fraction > 0.0;

  int64_t off = 0;
  auto take = [&off](int64_t bytes) {
    const int64_t at = off;
    off = AlignUp(off + bytes, kLayoutAlign);
    return at;
  };
  const int64_t per_head_tokens = static_cast<int64_t>(shape.n_kv_heads) * kBlockTokens;
  b.key_codes_offset = take(per_head_tokens * b.key_words_per_token * 4);
  b.value_codes_offset = take(per_head_tokens * b.value_words_per_token * 4);
  if (format.kind == KvFormatKind::kIntPerToken) b.key_scales_offset = take(kBlockTokens * 4);
  if (format.quantized()) b.value_scales_offset = take(kBlockTokens * 4);
  if (b.value_outliers_per_token > 0) {
    b.value_outlier_index_offset = take(static_cast<int64_t>(kBlockTokens) *
                                        b.value_outliers_per_token * b.value_outlier_index_bytes);
    b.value_outlier_value_offset =
        take(static_cast<int64_t>(kBlockTokens) * b.value_outliers_per_token * 2);
  }
  if (b.has_key_outliers) b.key_outlier_dir_offset = take(static_cast<int64_t>(shape.n_kv_heads) * 8);
  if (HasValueOutlierHeadStarts(b.value_outliers_per_token, b.n_kv_heads)) {
    b.value_outlier_head_start_offset = take(static_cast<int64_t>(shape.n_kv_heads) * kBlockTokens);
  }
  b.layer_bytes = off;
  b.fixed_bytes = b.layer_bytes * shape.n_layers;
  return b;
}

// The fp16 sink buffer of a cache holding n_sink sink tokens (section 1 above).
struct SinkLayout {
  int64_t k_offset = 0;  // fp16 [n_layers][n_sink][n_kv_heads][head_dim], pre-RoPE
  int64_t v_offset = 0;  // fp16 [n_layers][n_sink][n_kv_heads][head_dim]
  int64_t bytes = 0;
};

inline SinkLayout ComputeSinkLayout(const KvShape& shape, int n_sink) {
  SinkLayout s;
  const int64_t half_count =
      static_cast<int64_t>(shape.n_layers) * n_sink * shape.n_kv_heads * shape.head_dim;
  s.k_offset = 0;
  s.v_offset = half_count * 2;
  s.bytes = half_count * 4;
  return s;
}

// Key outlier entry packing (variable section).
inline constexpr uint32_t PackKeyOutlier(int token_in_block, int channel, uint16_t half_bits) {
  return static_cast<uint32_t>(token_in_block & 0xff) |
         (static_cast<uint32_t>(channel & 0xff) << 8) | (static_cast<uint32_t>(half_bits) << 16);
}
inline constexpr int KeyOutlierToken(uint32_t e) { return static_cast<int>(e & 0xffu); }
inline constexpr int KeyOutlierChannel(uint32_t e) { return static_cast<int>((e >> 8) & 0xffu); }
inline constexpr uint16_t KeyOutlierHalf(uint32_t e) { return static_cast<uint16_t>(e >> 16); }

}  // namespace kvq::kvstore
