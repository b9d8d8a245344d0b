// The kernels' view of a block layout: kernels/paged_kv.h mirrors kvstore::BlockLayout field by
// field (kernels/ sits below kvstore/), and this is the one place that copies it across.
#pragma once

#include "kernels/paged_kv.h"
#include "kvstore/block_layout.h"

namespace kvq::kvstore {

static_assert(kernels::kKvBlockTokens == kBlockTokens);

inline kernels::KvBlockGeometry ToKernelGeometry(const BlockLayout& b) {
  kernels::KvBlockGeometry g;
  g.n_layers = b.n_layers;
  g.n_kv_heads = b.n_kv_heads;
  g.head_dim = b.head_dim;
  g.bits = b.bits;
  g.key_words_per_token = b.key_words_per_token;
  g.value_words_per_token = b.value_words_per_token;
  g.value_outliers_per_token = b.value_outliers_per_token;
  g.value_outlier_index_bytes = b.value_outlier_index_bytes;
  g.has_key_outliers = b.has_key_outliers;
  g.key_codes_offset = b.key_codes_offset;
  g.value_codes_offset = b.value_codes_offset;
  g.key_scales_offset = b.key_scales_offset;
  g.value_scales_offset = b.value_scales_offset;
  g.value_outlier_index_offset = b.value_outlier_index_offset;
  g.value_outlier_value_offset = b.value_outlier_value_offset;
  g.key_outlier_dir_offset = b.key_outlier_dir_offset;
  g.value_outlier_head_start_offset = b.value_outlier_head_start_offset;
  g.layer_bytes = b.layer_bytes;
  g.fixed_bytes = b.fixed_bytes;
  return g;
}

}  // namespace kvq::kvstore
