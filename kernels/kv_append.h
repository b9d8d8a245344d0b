// Quantize-and-append of new K/V tokens into the paged cache (kernels/kv_append.cu): the GPU twin
// of kvstore::QuantizedKvCache::Append, bit-exact with it for fp16, nuqB and intB-pc-pre formats
// (block_layout.h section 4 arithmetic). One launch per layer appends n_new tokens to every
// sequence of the batch (n_new = 1 for decode, a chunk for prefill).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/paged_kv.h"

namespace kvq::kernels {

struct KvAppendParams {
  // Geometry, codec, block table, sink length, quantizer tensors, rope_inv_freq (post-RoPE
  // formats only). kv.seq_lens[s] is the number of tokens the sequence held BEFORE this step
  // (the host advances it after every layer appended). The block table must already map every
  // block the new tokens fall in; the pool zero-fills new blocks and sets their key-outlier
  // directories to {first = (layer * n_kv + head) * key_outlier_capacity, count = 0}.
  PagedKvCache kv;
  uint8_t* pool = nullptr;            // == kv.pool, written
  uint16_t* const* sink = nullptr;    // [batch] == kv.sink, written (sink tokens)
  int layer = 0;
  int batch = 0;
  int n_new = 0;
  const float* k = nullptr;  // [batch][n_new][n_kv_heads][head_dim], pre-RoPE
  const float* v = nullptr;  // [batch][n_new][n_kv_heads][head_dim]
  // Floats from one token's row of k (and of v) to the next; 0: n_kv_heads * head_dim (rows
  // packed). A stride lets k and v be read where a stacked q/k/v projection wrote them.
  int64_t kv_row_stride = 0;
  // Set to 1 when a (block, layer, head) list cannot grow (fixed reservations: beyond
  // key_outlier_capacity; growable lists: the block's area is used up). That step's new entries
  // of the list are dropped (the dense codes still hold the clamped values). May be null.
  int* overflow = nullptr;
};

absl::Status LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream);
// The same with the key append on one stream and the value append on another (they touch
// disjoint parts of the blocks and only read p.k / p.v): the caller orders both after the
// producer of k and v, and whatever reads the cache after both.
absl::Status LaunchKvAppend(const KvAppendParams& p, cudaStream_t key_stream, cudaStream_t value_stream);
// Appends of one token per sequence (n_new == 1: decode steps) take the keys through a warp per
// (kv head, sequence) instead of the chunk kernel's CTA per block segment: the same bytes (on by
// default; off only to time or test the chunk kernel on decode steps). Process-wide.
void SetKeyAppendDecodePath(bool on);
bool KeyAppendDecodePath();

// Compaction of growable key-outlier lists (paged_kv.h): for each block, its lists are rewritten
// contiguously in list order, each with room for what the rest of the block may add (a full block
// keeps exactly its entries), and the bump pointer reset after them: space abandoned by lists
// that moved while the block filled comes back. Run between steps, on blocks that just filled
// (and every so often on a block being decoded into).
struct CompactKeyOutliersParams {
  static constexpr int kMaxBlocks = 32;
  uint8_t* pool = nullptr;
  int64_t block_stride_bytes = 0;
  int64_t layer_bytes = 0;
  int64_t fixed_bytes = 0;
  int64_t dir_offset = -1;
  int n_layers = 0;
  int n_kv_heads = 0;
  int header_words = 0;
  int key_outlier_capacity = 0;  // nominal entries per list and full block (the growth rate)
  uint32_t* scratch = nullptr;   // kMaxBlocks * (block_stride_bytes - fixed_bytes) bytes, device
  int n = 0;
  int32_t ids[kMaxBlocks] = {};
  int32_t filled[kMaxBlocks] = {};  // tokens in each block (256 = full)
};
absl::Status LaunchCompactKeyOutliers(const CompactKeyOutliersParams& p, cudaStream_t stream);

}  // namespace kvq::kernels
