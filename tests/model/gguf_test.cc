// GGUF reader: the real SmolLM2 file (skipped when absent), every metadata type, and corrupt
// files built with GgufWriter, each of which must fail with a status naming what is wrong.
#include "model/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/loader_gguf_writer.h"
#include "tests/test_util.h"

namespace kvq::model {
namespace {

using ::testing::HasSubstr;
using W = GgufWriter;

std::string TempPath(const std::string& name) {
  const char* tmp = std::getenv("TMPDIR");
  return std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/kvq_gguf_test_" +
         std::to_string(::getpid()) + "_" + name;
}

std::string WriteBytes(const std::string& name, const std::string& bytes) {
  const std::string path = TempPath(name);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

std::string ReadBytes(const std::string& path, uint64_t offset, uint64_t n) {
  std::ifstream f(path, std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  std::string s(n, '\0');
  f.read(s.data(), static_cast<std::streamsize>(n));
  return s;
}

float HalfAt(const std::string& b, size_t i) {
  uint16_t h;
  std::memcpy(&h, b.data() + i, 2);
  return HalfBitsToFloat(h);
}

// A small valid file: a few keys and two tensors (F32 [4, 2] and Q8_0 [32]).
W SmallFile() {
  W w;
  w.AddString("general.architecture", "llama");
  w.AddU32("llama.block_count", 2);
  w.AddF32Tensor("a.weight", {4, 2}, {1, 2, 3, 4, 5, 6, 7, 8});
  std::string q8 = W::Pod<uint16_t>(FloatToHalfBits(0.5f));
  for (int i = 0; i < 32; ++i) q8 += static_cast<char>(i - 16);
  w.AddTensor("b.weight", /*Q8_0*/ 8, {32}, q8);
  return w;
}

absl::Status OpenBytes(const std::string& name, const std::string& bytes) {
  return GgufFile::Open(WriteBytes(name, bytes)).status();
}

// ---------------------------------------------------------------------------------------------
// The real model file.

TEST(GgufRealFileTest, HeaderMetadataAndTensorTable) {
  KVQ_REQUIRE_MODEL();
  auto g = GgufFile::Open(testing::ModelPath());
  ASSERT_TRUE(g.ok()) << g.status();
  const GgufFile& f = **g;
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.tensors().size(), 272u);
  EXPECT_EQ(f.Keys().size(), 33u);
  EXPECT_EQ(f.GetString("general.architecture").value(), "llama");
  EXPECT_EQ(f.GetInt("llama.block_count").value(), 30);
  EXPECT_EQ(f.GetInt("llama.attention.head_count").value(), 9);
  EXPECT_EQ(f.GetInt("llama.attention.head_count_kv").value(), 3);
  EXPECT_EQ(f.GetInt("llama.embedding_length").value(), 576);
  EXPECT_EQ(f.GetFloat("llama.rope.freq_base").value(), 100000.0);
  EXPECT_EQ(static_cast<float>(f.GetFloat("llama.attention.layer_norm_rms_epsilon").value()),
            1e-5f);
  EXPECT_FALSE(f.GetBool("tokenizer.ggml.add_bos_token").value());
  auto tokens = f.GetStringArray("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(tokens->size(), 49152u);
  EXPECT_EQ(f.GetIntArray("tokenizer.ggml.token_type").value().size(), 49152u);
  EXPECT_EQ(f.GetStringArray("tokenizer.ggml.merges").value().size(), 48900u);

  const auto* embd = f.FindTensor("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->type, GgmlType::kQ8_0);
  EXPECT_EQ(embd->dims, (std::vector<int64_t>{576, 49152}));
  const auto* q = f.FindTensor("blk.0.attn_q.weight");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->type, GgmlType::kQ4_1);
  EXPECT_EQ(q->dims, (std::vector<int64_t>{576, 576}));
  EXPECT_EQ(f.FindTensor("output.weight"), nullptr);  // tied embeddings
  for (const auto& t : f.tensors()) {
    EXPECT_EQ(t.offset % 32, 0u) << t.name;
    EXPECT_LE(t.offset + t.nbytes, 98362432u) << t.name;
  }
}

// Decodes the first and last blocks of a Q4_1, a Q8_0 and an F32 tensor by hand from the file
// bytes and compares with ReadTensorF32: exact, as both compute q*d+m / q*d in fp32 from the same
// fp16 scales.
TEST(GgufRealFileTest, DequantizedBlocksMatchHandDecode) {
  KVQ_REQUIRE_MODEL();
  const std::string path = testing::ModelPath();
  auto g = GgufFile::Open(path);
  ASSERT_TRUE(g.ok()) << g.status();
  {
    const auto* t = (*g)->FindTensor("blk.0.ffn_down.weight");
    ASSERT_NE(t, nullptr);
    auto v = (*g)->ReadTensorF32(t->name);
    ASSERT_TRUE(v.ok()) << v.status();
    ASSERT_EQ(v->size(), 1536u * 576u);
    const uint64_t nblocks = v->size() / 32;
    for (uint64_t blk : {uint64_t{0}, uint64_t{1}, nblocks - 1}) {
      const std::string b = ReadBytes(path, t->offset + blk * 20, 20);
      const float d = HalfAt(b, 0), m = HalfAt(b, 2);
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = static_cast<uint8_t>(b[4 + j]);
        EXPECT_EQ((*v)[blk * 32 + j], (byte & 15) * d + m) << "block " << blk << " elem " << j;
        EXPECT_EQ((*v)[blk * 32 + 16 + j], (byte >> 4) * d + m) << "block " << blk;
      }
    }
  }
  {
    const auto* t = (*g)->FindTensor("token_embd.weight");
    ASSERT_NE(t, nullptr);
    auto v = (*g)->ReadTensorF32(t->name);
    ASSERT_TRUE(v.ok()) << v.status();
    ASSERT_EQ(v->size(), 576u * 49152u);
    const uint64_t nblocks = v->size() / 32;
    for (uint64_t blk : {uint64_t{0}, nblocks / 2 + 3, nblocks - 1}) {
      const std::string b = ReadBytes(path, t->offset + blk * 34, 34);
      const float d = HalfAt(b, 0);
      for (int j = 0; j < 32; ++j) {
        EXPECT_EQ((*v)[blk * 32 + j], static_cast<int8_t>(b[2 + j]) * d) << "block " << blk;
      }
    }
  }
  {
    auto v = (*g)->ReadTensorF32("output_norm.weight");
    ASSERT_TRUE(v.ok()) << v.status();
    const std::string b = ReadBytes(path, (*g)->FindTensor("output_norm.weight")->offset, 576 * 4);
    EXPECT_EQ(std::memcmp(v->data(), b.data(), b.size()), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Metadata of every type, written by GgufWriter.

TEST(GgufMetadataTest, EveryValueTypeRoundTrips) {
  W w;
  w.AddRaw("u8", W::kU8, W::Pod<uint8_t>(250));
  w.AddRaw("i8", W::kI8, W::Pod<int8_t>(-100));
  w.AddRaw("u16", W::kU16, W::Pod<uint16_t>(65000));
  w.AddRaw("i16", W::kI16, W::Pod<int16_t>(-30000));
  w.AddU32("u32", 4000000000u);
  w.AddI32("i32", -2000000000);
  w.AddU64("u64", uint64_t{1} << 40);
  w.AddU64("u64_big", ~uint64_t{0});
  w.AddRaw("i64", W::kI64, W::Pod<int64_t>(-(int64_t{1} << 50)));
  w.AddF32("f32", 0.25f);
  w.AddRaw("f64", W::kF64, W::Pod<double>(1e300));
  w.AddBool("bool", true);
  w.AddString("str", "hello \xe2\x9c\x93");
  w.AddString("empty", "");
  w.AddStringArray("strs", {"a", "", "ccc"});
  w.AddRaw("ints", W::kArray,
           W::Array(W::kI16, 3, W::Pod<int16_t>(-1) + W::Pod<int16_t>(2) + W::Pod<int16_t>(3)));
  w.AddRaw("floats", W::kArray, W::Array(W::kF32, 2, W::Pod(1.5f) + W::Pod(-2.0f)));
  w.AddRaw("nested", W::kArray,
           W::Array(W::kArray, 2,
                    W::Array(W::kString, 2, W::String("x") + W::String("yy")) +
                        W::Array(W::kString, 1, W::String("z"))));
  w.AddRaw("empty_arr", W::kArray, W::Array(W::kU8, 0, ""));
  auto g = GgufFile::Open(WriteBytes("types.gguf", w.Serialize()));
  ASSERT_TRUE(g.ok()) << g.status();
  const GgufFile& f = **g;
  EXPECT_EQ(f.GetInt("u8").value(), 250);
  EXPECT_EQ(f.GetInt("i8").value(), -100);
  EXPECT_EQ(f.GetInt("u16").value(), 65000);
  EXPECT_EQ(f.GetInt("i16").value(), -30000);
  EXPECT_EQ(f.GetInt("u32").value(), 4000000000);
  EXPECT_EQ(f.GetInt("i32").value(), -2000000000);
  EXPECT_EQ(f.GetInt("u64").value(), int64_t{1} << 40);
  EXPECT_EQ(f.GetInt("u64_big").status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(f.GetInt("i64").value(), -(int64_t{1} << 50));
  EXPECT_EQ(f.GetFloat("f32").value(), 0.25);
  EXPECT_EQ(f.GetFloat("f64").value(), 1e300);
  EXPECT_EQ(f.GetFloat("u32").value(), 4e9);  // integers are accepted as floats
  EXPECT_TRUE(f.GetBool("bool").value());
  EXPECT_EQ(f.GetString("str").value(), "hello \xe2\x9c\x93");
  EXPECT_EQ(f.GetString("empty").value(), "");
  EXPECT_EQ(f.GetStringArray("strs").value(), (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_EQ(f.GetIntArray("ints").value(), (std::vector<int64_t>{-1, 2, 3}));
  EXPECT_EQ(f.GetFloatArray("floats").value(), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(f.GetFloatArray("ints").value(), (std::vector<float>{-1, 2, 3}));
  EXPECT_TRUE(f.GetIntArray("empty_arr").value().empty());
  EXPECT_TRUE(f.Has("nested"));
  EXPECT_EQ(f.Keys().size(), 19u);
  EXPECT_EQ(f.Keys().front(), "u8");
  EXPECT_EQ(f.version(), 3u);
  EXPECT_TRUE(f.tensors().empty());

  // Wrong type and missing key: the key is named.
  auto s = f.GetInt("str");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.status().message(), HasSubstr("'str'"));
  EXPECT_EQ(f.GetString("nested").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.GetBool("u8").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.GetStringArray("ints").status().code(), absl::StatusCode::kInvalidArgument);
  auto missing = f.GetFloat("no.such.key");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("no.such.key"));
}

TEST(GgufMetadataTest, TensorsReadBackAndVersion2IsAccepted) {
  W w = SmallFile();
  w.set_version(2);
  auto g = GgufFile::Open(WriteBytes("v2.gguf", w.Serialize()));
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)->version(), 2u);
  ASSERT_EQ((*g)->tensors().size(), 2u);
  EXPECT_EQ((*g)->ReadTensorF32("a.weight").value(), (std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8}));
  const std::vector<float> b = (*g)->ReadTensorF32("b.weight").value();
  ASSERT_EQ(b.size(), 32u);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(b[i], 0.5f * (i - 16));
  const auto* info = (*g)->FindTensor("b.weight");
  EXPECT_EQ(info->nbytes, 34u);
  EXPECT_EQ(info->num_elements(), 32);
  auto missing = (*g)->ReadTensorF32("nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("nope"));
}

TEST(GgufMetadataTest, CustomAlignmentPlacesData) {
  W w = SmallFile();
  w.AddU32("general.alignment", 256);
  w.set_alignment(256);
  auto g = GgufFile::Open(WriteBytes("align.gguf", w.Serialize()));
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ((*g)->alignment(), 256u);
  for (const auto& t : (*g)->tensors()) EXPECT_EQ(t.offset % 256, 0u) << t.name;
  EXPECT_EQ((*g)->ReadTensorF32("a.weight").value(), (std::vector<float>{1, 2, 3, 4, 5, 6, 7, 8}));

  W bad = SmallFile();
  bad.AddU32("general.alignment", 48);  // not a power of two
  const absl::Status s = OpenBytes("align48.gguf", bad.Serialize());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("general.alignment"));
}

TEST(GgufMetadataTest, KQuantTensorOpensButReadIsUnimplemented) {
  W w;
  w.AddTensor("k.weight", /*Q4_K*/ 12, {256}, std::string(144, '\0'));
  auto g = GgufFile::Open(WriteBytes("q4k.gguf", w.Serialize()));
  ASSERT_TRUE(g.ok()) << g.status();
  auto r = (*g)->ReadTensorF32("k.weight");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(r.status().message(), HasSubstr("k.weight"));
  EXPECT_THAT(r.status().message(), HasSubstr("Q4_K"));
}

// ---------------------------------------------------------------------------------------------
// Corrupt files.

TEST(GgufCorruptTest, EmptyAndTruncatedHeader) {
  absl::Status s = OpenBytes("empty.gguf", "");
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(s.message(), HasSubstr("magic"));
  s = OpenBytes("trunc_header.gguf", SmallFile().Serialize().substr(0, 10));
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(s.message(), HasSubstr("tensor count"));
}

TEST(GgufCorruptTest, BadMagic) {
  std::string bytes = SmallFile().Serialize();
  bytes[0] = 'X';
  const absl::Status s = OpenBytes("magic.gguf", bytes);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("magic"));
}

TEST(GgufCorruptTest, UnsupportedVersion) {
  for (uint32_t v : {1u, 4u, 0x03000000u}) {
    W w = SmallFile();
    w.set_version(v);
    const absl::Status s = OpenBytes("version.gguf", w.Serialize());
    EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << v;
  }
}

TEST(GgufCorruptTest, TruncatedTensorDataNamesTheTensor) {
  const std::string bytes = SmallFile().Serialize();
  const absl::Status s = OpenBytes("trunc_data.gguf", bytes.substr(0, bytes.size() - 1));
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(s.message(), HasSubstr("'b.weight'"));
}

// Every strict prefix of a valid file is invalid (the last tensor ends the file); none may crash.
TEST(GgufCorruptTest, EveryTruncationFailsCleanly) {
  const std::string bytes = SmallFile().Serialize();
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_FALSE(OpenBytes("prefix.gguf", bytes.substr(0, n)).ok()) << "prefix of " << n;
  }
  EXPECT_TRUE(OpenBytes("prefix.gguf", bytes).ok());
}

// Random byte corruption of the header and tables: any outcome but a crash or hang is fine; when
// Open succeeds, reading every tensor must succeed too (the table was validated).
TEST(GgufCorruptTest, RandomByteFlipsNeverCrash) {
  W w = SmallFile();
  w.AddStringArray("tokens", {"a", "bb", "ccc"});
  w.AddRaw("nested", W::kArray, W::Array(W::kArray, 1, W::Array(W::kString, 1, W::String("x"))));
  const std::string good = w.Serialize();
  const size_t header_end = good.size() - 34 - 32;  // flip only outside the tensor data
  std::mt19937 rng(7);
  int opened = 0;
  for (int trial = 0; trial < 800; ++trial) {
    std::string bytes = good;
    const int flips = 1 + trial % 3;
    for (int k = 0; k < flips; ++k) {
      bytes[rng() % header_end] = static_cast<char>(rng() & 0xff);
    }
    auto g = GgufFile::Open(WriteBytes("flip.gguf", bytes));
    if (!g.ok()) continue;
    ++opened;
    for (const auto& t : (*g)->tensors()) {
      auto r = (*g)->ReadTensorF32(t.name);
      if (!r.ok()) EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented) << r.status();
    }
  }
  EXPECT_GT(opened, 0);  // some flips hit string bytes and leave a valid file
}

TEST(GgufCorruptTest, UnknownTensorTypeNamesTypeAndTensor) {
  W w = SmallFile();
  w.AddTensor("weird.weight", 99, {32}, std::string(64, '\0'));
  const absl::Status s = OpenBytes("type99.gguf", w.Serialize());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("99"));
  EXPECT_THAT(s.message(), HasSubstr("weird.weight"));
}

TEST(GgufCorruptTest, AbsurdCountsAndLengths) {
  {
    std::string bytes = SmallFile().Serialize();
    const uint64_t huge = uint64_t{1} << 60;
    std::memcpy(bytes.data() + 8, &huge, 8);  // tensor count
    const absl::Status s = OpenBytes("count.gguf", bytes);
    EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
    EXPECT_THAT(s.message(), HasSubstr("tensor count"));
  }
  {
    std::string bytes = SmallFile().Serialize();
    const uint64_t huge = uint64_t{1} << 60;
    std::memcpy(bytes.data() + 16, &huge, 8);  // kv count
    const absl::Status s = OpenBytes("kvcount.gguf", bytes);
    EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
    EXPECT_THAT(s.message(), HasSubstr("metadata count"));
  }
  {
    std::string bytes = SmallFile().Serialize();
    const uint64_t huge = ~uint64_t{0} - 3;
    std::memcpy(bytes.data() + 24, &huge, 8);  // length of the first key
    const absl::Status s = OpenBytes("keylen.gguf", bytes);
    EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  }
  {
    W w;
    w.AddRaw("tokenizer.ggml.tokens", W::kArray, W::Array(W::kString, uint64_t{1} << 62, ""));
    const absl::Status s = OpenBytes("arrlen.gguf", w.Serialize());
    EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
    EXPECT_THAT(s.message(), HasSubstr("tokenizer.ggml.tokens"));
  }
  {
    W w;
    w.AddRaw("weird", 13, W::Pod<uint32_t>(0));
    const absl::Status s = OpenBytes("valtype.gguf", w.Serialize());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr("weird"));
  }
}

TEST(GgufCorruptTest, TensorTableErrorsNameTheTensor) {
  struct Case {
    const char* label;
    uint32_t type;
    std::vector<uint64_t> dims;
    std::string data;
    std::optional<uint64_t> offset;
    absl::StatusCode code;
  };
  const uint64_t big = uint64_t{1} << 40;
  const std::vector<Case> cases = {
      {"unaligned", 0, {4}, std::string(16, '\0'), 8, absl::StatusCode::kInvalidArgument},
      {"overflow", 0, {big, big}, "", std::nullopt, absl::StatusCode::kInvalidArgument},
      {"too_many_dims", 0, {1, 1, 1, 1, 1}, std::string(4, '\0'), std::nullopt,
       absl::StatusCode::kInvalidArgument},
      {"partial_block", 8, {33}, std::string(68, '\0'), std::nullopt,
       absl::StatusCode::kInvalidArgument},
      {"beyond_eof", 0, {4}, std::string(16, '\0'), 1 << 20, absl::StatusCode::kOutOfRange},
  };
  for (const Case& c : cases) {
    W w;
    w.AddTensor(std::string("t_") + c.label, c.type, c.dims, c.data, c.offset);
    std::string bytes = w.Serialize();
    if (c.offset.has_value() && *c.offset >= (1 << 20)) bytes.resize(bytes.size() - (1 << 20));
    const absl::Status s = OpenBytes("table.gguf", bytes);
    EXPECT_EQ(s.code(), c.code) << c.label << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr(std::string("t_") + c.label)) << c.label;
  }
  W dup = SmallFile();
  dup.AddF32Tensor("a.weight", {1}, {1});
  const absl::Status s = OpenBytes("dup.gguf", dup.Serialize());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("duplicate tensor name 'a.weight'"));
}

}  // namespace
}  // namespace kvq::model
