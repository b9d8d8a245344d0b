// The GPU pool's block bytes against the canonical (CPU, serialized) form, on the host: blocks with
// key-outlier lists far over the nominal count load packed (full blocks exactly, a partial block
// with room to grow) and come back byte-identical; a block that cannot fit is refused with a
// message that says what to raise. This is the path sessions take between the CPU and GPU
// engines; it needs no GPU.
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvstore/quantized_kv_cache.h"
#include "kvstore/quantizer.h"
#include "model/config.h"
#include "model/forward.h"
#include "tests/test_util.h"

#if KVQ_HAVE_CUDA
#include "sharding/gpu/gpu_kv_cache.h"
#endif

namespace kvq::sharding {
namespace {

#if KVQ_HAVE_CUDA

// Appends `n` tokens with keys inside the calibrated range except `dense_lists` (layer, head)
// lists whose first `dense_tokens` tokens have 40 of 64 channels far outside it.
std::unique_ptr<kvstore::QuantizedKvCache> MakeCache(const std::vector<std::pair<int, int>>& dense_lists,
                                                     int dense_tokens, int n) {
  model::ModelConfig c;
  EXPECT_TRUE(model::BuiltinConfig("smollm2-135m", &c).ok());
  auto q = kvstore::Quantizer::Load(testing::FixturePath("quantizers/nuq3-1%.kvqq"));
  EXPECT_TRUE(q.ok()) << q.status();
  auto quant = std::make_shared<const kvstore::Quantizer>(std::move(*q));
  auto f = kvstore::KvFormat::Parse("nuq3-1%");
  const kvstore::KvShape shape{c.n_layers, c.n_kv_heads, c.head_dim};
  auto cache = kvstore::QuantizedKvCache::Create(shape, *f, quant, model::RopeParamsFor(c), 0);
  EXPECT_TRUE(cache.ok());
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int L = c.kv_dim(), hd = c.head_dim;
  for (int t = 0; t < n; ++t) {
    for (int l = 0; l < c.n_layers; ++l) {
      std::vector<float> k(L), v(L);
      for (int e = 0; e < L; ++e) {
        const float zp = quant->KeyZeroPoint(l)[e], r = quant->KeyRange(l)[e];
        k[e] = zp + 0.3f * r * nd(rng);
        v[e] = nd(rng);
      }
      for (auto [dl, dh] : dense_lists) {
        if (dl != l || t >= dense_tokens) continue;
        for (int ch = 0; ch < 40; ++ch) {
          const int e = dh * hd + ch;
          k[e] = quant->KeyZeroPoint(l)[e] + 3.0f * quant->KeyRange(l)[e];
        }
      }
      EXPECT_TRUE((*cache)->Append(l, k.data(), v.data(), 1).ok());
    }
    EXPECT_TRUE((*cache)->Commit().ok());
  }
  return std::move(*cache);
}

uint32_t Word(const std::vector<uint8_t>& b, int64_t offset) {
  uint32_t w;
  std::memcpy(&w, b.data() + offset, 4);
  return w;
}

TEST(GpuBlockLayoutTest, DenseListsLoadPackedWithRoomInThePartialBlockAndRoundTrip) {
  if (!testing::FileExists(testing::FixturePath("quantizers/nuq3-1%.kvqq"))) GTEST_SKIP() << "no quantizer fixture";
  auto cache = MakeCache({{0, 0}, {7, 2}}, 200, 600);
  const kvstore::BlockLayout& lay = cache->layout();
  const GpuBlockGeometry g = ComputeGpuBlockGeometry(cache->shape(), cache->format(), GpuKvOptions{});
  ASSERT_GT(g.key_outlier_header_words, 0);
  const int lists = lay.n_layers * lay.n_kv_heads;
  ASSERT_EQ(cache->num_blocks(), 3);  // 1 sink token, then 256 + 256 + 87
  for (int64_t b = 0; b < cache->num_blocks(); ++b) {
    const int filled = b < 2 ? 256 : 87;
    const std::string canon = cache->ExportBlock(b);
    std::vector<uint8_t> dev;
    ASSERT_TRUE(DeviceBlockFromCanonical(lay, g.key_outlier_capacity, g.key_outlier_header_words, canon,
                                         g.block_stride_bytes, filled, &dev)
                    .ok());
    EXPECT_EQ(static_cast<int64_t>(dev.size()), g.block_stride_bytes);
    EXPECT_EQ(CanonicalBlockFromDevice(lay, g.block_stride_bytes, dev.data()), canon) << "block " << b;
    const int64_t var = lay.fixed_bytes;
    // Lists follow each other in list order from the header's end; the header's capacity of a
    // list is its count in a full block and more in the partial one.
    uint32_t at = static_cast<uint32_t>(g.key_outlier_header_words);
    for (int i = 0; i < lists; ++i) {
      const int l = i / lay.n_kv_heads, h = i % lay.n_kv_heads;
      const uint32_t first = Word(dev, lay.KeyOutlierDirAt(l, h)), count = Word(dev, lay.KeyOutlierDirAt(l, h) + 4);
      const uint32_t cap = Word(dev, var + 4 * (1 + i));
      ASSERT_EQ(first, at) << "block " << b << " list " << i;
      if (filled == 256) {
        EXPECT_EQ(cap, count);
      } else {
        EXPECT_GT(cap, count + (256 - filled) * g.key_outlier_capacity / 256);
      }
      at += cap;
    }
    EXPECT_EQ(Word(dev, var), at);  // the bump pointer follows the last list
    EXPECT_LE(at, static_cast<uint32_t>((g.block_stride_bytes - var) / 4));
    if (b == 0) {
      // Tokens 1-199 (token 0 is the fp16 sink) x 40 channels of list (layer 0, head 0).
      EXPECT_GE(Word(dev, lay.KeyOutlierDirAt(0, 0) + 4), 199u * 40u);
    }
  }
}

TEST(GpuBlockLayoutTest, ABlockThatCannotFitIsRefusedWithWhatToRaise) {
  if (!testing::FileExists(testing::FixturePath("quantizers/nuq3-1%.kvqq"))) GTEST_SKIP() << "no quantizer fixture";
  std::vector<std::pair<int, int>> all;
  for (int l = 0; l < 30; ++l) {
    for (int h = 0; h < 3; ++h) all.push_back({l, h});
  }
  auto cache = MakeCache(all, 256, 257);
  const GpuBlockGeometry g = ComputeGpuBlockGeometry(cache->shape(), cache->format(), GpuKvOptions{});
  std::vector<uint8_t> dev;
  const absl::Status s = DeviceBlockFromCanonical(cache->layout(), g.key_outlier_capacity, g.key_outlier_header_words,
                                                  cache->ExportBlock(0), g.block_stride_bytes, 256, &dev);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(std::string(s.message()).find("key_outlier_reserve"), std::string::npos) << s;
}

#else
TEST(GpuBlockLayoutTest, Skipped) { GTEST_SKIP() << "built without CUDA"; }
#endif

}  // namespace
}  // namespace kvq::sharding
