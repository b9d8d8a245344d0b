// The byte geometry of a GPU pool block (host arithmetic, no CUDA): the fixed section of
// kvstore/block_layout.h, then the key-outlier variable section: a header (bump pointer and list
// capacities, kernels/paged_kv.h) and one area of key_outlier_reserve times the nominal count of key
// outliers (256 * head_dim * outlier_fraction per (layer, head) list), from which lists take regions
// as they grow. The GPU pool (sharding/gpu/gpu_kv_cache.h) allocates blocks of exactly this size,
// and the planner (`kvq plan`) uses it for the bytes per token a GPU really spends.
#pragma once

#include <cstdint>

#include "kvstore/block_layout.h"
#include "kvstore/kv_format.h"

namespace kvq::sharding {

// Measured with `kvq outlier-census` on SmolLM2 (calibrated nuq4/3/2-1% thresholds). Prose (2048-
// token windows, 32 full blocks per test split and format): block totals average 0.94-1.02x
// nominal, at most 1.56x (Austen, nuq4-1%); single lists up to 2.37x. Chat-template text (the
// model's template around short questions and answers, 512-token windows, 8 full blocks): block
// totals average 2.49x, at most 2.78x; single lists up to 8.4x (the template markers carry large
// activations). The old 2.25 ran out on SmolLM2 chat prompts within a few decode steps (the GPU
// sharding test, 2026-12-01); 3.5 leaves 26% above the chat maximum for the regions that lists
// leave behind when they grow (packed again every 64 tokens). The area is ~15% of a nuq3 block.
inline constexpr double kDefaultKeyOutlierReserve = 3.5;

struct GpuBlockGeometry {
  int key_outlier_capacity = 0;   // nominal entries per (layer, head) list and full block
  int key_outlier_header_words = 0;
  int64_t area_words = 0;
  int64_t block_stride_bytes = 0;
  double bytes_per_token() const { return static_cast<double>(block_stride_bytes) / kvstore::kBlockTokens; }
};

GpuBlockGeometry ComputeGpuBlockGeometry(const kvstore::KvShape& shape, const kvstore::KvFormat& format,
                                         double key_outlier_reserve = kDefaultKeyOutlierReserve);

}  // namespace kvq::sharding
