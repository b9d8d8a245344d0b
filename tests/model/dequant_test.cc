// Dequantization of hand-built ggml blocks. Every expected value is exact: scales are powers of
// two (or small fp16-exact numbers) and codes are small integers, so q*d (+m) has no rounding.
#include "model/dequant.h"

#include <cstring>
#include <string>
#include <vector>

#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvq::model {
namespace {

using ::testing::HasSubstr;

void PutHalf(std::vector<uint8_t>* b, float v) {
  const uint16_t h = FloatToHalfBits(v);
  ASSERT_EQ(HalfBitsToFloat(h), v) << "test scale must be exact in fp16";
  b->push_back(static_cast<uint8_t>(h & 0xff));
  b->push_back(static_cast<uint8_t>(h >> 8));
}

void PutU32(std::vector<uint8_t>* b, uint32_t v) {
  for (int i = 0; i < 4; ++i) b->push_back(static_cast<uint8_t>(v >> (8 * i)));
}

// The 4-bit code of element e (0..31) in a 16-byte nibble array: ggml puts element j < 16 in the
// low nibble of byte j and element j + 16 in the high nibble of byte j.
int Nibble(const uint8_t* qs, int e) { return e < 16 ? (qs[e] & 0xf) : (qs[e - 16] >> 4); }

TEST(DequantTest, TypeTable) {
  struct Row { GgmlType t; int64_t elems, bytes; const char* name; };
  for (const Row& r : {Row{GgmlType::kF32, 1, 4, "F32"}, Row{GgmlType::kF16, 1, 2, "F16"},
                       Row{GgmlType::kBF16, 1, 2, "BF16"}, Row{GgmlType::kQ4_0, 32, 18, "Q4_0"},
                       Row{GgmlType::kQ4_1, 32, 20, "Q4_1"}, Row{GgmlType::kQ5_0, 32, 22, "Q5_0"},
                       Row{GgmlType::kQ5_1, 32, 24, "Q5_1"}, Row{GgmlType::kQ8_0, 32, 34, "Q8_0"},
                       Row{GgmlType::kQ4_K, 256, 144, "Q4_K"},
                       Row{GgmlType::kQ6_K, 256, 210, "Q6_K"}}) {
    const GgmlTypeInfo* info = FindGgmlTypeInfo(static_cast<uint32_t>(r.t));
    ASSERT_NE(info, nullptr) << r.name;
    EXPECT_EQ(info->block_elems, r.elems) << r.name;
    EXPECT_EQ(info->block_bytes, r.bytes) << r.name;
    EXPECT_STREQ(GgmlTypeName(r.t), r.name);
    EXPECT_EQ(GgmlTypeBytes(r.t, r.elems * 3, "t").value(), static_cast<uint64_t>(r.bytes * 3));
  }
  EXPECT_EQ(FindGgmlTypeInfo(4), nullptr);   // retired Q4_2
  EXPECT_EQ(FindGgmlTypeInfo(99), nullptr);
  auto partial = GgmlTypeBytes(GgmlType::kQ4_1, 48, "blk.0.x");
  EXPECT_EQ(partial.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(partial.status().message(), HasSubstr("blk.0.x"));
}

TEST(DequantTest, F32F16BF16) {
  const float f[3] = {1.5f, -0.0f, 3.0e-39f};
  std::vector<float> out(3);
  DequantizeF32(reinterpret_cast<const uint8_t*>(f), 3, out.data());
  EXPECT_EQ(std::memcmp(out.data(), f, sizeof(f)), 0);

  // 1, -2, 65504 (max), 2^-24 (smallest subnormal), -0, 0.333251953125 (0x3555)
  const uint16_t h[6] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x8000, 0x3555};
  out.resize(6);
  DequantizeF16(reinterpret_cast<const uint8_t*>(h), 6, out.data());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 65504.0f);
  EXPECT_EQ(out[3], 0x1.0p-24f);
  EXPECT_TRUE(out[4] == 0.0f && std::signbit(out[4]));
  EXPECT_EQ(out[5], 0.333251953125f);

  // bf16 is the top half of an fp32: 1, -3, 3.140625, smallest bf16 normal 2^-126
  const uint16_t b[4] = {0x3f80, 0xc040, 0x4049, 0x0080};
  out.resize(4);
  DequantizeBF16(reinterpret_cast<const uint8_t*>(b), 4, out.data());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -3.0f);
  EXPECT_EQ(out[2], 3.140625f);
  EXPECT_EQ(out[3], 0x1.0p-126f);
}

TEST(DequantTest, Q4_0) {
  std::vector<uint8_t> blk;
  PutHalf(&blk, 0.5f);
  for (int j = 0; j < 16; ++j) blk.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  std::vector<float> y(32);
  DequantizeQ4_0(blk.data(), 32, y.data());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], (j - 8) * 0.5f) << j;             // low nibbles: 0..15
    EXPECT_EQ(y[j + 16], (15 - j - 8) * 0.5f) << j;   // high nibbles: 15..0
  }
  EXPECT_EQ(y[0], -4.0f);
  EXPECT_EQ(y[16], 3.5f);
}

TEST(DequantTest, Q4_1TwoBlocks) {
  std::vector<uint8_t> blk;
  PutHalf(&blk, 0.25f);
  PutHalf(&blk, -1.5f);
  for (int j = 0; j < 16; ++j) blk.push_back(static_cast<uint8_t>((j * 7) & 0xff));
  PutHalf(&blk, 2.0f);
  PutHalf(&blk, 10.0f);
  for (int j = 0; j < 16; ++j) blk.push_back(static_cast<uint8_t>(0xf0 | (j & 0xf)));
  std::vector<float> y(64);
  DequantizeQ4_1(blk.data(), 64, y.data());
  for (int e = 0; e < 32; ++e) {
    EXPECT_EQ(y[e], Nibble(blk.data() + 4, e) * 0.25f - 1.5f) << e;
    EXPECT_EQ(y[32 + e], Nibble(blk.data() + 24, e) * 2.0f + 10.0f) << e;
  }
  EXPECT_EQ(y[1], 7 * 0.25f - 1.5f);   // byte 7: low nibble 7
  EXPECT_EQ(y[18], 0 * 0.25f - 1.5f);  // element 18: high nibble of byte 2 = 14 = 0x0e
  EXPECT_EQ(y[32 + 16], 15 * 2.0f + 10.0f);
}

TEST(DequantTest, Q5_0) {
  const uint32_t qh = 0xa5a5f00fu;
  std::vector<uint8_t> blk;
  PutHalf(&blk, 0.5f);
  PutU32(&blk, qh);
  for (int j = 0; j < 16; ++j) blk.push_back(static_cast<uint8_t>((j * 37 + 11) & 0xff));
  std::vector<float> y(32);
  DequantizeQ5_0(blk.data(), 32, y.data());
  for (int e = 0; e < 32; ++e) {
    const int q = Nibble(blk.data() + 6, e) + 16 * ((qh >> e) & 1);  // bit e is element e's 5th
    EXPECT_EQ(y[e], (q - 16) * 0.5f) << e;
  }
  // Element 0: nibble 11, qh bit 0 = 1 -> 27 - 16 = 11; element 31: byte 15 = 0x3e high nibble 3,
  // qh bit 31 = 1 -> 19 - 16 = 3.
  EXPECT_EQ(y[0], 5.5f);
  EXPECT_EQ(y[31], 1.5f);
}

TEST(DequantTest, Q5_1) {
  const uint32_t qh = 0x0ff0c3a5u;
  std::vector<uint8_t> blk;
  PutHalf(&blk, 0.125f);
  PutHalf(&blk, -2.0f);
  PutU32(&blk, qh);
  for (int j = 0; j < 16; ++j) blk.push_back(static_cast<uint8_t>((j * 53 + 5) & 0xff));
  std::vector<float> y(32);
  DequantizeQ5_1(blk.data(), 32, y.data());
  for (int e = 0; e < 32; ++e) {
    const int q = Nibble(blk.data() + 8, e) + 16 * ((qh >> e) & 1);
    EXPECT_EQ(y[e], q * 0.125f - 2.0f) << e;
  }
  EXPECT_EQ(y[0], (5 + 16) * 0.125f - 2.0f);  // nibble 5, qh bit 0 = 1
}

TEST(DequantTest, Q8_0) {
  std::vector<uint8_t> blk;
  PutHalf(&blk, 0.0625f);
  const int8_t q[32] = {-128, 127, 0, -1, 1, 5, -5, 64, -64, 100, -100, 3, 2, 1, 0, -7,
                        9,    -9,  8, -8, 7, 6, -6, 50, -50, 33,  -33, 12, 13, -13, 14, -14};
  for (int8_t v : q) blk.push_back(static_cast<uint8_t>(v));
  std::vector<float> y(32);
  DequantizeQ8_0(blk.data(), 32, y.data());
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], q[j] * 0.0625f) << j;
  EXPECT_EQ(y[0], -8.0f);
}

TEST(DequantTest, DispatchChecksSizesAndTypes) {
  std::vector<uint8_t> blk(20, 0);
  std::vector<float> y(32);
  EXPECT_TRUE(Dequantize(GgmlType::kQ4_1, blk.data(), 20, 32, y.data(), "t").ok());
  absl::Status s = Dequantize(GgmlType::kQ4_1, blk.data(), 19, 32, y.data(), "blk.3.ffn_up");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("blk.3.ffn_up"));
  s = Dequantize(GgmlType::kQ4_1, blk.data(), 20, 31, y.data(), "t");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> k(210, 0);
  y.resize(256);
  s = Dequantize(GgmlType::kQ6_K, k.data(), 210, 256, y.data(), "output.weight");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(s.message(), HasSubstr("Q6_K"));
  EXPECT_THAT(s.message(), HasSubstr("output.weight"));
}

}  // namespace
}  // namespace kvq::model
