// QuantizedKvCache: the compressed KV cache of one sequence (or one rank's contiguous shard of it)
// in the layout of block_layout.h — the CPU backend and the oracle of the CUDA kernels.
//
// Use per step (decode token or prefill chunk of n tokens):
//   for each layer: Append(layer, k_prerope, v, n); AttendPast(layer, q, ...) sees only the
//   committed tokens (the caller attends to the step's own tokens causally in full precision);
//   then Commit() once every layer has appended the same n tokens.
// Blocks are held by shared_ptr: Clone() forks a session sharing every block; the first write to a
// shared (partly filled tail) block copies it (copy-on-write). Full blocks are never written again.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/reference/rope.h"
#include "kvstore/attention_merge.h"
#include "kvstore/block_layout.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantizer.h"

namespace kvq::kvstore {

// Exact bytes held by a cache (everything Serialize() writes except its fixed framing).
struct KvBytes {
  int64_t tokens = 0;        // committed tokens
  int64_t sink_tokens = 0;   // of which fp16 sink
  int64_t blocks = 0;        // allocated blocks (the last may be partly filled)
  int64_t key_code_bytes = 0;
  int64_t value_code_bytes = 0;
  int64_t scale_bytes = 0;           // per-token value (and int key) zero-point/range
  int64_t value_outlier_bytes = 0;   // fixed count per token: index + fp16
  int64_t key_outlier_bytes = 0;     // variable: entries * 4 + directories
  int64_t key_outlier_entries = 0;
  int64_t padding_bytes = 0;         // alignment inside layer sections
  int64_t sink_bytes = 0;
  int64_t total_bytes = 0;           // sum of the above byte counts
  int64_t block_fixed_bytes = 0;     // one block's fixed section (BlockLayout::fixed_bytes)
  int64_t quantizer_device_bytes = 0;  // per model, not per sequence (amortize separately)
  double bytes_per_token = 0;        // total_bytes / tokens
  double bits_per_element = 0;       // 8 * total_bytes / (tokens * n_layers * 2 * n_kv * hd)
  double compression_vs_fp16 = 0;    // 16 / bits_per_element
};

// Bytes per token of a format when blocks are full and keys have exactly `outlier_fraction`
// outliers (the planner's estimate; a real cache reports its exact KvBytes).
double ExpectedBytesPerToken(const KvFormat& format, const KvShape& shape);

class QuantizedKvCache {
 public:
  // `quantizer` may be null for formats that need no calibration (fp16, int per-token); it must
  // match the shape and the format's calibration fields otherwise. The first token sits at RoPE
  // position first_position (rank shards of a long sequence start past 0 and hold no sink).
  static absl::StatusOr<std::unique_ptr<QuantizedKvCache>> Create(
      const KvShape& shape, const KvFormat& format, std::shared_ptr<const Quantizer> quantizer,
      const kernels::RopeParams& rope, int64_t first_position = 0);

  const KvShape& shape() const { return shape_; }
  const KvFormat& format() const { return format_; }
  const BlockLayout& layout() const { return layout_; }
  int64_t first_position() const { return first_position_; }
  int64_t length() const { return length_; }  // committed tokens
  int sink_capacity() const { return n_sink_; }
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }

  // k_prerope, v: [n][n_kv_heads][head_dim]. Each layer appends once per step, all with the same n.
  absl::Status Append(int layer, const float* k_prerope, const float* v, int n);
  // Makes the step's tokens visible. Fails unless every layer appended.
  absl::Status Commit();
  // Discards the open step's appended tokens (their slots return to zero bytes, their key outliers
  // and any block they opened are dropped). No-op without an open step.
  void AbortStep();
  int pending_tokens() const { return pending_n_; }

  // Dequantized K (pre-RoPE) and V of local tokens [begin, end): [end-begin][n_kv][head_dim].
  // include_staged: also allow the open step's tokens of `layer` (if that layer appended).
  absl::Status ReadBack(int layer, int64_t begin, int64_t end, std::vector<float>* k,
                        std::vector<float>* v, bool include_staged = false) const;
  // RoPE inverse frequencies used for keys (kernels::RopeInvFreq of the cache's RopeParams).
  const std::vector<double>& inv_freq() const { return inv_freq_; }

  // Attention of q [n_q][n_heads][head_dim] (RoPE already applied at the query positions) over
  // the committed local tokens [begin, end) of `layer`; no causal mask. GQA: query head h reads kv
  // head h / (n_heads / n_kv_heads). Scores are scale * q.k with scale 1/sqrt(head_dim) when
  // scale <= 0. Keys are dequantized, rotated at their own positions, and everything accumulates
  // in double. Empty range: o = 0, lse = -inf.
  absl::StatusOr<AttentionPartial> AttendPast(int layer, const float* q, int n_q, int n_heads,
                                              int64_t begin, int64_t end,
                                              double scale = 0.0) const;
  absl::StatusOr<AttentionPartial> AttendPast(int layer, const float* q, int n_q,
                                              int n_heads) const {
    return AttendPast(layer, q, n_q, n_heads, 0, length_);
  }

  KvBytes Bytes() const;
  // Bytes Serialize() adds to KvBytes::total_bytes: framing, header and per-block counts.
  int64_t SerializationOverheadBytes() const;

  // The canonical bytes of block b (fixed section with dense key-outlier directories, then the
  // variable section): what a GPU pool uploads.
  std::string ExportBlock(int64_t b) const;

  // A fork sharing all blocks (copy-on-write). Fails while a step is open.
  absl::StatusOr<std::unique_ptr<QuantizedKvCache>> Clone() const;
  // True when block b is shared with a clone.
  bool BlockShared(int64_t b) const { return blocks_[b].use_count() > 1; }

  // Session save/restore of the compressed cache (checksummed). Fails while a step is open.
  absl::StatusOr<std::string> Serialize() const;
  // What Serialize writes, from its parts: canonical blocks as ExportBlock returns them and the
  // sink buffers [n_layers][sink_capacity][n_kv * hd] (fp16 bits) of K and of V. The GPU pool
  // serializes its caches through this, so a session saved on a GPU loads on a CPU and back.
  // `version` (tests of the loader's conversions) writes an older version number; blocks must then
  // be in that version's layout (before 4: layer sections without value_outlier_head_start).
  static std::string SerializeParts(const KvFormat& format, const KvShape& shape,
                                    int64_t first_position, int64_t length, int sink_capacity,
                                    const std::vector<uint16_t>& sink_k,
                                    const std::vector<uint16_t>& sink_v,
                                    const std::vector<std::string>& blocks, uint32_t version = 0);
  static absl::StatusOr<std::unique_ptr<QuantizedKvCache>> Deserialize(
      std::string_view bytes, std::shared_ptr<const Quantizer> quantizer,
      const kernels::RopeParams& rope);

 private:
  struct Block {
    std::vector<uint8_t> fixed;                       // BlockLayout::fixed_bytes
    std::vector<std::vector<uint32_t>> key_outliers;  // [layer * n_kv + head], sorted by token
  };
  struct LayerCodec {
    std::vector<float> key_lut, key_mids, value_lut, value_mids;
  };

  QuantizedKvCache(const KvShape& shape, const KvFormat& format,
                   std::shared_ptr<const Quantizer> quantizer, const kernels::RopeParams& rope,
                   int64_t first_position);
  int64_t Position(int64_t i) const { return first_position_ + i; }
  Block* WritableBlock(int64_t b);
  void AppendToken(int layer, int64_t i, const float* k, const float* v);
  // Stored-domain key (post-RoPE for post-RoPE formats, else pre-RoPE) and value of token i.
  void DecodeToken(int layer, int64_t i, float* k, float* v) const;

  KvShape shape_;
  KvFormat format_;
  BlockLayout layout_;
  std::shared_ptr<const Quantizer> quantizer_;
  kernels::RopeParams rope_;
  std::vector<double> inv_freq_;
  int64_t first_position_ = 0;
  int n_sink_ = 0;
  int k_v_ = 0;
  std::vector<LayerCodec> codecs_;
  int64_t length_ = 0;
  int pending_n_ = 0;
  std::vector<bool> appended_;  // [layer] for the open step
  std::vector<uint16_t> sink_k_, sink_v_;  // [n_layers][n_sink][n_kv][hd] fp16
  std::vector<std::shared_ptr<Block>> blocks_;
};

}  // namespace kvq::kvstore
