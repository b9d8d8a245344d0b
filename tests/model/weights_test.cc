// Weight loading: the real GGUF (config, shapes, tying, q/k un-permutation against the raw file),
// tiny GGUF files with known matrices, built-in configs and synthetic weights.
#include "model/weights.h"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/gguf.h"
#include "model/loader_gguf.h"
#include "model/loader_gguf_writer.h"
#include "tests/test_util.h"

namespace kvq::model {
namespace {

using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  const char* tmp = std::getenv("TMPDIR");
  return std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/kvq_weights_test_" +
         std::to_string(::getpid()) + "_" + name;
}

bool AllFinite(const std::vector<float>& v) {
  for (float x : v) {
    if (!std::isfinite(x)) return false;
  }
  return true;
}

// The HF row that GGUF row r of a permuted q/k weight comes from (the converter's permutation,
// written independently of UnpermuteRopeRows: within a head, GGUF row 2i+j holds HF row
// j*hd/2 + i).
int HfRowOfGgufRow(int r, int head_dim) {
  const int h = r / head_dim, w = r % head_dim;
  return h * head_dim + (w % 2) * (head_dim / 2) + w / 2;
}

// ---------------------------------------------------------------------------------------------
// The real model.

TEST(GgufWeightsTest, RealModelLoads) {
  KVQ_REQUIRE_MODEL();
  const auto start = std::chrono::steady_clock::now();
  auto w = LoadGgufWeights(testing::ModelPath());
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(w.ok()) << w.status();
  std::printf("LoadGgufWeights: %.2f s\n", secs);
  const ModelConfig& c = w->config;
  EXPECT_EQ(c.arch, "llama");
  EXPECT_EQ(c.n_layers, 30);
  EXPECT_EQ(c.hidden, 576);
  EXPECT_EQ(c.n_heads, 9);
  EXPECT_EQ(c.n_kv_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.intermediate, 1536);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.max_position, 8192);
  EXPECT_EQ(c.rope_theta, 100000.0f);
  EXPECT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.rope_scaling.enabled);
  EXPECT_EQ(c.ParameterCount(), 134515008);

  EXPECT_EQ(w->tok_embd.size(), 49152u * 576u);
  EXPECT_TRUE(w->output.empty());
  EXPECT_EQ(&w->lm_head(), &w->tok_embd);
  EXPECT_EQ(w->output_norm.size(), 576u);
  ASSERT_EQ(w->layers.size(), 30u);
  int64_t params = w->tok_embd.size() + w->output_norm.size();
  for (const LayerWeights& L : w->layers) {
    EXPECT_EQ(L.attn_norm.size(), 576u);
    EXPECT_EQ(L.wq.size(), 576u * 576u);
    EXPECT_EQ(L.wk.size(), 192u * 576u);
    EXPECT_EQ(L.wv.size(), 192u * 576u);
    EXPECT_EQ(L.wo.size(), 576u * 576u);
    EXPECT_EQ(L.ffn_norm.size(), 576u);
    EXPECT_EQ(L.w_gate.size(), 1536u * 576u);
    EXPECT_EQ(L.w_up.size(), 1536u * 576u);
    EXPECT_EQ(L.w_down.size(), 576u * 1536u);
    EXPECT_TRUE(L.bq.empty() && L.bk.empty() && L.bv.empty());
    for (const auto* v : {&L.attn_norm, &L.wq, &L.wk, &L.wv, &L.wo, &L.ffn_norm, &L.w_gate,
                          &L.w_up, &L.w_down}) {
      EXPECT_TRUE(AllFinite(*v));
      params += v->size();
    }
  }
  EXPECT_EQ(params, c.ParameterCount());
  EXPECT_TRUE(AllFinite(w->tok_embd));

  // q/k rows are un-permuted; v/o and everything else are as stored.
  auto g = GgufFile::Open(testing::ModelPath());
  ASSERT_TRUE(g.ok());
  for (int layer : {0, 29}) {
    const std::string b = "blk." + std::to_string(layer) + ".";
    const auto raw_q = (*g)->ReadTensorF32(b + "attn_q.weight").value();
    const auto raw_k = (*g)->ReadTensorF32(b + "attn_k.weight").value();
    const auto raw_v = (*g)->ReadTensorF32(b + "attn_v.weight").value();
    const LayerWeights& L = w->layers[layer];
    int bad = 0;
    for (int r = 0; r < 576; ++r) {
      const int hf = HfRowOfGgufRow(r, 64);
      for (int col = 0; col < 576; ++col) bad += L.wq[hf * 576 + col] != raw_q[r * 576 + col];
    }
    for (int r = 0; r < 192; ++r) {
      const int hf = HfRowOfGgufRow(r, 64);
      for (int col = 0; col < 576; ++col) bad += L.wk[hf * 576 + col] != raw_k[r * 576 + col];
    }
    EXPECT_EQ(bad, 0) << "layer " << layer;
    EXPECT_EQ(L.wv, raw_v);
    EXPECT_NE(L.wq, raw_q);  // the permutation is not the identity
  }
  EXPECT_LT(secs, 30.0);  // a generous bound; ~1-2 s expected on one core
}

TEST(GgufWeightsTest, LoadWeightsDispatchesOnGgufSuffix) {
  KVQ_REQUIRE_MODEL();
  auto w = LoadWeights(testing::ModelPath());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->config.n_layers, 30);
}

// ---------------------------------------------------------------------------------------------
// Tiny GGUF models with known values.

struct Tiny {
  int hidden = 8, n_heads = 2, n_kv = 1, hd = 4, ff = 16, vocab = 10, layers = 2;
};

// HF-layout value of element (row, col) of tensor `tag`: distinct, exactly representable.
float Val(int tag, int row, int col) { return tag * 10000.0f + row * 100.0f + col; }

std::vector<float> Matrix(int tag, int rows, int cols) {
  std::vector<float> m(rows * cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) m[r * cols + c] = Val(tag, r, c);
  }
  return m;
}

// The matrix as llama.cpp stores q/k: row r of the file is HF row HfRowOfGgufRow(r).
std::vector<float> Permuted(int tag, int rows, int cols, int hd) {
  std::vector<float> m(rows * cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) m[r * cols + c] = Val(tag, HfRowOfGgufRow(r, hd), c);
  }
  return m;
}

GgufWriter TinyGguf(const Tiny& t, bool with_output, const std::string& skip_key = "",
                    const std::string& skip_tensor = "") {
  GgufWriter w;
  auto u32 = [&](const std::string& k, uint32_t v) {
    if (k != skip_key) w.AddU32(k, v);
  };
  w.AddString("general.architecture", "llama");
  w.AddString("general.name", "tiny");
  u32("llama.block_count", t.layers);
  u32("llama.embedding_length", t.hidden);
  u32("llama.feed_forward_length", t.ff);
  u32("llama.attention.head_count", t.n_heads);
  u32("llama.attention.head_count_kv", t.n_kv);
  u32("llama.context_length", 128);
  u32("llama.rope.dimension_count", t.hd);
  w.AddF32("llama.rope.freq_base", 5000.0f);
  w.AddF32("llama.attention.layer_norm_rms_epsilon", 1e-6f);
  std::vector<std::string> tokens;
  for (int i = 0; i < t.vocab; ++i) tokens.push_back("t" + std::to_string(i));
  w.AddStringArray("tokenizer.ggml.tokens", tokens);
  const uint64_t h = t.hidden, q = t.n_heads * t.hd, kv = t.n_kv * t.hd, ff = t.ff;
  auto add = [&](const std::string& name, std::vector<uint64_t> dims, std::vector<float> v) {
    if (name != skip_tensor) w.AddF32Tensor(name, std::move(dims), v);
  };
  add("token_embd.weight", {h, uint64_t(t.vocab)}, Matrix(1, t.vocab, h));
  add("output_norm.weight", {h}, Matrix(2, 1, h));
  if (with_output) add("output.weight", {h, uint64_t(t.vocab)}, Matrix(3, t.vocab, h));
  for (int l = 0; l < t.layers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    const int tag = 100 * (l + 1);
    add(b + "attn_norm.weight", {h}, Matrix(tag + 1, 1, h));
    add(b + "attn_q.weight", {h, q}, Permuted(tag + 2, q, h, t.hd));
    add(b + "attn_k.weight", {h, kv}, Permuted(tag + 3, kv, h, t.hd));
    add(b + "attn_v.weight", {h, kv}, Matrix(tag + 4, kv, h));
    add(b + "attn_output.weight", {q, h}, Matrix(tag + 5, h, q));
    add(b + "ffn_norm.weight", {h}, Matrix(tag + 6, 1, h));
    add(b + "ffn_gate.weight", {h, ff}, Matrix(tag + 7, ff, h));
    add(b + "ffn_up.weight", {h, ff}, Matrix(tag + 8, ff, h));
    add(b + "ffn_down.weight", {ff, h}, Matrix(tag + 9, h, ff));
  }
  return w;
}

TEST(GgufWeightsTest, TinyModelLoadsInHfLayout) {
  const Tiny t;
  const std::string path = TempPath("tiny.gguf");
  ASSERT_TRUE(TinyGguf(t, /*with_output=*/true).WriteFile(path).ok());
  auto w = LoadGgufWeights(path);
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelConfig& c = w->config;
  EXPECT_EQ(c.name, "tiny");
  EXPECT_EQ(c.n_layers, 2);
  EXPECT_EQ(c.head_dim, 4);
  EXPECT_EQ(c.n_kv_heads, 1);
  EXPECT_EQ(c.vocab_size, 10);  // from the tokens array (no llama.vocab_size key)
  EXPECT_EQ(c.rope_theta, 5000.0f);
  EXPECT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_FALSE(c.tie_word_embeddings);
  const int h = t.hidden, q = t.n_heads * t.hd, kv = t.n_kv * t.hd;
  EXPECT_EQ(w->tok_embd, Matrix(1, t.vocab, h));
  EXPECT_EQ(w->output, Matrix(3, t.vocab, h));
  EXPECT_EQ(&w->lm_head(), &w->output);
  for (int l = 0; l < t.layers; ++l) {
    const int tag = 100 * (l + 1);
    const LayerWeights& L = w->layers[l];
    EXPECT_EQ(L.attn_norm, Matrix(tag + 1, 1, h));
    EXPECT_EQ(L.wq, Matrix(tag + 2, q, h)) << "q not un-permuted, layer " << l;
    EXPECT_EQ(L.wk, Matrix(tag + 3, kv, h)) << "k not un-permuted, layer " << l;
    EXPECT_EQ(L.wv, Matrix(tag + 4, kv, h));
    EXPECT_EQ(L.wo, Matrix(tag + 5, h, q));
    EXPECT_EQ(L.w_down, Matrix(tag + 9, h, t.ff));
  }
  // Spot check of the mapping itself: HF row 1 of head 0 (i=1, j=0) is GGUF row 2; HF row 2
  // (i=0, j=1) is GGUF row 1.
  std::vector<float> rows = {0, 1, 2, 3, 4, 5, 6, 7};  // gguf rows of 2 heads x 4, one column
  UnpermuteRopeRows(&rows, 2, 4, 1);
  EXPECT_EQ(rows, (std::vector<float>{0, 2, 1, 3, 4, 6, 5, 7}));
}

TEST(GgufWeightsTest, TiedWhenOutputIsAbsent) {
  const std::string path = TempPath("tied.gguf");
  ASSERT_TRUE(TinyGguf(Tiny{}, /*with_output=*/false).WriteFile(path).ok());
  auto w = LoadGgufWeights(path);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE(w->config.tie_word_embeddings);
  EXPECT_TRUE(w->output.empty());
  EXPECT_EQ(&w->lm_head(), &w->tok_embd);
}

TEST(GgufWeightsTest, MissingKeyOrTensorIsNamed) {
  for (const char* key : {"llama.block_count", "llama.embedding_length",
                          "llama.attention.head_count", "llama.feed_forward_length"}) {
    const std::string path = TempPath("nokey.gguf");
    ASSERT_TRUE(TinyGguf(Tiny{}, true, key).WriteFile(path).ok());
    auto w = LoadGgufWeights(path);
    EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound) << key;
    EXPECT_THAT(w.status().message(), HasSubstr(key));
  }
  const std::string path = TempPath("notensor.gguf");
  ASSERT_TRUE(TinyGguf(Tiny{}, true, "", "blk.1.ffn_up.weight").WriteFile(path).ok());
  auto w = LoadGgufWeights(path);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr("blk.1.ffn_up.weight"));
}

TEST(GgufWeightsTest, WrongShapeIsNamed) {
  Tiny t;
  GgufWriter w = TinyGguf(t, true, "", "blk.0.attn_v.weight");
  w.AddF32Tensor("blk.0.attn_v.weight", {8, 8}, std::vector<float>(64, 0.0f));  // kv_dim is 4
  const std::string path = TempPath("shape.gguf");
  ASSERT_TRUE(w.WriteFile(path).ok());
  auto r = LoadGgufWeights(path);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("blk.0.attn_v.weight"));
}

TEST(GgufWeightsTest, UnsupportedArchitectureAndPartialRope) {
  {
    GgufWriter w;
    w.AddString("general.architecture", "gpt2");
    const std::string path = TempPath("gpt2.gguf");
    ASSERT_TRUE(w.WriteFile(path).ok());
    auto r = LoadGgufWeights(path);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_THAT(r.status().message(), HasSubstr("gpt2"));
  }
  {
    GgufWriter w = TinyGguf(Tiny{}, true, "llama.rope.dimension_count");
    w.AddU32("llama.rope.dimension_count", 2);
    const std::string path = TempPath("partial.gguf");
    ASSERT_TRUE(w.WriteFile(path).ok());
    auto r = LoadGgufWeights(path);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_THAT(r.status().message(), HasSubstr("rope.dimension_count"));
  }
}

// ---------------------------------------------------------------------------------------------
// Built-in configs and synthetic weights.

TEST(ModelConfigTest, BuiltinConfigsHaveKnownParameterCounts) {
  struct Row { const char* name; int64_t params; int layers, kv_heads; };
  // Published parameter counts of the real checkpoints.
  for (const Row& r : {Row{"smollm2-135m", 134515008, 30, 3}, Row{"llama-2-7b", 6738415616, 32, 32},
                       Row{"llama-3-8b", 8030261248, 32, 8}, Row{"mistral-7b", 7241732096, 32, 8},
                       Row{"qwen2-7b", 7615616512, 28, 4}}) {
    ModelConfig c;
    ASSERT_TRUE(BuiltinConfig(r.name, &c).ok()) << r.name;
    EXPECT_TRUE(c.Validate().ok()) << r.name;
    EXPECT_EQ(c.ParameterCount(), r.params) << r.name;
    EXPECT_EQ(c.n_layers, r.layers) << r.name;
    EXPECT_EQ(c.n_kv_heads, r.kv_heads) << r.name;
    EXPECT_THAT(c.ToString(), HasSubstr(std::to_string(r.layers) + " layers"));
  }
  ModelConfig c;
  BuiltinConfig("qwen2-7b", &c).IgnoreError();
  EXPECT_TRUE(c.attention_bias);
  EXPECT_EQ(c.rms_norm_eps, 1e-6f);
  EXPECT_EQ(BuiltinConfig("gpt-5", &c).code(), absl::StatusCode::kNotFound);
}

TEST(ModelConfigTest, ValidateRejectsInconsistentShapes) {
  ModelConfig good;
  ASSERT_TRUE(BuiltinConfig("smollm2-135m", &good).ok());
  ModelConfig c = good;
  c.n_kv_heads = 2;  // 9 heads
  EXPECT_THAT(c.Validate().message(), HasSubstr("n_kv_heads"));
  c = good;
  c.head_dim = 63;
  EXPECT_THAT(c.Validate().message(), HasSubstr("head_dim"));
  c = good;
  c.vocab_size = 0;
  EXPECT_FALSE(c.Validate().ok());
  c = good;
  c.arch = "gpt2";
  EXPECT_FALSE(c.Validate().ok());
  c = good;
  c.rope_scaling.enabled = true;
  c.rope_scaling.factor = 8.0f;
  EXPECT_TRUE(c.Validate().ok());
  c.rope_scaling.high_freq_factor = 0.5f;
  EXPECT_FALSE(c.Validate().ok());
}

ModelConfig SmallConfig() {
  ModelConfig c;
  c.name = "small";
  c.n_layers = 2;
  c.hidden = 64;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.intermediate = 96;
  c.vocab_size = 100;
  c.max_position = 512;
  c.attention_bias = true;
  return c;
}

TEST(SyntheticWeightsTest, DeterministicPerSeedAndShaped) {
  const ModelConfig c = SmallConfig();
  auto a = MakeSyntheticWeights(c, 42);
  auto b = MakeSyntheticWeights(c, 42);
  auto d = MakeSyntheticWeights(c, 43);
  ASSERT_TRUE(a.ok() && b.ok() && d.ok());
  EXPECT_EQ(a->tok_embd, b->tok_embd);
  EXPECT_EQ(a->output, b->output);
  EXPECT_EQ(a->layers[1].w_down, b->layers[1].w_down);
  EXPECT_EQ(a->layers[0].bq, b->layers[0].bq);
  EXPECT_NE(a->tok_embd, d->tok_embd);
  EXPECT_NE(a->layers[1].wq, d->layers[1].wq);
  EXPECT_NE(a->layers[0].wq, a->layers[1].wq);      // per tensor name
  EXPECT_NE(a->layers[0].w_gate, a->layers[0].w_up);

  EXPECT_EQ(a->tok_embd.size(), 100u * 64u);
  EXPECT_EQ(a->output.size(), 100u * 64u);
  const LayerWeights& L = a->layers[0];
  EXPECT_EQ(L.wq.size(), 64u * 64u);
  EXPECT_EQ(L.wk.size(), 32u * 64u);
  EXPECT_EQ(L.wo.size(), 64u * 64u);
  EXPECT_EQ(L.w_down.size(), 64u * 96u);
  EXPECT_EQ(L.bq.size(), 64u);
  EXPECT_EQ(L.bk.size(), 32u);
  EXPECT_EQ(L.attn_norm, std::vector<float>(64, 1.0f));
  EXPECT_EQ(a->output_norm, std::vector<float>(64, 1.0f));

  // Sample moments of N(0, 0.02^2) over n = 100*64*2 + 2*(...) elements; with n >= 10^4 the
  // standard error of the std is 0.02/sqrt(2n) < 1.5e-4 and of the mean 0.02/sqrt(n) = 2e-4, so
  // 1e-3 bounds are > 5 sigma.
  double sum = 0, sq = 0;
  int64_t n = 0;
  for (const std::vector<float>* v : std::vector<const std::vector<float>*>{
           &a->tok_embd, &a->output, &L.wq, &L.w_gate, &L.w_up, &L.w_down}) {
    for (float x : *v) {
      sum += x;
      sq += double{x} * x;
      ++n;
    }
  }
  const double mean = sum / n, stddev = std::sqrt(sq / n - mean * mean);
  EXPECT_NEAR(mean, 0.0, 1e-3);
  EXPECT_NEAR(stddev, 0.02, 1e-3);

  ModelConfig tied = c;
  tied.tie_word_embeddings = true;
  tied.attention_bias = false;
  auto t = MakeSyntheticWeights(tied, 42);
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->output.empty());
  EXPECT_TRUE(t->layers[0].bq.empty());
  EXPECT_EQ(t->tok_embd, a->tok_embd);  // same name and seed, same values

  ModelConfig bad = c;
  bad.n_heads = 3;
  EXPECT_EQ(MakeSyntheticWeights(bad, 1).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(SyntheticWeightsTest, LoadWeightsSpecs) {
  EXPECT_EQ(LoadWeights("synthetic:no-such-model").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(LoadWeights("synthetic:smollm2-135m:abc").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadWeights("synthetic:").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadWeights("/no/such/model.bin").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadWeights("/no/such/model.gguf").status().code(), absl::StatusCode::kNotFound);
  const std::string path = TempPath("spec.gguf");
  ASSERT_TRUE(TinyGguf(Tiny{}, true).WriteFile(path).ok());
  auto w = LoadWeights(path);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->config.name, "tiny");
}

}  // namespace
}  // namespace kvq::model
