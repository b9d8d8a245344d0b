// QuantizedKvCache: exact round trips, error bounds, attention vs dense references, merges of
// partials, byte accounting, effective bits, copy-on-write forks and session save/restore.
//
// Tolerances (worst element):
//   kReadBackAttnRel  1e-5   AttendPast vs a double reference over ReadBack keys rotated by the
//                            same ApplyRopeReference: identical float inputs, both accumulate in
//                            double, only the float outputs round (2^-24) plus exp/log ordering.
//   kPostRopeAttnRel  1e-3   same for post-RoPE formats: ReadBack un-rotates stored keys and the
//                            reference re-rotates them (two float roundings of |k| <~ 40 each).
//   kMergeRel         1e-5   merge of float partials vs one pass: one extra float rounding of o and
//                            lse per partial, amplified by exp(lse) weights <= 1.
//   QuantError table  per format, max |o - o_fp32| / rms(v) of attention to the unquantized
//                     cache: o is a convex combination of values, so its error is bounded by the
//                     value error (<= half a LUT gap x range, i.e. 1/(2^B - 1) of the token's
//                     range for uniform) plus the softmax shift from key error. The limits are
//                     empirical on this synthetic data (seeded, so stable): measured worst cases
//                     are 35-75% of them (e.g. nuq3-1% 0.09 / 0.25, nuq4 0.11 / 0.15); fp16's
//                     2e-3 is ~4 x fp16 rounding (2^-11) of values up to ~5 rms.
//   Element bound     |x - x_hat| <= dist(x, [zp - r, zp + r]) + r * H + 1e-6 (|zp| + r), H =
//                     max(largest half gap, 1 - c_max, c_min + 1) of the effective LUT: the encode
//                     clamps then picks the nearest centroid; 1e-6 covers the float fma/division.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "gtest/gtest.h"
#include "kernels/reference/rope.h"
#include "kvstore/attention_merge.h"
#include "kvstore/bit_packing.h"
#include "kvstore/block_layout.h"
#include "kvstore/lut_codec.h"
#include "kvstore/quantized_kv_cache.h"
#include "tests/kvstore/kvstore_test_util.h"

namespace kvq::kvstore {
namespace {

constexpr double kReadBackAttnRel = 1e-5;
constexpr double kPostRopeAttnRel = 1e-3;
constexpr double kMergeRel = 1e-5;

const std::map<std::string, double> kQuantErrorLimit = {
    {"fp16", 2e-3},        {"int4", 0.25},     {"int3", 0.5},      {"int3-pc-pre", 0.5},
    {"int3-pc-post", 0.5}, {"nuq4-1%", 0.12},  {"nuq3-1%", 0.25},  {"nuq2-1%", 0.5},
    {"nuq3", 0.3},         {"nuq4", 0.15},     {"nuq2", 0.6},      {"int4-pc-pre-1%", 0.2},
};

kernels::RopeParams Rope(int hd) {
  kernels::RopeParams r;
  r.head_dim = hd;
  r.theta = 10000.0;
  return r;
}

struct Filled {
  std::unique_ptr<QuantizedKvCache> cache;
  std::vector<std::vector<float>> k, v;  // per layer [n][n_kv][hd]
};

// Appends n tokens in chunks of `chunk`.
Filled Fill(const KvShape& shape, const KvFormat& f, std::shared_ptr<const Quantizer> q, int64_t n,
            int chunk, uint32_t seed, int64_t first_position = 0) {
  Filled out;
  auto c = QuantizedKvCache::Create(shape, f, q, Rope(shape.head_dim), first_position);
  EXPECT_TRUE(c.ok()) << c.status();
  out.cache = std::move(*c);
  const int64_t L = shape.ElementsPerTokenPerLayer();
  for (int l = 0; l < shape.n_layers; ++l) {
    out.k.push_back(testing::SyntheticKeys(n, shape, l, seed));
    out.v.push_back(testing::SyntheticValues(n, shape, l, seed));
  }
  for (int64_t t = 0; t < n; t += chunk) {
    const int m = static_cast<int>(std::min<int64_t>(chunk, n - t));
    for (int l = 0; l < shape.n_layers; ++l) {
      EXPECT_TRUE(out.cache->Append(l, out.k[l].data() + t * L, out.v[l].data() + t * L, m).ok());
    }
    EXPECT_TRUE(out.cache->Commit().ok());
  }
  return out;
}

std::vector<float> RandomQueries(int n_q, int n_heads, int hd, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> g(0.0f, 0.3f);
  std::vector<float> q(static_cast<size_t>(n_q) * n_heads * hd);
  for (auto& x : q) x = g(rng);
  return q;
}

// Dense double attention over pre-RoPE keys [n][n_kv][hd] at positions first + i.
AttentionPartial DenseAttention(const std::vector<float>& k, const std::vector<float>& v,
                                int64_t n, int64_t first, const KvShape& s, const float* q, int n_q,
                                int n_heads) {
  const int H = s.n_kv_heads, D = s.head_dim;
  const int64_t L = static_cast<int64_t>(H) * D;
  const std::vector<double> inv = kernels::RopeInvFreq(Rope(D));
  std::vector<float> kr(k.begin(), k.begin() + n * L);
  for (int64_t i = 0; i < n; ++i) kernels::ApplyRopeReference(kr.data() + i * L, H, D, first + i, inv);
  AttentionPartial out = AttentionPartial::Empty(n_q, n_heads, D);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int qi = 0; qi < n_q; ++qi) {
    for (int h = 0; h < n_heads; ++h) {
      const int hk = h / (n_heads / H);
      const float* qv = q + (static_cast<size_t>(qi) * n_heads + h) * D;
      std::vector<double> sc(n);
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t i = 0; i < n; ++i) {
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += static_cast<double>(qv[d]) * kr[i * L + hk * D + d];
        sc[i] = dot * scale;
        mx = std::max(mx, sc[i]);
      }
      double sum = 0;
      std::vector<double> acc(D, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        const double p = std::exp(sc[i] - mx);
        sum += p;
        for (int d = 0; d < D; ++d) acc[d] += p * v[i * L + hk * D + d];
      }
      const size_t row = static_cast<size_t>(qi) * n_heads + h;
      for (int d = 0; d < D; ++d) out.o[row * D + d] = static_cast<float>(acc[d] / sum);
      out.lse[row] = static_cast<float>(mx + std::log(sum));
    }
  }
  return out;
}

// Worst |a - b| / scale over o, and |lse diff| separately.
double MaxRelO(const AttentionPartial& a, const AttentionPartial& b, double scale) {
  double m = 0;
  for (size_t i = 0; i < a.o.size(); ++i) m = std::max(m, std::fabs(a.o[i] - b.o[i]) / scale);
  return m;
}
double MaxLseDiff(const AttentionPartial& a, const AttentionPartial& b) {
  double m = 0;
  for (size_t i = 0; i < a.lse.size(); ++i) m = std::max(m, std::fabs(a.lse[i] - static_cast<double>(b.lse[i])));
  return m;
}
double Rms(const std::vector<float>& x) {
  double s = 0;
  for (float v : x) s += static_cast<double>(v) * v;
  return std::sqrt(s / x.size());
}

const KvShape kShape{2, 2, 64};

class FormatTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FormatTest, ElementErrorBounds) {
  const KvFormat f = *KvFormat::Parse(GetParam());
  auto q = testing::CalibratedQuantizer(kShape, f);
  ASSERT_NE(q, nullptr);
  const int64_t n = 300;
  Filled c = Fill(kShape, f, q, n, 37, 21);
  const int H = kShape.n_kv_heads, D = kShape.head_dim;
  const int64_t L = kShape.ElementsPerTokenPerLayer();
  const std::vector<double> inv = kernels::RopeInvFreq(Rope(D));
  const int sink = c.cache->sink_capacity();
  for (int l = 0; l < kShape.n_layers; ++l) {
    std::vector<float> k, v;
    ASSERT_TRUE(c.cache->ReadBack(l, 0, n, &k, &v).ok());
    auto half_gap = [](const std::vector<float>& lut) {
      double h = std::max(1.0 - lut.back(), lut.front() + 1.0);
      for (size_t j = 1; j < lut.size(); ++j) h = std::max(h, 0.5 * (lut[j] - lut[j - 1]));
      return h;
    };
    auto bound = [](double x, double zp, double r, double H) {
      const double dist = std::max(0.0, std::fabs(x - zp) - r);
      return dist + r * H + 1e-6 * (std::fabs(zp) + r);
    };
    double worst_k = 0, worst_v = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float* x = c.k[l].data() + i * L;
      const float* vx = c.v[l].data() + i * L;
      if (i < sink) {  // sink: fp16, exact for fp16 rounding
        for (int64_t e = 0; e < L; ++e) {
          ASSERT_EQ(k[i * L + e], HalfBitsToFloat(FloatToHalfBits(x[e])));
          ASSERT_EQ(v[i * L + e], HalfBitsToFloat(FloatToHalfBits(vx[e])));
        }
        continue;
      }
      if (!f.quantized()) {
        for (int64_t e = 0; e < L; ++e) ASSERT_EQ(k[i * L + e], HalfBitsToFloat(FloatToHalfBits(x[e])));
        continue;
      }
      // Values: recompute the online scaling.
      std::vector<int> outl, order;
      const TokenScaling s =
          ComputeTokenScaling(vx, static_cast<int>(L), ValueOutliersPerToken(f, kShape), &outl, &order);
      const double hv = half_gap(q->EffectiveValueLut(l, f.qnorm));
      for (int64_t e = 0; e < L; ++e) {
        const double err = std::fabs(v[i * L + e] - vx[e]);
        if (std::find(outl.begin(), outl.end(), e) != outl.end()) {
          ASSERT_EQ(v[i * L + e], HalfBitsToFloat(FloatToHalfBits(vx[e])));
          continue;
        }
        const double b = bound(vx[e], s.zero_point(), s.range(), hv);
        worst_v = std::max(worst_v, err / b);
        ASSERT_LE(err, b) << "layer " << l << " token " << i << " elem " << e;
      }
      // Keys: in the domain they were quantized in.
      std::vector<float> xr(x, x + L), kr(k.begin() + i * L, k.begin() + (i + 1) * L);
      if (f.keys_post_rope()) {
        kernels::ApplyRopeReference(xr.data(), H, D, i, inv);
        kernels::ApplyRopeReference(kr.data(), H, D, i, inv);
      }
      std::vector<double> b(L);
      const double hk = half_gap(q->EffectiveKeyLut(l, f.qnorm));
      std::vector<int> ko, ord;
      const TokenScaling ks = ComputeTokenScaling(xr.data(), static_cast<int>(L), 0, &ko, &ord);
      for (int64_t e = 0; e < L; ++e) {
        const double zp = f.keys_per_channel() ? q->KeyZeroPoint(l)[e] : ks.zero_point();
        const double r = f.keys_per_channel() ? q->KeyRange(l)[e] : ks.range();
        const bool outlier = f.outlier_fraction > 0 && std::fabs((xr[e] - zp) / r) > 1.0;
        b[e] = outlier ? std::fabs(xr[e]) * std::ldexp(1.0, -11) : bound(xr[e], zp, r, hk);
        if (!f.keys_post_rope() && outlier) ASSERT_EQ(k[i * L + e], HalfBitsToFloat(FloatToHalfBits(x[e])));
      }
      for (int64_t e = 0; e < L; ++e) {
        double be = b[e];
        // Post-RoPE keys went through rotate(-pos) in ReadBack and rotate(+pos) here: one float
        // rounding each (|x| < 64 -> 2 * 64 * 2^-24 < 1e-5).
        if (f.keys_post_rope()) be += 1e-5;
        const double err = std::fabs(kr[e] - xr[e]);
        worst_k = std::max(worst_k, err / be);
        ASSERT_LE(err, be) << "layer " << l << " token " << i << " elem " << e;
      }
    }
    RecordProperty("worst_k_ratio_l" + std::to_string(l), std::to_string(worst_k));
  }
}

TEST_P(FormatTest, AttentionMatchesReadBackAndUnquantized) {
  const KvFormat f = *KvFormat::Parse(GetParam());
  auto q = testing::CalibratedQuantizer(kShape, f);
  ASSERT_NE(q, nullptr);
  const int64_t n = 600;
  Filled c = Fill(kShape, f, q, n, 113, 22);
  const int n_heads = 4, n_q = 3;  // GQA group 2
  const std::vector<float> qv = RandomQueries(n_q, n_heads, kShape.head_dim, 7);
  for (int l = 0; l < kShape.n_layers; ++l) {
    auto att = c.cache->AttendPast(l, qv.data(), n_q, n_heads);
    ASSERT_TRUE(att.ok()) << att.status();
    std::vector<float> k, v;
    ASSERT_TRUE(c.cache->ReadBack(l, 0, n, &k, &v).ok());
    const AttentionPartial ref = DenseAttention(k, v, n, 0, kShape, qv.data(), n_q, n_heads);
    const double vs = Rms(v);
    const double tol = f.keys_post_rope() ? kPostRopeAttnRel : kReadBackAttnRel;
    EXPECT_LE(MaxRelO(*att, ref, vs), tol) << "layer " << l;
    EXPECT_LE(MaxLseDiff(*att, ref), tol * 10) << "layer " << l;
    const AttentionPartial exact =
        DenseAttention(c.k[l], c.v[l], n, 0, kShape, qv.data(), n_q, n_heads);
    const double err = MaxRelO(*att, exact, Rms(c.v[l]));
    RecordProperty("quant_err_l" + std::to_string(l), std::to_string(err));
    EXPECT_LE(err, kQuantErrorLimit.at(GetParam())) << "layer " << l;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, FormatTest,
                         ::testing::Values("fp16", "int4", "int3", "int3-pc-pre", "int3-pc-post",
                                           "nuq4-1%", "nuq3-1%", "nuq2-1%", "nuq3", "nuq4", "nuq2",
                                           "int4-pc-pre-1%"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (char& ch : s) if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return s;
                         });

TEST(QuantizedKvCacheTest, CentroidValuesRoundTripBitExactly) {
  for (const char* name : {"nuq3-1%", "nuq2-1%", "int3-pc-pre", "nuq4"}) {
    const KvFormat f = *KvFormat::Parse(name);
    auto q = testing::CalibratedQuantizer(kShape, f);
    ASSERT_NE(q, nullptr);
    auto c = *QuantizedKvCache::Create(kShape, f, q, Rope(64));
    const int64_t L = kShape.ElementsPerTokenPerLayer();
    const int n = 40;
    std::mt19937 rng(4);
    std::vector<std::vector<float>> keys(kShape.n_layers), vals(kShape.n_layers);
    for (int l = 0; l < kShape.n_layers; ++l) {
      const std::vector<float> lut = q->EffectiveKeyLut(l, f.qnorm);
      keys[l].resize(n * L);
      for (int i = 0; i < n; ++i) {
        for (int64_t e = 0; e < L; ++e) {
          keys[l][i * L + e] = std::fmaf(lut[rng() % lut.size()], q->KeyRange(l)[e], q->KeyZeroPoint(l)[e]);
        }
      }
      vals[l] = testing::SyntheticValues(n, kShape, l, 3);
      ASSERT_TRUE(c->Append(l, keys[l].data(), vals[l].data(), n).ok());
    }
    ASSERT_TRUE(c->Commit().ok());
    for (int l = 0; l < kShape.n_layers; ++l) {
      std::vector<float> k, v;
      ASSERT_TRUE(c->ReadBack(l, 0, n, &k, &v).ok());
      for (int64_t i = c->sink_capacity() * L; i < n * L; ++i) ASSERT_EQ(k[i], keys[l][i]) << name;
    }
  }
  // Values: uniform LUTs end at +-1, so a token whose values are centroids spanning both ends
  // recomputes the same fp16 scaling and round-trips exactly.
  for (const char* name : {"int2", "int3", "int4", "int3-pc-pre"}) {
    const KvFormat f = *KvFormat::Parse(name);
    auto q = testing::CalibratedQuantizer(kShape, f);
    auto c = *QuantizedKvCache::Create(kShape, f, q, Rope(64));
    const int64_t L = kShape.ElementsPerTokenPerLayer();
    const int n = 20;
    const std::vector<float> lut = UniformLut(f.bits);
    std::mt19937 rng(8);
    std::vector<float> vals(n * L);
    for (int i = 0; i < n; ++i) {
      const float zp = static_cast<float>(static_cast<int>(rng() % 64) - 32) / 8.0f;
      const float r = static_cast<float>(1 + rng() % 32) / 4.0f;
      for (int64_t e = 0; e < L; ++e) {
        const uint32_t code = e < 2 ? static_cast<uint32_t>(e * (lut.size() - 1)) : rng() % lut.size();
        vals[i * L + e] = std::fmaf(lut[code], r, zp);
      }
    }
    std::vector<float> keys = testing::SyntheticKeys(n, kShape, 0, 1);
    for (int l = 0; l < kShape.n_layers; ++l) ASSERT_TRUE(c->Append(l, keys.data(), vals.data(), n).ok());
    ASSERT_TRUE(c->Commit().ok());
    std::vector<float> k, v;
    ASSERT_TRUE(c->ReadBack(1, 0, n, &k, &v).ok());
    EXPECT_EQ(v, vals) << name;
  }
}

TEST(QuantizedKvCacheTest, OutliersReconstructExactly) {
  const KvFormat f = *KvFormat::Parse("nuq3-1%");
  auto q = testing::CalibratedQuantizer(kShape, f);
  auto c = *QuantizedKvCache::Create(kShape, f, q, Rope(64));
  const int64_t L = kShape.ElementsPerTokenPerLayer();
  const int n = 300;
  const int k_v = ValueOutliersPerToken(f, kShape);
  ASSERT_EQ(k_v, 1);  // round(0.01 * 128)
  std::vector<float> keys = testing::SyntheticKeys(n, kShape, 0, 5);
  std::vector<float> vals = testing::SyntheticValues(n, kShape, 0, 5);
  std::mt19937 rng(6);
  std::vector<std::pair<int64_t, float>> planted_k, planted_v;
  for (int i = 0; i < n; ++i) {
    const int64_t e = rng() % L;
    const float big = (rng() % 2 ? 1.0f : -1.0f) * (520.0f + static_cast<float>(rng() % 900) * 0.5f);
    keys[i * L + e] = big;  // fp16-representable, far outside every channel's range
    planted_k.push_back({i * L + e, big});
    const int64_t ev = rng() % L;
    vals[i * L + ev] = 1000.0f + static_cast<float>(i);  // the single (high) value outlier
    planted_v.push_back({i * L + ev, vals[i * L + ev]});
  }
  for (int l = 0; l < 2; ++l) ASSERT_TRUE(c->Append(l, keys.data(), vals.data(), n).ok());
  ASSERT_TRUE(c->Commit().ok());
  std::vector<float> k, v;
  ASSERT_TRUE(c->ReadBack(0, 0, n, &k, &v).ok());
  for (auto [at, x] : planted_k) ASSERT_EQ(k[at], x) << at;
  for (auto [at, x] : planted_v) ASSERT_EQ(v[at], x) << at;
}

TEST(QuantizedKvCacheTest, PartialsMergeToTheFullRange) {
  for (const char* name : {"nuq3-1%", "fp16", "int3-pc-post"}) {
    const KvFormat f = *KvFormat::Parse(name);
    auto q = testing::CalibratedQuantizer(kShape, f);
    const int64_t n = 700;
    Filled c = Fill(kShape, f, q, n, 256, 23);
    const int n_heads = 2, n_q = 2;
    const std::vector<float> qv = RandomQueries(n_q, n_heads, 64, 9);
    auto full = c.cache->AttendPast(1, qv.data(), n_q, n_heads);
    ASSERT_TRUE(full.ok());
    const int sink = c.cache->sink_capacity();
    for (int64_t a : {int64_t{0}, int64_t{1}, int64_t{113}, int64_t{sink}, int64_t{sink + 256},
                      int64_t{sink + 512}, n - 1, n}) {
      auto lo = c.cache->AttendPast(1, qv.data(), n_q, n_heads, 0, a);
      auto hi = c.cache->AttendPast(1, qv.data(), n_q, n_heads, a, n);
      ASSERT_TRUE(lo.ok() && hi.ok());
      auto m = MergePartials({*lo, *hi});
      ASSERT_TRUE(m.ok());
      EXPECT_LE(MaxRelO(*m, *full, 1.0), kMergeRel) << name << " split " << a;
      EXPECT_LE(MaxLseDiff(*m, *full), kMergeRel * 10) << name << " split " << a;
    }
    // Three-way split at block boundaries, and an empty range.
    auto p0 = c.cache->AttendPast(1, qv.data(), n_q, n_heads, 0, sink + 256);
    auto p1 = c.cache->AttendPast(1, qv.data(), n_q, n_heads, sink + 256, sink + 512);
    auto p2 = c.cache->AttendPast(1, qv.data(), n_q, n_heads, sink + 512, n);
    auto e = c.cache->AttendPast(1, qv.data(), n_q, n_heads, 5, 5);
    ASSERT_TRUE(e.ok());
    for (float l : e->lse) EXPECT_EQ(l, -std::numeric_limits<float>::infinity());
    for (float o : e->o) EXPECT_EQ(o, 0.0f);
    auto m3 = MergePartials({*p0, *e, *p1, *p2});
    ASSERT_TRUE(m3.ok());
    EXPECT_LE(MaxRelO(*m3, *full, 1.0), kMergeRel) << name;
  }
}

TEST(QuantizedKvCacheTest, ShardWithPositionOffsetMatchesTheTailOfTheFullCache) {
  // A rank holding tokens [300, 600) of a sequence: no sink, positions from 300.
  const KvFormat f = *KvFormat::Parse("fp16");
  const int64_t n = 600, a = 300;
  Filled full = Fill(kShape, f, nullptr, n, 100, 30);
  auto shard = *QuantizedKvCache::Create(kShape, f, nullptr, Rope(64), a);
  const int64_t L = kShape.ElementsPerTokenPerLayer();
  for (int l = 0; l < 2; ++l) {
    ASSERT_TRUE(shard->Append(l, full.k[l].data() + a * L, full.v[l].data() + a * L, n - a).ok());
  }
  ASSERT_TRUE(shard->Commit().ok());
  const std::vector<float> qv = RandomQueries(1, 2, 64, 3);
  auto x = full.cache->AttendPast(0, qv.data(), 1, 2, a, n);
  auto y = shard->AttendPast(0, qv.data(), 1, 2);
  ASSERT_TRUE(x.ok() && y.ok());
  EXPECT_EQ(x->o, y->o);
  EXPECT_EQ(x->lse, y->lse);
}

// Images written before 2- and 3-bit codes were bit-sliced load into today's layout: the same cache
// as the one they were made from. Version 1 had LSB-first streams at every width, version 2 at 2
// bits (3 bits sliced); a version this build does not know is refused naming it.
TEST(QuantizedKvCacheTest, OlderImagesLoadInTodaysCodeLayout) {
  struct Case {
    const char* format;
    uint32_t version;
    bool stream;  // its code rows were LSB-first streams
  };
  for (const Case& k : {Case{"nuq3-1%-sink0", 1, true}, Case{"nuq2-1%-sink0", 1, true},
                        Case{"nuq2-1%-sink0", 2, true}, Case{"nuq3-1%-sink0", 2, false}}) {
    SCOPED_TRACE(std::string(k.format) + " version " + std::to_string(k.version));
    const KvFormat f = *KvFormat::Parse(k.format);
    auto q = testing::CalibratedQuantizer(kShape, f);
    Filled c = Fill(kShape, f, q, 300, 101, 24);
    const KvBytes bytes = c.cache->Bytes();
    ASSERT_EQ(bytes.sink_tokens, 0);
    const BlockLayout lay = ComputeBlockLayout(f, kShape);
    std::vector<std::string> old_blocks;
    int changed = 0;
    for (int64_t b = 0; b < bytes.blocks; ++b) {
      std::string blk = c.cache->ExportBlock(b);
      for (int l = 0; l < kShape.n_layers && k.stream; ++l) {
        for (int h = 0; h < kShape.n_kv_heads; ++h) {
          for (int t = 0; t < kBlockTokens; ++t) {
            for (const int64_t at : {lay.KeyCodesAt(l, h, t), lay.ValueCodesAt(l, h, t)}) {
              std::vector<uint32_t> row(lay.key_words_per_token), old(row.size(), 0u);
              std::memcpy(row.data(), blk.data() + at, row.size() * 4);
              for (int ch = 0; ch < kShape.head_dim; ++ch) {  // the LSB-first stream, by hand
                const uint64_t code = GetPackedCode(row.data(), ch, lay.bits);
                const int bit = lay.bits * ch;
                old[bit / 32] |= static_cast<uint32_t>(code << (bit % 32));
                if (bit % 32 + lay.bits > 32) old[bit / 32 + 1] |= static_cast<uint32_t>(code >> (32 - bit % 32));
              }
              changed += old != row;
              std::memcpy(blk.data() + at, old.data(), old.size() * 4);
            }
          }
        }
      }
      old_blocks.push_back(std::move(blk));
    }
    EXPECT_EQ(changed > 0, k.stream);
    std::string image = QuantizedKvCache::SerializeParts(f, kShape, 0, 300, 0, {}, {}, old_blocks);
    std::memcpy(image.data() + 8, &k.version, 4);  // the version is outside the checksummed payload
    auto back = QuantizedKvCache::Deserialize(image, q, Rope(64));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*(*back)->Serialize(), *c.cache->Serialize());
    const uint32_t version9 = 9;
    std::memcpy(image.data() + 8, &version9, 4);
    auto bad = QuantizedKvCache::Deserialize(image, q, Rope(64));
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(std::string(bad.status().message()).find("version 9"), std::string::npos);
  }
}

// value_outlier_head_start (block_layout.h) of every appended token: entry [h][t] counts the
// token's value outliers with element index < h * head_dim, read back from the index array.
TEST(QuantizedKvCacheTest, ValueOutlierHeadStartsIndexTheOutliersOfEachHead) {
  const KvShape shape{2, 4, 64};
  const KvFormat f = *KvFormat::Parse("nuq3-5%");  // k_v = 13 over 4 heads
  const BlockLayout lay = ComputeBlockLayout(f, shape);
  ASSERT_EQ(lay.value_outliers_per_token, 13);
  ASSERT_GE(lay.value_outlier_head_start_offset, 0);
  auto q = testing::CalibratedQuantizer(shape, f);
  Filled c = Fill(shape, f, q, 300, 37, 5);
  int nonzero_heads = 0;
  for (int64_t b = 0; b < c.cache->Bytes().blocks; ++b) {
    const std::string blk = c.cache->ExportBlock(b);
    const auto* base = reinterpret_cast<const uint8_t*>(blk.data());
    const int filled = static_cast<int>(std::min<int64_t>(256, 300 - 1 - b * 256));  // 1 sink token
    for (int l = 0; l < shape.n_layers; ++l) {
      for (int t = 0; t < 256; ++t) {
        const uint8_t* idx = base + lay.ValueOutlierIndexAt(l, t);
        for (int h = 0; h < shape.n_kv_heads; ++h) {
          int want = 0;
          while (t < filled && want < 13 && idx[want] < h * 64) ++want;
          ASSERT_EQ(base[lay.ValueOutlierHeadStartAt(l, h, t)], want) << "block " << b << " layer " << l
                                                                       << " token " << t << " head " << h;
          nonzero_heads += want > 0;
        }
      }
    }
  }
  EXPECT_GT(nonzero_heads, 0);
}

// A version-3 image (layer sections without head starts) of a format that has them loads into
// today's layout: the same cache as the one it was made from.
TEST(QuantizedKvCacheTest, Version3ImagesGainValueOutlierHeadStarts) {
  const KvFormat f = *KvFormat::Parse("nuq3-5%-sink0");
  const BlockLayout lay = ComputeBlockLayout(f, kShape);
  ASSERT_GE(lay.value_outlier_head_start_offset, 0);
  auto q = testing::CalibratedQuantizer(kShape, f);
  Filled c = Fill(kShape, f, q, 300, 101, 24);
  std::vector<std::string> old_blocks;
  const int64_t old_lb = lay.value_outlier_head_start_offset;
  for (int64_t b = 0; b < c.cache->Bytes().blocks; ++b) {
    const std::string blk = c.cache->ExportBlock(b);
    std::string old;
    for (int l = 0; l < kShape.n_layers; ++l) old += blk.substr(lay.LayerOffset(l), old_lb);
    old += blk.substr(lay.fixed_bytes);  // key outlier entries
    old_blocks.push_back(std::move(old));
  }
  const std::string image = QuantizedKvCache::SerializeParts(f, kShape, 0, 300, 0, {}, {}, old_blocks, 3);
  auto back = QuantizedKvCache::Deserialize(image, q, Rope(64));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*(*back)->Serialize(), *c.cache->Serialize());
}

TEST(QuantizedKvCacheTest, ByteAccountingMatchesSerializationAndRestores) {
  for (const char* name : {"nuq3-1%", "nuq2-1%-sink5", "fp16", "int4", "int3-pc-post-1%"}) {
    const KvFormat f = *KvFormat::Parse(name);
    auto q = testing::CalibratedQuantizer(kShape, f);
    Filled c = Fill(kShape, f, q, 613, 101, 24);
    const KvBytes b = c.cache->Bytes();
    auto bytes = c.cache->Serialize();
    ASSERT_TRUE(bytes.ok());
    EXPECT_EQ(static_cast<int64_t>(bytes->size()), b.total_bytes + c.cache->SerializationOverheadBytes())
        << name;
    EXPECT_EQ(b.blocks, (613 - b.sink_tokens + 255) / 256);
    EXPECT_EQ(b.key_code_bytes + b.value_code_bytes + b.scale_bytes + b.value_outlier_bytes +
                  b.padding_bytes + b.key_outlier_bytes - b.key_outlier_entries * 4,
              b.blocks * b.block_fixed_bytes);
    auto back = QuantizedKvCache::Deserialize(*bytes, q, Rope(64));
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*(*back)->Serialize(), *bytes);
    for (int l = 0; l < 2; ++l) {
      std::vector<float> k1, v1, k2, v2;
      ASSERT_TRUE(c.cache->ReadBack(l, 0, 613, &k1, &v1).ok());
      ASSERT_TRUE((*back)->ReadBack(l, 0, 613, &k2, &v2).ok());
      EXPECT_EQ(k1, k2);
      EXPECT_EQ(v1, v2);
    }
    std::string bad = *bytes;
    bad[bad.size() / 2] ^= 1;
    auto r = QuantizedKvCache::Deserialize(bad, q, Rope(64));
    ASSERT_FALSE(r.ok());
    EXPECT_NE(std::string(r.status().message()).find("checksum"), std::string::npos);
    EXPECT_FALSE(QuantizedKvCache::Deserialize(bytes->substr(0, bytes->size() - 3), q, Rope(64)).ok());
  }
}

TEST(QuantizedKvCacheTest, EffectiveBitsOnRealShapes) {
  // Two layers stand for the model: every layer has the same per-token bytes.
  struct Shape {
    const char* name;
    KvShape shape;
  };
  for (const Shape& s : {Shape{"SmolLM2-135M", KvShape{2, 3, 64}}, Shape{"Llama-3-8B", KvShape{2, 8, 128}}}) {
    for (int bits : {2, 3, 4}) {
      const KvFormat f = KvFormat::Make(KvFormatKind::kNuq, bits, 0.01);
      // Calibration as in the paper's order of magnitude (thresholds at 0.5% tails need enough
      // tokens to be estimated), and a sequence of sink + 8 full blocks.
      auto q = testing::CalibratedQuantizer(s.shape, f, 4096, 2);
      ASSERT_NE(q, nullptr);
      Filled c = Fill(s.shape, f, q, 1 + 8 * kBlockTokens, 256, 77);
      const KvBytes b = c.cache->Bytes();
      const double key_outlier_rate = static_cast<double>(b.key_outlier_entries) /
                                      (b.tokens - 1) / s.shape.n_layers / s.shape.ElementsPerTokenPerLayer();
      RecordProperty(std::string(s.name) + "_nuq" + std::to_string(bits), std::to_string(b.bits_per_element) + " bits, key outlier rate " + std::to_string(key_outlier_rate));
      EXPECT_LE(b.bits_per_element, bits + 0.4) << s.name << " nuq" << bits << "-1%: key outlier rate " << key_outlier_rate << " sink bytes " << b.sink_bytes << " total " << b.total_bytes;
      EXPECT_GT(b.bits_per_element, bits + 0.2) << s.name;
      EXPECT_NEAR(key_outlier_rate, 0.01, 0.004) << s.name;
      EXPECT_NEAR(b.compression_vs_fp16, 16.0 / b.bits_per_element, 1e-12);
      EXPECT_NEAR(ExpectedBytesPerToken(f, s.shape) * 8 / (2.0 * 2 * s.shape.ElementsPerTokenPerLayer()),
                  bits + 0.35, 0.07);
    }
  }
}

TEST(QuantizedKvCacheTest, CloneSharesBlocksCopyOnWrite) {
  const KvFormat f = *KvFormat::Parse("nuq3-1%");
  auto q = testing::CalibratedQuantizer(kShape, f);
  Filled c = Fill(kShape, f, q, 400, 200, 25);  // sink + 399: block 0 full, block 1 partial
  auto fork = c.cache->Clone();
  ASSERT_TRUE(fork.ok());
  EXPECT_TRUE(c.cache->BlockShared(0));
  EXPECT_TRUE(c.cache->BlockShared(1));
  const int64_t L = kShape.ElementsPerTokenPerLayer();
  std::vector<float> before_k, before_v;
  ASSERT_TRUE(c.cache->ReadBack(0, 0, 400, &before_k, &before_v).ok());
  const std::vector<float> k2 = testing::SyntheticKeys(10, kShape, 0, 99);
  const std::vector<float> v2 = testing::SyntheticValues(10, kShape, 0, 99);
  for (int l = 0; l < 2; ++l) ASSERT_TRUE((*fork)->Append(l, k2.data(), v2.data(), 10).ok());
  ASSERT_TRUE((*fork)->Commit().ok());
  EXPECT_TRUE(c.cache->BlockShared(0));   // full block still shared
  EXPECT_FALSE(c.cache->BlockShared(1));  // the fork copied the tail before writing
  std::vector<float> after_k, after_v;
  ASSERT_TRUE(c.cache->ReadBack(0, 0, 400, &after_k, &after_v).ok());
  EXPECT_EQ(before_k, after_k);
  EXPECT_EQ(before_v, after_v);
  EXPECT_EQ(c.cache->length(), 400);
  EXPECT_EQ((*fork)->length(), 410);
  std::vector<float> fk, fv;
  ASSERT_TRUE((*fork)->ReadBack(0, 0, 400, &fk, &fv).ok());
  EXPECT_EQ(fk, before_k);
  (void)L;
}

TEST(QuantizedKvCacheTest, AbortStepRestoresTheCommittedState) {
  for (const char* name : {"nuq3-1%", "int4", "nuq2-1%-sink5", "nuq3-5%"}) {  // 5%: head starts
    const KvFormat f = *KvFormat::Parse(name);
    auto q = testing::CalibratedQuantizer(kShape, f, 512);
    for (int64_t committed : {int64_t{3}, int64_t{250}, int64_t{257}}) {
      Filled c = Fill(kShape, f, q, committed, 100, 26);
      auto fork = c.cache->Clone();  // the tail block is shared: abort must not touch the fork
      ASSERT_TRUE(fork.ok());
      const std::string before = *c.cache->Serialize();
      const std::vector<float> k = testing::SyntheticKeys(300, kShape, 0, 98);
      const std::vector<float> v = testing::SyntheticValues(300, kShape, 0, 98);
      ASSERT_TRUE(c.cache->Append(0, k.data(), v.data(), 300).ok());
      std::vector<float> rk, rv;
      EXPECT_FALSE(c.cache->ReadBack(0, 0, committed + 300, &rk, &rv).ok());
      ASSERT_TRUE(c.cache->ReadBack(0, 0, committed + 300, &rk, &rv, /*include_staged=*/true).ok());
      EXPECT_FALSE(c.cache->ReadBack(1, 0, committed + 1, &rk, &rv, true).ok());  // not appended
      c.cache->AbortStep();
      EXPECT_EQ(c.cache->pending_tokens(), 0);
      EXPECT_EQ(*c.cache->Serialize(), before) << name << " " << committed;
      EXPECT_EQ(*(*fork)->Serialize(), before) << name << " " << committed;
    }
  }
}

TEST(QuantizedKvCacheTest, StepProtocolErrors) {
  auto c = *QuantizedKvCache::Create(kShape, *KvFormat::Parse("int4"), nullptr, Rope(64));
  const std::vector<float> k = testing::SyntheticKeys(4, kShape, 0, 1);
  EXPECT_FALSE(c->Commit().ok());
  ASSERT_TRUE(c->Append(0, k.data(), k.data(), 4).ok());
  EXPECT_FALSE(c->Append(0, k.data(), k.data(), 4).ok());  // twice in one step
  EXPECT_FALSE(c->Append(1, k.data(), k.data(), 3).ok());  // different n
  EXPECT_FALSE(c->Commit().ok());                          // layer 1 missing
  EXPECT_FALSE(c->Clone().ok());
  EXPECT_FALSE(c->Serialize().ok());
  ASSERT_TRUE(c->Append(1, k.data(), k.data(), 4).ok());
  ASSERT_TRUE(c->Commit().ok());
  EXPECT_EQ(c->length(), 4);
  std::vector<float> kk, vv;
  EXPECT_FALSE(c->ReadBack(0, 0, 5, &kk, &vv).ok());
  const std::vector<float> qv = RandomQueries(1, 3, 64, 1);
  EXPECT_FALSE(c->AttendPast(0, qv.data(), 1, 3).ok());  // 3 heads over 2 kv heads
  EXPECT_FALSE(QuantizedKvCache::Create(kShape, *KvFormat::Parse("nuq3"), nullptr, Rope(64)).ok());
  auto q4 = testing::CalibratedQuantizer(kShape, *KvFormat::Parse("nuq4"), 256);
  EXPECT_FALSE(QuantizedKvCache::Create(kShape, *KvFormat::Parse("nuq3"), q4, Rope(64)).ok());
  auto other = testing::CalibratedQuantizer(KvShape{3, 2, 64}, *KvFormat::Parse("nuq4"), 256);
  auto mism = QuantizedKvCache::Create(kShape, *KvFormat::Parse("nuq4"), other, Rope(64));
  ASSERT_FALSE(mism.ok());
  EXPECT_EQ(mism.status().message(), "quantizer is for 3 layers, model has 2");
}

TEST(BlockLayoutTest, OffsetsAreAlignedAndDisjoint) {
  const KvShape llama{32, 8, 128};
  const BlockLayout b = ComputeBlockLayout(*KvFormat::Parse("nuq3-1%"), llama);
  EXPECT_EQ(b.key_words_per_token, 12);
  EXPECT_EQ(b.value_outliers_per_token, 10);
  EXPECT_EQ(b.value_outlier_index_bytes, 2);
  EXPECT_EQ(b.key_codes_offset, 0);
  EXPECT_EQ(b.value_codes_offset, 8 * 256 * 48);
  EXPECT_EQ(b.value_scales_offset, 2 * 8 * 256 * 48);
  EXPECT_EQ(b.key_scales_offset, -1);
  EXPECT_EQ(b.value_outlier_index_offset, b.value_scales_offset + 1024);
  EXPECT_EQ(b.value_outlier_value_offset, b.value_outlier_index_offset + 256 * 10 * 2);
  EXPECT_EQ(b.key_outlier_dir_offset, b.value_outlier_value_offset + 256 * 10 * 2);
  EXPECT_EQ(b.value_outlier_head_start_offset, b.key_outlier_dir_offset + 64);  // 10 > 8 heads
  EXPECT_EQ(b.layer_bytes, b.value_outlier_head_start_offset + 8 * 256);
  EXPECT_EQ(b.fixed_bytes, 32 * b.layer_bytes);
  const BlockLayout s = ComputeBlockLayout(*KvFormat::Parse("nuq3-1%"), KvShape{30, 3, 64});
  EXPECT_EQ(s.value_outliers_per_token, 2);
  EXPECT_EQ(s.value_outlier_index_bytes, 1);
  EXPECT_EQ(s.value_outlier_head_start_offset, -1);  // 2 outliers over 3 heads: no head starts
  EXPECT_EQ(ComputeBlockLayout(*KvFormat::Parse("nuq3-10%"), KvShape{1, 2, 2048}).value_outlier_head_start_offset,
            -1);  // 410 outliers per token: more than a byte counts
  for (int64_t off : {s.value_codes_offset, s.value_scales_offset, s.value_outlier_index_offset,
                      s.value_outlier_value_offset, s.key_outlier_dir_offset, s.layer_bytes}) {
    EXPECT_EQ(off % kLayoutAlign, 0);
  }
  const BlockLayout h = ComputeBlockLayout(*KvFormat::Parse("fp16"), KvShape{1, 1, 64});
  EXPECT_EQ(h.layer_bytes, 2 * 256 * 64 * 2);
}

}  // namespace
}  // namespace kvq::kvstore
