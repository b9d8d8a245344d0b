#include "sharding/gpu_block_geometry.h"

#include <algorithm>
#include <cmath>

#include "kernels/paged_kv.h"

namespace kvq::sharding {

GpuBlockGeometry ComputeGpuBlockGeometry(const kvstore::KvShape& shape, const kvstore::KvFormat& format,
                                         double key_outlier_reserve) {
  const kvstore::BlockLayout lay = kvstore::ComputeBlockLayout(format, shape);
  GpuBlockGeometry g;
  const int64_t lists = static_cast<int64_t>(shape.n_layers) * shape.n_kv_heads;
  if (lay.has_key_outliers) {
    const double expected = static_cast<double>(kvstore::kBlockTokens) * shape.head_dim * format.outlier_fraction;
    g.key_outlier_capacity = std::max(1, static_cast<int>(std::ceil(expected)));
    g.key_outlier_header_words = kernels::PagedKvCache::KeyOutlierHeaderWords(shape.n_layers, shape.n_kv_heads);
    g.area_words = static_cast<int64_t>(std::ceil(std::max(1.0, key_outlier_reserve) * expected * lists));
  }
  g.block_stride_bytes = kvstore::AlignUp(lay.fixed_bytes + (g.key_outlier_header_words + g.area_words) * 4, 16);
  return g;
}

}  // namespace kvq::sharding
