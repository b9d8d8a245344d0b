// ExpandKv (kernels/prefill_attention.h), GPU vs kvstore::QuantizedKvCache::ReadBack (the
// dequantization oracle) with the keys rotated by kernels::ApplyRopeReference at their positions:
// every format the GPU kernels support, sinks (full, partial capacity, none on a rank shard),
// sub-ranges starting past 0 and crossing block boundaries, token-major and head-major outputs.
// Values bit-exact, keys within one fp16 rounding, nothing written outside the addressed elements;
// and the launcher's validation (host only).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/half.h"
#include "kernels/prefill_attention.h"
#include "kernels/reference/rope.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantized_kv_cache.h"
#include "kvstore/quantizer.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/kv_pool_test_util.h"
#include "tests/kernels/prefill_test_util.h"

namespace kvq {
namespace {

using testing::BuildPast;
using testing::DeviceBuffer;
using testing::ExpectInvalid;
using testing::FormatTag;
using testing::kUnwritten;
using testing::Past;
constexpr int kLayer = testing::kPrefillTestLayer;

// ---- Tolerances (worst element) ----
//
// ExpandKv keys: the GPU decodes the same fp32 pre-RoPE key as ReadBack, rotates it in fp32 with
// cos/sin of a double angle and rounds once to fp16; the oracle rotates in double and is compared
// unrounded. One rounding to fp16 moves a value by at most half an ulp, <= 2^-11 |ref| (equality
// just above a power of two, so the worst element sits near 1.0x of this bound by design: 0.97x
// measured on an H200). The fp32 rotation adds a few fp32 ulps of the pair's magnitude (<= ~20
// with key outliers: ~1e-5 at most); the 1e-4 absolute term leaves 10x over that and covers
// subnormals. Post-RoPE formats: the oracle un-rotates (ReadBack) and rotates back in double, with
// one float rounding in between: the same order.
constexpr double kHalfRel = 1.0 / 2048.0;
constexpr double kExpandKeyAbs = 1e-4;
// ExpandKv values are compared bit for bit: ReadBack computes fmaf(lut[code], r, zp) in fp32 as
// the kernel does, outliers and sinks are fp16 already, and both round to nearest even once.

// ---- ExpandKv ----

// LaunchExpandKv of local tokens [t0, t0 + n) of batch row `seq` into fresh buffers of `elems`
// halves filled with kUnwritten; both come back to the host.
void Expand(const kernels::PagedKvCache& view, int seq, int64_t t0, int n, int64_t token_stride,
            int64_t head_stride, size_t elems, std::vector<uint16_t>* k, std::vector<uint16_t>* v) {
  DeviceBuffer<uint16_t> dk(std::vector<uint16_t>(elems, kUnwritten));
  DeviceBuffer<uint16_t> dv(std::vector<uint16_t>(elems, kUnwritten));
  kernels::ExpandKvParams p;
  p.kv = view;
  p.layer = kLayer;
  p.seq = seq;
  p.t0 = t0;
  p.n = n;
  p.k = dk.get();
  p.v = dv.get();
  p.token_stride = token_stride;
  p.head_stride = head_stride;
  const absl::Status st = kernels::LaunchExpandKv(p, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  *k = dk.Download();
  *v = dv.Download();
}

// The oracle of ExpandKv: ReadBack's K (pre-RoPE: ReadBack un-rotates post-RoPE formats; sinks
// are stored pre-RoPE) rotated at first_position + t0 + i, and ReadBack's V.
void ExpandOracle(const kvstore::QuantizedKvCache& c, int64_t t0, int n, std::vector<float>* k,
                  std::vector<float>* v) {
  ASSERT_TRUE(c.ReadBack(kLayer, t0, t0 + n, k, v).ok());
  const int64_t L = c.shape().ElementsPerTokenPerLayer();
  for (int i = 0; i < n; ++i) {
    kernels::ApplyRopeReference(k->data() + i * L, c.shape().n_kv_heads, c.shape().head_dim,
                                c.first_position() + t0 + i, c.inv_freq());
  }
}

// GPU expansion (fp16 at i * ts + h * hs + d) vs the oracle ([n][H][D] floats): keys within one
// fp16 rounding, values bit-exact, every other element still kUnwritten.
void CheckExpanded(const std::vector<float>& rk, const std::vector<float>& rv,
                   const std::vector<uint16_t>& gk, const std::vector<uint16_t>& gv, int n, int H,
                   int D, int64_t ts, int64_t hs) {
  std::vector<bool> written(gk.size(), false);
  double worst = 0.0;  // max over keys of err / tol
  size_t worst_ref = 0;
  float worst_got = 0.0f;
  int64_t v_bad = 0;
  size_t v_first = 0;
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < H; ++h) {
      for (int d = 0; d < D; ++d) {
        const size_t at = static_cast<size_t>(i * ts + h * hs + d);
        const size_t ref = (static_cast<size_t>(i) * H + h) * D + d;
        ASSERT_LT(at, gk.size());
        written[at] = true;
        const float got = HalfBitsToFloat(gk[at]);
        const double want = rk[ref];
        double err = std::fabs(static_cast<double>(got) - want);
        if (std::isnan(err)) err = INFINITY;
        const double r = err / (kHalfRel * std::fabs(want) + kExpandKeyAbs);
        if (r > worst) {
          worst = r;
          worst_ref = ref;
          worst_got = got;
        }
        if (gv[at] != FloatToHalfBits(rv[ref]) && v_bad++ == 0) v_first = ref;
      }
    }
  }
  const auto where = [&](size_t ref) {
    return absl::StrCat("token +", ref / (static_cast<size_t>(H) * D), ", head ", (ref / D) % H,
                        ", channel ", ref % D);
  };
  EXPECT_LE(worst, 1.0) << "key at " << where(worst_ref) << " = " << worst_got << ", want "
                        << rk[worst_ref] << " (" << worst << "x the tolerance)";
  if (v_bad > 0) {
    const size_t i = v_first / (static_cast<size_t>(H) * D), h = (v_first / D) % H, d = v_first % D;
    ADD_FAILURE() << v_bad << " values differ; first at " << where(v_first) << ": "
                  << HalfBitsToFloat(gv[static_cast<size_t>(i * ts + h * hs + d)]) << ", want "
                  << rv[v_first] << " (fp16 " << HalfBitsToFloat(FloatToHalfBits(rv[v_first]))
                  << ")";
  }
  int64_t stray = 0;
  for (size_t at = 0; at < gk.size(); ++at) {
    if (!written[at] && (gk[at] != kUnwritten || gv[at] != kUnwritten)) ++stray;
  }
  EXPECT_EQ(stray, 0) << "elements written outside [t0, t0 + n) x heads x head_dim";
}

struct ExpandCase {
  std::string format;
  int head_dim;
  int n_kv_heads;
  int64_t first_position;  // of every sequence (> sink: a rank shard without sink tokens)
};

std::string ExpandName(const ::testing::TestParamInfo<ExpandCase>& info) {
  const ExpandCase& c = info.param;
  return absl::StrCat(FormatTag(c.format), "_hd", c.head_dim, "_kv", c.n_kv_heads, "_pos",
                      c.first_position);
}

class ExpandKvTest : public ::testing::TestWithParam<ExpandCase> {};

TEST_P(ExpandKvTest, MatchesReadBackRotated) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const ExpandCase& c = GetParam();
  const int H = c.n_kv_heads, D = c.head_dim;
  Past past;
  // 256 and 300 put the end on and past the first block boundary (sink tokens shift it).
  ASSERT_NO_FATAL_FAILURE(BuildPast(c.format, D, H, {1, 113, 256, 300, 700}, c.first_position,
                                    77 + D + H, &past));
  for (size_t s = 0; s < past.caches.size(); ++s) {
    const kvstore::QuantizedKvCache& cache = *past.caches[s];
    const int len = static_cast<int>(cache.length());
    // Whole sequence; from t0 = 37 (past any sink) to the end; 20 tokens across block 0's end.
    std::vector<std::pair<int64_t, int>> ranges = {{0, len}};
    if (len > 37) ranges.push_back({37, len - 37});
    if (len > 251) ranges.push_back({250, std::min(20, len - 250)});
    for (const auto& [t0, n] : ranges) {
      std::vector<float> rk, rv;
      ASSERT_NO_FATAL_FAILURE(ExpandOracle(cache, t0, n, &rk, &rv));
      for (const bool head_major : {false, true}) {
        SCOPED_TRACE(absl::StrCat("seq ", s, " (len ", len, "), tokens [", t0, ", ", t0 + n, "), ",
                                  head_major ? "head-major" : "token-major"));
        // Head-major: one token of padding after each head; token-major: a tail after the last
        // token. Both must stay unwritten.
        const int64_t ts = head_major ? D : static_cast<int64_t>(H) * D;
        const int64_t hs = head_major ? static_cast<int64_t>(n + 1) * D : D;
        const size_t elems = head_major ? static_cast<size_t>(H * hs) : static_cast<size_t>(n * ts + 64);
        std::vector<uint16_t> gk, gv;
        ASSERT_NO_FATAL_FAILURE(Expand(past.dev->view, static_cast<int>(s), t0, n, ts, hs, elems, &gk, &gv));
        ASSERT_NO_FATAL_FAILURE(CheckExpanded(rk, rv, gk, gv, n, H, D, ts, hs));
      }
    }
  }
}

std::vector<ExpandCase> ExpandCases() {
  std::vector<ExpandCase> cs;
  // Every format decode_attention_test runs on the GPU: fp16, nuq at 1% / 0.1% / 0% outliers,
  // sinks (nuq defaults to sink1; sink5, sink64), per-channel int pre- and post-RoPE (keys stored
  // rotated, sinks not). n_kv alternates 2 / 3 (3 x 128 = 384 elements: 2-byte value-outlier
  // indices).
  const std::vector<std::string> formats = {
      "fp16",          "nuq4-1%",         "nuq3-1%",         "nuq2-1%",
      "nuq3",          "nuq4-0.1%-sink5", "nuq2-1%-sink64",  "int3-pc-post-1%",
      "int3-pc-post-1%-sink3", "int4-pc-pre"};
  for (int hd : {64, 128}) {
    for (size_t i = 0; i < formats.size(); ++i) {
      cs.push_back({formats[i], hd, 2 + static_cast<int>(i % 2), 0});
    }
    // Partial sink capacity: first_position 2 < sink 5 leaves 3 sink tokens.
    cs.push_back({"nuq3-1%-sink5", hd, 2, 2});
    // Rank shards deep into a long sequence (no sink; RoPE angles near 5e6 rad need double).
    cs.push_back({"fp16", hd, 3, 5000000});
    cs.push_back({"nuq3-1%", hd, 2, 5000000});
    cs.push_back({"int3-pc-post-1%-sink3", hd, 2, 5000000});
  }
  return cs;
}

INSTANTIATE_TEST_SUITE_P(Grid, ExpandKvTest, ::testing::ValuesIn(ExpandCases()), ExpandName);

TEST(ExpandKvLauncher, RejectsBadArguments) {
  kernels::ExpandKvParams p;
  p.kv.geom.n_layers = 2;
  p.kv.geom.n_kv_heads = 2;
  p.kv.geom.head_dim = 256;  // over the kernel's tile
  p.kv.codec = kernels::KvCodec::kFp16;
  p.n = 4;
  ExpectInvalid(kernels::LaunchExpandKv(p, nullptr), "head_dim");
  p.kv.geom.head_dim = 128;
  p.layer = 2;
  ExpectInvalid(kernels::LaunchExpandKv(p, nullptr), "layer");
  p.layer = 1;
  p.t0 = -1;
  ExpectInvalid(kernels::LaunchExpandKv(p, nullptr), "t0");
  p.t0 = 0;
  p.n = -1;
  ExpectInvalid(kernels::LaunchExpandKv(p, nullptr), "n ");
  p.n = 4;
  ExpectInvalid(kernels::LaunchExpandKv(p, nullptr), "null");
  // A LUT codec without its quantizer tensors.
  p.kv.codec = kernels::KvCodec::kLut3;
  ExpectInvalid(kernels::LaunchExpandKv(p, nullptr), "lut");
  // No tokens: nothing to do.
  p.kv.codec = kernels::KvCodec::kFp16;
  p.n = 0;
  EXPECT_TRUE(kernels::LaunchExpandKv(p, nullptr).ok());
}

}  // namespace
}  // namespace kvq
