// Bit packing, LUT codec, format names, merge of partials, quantizer files and calibration.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvstore/attention_merge.h"
#include "kvstore/bit_packing.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_format.h"
#include "kvstore/lut_codec.h"
#include "kvstore/quantizer.h"
#include "tests/kvstore/kvstore_test_util.h"

namespace kvq::kvstore {
namespace {

class PackingTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(PackingTest, RoundTripIsBitExact) {
  const auto [bits, n] = GetParam();
  std::mt19937 rng(bits * 1000 + n);
  std::vector<uint8_t> codes(n);
  for (auto& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1));
  std::vector<uint32_t> words(PackedWords(n, bits), 0xdeadbeefu);
  PackCodes(codes.data(), n, bits, words.data());
  std::vector<uint8_t> back(n);
  UnpackCodes(words.data(), n, bits, back.data());
  EXPECT_EQ(back, codes);
  // The same stream built code by code with SetPackedCode.
  std::vector<uint32_t> words2(PackedWords(n, bits), 0u);
  for (int i = 0; i < n; ++i) SetPackedCode(words2.data(), i, bits, codes[i]);
  EXPECT_EQ(words2, words);
  // Padding bits are zero (the codes after n read back as 0); no waste for multiples of 32.
  if (n % 32 == 0) EXPECT_EQ(words.size(), static_cast<size_t>(n / 32 * bits));
  const int64_t capacity = static_cast<int64_t>(words.size()) * 32 / bits;
  for (int64_t i = n; i < capacity; ++i) EXPECT_EQ(GetPackedCode(words.data(), i, bits), 0u) << i;
  if (!kernels::SlicedCodes(bits) && (static_cast<int64_t>(n) * bits) % 32 != 0) {
    EXPECT_EQ(words.back() >> ((static_cast<int64_t>(n) * bits) % 32), 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(AllWidths, PackingTest,
                         ::testing::Combine(::testing::Values(2, 3, 4),
                                            ::testing::Values(1, 7, 31, 32, 33, 113, 1000)),
                         [](const auto& info) {
                           return "b" + std::to_string(std::get<0>(info.param)) + "_n" +
                                  std::to_string(std::get<1>(info.param));
                         });

TEST(PackingTest, FourBitCodesAreAnLsbFirstStream) {
  // Stream bit k is bit k%32 of word k/32.
  const std::vector<uint8_t> codes = {1, 15, 3, 4, 9, 6, 7, 0, 14};
  std::vector<uint32_t> w(PackedWords(codes.size(), 4));
  PackCodes(codes.data(), codes.size(), 4, w.data());
  uint64_t expect = 0;
  for (size_t i = 0; i < codes.size(); ++i) expect |= static_cast<uint64_t>(codes[i]) << (4 * i);
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[0], static_cast<uint32_t>(expect));
  EXPECT_EQ(w[1], static_cast<uint32_t>(expect >> 32));
}

TEST(PackingTest, TwoAndThreeBitCodesAreBitSlicedInGroupsOf32) {
  // Word 0: low two bits of codes 0-7 in nibble bits 0-1, of codes 8-15 in nibble bits 2-3; word
  // 1: the same for codes 16-31; at 3 bits word 2: the high bit of code j at bit 4 (j % 8) + j / 8.
  for (const int bits : {2, 3}) {
    std::vector<uint8_t> codes(64);
    for (int i = 0; i < 64; ++i) codes[i] = static_cast<uint8_t>((5 * i + i / 7) & ((1 << bits) - 1));
    std::vector<uint32_t> w(PackedWords(codes.size(), bits));
    ASSERT_EQ(w.size(), static_cast<size_t>(2 * bits));
    PackCodes(codes.data(), codes.size(), bits, w.data());
    for (int g = 0; g < 2; ++g) {
      uint32_t a = 0, b = 0, c = 0;
      for (int j = 0; j < 32; ++j) {
        const uint32_t code = codes[32 * g + j];
        const uint32_t lo = (code & 3u) << (4 * (j % 8) + 2 * ((j / 8) % 2));
        (j < 16 ? a : b) |= lo;
        c |= (code >> 2) << (4 * (j % 8) + j / 8);
      }
      const uint32_t* grp = w.data() + bits * g;
      EXPECT_EQ(grp[0], a) << bits << " " << g;
      EXPECT_EQ(grp[1], b) << bits << " " << g;
      if (bits == 3) EXPECT_EQ(grp[2], c) << g;
      // What the GPU kernels read: eight codes as the low bits of eight nibbles.
      for (int m = 0; m < 4; ++m) {
        const uint32_t nib = kernels::SlicedNibbles8(grp[0], grp[1], bits == 3 ? grp[2] : 0u, bits, m);
        for (int e = 0; e < 8; ++e) {
          EXPECT_EQ((nib >> (4 * e)) & 15u, codes[32 * g + 8 * m + e]) << bits << " " << g << m << e;
        }
      }
    }
  }
}

TEST(LutCodecTest, CentroidsRoundTripAndTiesGoLow) {
  const std::vector<float> lut = {-0.9f, -0.35f, -0.1f, 0.05f, 0.2f, 0.4f, 0.7f, 0.95f};
  const std::vector<float> mids = LutMidpoints(lut);
  const float zp = 0.375f, r = 2.5f;
  for (uint32_t c = 0; c < lut.size(); ++c) {
    const float x = Dequantize(c, lut.data(), zp, r);
    EXPECT_EQ(EncodeNearest(Normalize(x, zp, r), mids.data(), 7), c);
    EXPECT_EQ(EncodeNearest(lut[c], mids.data(), 7), c);
  }
  for (int j = 0; j < 7; ++j) {
    EXPECT_EQ(EncodeNearest(mids[j], mids.data(), 7), static_cast<uint32_t>(j));
  }
  EXPECT_EQ(EncodeNearest(5.0f, mids.data(), 7), 7u);
  EXPECT_EQ(EncodeNearest(-5.0f, mids.data(), 7), 0u);
  const std::vector<float> u = UniformLut(2);
  EXPECT_EQ(u, (std::vector<float>{-1.0f, static_cast<float>(-1.0 / 3), static_cast<float>(1.0 / 3), 1.0f}));
}

TEST(LutCodecTest, TokenScalingSplitsOutliersBetweenTails) {
  std::vector<float> x = {0.5f, -9.0f, 0.25f, 7.0f, 8.0f, -0.5f, 0.0f, 1.0f};
  std::vector<int> outl, order;
  const TokenScaling s = ComputeTokenScaling(x.data(), 8, 3, &outl, &order);
  EXPECT_EQ(outl, (std::vector<int>{1, 3, 4}));  // one low (-9), two high (7, 8)
  EXPECT_EQ(s.zero_point(), 0.25f);              // (1 + -0.5) / 2
  EXPECT_EQ(s.range(), 0.75f);
}

TEST(KvFormatTest, ParseAndToStringRoundTrip) {
  for (const char* name :
       {"fp16", "int2", "int3", "int4", "int3-pc-pre", "int3-pc-post", "int4-pc-pre-1%", "nuq2",
        "nuq3", "nuq4", "nuq3-1%", "nuq4-0.1%", "nuq2-1%-noqnorm", "nuq3-1%-nosink",
        "nuq3-sink5-qnorm", "int2-sink1"}) {
    auto f = KvFormat::Parse(name);
    ASSERT_TRUE(f.ok()) << name << ": " << f.status();
    EXPECT_EQ(f->ToString(), name);
    EXPECT_EQ(*KvFormat::Parse(f->ToString()), *f);
  }
  const KvFormat f = *KvFormat::Parse("nuq3-1%");
  EXPECT_EQ(f.kind, KvFormatKind::kNuq);
  EXPECT_EQ(f.bits, 3);
  EXPECT_DOUBLE_EQ(f.outlier_fraction, 0.01);
  EXPECT_EQ(f.sink_tokens, 1);
  EXPECT_FALSE(f.qnorm);
  EXPECT_TRUE(KvFormat::Parse("nuq2")->qnorm);
  EXPECT_EQ(KvFormat::Parse("nuq3-sink1-noqnorm")->ToString(), "nuq3");  // defaults elided
  for (const char* bad : {"", "fp8", "nuq5", "int3-1%", "fp16-1%", "nuq3-20%", "nuq3-x",
                          "int3-pc", "nuq3-1%-2%", "nuq3-sink99", "int3-pc-mid"}) {
    auto f2 = KvFormat::Parse(bad);
    EXPECT_FALSE(f2.ok()) << bad;
    if (!f2.ok()) EXPECT_NE(std::string(f2.status().message()).find("bad KV format"), std::string::npos);
  }
}

// Merge of partials: exact cases.
TEST(MergePartialsTest, IntegerPartialsMergeExactly) {
  AttentionPartial a = AttentionPartial::Empty(2, 3, 4), b = a, c = a;
  for (size_t i = 0; i < a.o.size(); ++i) {
    a.o[i] = static_cast<float>(i % 7) * 2.0f;
    b.o[i] = -static_cast<float>(i % 5) * 4.0f;
    c.o[i] = 1000.0f;  // lse = -inf: must not contribute
  }
  for (size_t r = 0; r < a.lse.size(); ++r) {
    a.lse[r] = static_cast<float>(r);
    b.lse[r] = static_cast<float>(r);
  }
  auto m = MergePartials({a, b, c});
  ASSERT_TRUE(m.ok());
  for (size_t i = 0; i < a.o.size(); ++i) EXPECT_EQ(m->o[i], 0.5f * (a.o[i] + b.o[i]));
  for (size_t r = 0; r < a.lse.size(); ++r) {
    EXPECT_EQ(m->lse[r], static_cast<float>(static_cast<double>(r) + std::log(2.0)));
  }
  auto single = MergePartials({a, c});  // merging with an empty partial is the identity
  ASSERT_TRUE(single.ok());
  EXPECT_EQ(single->o, a.o);
  EXPECT_EQ(single->lse, a.lse);
  auto empty = MergePartials({c, c});
  ASSERT_TRUE(empty.ok());
  for (float x : empty->o) EXPECT_EQ(x, 0.0f);
  for (float l : empty->lse) EXPECT_EQ(l, -std::numeric_limits<float>::infinity());
  AttentionPartial wrong = AttentionPartial::Empty(2, 3, 5);
  EXPECT_FALSE(MergePartials({a, wrong}).ok());
  EXPECT_FALSE(MergePartials({}).ok());
}

// ---- Quantizer files -------------------------------------------------------------------------

const KvShape kSmall{3, 2, 64};

TEST(QuantizerFileTest, RoundTripAndSaveLoad) {
  auto q = testing::CalibratedQuantizer(kSmall, *KvFormat::Parse("nuq3-1%"), 512);
  ASSERT_NE(q, nullptr);
  const std::string bytes = q->Serialize();
  auto back = Quantizer::Deserialize(bytes);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->Serialize(), bytes);
  EXPECT_EQ(back->format(), q->format());
  EXPECT_EQ(back->fingerprint(), "synthetic");
  const std::string path = ::testing::TempDir() + "/kvstore_quantizer_test.kvqq";
  ASSERT_TRUE(q->Save(path).ok());
  auto loaded = Quantizer::Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->Serialize(), bytes);
  std::remove(path.c_str());
  EXPECT_FALSE(Quantizer::Load(path).ok());
}

TEST(QuantizerFileTest, CorruptionIsRejectedWithAMessage) {
  auto q = testing::CalibratedQuantizer(kSmall, *KvFormat::Parse("nuq3-1%"), 512);
  ASSERT_NE(q, nullptr);
  const std::string bytes = q->Serialize();
  struct Case {
    size_t at;
    const char* message;
  };
  for (const Case& c : {Case{0, "bad magic"}, Case{9, "version"}, Case{40, "checksum"},
                        Case{bytes.size() / 2, "checksum"}, Case{bytes.size() - 1, "checksum"}}) {
    std::string bad = bytes;
    bad[c.at] ^= 0x5a;
    auto r = Quantizer::Deserialize(bad);
    ASSERT_FALSE(r.ok()) << "flip at " << c.at;
    EXPECT_NE(std::string(r.status().message()).find(c.message), std::string::npos)
        << r.status();
  }
  for (size_t len : {size_t{0}, size_t{10}, size_t{30}, bytes.size() - 1}) {
    auto r = Quantizer::Deserialize(bytes.substr(0, len));
    ASSERT_FALSE(r.ok()) << "truncated to " << len;
    const std::string msg(r.status().message());
    EXPECT_TRUE(msg.find("truncated") != std::string::npos || msg.find("bad magic") != std::string::npos)
        << msg;
  }
}

TEST(QuantizerFileTest, MismatchedModelIsNamed) {
  auto q = testing::CalibratedQuantizer(kSmall, *KvFormat::Parse("nuq3"), 256);
  ASSERT_NE(q, nullptr);
  EXPECT_TRUE(q->CheckCompatible(3, 2, 64, "synthetic").ok());
  auto s = q->CheckCompatible(30, 2, 64, "synthetic");
  EXPECT_EQ(s.message(), "quantizer is for 3 layers, model has 30");
  EXPECT_EQ(q->CheckCompatible(3, 4, 64, "synthetic").message(),
            "quantizer is for 2 KV heads, model has 4");
  EXPECT_EQ(q->CheckCompatible(3, 2, 128, "synthetic").message(),
            "quantizer is for head_dim 64, model has 128");
  EXPECT_NE(std::string(q->CheckCompatible(3, 2, 64, "llama3-8b").message()).find("llama3-8b"),
            std::string::npos);
  EXPECT_FALSE(q->CheckFormat(*KvFormat::Parse("nuq4")).ok());
  EXPECT_TRUE(q->CheckFormat(*KvFormat::Parse("nuq3-nosink")).ok());
}

// ---- Calibration -----------------------------------------------------------------------------

TEST(CalibrationTest, PercentileThresholds) {
  // One channel with values 0..99: 1% outliers -> t = 0.995 -> 98.505 and 0.495.
  std::vector<float> keys(100 * 32);
  for (int i = 0; i < 100; ++i) {
    for (int c = 0; c < 32; ++c) keys[i * 32 + c] = static_cast<float>(c == 0 ? (i * 37) % 100 : c);
  }
  std::vector<float> lo, up;
  ASSERT_TRUE(ComputeKeyThresholds(keys.data(), 100, 1, 32, 0.01, &lo, &up).ok());
  EXPECT_NEAR(lo[0], 0.495f, 1e-5f);
  EXPECT_NEAR(up[0], 98.505f, 1e-4f);
  EXPECT_EQ(lo[5], 5.0f);
  ASSERT_TRUE(ComputeKeyThresholds(keys.data(), 100, 1, 32, 0.0, &lo, &up).ok());
  EXPECT_EQ(lo[0], 0.0f);
  EXPECT_EQ(up[0], 99.0f);
}

TEST(CalibrationTest, WeightedKMeansIsDeterministicAndUsesTheWeights) {
  std::mt19937 rng(5);
  std::normal_distribution<float> g(0.0f, 0.35f);
  std::vector<float> x(20000), w(20000);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = std::clamp(g(rng), -1.0f, 1.0f);
    // Skewed sensitivity: positive values matter 100x more.
    w[i] = x[i] > 0.3f ? 100.0f : 1.0f;
  }
  auto a = FitLut1D(x, w, 8);
  auto b = FitLut1D(x, w, 8);
  auto un = FitLut1D(x, {}, 8);
  ASSERT_TRUE(a.ok() && b.ok() && un.ok());
  EXPECT_EQ(*a, *b);
  for (size_t j = 1; j < a->size(); ++j) EXPECT_LT((*a)[j - 1], (*a)[j]);
  const double e_weighted = WeightedQuantizationError(x, w, *a);
  const double e_unweighted = WeightedQuantizationError(x, w, *un);
  EXPECT_LT(e_weighted, 0.8 * e_unweighted);  // weighted fit puts centroids where weight is
  // And the unweighted fit is better on the unweighted objective.
  EXPECT_LT(WeightedQuantizationError(x, {}, *un), WeightedQuantizationError(x, {}, *a));
  // Lloyd never does worse than its quantile initialization with no iterations.
  auto init = FitLut1D(x, w, 8, KMeansOptions{0, 0.0});
  ASSERT_TRUE(init.ok());
  EXPECT_LE(e_weighted, WeightedQuantizationError(x, w, *init));
}

TEST(CalibrationTest, QNormMatchesMeanAndStd) {
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.1f, 0.3f);
  std::vector<float> x(5000);
  for (auto& v : x) v = std::clamp(g(rng), -1.0f, 1.0f);
  const std::vector<float> lut = UniformLut(2);
  const QNormParams p = FitQNorm(x, lut);
  const std::vector<float> mids = LutMidpoints(lut);
  double so = 0, so2 = 0, sq = 0, sq2 = 0;
  for (float v : x) {
    const double q = std::fma(lut[EncodeNearest(v, mids.data(), 3)], p.scale, p.offset);
    so += v, so2 += static_cast<double>(v) * v, sq += q, sq2 += q * q;
  }
  const double n = x.size();
  EXPECT_NEAR(sq / n, so / n, 1e-5);
  EXPECT_NEAR(std::sqrt(sq2 / n - (sq / n) * (sq / n)), std::sqrt(so2 / n - (so / n) * (so / n)), 1e-5);
}

TEST(CalibrationTest, DeterministicFileBytes) {
  for (const char* name : {"nuq2-1%", "nuq3", "int3-pc-post-1%"}) {
    const KvFormat f = *KvFormat::Parse(name);
    auto q1 = testing::CalibratedQuantizer(kSmall, f, 300, 9);
    auto q2 = testing::CalibratedQuantizer(kSmall, f, 300, 9);
    ASSERT_NE(q1, nullptr);
    ASSERT_NE(q2, nullptr);
    EXPECT_EQ(q1->Serialize(), q2->Serialize()) << name;
    auto q3 = testing::CalibratedQuantizer(kSmall, f, 300, 10);
    EXPECT_NE(q1->Serialize(), q3->Serialize()) << name;
  }
}

TEST(CalibrationTest, WeightedCalibrationChangesTheLut) {
  const KvShape shape{1, 1, 64};
  const int64_t n = 400;
  std::vector<float> k = testing::SyntheticKeys(n, shape, 0, 4), v = testing::SyntheticValues(n, shape, 0, 4);
  std::vector<float> w(k.size());
  for (size_t i = 0; i < w.size(); ++i) w[i] = (i % 64) < 8 ? 50.0f : 0.5f;
  LayerCalibrationData d{n, k.data(), v.data(), w.data(), w.data(), nullptr};
  LayerCalibrationData u{n, k.data(), v.data(), nullptr, nullptr, nullptr};
  auto qw = Calibrate(shape, *KvFormat::Parse("nuq3-1%"), "m", {d});
  auto qu = Calibrate(shape, *KvFormat::Parse("nuq3-1%"), "m", {u});
  ASSERT_TRUE(qw.ok() && qu.ok());
  EXPECT_NE(qw->data().key_lut, qu->data().key_lut);
  EXPECT_EQ(qw->data().key_lower, qu->data().key_lower);  // thresholds ignore weights
  // Wrong layer count is rejected.
  EXPECT_FALSE(Calibrate(KvShape{2, 1, 64}, *KvFormat::Parse("nuq3"), "m", {u}).ok());
}

}  // namespace
}  // namespace kvq::kvstore
