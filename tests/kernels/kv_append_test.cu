// GPU quantize-append vs kvstore::QuantizedKvCache::Append (the oracle), bit-exact: a prefill
// chunk then single-token decode steps, over every layer; every block's fixed section (codes,
// value scales, value outliers) must match byte for byte, the key-outlier entries of every
// (layer, head) must match entry for entry, and sink tokens must match as fp16. Then decode
// attention over the GPU-built pool is compared with the CPU cache's AttendPast. Key-outlier lists
// either have fixed worst-case reservations or are growable (the GPU pool's layout: regions taken
// from a per-block area as lists grow, packed by LaunchCompactKeyOutliers every 64 tokens and when
// a block fills, as GpuKvCache::Commit does).
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/half.h"
#include "kernels/decode_attention.h"
#include "kernels/kv_append.h"
#include "kernels/reference/rope.h"
#include "kvstore/block_layout.h"
#include "kvstore/quantized_kv_cache.h"
#include "kvstore/quantizer.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/kv_pool_test_util.h"

namespace kvq {
namespace {

using testing::DeviceBuffer;

struct AppendCase {
  std::string format;
  int head_dim;
  int n_kv_heads;
  int prefill;  // tokens of the first step (a chunk)
  int decode;   // single-token steps after it
  bool growable = false;
};

std::string AppendName(const ::testing::TestParamInfo<AppendCase>& info) {
  const AppendCase& c = info.param;
  return absl::StrCat(absl::StrReplaceAll(c.format, {{"-", "_"}, {"%", "pct"}, {".", "p"}}),
                      "_hd", c.head_dim, "_kv", c.n_kv_heads, "_p", c.prefill, "_d", c.decode,
                      c.growable ? "_growable" : "");
}

std::shared_ptr<const kvstore::Quantizer> RandomQuantizer(const kvstore::KvShape& shape,
                                                          const kvstore::KvFormat& format,
                                                          std::mt19937& rng) {
  if (!format.quantized()) return nullptr;
  kvstore::QuantizerData d;
  d.shape = shape;
  d.format = format;
  d.fingerprint = "t";
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  const size_t nk = static_cast<size_t>(shape.n_layers) * shape.ElementsPerTokenPerLayer();
  for (size_t i = 0; i < nk; ++i) {
    const float c = 0.3f * (u(rng) - 0.5f), h = 1.0f + 2.0f * u(rng);
    d.key_lower.push_back(c - h);
    d.key_upper.push_back(c + h);
  }
  const int C = format.num_centroids();
  for (int l = 0; l < shape.n_layers; ++l) {
    for (auto* lut : {&d.key_lut, &d.value_lut}) {
      for (int j = 0; j < C; ++j) {
        const float jitter = (j == 0 || j == C - 1) ? 0.0f : (u(rng) - 0.5f) * (0.8f / (C - 1));
        lut->push_back(-1.0f + 2.0f * j / (C - 1) + jitter);
      }
    }
    d.key_qnorm_scale.push_back(1.0f);
    d.key_qnorm_offset.push_back(0.0f);
    d.value_qnorm_scale.push_back(1.0f);
    d.value_qnorm_offset.push_back(0.0f);
  }
  auto q = kvstore::Quantizer::Create(std::move(d));
  EXPECT_TRUE(q.ok()) << q.status();
  return std::make_shared<const kvstore::Quantizer>(std::move(q).value());
}

class KvAppendTest : public ::testing::TestWithParam<AppendCase> {};

TEST_P(KvAppendTest, BitExactWithKvstore) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const AppendCase& c = GetParam();
  auto fmt = kvstore::KvFormat::Parse(c.format);
  ASSERT_TRUE(fmt.ok()) << fmt.status();
  const kvstore::KvShape shape{2, c.n_kv_heads, c.head_dim};
  std::mt19937 rng(77 + c.head_dim);
  auto quant = RandomQuantizer(shape, *fmt, rng);
  kernels::RopeParams rope;
  rope.head_dim = c.head_dim;
  auto cpu_or = kvstore::QuantizedKvCache::Create(shape, *fmt, quant, rope, 0);
  ASSERT_TRUE(cpu_or.ok()) << cpu_or.status();
  auto& cpu = *cpu_or;
  const kvstore::BlockLayout lay = kvstore::ComputeBlockLayout(*fmt, shape);
  const int total = c.prefill + c.decode;
  const int n_sink_cap = cpu->sink_capacity();
  const int n_blocks = std::max(1, (total - n_sink_cap + kvstore::kBlockTokens - 1) / kvstore::kBlockTokens);
  const int H = shape.n_kv_heads, D = shape.head_dim, NL = shape.n_layers;
  const int64_t L = shape.ElementsPerTokenPerLayer();
  const int lists = NL * H;
  const int header = c.growable ? kernels::PagedKvCache::KeyOutlierHeaderWords(NL, H) : 0;
  // Fixed: the worst case per list. Growable: the nominal count per list, and an area of half the
  // worst case for all lists (lists move several times while the blocks fill).
  const int cap = c.growable ? std::max(1, static_cast<int>(kvstore::kBlockTokens * D * fmt->outlier_fraction + 0.999))
                             : kvstore::kBlockTokens * D;
  const int64_t var_words = c.growable ? header + static_cast<int64_t>(lists) * kvstore::kBlockTokens * D / 2
                                       : static_cast<int64_t>(lists) * cap;
  const int64_t stride = (lay.fixed_bytes + var_words * 4 + 15) / 16 * 16;

  // Zeroed blocks with per-(layer, head) reserved outlier ranges (or empty growable lists); block b
  // at pool slot b.
  std::vector<uint8_t> pool(static_cast<size_t>(n_blocks) * stride, 0);
  if (lay.has_key_outliers && c.growable) {
    for (int b = 0; b < n_blocks; ++b) {
      for (int i = 0; i < lists; ++i) std::memcpy(pool.data() + b * stride + lay.KeyOutlierDirAt(i / H, i % H), &header, 4);
      std::memcpy(pool.data() + b * stride + lay.fixed_bytes, &header, 4);
    }
  } else if (lay.has_key_outliers) {
    for (int b = 0; b < n_blocks; ++b) {
      for (int l = 0; l < NL; ++l) {
        for (int h = 0; h < H; ++h) {
          const uint32_t first = static_cast<uint32_t>((l * H + h) * cap);
          std::memcpy(pool.data() + b * stride + lay.KeyOutlierDirAt(l, h), &first, 4);
        }
      }
    }
  }
  std::vector<int32_t> table(n_blocks);
  for (int b = 0; b < n_blocks; ++b) table[b] = b;
  DeviceBuffer<uint8_t> dpool(pool);
  DeviceBuffer<int32_t> dtable(table), dlen(std::vector<int32_t>{0});
  DeviceBuffer<int64_t> dfirst(std::vector<int64_t>{0});
  DeviceBuffer<uint16_t> dsink(std::max<size_t>(1, static_cast<size_t>(NL) * n_sink_cap * L * 2));
  DeviceBuffer<uint16_t*> dsinkp(std::vector<uint16_t*>{dsink.get()});
  DeviceBuffer<int> doverflow(std::vector<int>{0});
  // Quantizer tensors and views via the shared helper (uses an empty CPU cache for the format).
  auto qdev = testing::UploadCaches({cpu.get()}, quant.get(), rope);

  kernels::KvAppendParams ap;
  ap.kv = qdev->view;
  ap.kv.pool = dpool.get();
  ap.kv.block_stride_bytes = stride;
  ap.kv.key_outlier_capacity = cap;
  ap.kv.key_outlier_header_words = header;
  ap.kv.block_table = dtable.get();
  ap.kv.max_blocks_per_seq = n_blocks;
  ap.kv.seq_lens = dlen.get();
  ap.kv.first_positions = dfirst.get();
  ap.kv.sink = reinterpret_cast<const uint16_t* const*>(dsinkp.get());
  ap.pool = dpool.get();
  ap.sink = dsinkp.get();
  ap.batch = 1;
  ap.overflow = doverflow.get();

  std::normal_distribution<float> nd(0.0f, 1.0f);
  DeviceBuffer<uint32_t> dscratch(static_cast<size_t>(kernels::CompactKeyOutliersParams::kMaxBlocks) *
                                  ((stride - lay.fixed_bytes) / 4));
  int compactions = 0;
  int have = 0;
  std::vector<int> steps = {c.prefill};
  for (int i = 0; i < c.decode; ++i) steps.push_back(1);
  for (int n : steps) {
    std::vector<float> k(n * L), v(n * L);
    for (float& x : k) x = nd(rng) * 1.5f;
    for (float& x : v) x = nd(rng);
    for (size_t i = 0; i < v.size(); i += 53) v[i] *= 6.0f;  // value outliers
    if (n > 3) v[3] = v[4];  // a tie in the value order
    DeviceBuffer<float> dk(k), dv(v);
    // Odd layers read k and v from rows of a stacked q/k/v projection ([q | k | v] per token,
    // kv_row_stride): the same bytes in the pool as packed rows.
    const int64_t S = 3 * static_cast<int64_t>(L) + 4;
    std::vector<float> stacked(static_cast<size_t>(n) * S, 1e30f);
    for (int t = 0; t < n; ++t) {
      std::copy(k.begin() + t * L, k.begin() + (t + 1) * L, stacked.begin() + t * S + L);
      std::copy(v.begin() + t * L, v.begin() + (t + 1) * L, stacked.begin() + t * S + 2 * L);
    }
    DeviceBuffer<float> dstacked(stacked);
    dlen.Upload(std::vector<int32_t>{have});
    for (int l = 0; l < NL; ++l) {
      ASSERT_TRUE(cpu->Append(l, k.data(), v.data(), n).ok());
      ap.layer = l;
      ap.n_new = n;
      const bool strided = l % 2 == 1;
      ap.k = strided ? dstacked.get() + L : dk.get();
      ap.v = strided ? dstacked.get() + 2 * L : dv.get();
      ap.kv_row_stride = strided ? S : 0;
      const absl::Status st = kernels::LaunchKvAppend(ap, nullptr);
      ASSERT_TRUE(st.ok()) << st;
    }
    ap.kv_row_stride = 0;
    {  // a row stride shorter than a row is refused, saying so
      kernels::KvAppendParams bad = ap;
      bad.kv_row_stride = L - 1;
      const absl::Status st = kernels::LaunchKvAppend(bad, nullptr);
      EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
    }
    ASSERT_TRUE(cpu->Commit().ok());
    if (c.growable && lay.has_key_outliers) {
      kernels::CompactKeyOutliersParams cp;
      cp.pool = dpool.get();
      cp.block_stride_bytes = stride;
      cp.layer_bytes = lay.layer_bytes;
      cp.fixed_bytes = lay.fixed_bytes;
      cp.dir_offset = lay.key_outlier_dir_offset;
      cp.n_layers = NL;
      cp.n_kv_heads = H;
      cp.header_words = header;
      cp.key_outlier_capacity = cap;
      cp.scratch = dscratch.get();
      const int before = std::max(0, have - n_sink_cap), after = std::max(0, have + n - n_sink_cap);
      for (int b = before / 256; b * 256 < after; ++b) {
        const int f0 = std::clamp(before - b * 256, 0, 256), f1 = std::clamp(after - b * 256, 0, 256);
        if (f1 / 64 > f0 / 64 && cp.n < cp.kMaxBlocks) {
          cp.ids[cp.n] = b;
          cp.filled[cp.n++] = f1;
        }
      }
      if (cp.n > 0) ++compactions;
      ASSERT_TRUE(kernels::LaunchCompactKeyOutliers(cp, nullptr).ok());
    }
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    have += n;
  }
  if (c.growable && lay.has_key_outliers) EXPECT_GT(compactions, 0);
  EXPECT_EQ(doverflow.Download()[0], 0);
  const std::vector<uint8_t> got = dpool.Download();
  const int64_t cpu_blocks = cpu->Bytes().blocks;
  for (int64_t b = 0; b < cpu_blocks; ++b) {
    const std::string want = cpu->ExportBlock(b);
    const uint8_t* g = got.data() + b * stride;
    for (int l = 0; l < NL; ++l) {
      const int64_t lo = l * lay.layer_bytes;
      // Everything in the layer section except the key-outlier directory.
      const int64_t dir_lo = lay.has_key_outliers ? lo + lay.key_outlier_dir_offset : lo + lay.layer_bytes;
      const int64_t dir_hi = lay.has_key_outliers ? dir_lo + H * 8 : dir_lo;
      for (int64_t x = lo; x < lo + lay.layer_bytes; ++x) {
        if (x >= dir_lo && x < dir_hi) continue;
        ASSERT_EQ(g[x], static_cast<uint8_t>(want[x]))
            << "block " << b << " layer " << l << " byte " << x - lo;
      }
      if (!lay.has_key_outliers) continue;
      for (int h = 0; h < H; ++h) {
        uint32_t wf, wc, gf, gc;
        std::memcpy(&wf, want.data() + lay.KeyOutlierDirAt(l, h), 4);
        std::memcpy(&wc, want.data() + lay.KeyOutlierDirAt(l, h) + 4, 4);
        std::memcpy(&gf, g + lay.KeyOutlierDirAt(l, h), 4);
        std::memcpy(&gc, g + lay.KeyOutlierDirAt(l, h) + 4, 4);
        ASSERT_EQ(gc, wc) << "block " << b << " layer " << l << " head " << h;
        for (uint32_t e = 0; e < wc; ++e) {
          uint32_t we, ge;
          std::memcpy(&we, want.data() + lay.fixed_bytes + 4 * (wf + e), 4);
          std::memcpy(&ge, g + lay.fixed_bytes + 4 * (gf + e), 4);
          ASSERT_EQ(ge, we) << "block " << b << " layer " << l << " head " << h << " entry " << e;
        }
      }
    }
  }
  // Sinks.
  if (n_sink_cap > 0) {
    const std::vector<uint16_t> sink = dsink.Download();
    for (int l = 0; l < NL; ++l) {
      std::vector<float> k, v;
      ASSERT_TRUE(cpu->ReadBack(l, 0, std::min(n_sink_cap, total), &k, &v).ok());
      for (size_t i = 0; i < k.size(); ++i) {
        ASSERT_EQ(sink[static_cast<size_t>(l) * n_sink_cap * L + i], FloatToHalfBits(k[i]));
        ASSERT_EQ(sink[(static_cast<size_t>(NL) * n_sink_cap + static_cast<size_t>(l) * n_sink_cap) * L + i],
                  FloatToHalfBits(v[i]));
      }
    }
  }
  // Attention over the GPU-built pool (per-capacity outlier directories).
  kernels::DecodeAttentionParams p;
  p.kv = ap.kv;
  dlen.Upload(std::vector<int32_t>{total});
  p.layer = 1;
  p.batch = 1;
  p.n_heads = H * 2;
  std::vector<float> q(static_cast<size_t>(p.n_heads) * D);
  for (float& x : q) x = nd(rng) * 0.5f;
  DeviceBuffer<float> dq(q), dout(q.size()), dlse(p.n_heads);
  DeviceBuffer<uint8_t> ws(1 << 20);
  p.q = dq.get();
  p.o = dout.get();
  p.lse = dlse.get();
  p.max_seq_len = total;
  p.workspace = ws.get();
  p.workspace_bytes = ws.size();
  ASSERT_TRUE(kernels::LaunchDecodeAttention(p, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  auto ref = cpu->AttendPast(1, q.data(), 1, p.n_heads);
  ASSERT_TRUE(ref.ok());
  // Same tolerance and reasoning as decode_attention_test.cu.
  EXPECT_LE(testing::MaxAbsError(dout.Download(), ref->o).err, 2e-3);
  EXPECT_LE(testing::MaxAbsError(dlse.Download(), ref->lse).err, 1e-3);
}

INSTANTIATE_TEST_SUITE_P(
    Grid, KvAppendTest,
    ::testing::Values(AppendCase{"fp16", 128, 2, 300, 3}, AppendCase{"nuq4-1%", 128, 2, 300, 5},
                      AppendCase{"nuq3-1%", 64, 3, 113, 150}, AppendCase{"nuq2-1%", 128, 8, 257, 2},
                      AppendCase{"nuq3", 64, 1, 40, 3}, AppendCase{"nuq3-0.1%-sink5", 128, 2, 3, 260},
                      AppendCase{"int4-pc-pre-1%", 64, 2, 256, 1},
                      AppendCase{"nuq3-1%", 64, 3, 600, 300, true}, AppendCase{"nuq4-2%", 128, 2, 113, 150, true},
                      AppendCase{"nuq2-1%-sink5", 128, 2, 3, 260, true},
                      // LLaMA-2-7B's 32 KV heads (4,096 elements per token) at 2%: 82 value
                      // outliers per token, 42 rounds of the value append's selection.
                      AppendCase{"nuq2-2%", 128, 32, 40, 2},
                      // 13 value outliers per token over 4 heads: value_outlier_head_start.
                      AppendCase{"nuq3-5%", 64, 4, 300, 3}),
    AppendName);

}  // namespace
}  // namespace kvq
