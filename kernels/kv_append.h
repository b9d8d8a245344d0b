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
  // Set to 1 when a (block, layer, head) would exceed key_outlier_capacity (its new entries are
  // then dropped: the dense codes still hold the clamped values). May be null.
  int* overflow = nullptr;
};

absl::Status LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream);

}  // namespace kvq::kernels
