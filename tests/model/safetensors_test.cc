// Safetensors files, Hugging Face config.json and model directories (single file and sharded),
// written by the test itself with values that are exact in every dtype used.
#include "model/safetensors.h"

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "common/half.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/weights.h"
#include "nlohmann/json.hpp"

namespace kvq::model {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

fs::path TempDir(const std::string& name) {
  const char* tmp = std::getenv("TMPDIR");
  fs::path p = fs::path(tmp != nullptr && *tmp ? tmp : "/tmp") /
               ("kvq_st_test_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

void WriteText(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(s.data(), static_cast<std::streamsize>(s.size()));
}

struct StTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<float> values;  // must be exact in dtype
};

std::string Encode(const StTensor& t) {
  std::string out;
  for (float v : t.values) {
    if (t.dtype == "F32") {
      out.append(reinterpret_cast<const char*>(&v), 4);
    } else if (t.dtype == "F16") {
      const uint16_t h = FloatToHalfBits(v);
      out.append(reinterpret_cast<const char*>(&h), 2);
    } else {  // BF16: top half of the fp32 (values are chosen exact)
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      const uint16_t b = static_cast<uint16_t>(bits >> 16);
      out.append(reinterpret_cast<const char*>(&b), 2);
    }
  }
  return out;
}

std::string Safetensors(const std::map<std::string, StTensor>& tensors) {
  nlohmann::json header = {{"__metadata__", {{"format", "pt"}}}};
  std::string data;
  for (const auto& [name, t] : tensors) {
    const std::string bytes = Encode(t);
    header[name] = {{"dtype", t.dtype}, {"shape", t.shape},
                    {"data_offsets", {data.size(), data.size() + bytes.size()}}};
    data += bytes;
  }
  const std::string h = header.dump();
  const uint64_t n = h.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + h + data;
}

// Values exact in fp16 and bf16: small integers times a power of two.
std::vector<float> Values(int tag, int64_t n) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>((tag * 7 + i) % 61 - 30) * 0.125f;
  return v;
}

struct TinyHf {
  int hidden = 8, heads = 2, kv = 1, hd = 4, ff = 12, vocab = 11, layers = 2;
  bool tied = false;
  std::string arch = "LlamaForCausalLM";
};

std::string ConfigJson(const TinyHf& t) {
  nlohmann::json j = {{"architectures", {t.arch}},   {"hidden_size", t.hidden},
                      {"num_hidden_layers", t.layers}, {"num_attention_heads", t.heads},
                      {"num_key_value_heads", t.kv},  {"intermediate_size", t.ff},
                      {"vocab_size", t.vocab},       {"max_position_embeddings", 256},
                      {"rope_theta", 50000.0},       {"rms_norm_eps", 1e-5},
                      {"tie_word_embeddings", t.tied}, {"hidden_act", "silu"},
                      {"_name_or_path", "tiny-hf"}};
  return j.dump(2);
}

// Every tensor of the tiny model, dtypes rotating through F32/F16/BF16.
std::map<std::string, StTensor> TinyTensors(const TinyHf& t) {
  std::map<std::string, StTensor> m;
  const char* dtypes[] = {"F32", "F16", "BF16"};
  int tag = 0;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    m[name] = {dtypes[tag % 3], shape, Values(tag, n)};
    ++tag;
  };
  const int64_t h = t.hidden, q = t.heads * t.hd, kv = t.kv * t.hd;
  add("model.embed_tokens.weight", {t.vocab, h});
  add("model.norm.weight", {h});
  if (!t.tied) add("lm_head.weight", {t.vocab, h});
  for (int l = 0; l < t.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {h});
    add(p + "post_attention_layernorm.weight", {h});
    add(p + "self_attn.q_proj.weight", {q, h});
    add(p + "self_attn.k_proj.weight", {kv, h});
    add(p + "self_attn.v_proj.weight", {kv, h});
    add(p + "self_attn.o_proj.weight", {h, q});
    add(p + "mlp.gate_proj.weight", {t.ff, h});
    add(p + "mlp.up_proj.weight", {t.ff, h});
    add(p + "mlp.down_proj.weight", {h, t.ff});
    if (t.arch == "Qwen2ForCausalLM") {
      add(p + "self_attn.q_proj.bias", {q});
      add(p + "self_attn.k_proj.bias", {kv});
      add(p + "self_attn.v_proj.bias", {kv});
    }
  }
  return m;
}

void ExpectLoaded(const LlamaWeights& w, const std::map<std::string, StTensor>& m,
                  const TinyHf& t) {
  EXPECT_EQ(w.tok_embd, m.at("model.embed_tokens.weight").values);
  EXPECT_EQ(w.output_norm, m.at("model.norm.weight").values);
  if (t.tied) {
    EXPECT_TRUE(w.output.empty());
  } else {
    EXPECT_EQ(w.output, m.at("lm_head.weight").values);
  }
  ASSERT_EQ(w.layers.size(), static_cast<size_t>(t.layers));
  for (int l = 0; l < t.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const LayerWeights& L = w.layers[l];
    EXPECT_EQ(L.attn_norm, m.at(p + "input_layernorm.weight").values);
    EXPECT_EQ(L.ffn_norm, m.at(p + "post_attention_layernorm.weight").values);
    EXPECT_EQ(L.wq, m.at(p + "self_attn.q_proj.weight").values);  // no permutation for HF
    EXPECT_EQ(L.wk, m.at(p + "self_attn.k_proj.weight").values);
    EXPECT_EQ(L.wv, m.at(p + "self_attn.v_proj.weight").values);
    EXPECT_EQ(L.wo, m.at(p + "self_attn.o_proj.weight").values);
    EXPECT_EQ(L.w_gate, m.at(p + "mlp.gate_proj.weight").values);
    EXPECT_EQ(L.w_up, m.at(p + "mlp.up_proj.weight").values);
    EXPECT_EQ(L.w_down, m.at(p + "mlp.down_proj.weight").values);
    if (w.config.attention_bias) {
      EXPECT_EQ(L.bq, m.at(p + "self_attn.q_proj.bias").values);
      EXPECT_EQ(L.bk, m.at(p + "self_attn.k_proj.bias").values);
      EXPECT_EQ(L.bv, m.at(p + "self_attn.v_proj.bias").values);
    }
  }
}

TEST(SafetensorsTest, SingleFileModelLoadsExactly) {
  const TinyHf t;
  const fs::path dir = TempDir("single");
  WriteText(dir / "config.json", ConfigJson(t));
  const auto tensors = TinyTensors(t);
  WriteText(dir / "model.safetensors", Safetensors(tensors));
  auto w = LoadHfWeights(dir.string());
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelConfig& c = w->config;
  EXPECT_EQ(c.name, "tiny-hf");
  EXPECT_EQ(c.arch, "llama");
  EXPECT_EQ(c.hidden, 8);
  EXPECT_EQ(c.n_kv_heads, 1);
  EXPECT_EQ(c.head_dim, 4);
  EXPECT_EQ(c.rope_theta, 50000.0f);
  EXPECT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_EQ(c.max_position, 256);
  EXPECT_FALSE(c.tie_word_embeddings);
  ExpectLoaded(*w, tensors, t);

  auto via_spec = LoadWeights(dir.string());  // a directory dispatches to the HF loader
  ASSERT_TRUE(via_spec.ok()) << via_spec.status();
  EXPECT_EQ(via_spec->tok_embd, w->tok_embd);
}

TEST(SafetensorsTest, ShardedTiedQwen2ModelLoadsExactly) {
  TinyHf t;
  t.tied = true;
  t.arch = "Qwen2ForCausalLM";
  const fs::path dir = TempDir("sharded");
  WriteText(dir / "config.json", ConfigJson(t));
  const auto tensors = TinyTensors(t);
  std::map<std::string, StTensor> shard[2];
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  int k = 0;
  for (const auto& [name, tensor] : tensors) {
    const int s = k++ % 2;
    shard[s][name] = tensor;
    index["weight_map"][name] = "model-0000" + std::to_string(s + 1) + "-of-00002.safetensors";
  }
  WriteText(dir / "model-00001-of-00002.safetensors", Safetensors(shard[0]));
  WriteText(dir / "model-00002-of-00002.safetensors", Safetensors(shard[1]));
  WriteText(dir / "model.safetensors.index.json", index.dump());
  auto w = LoadHfWeights(dir.string());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->config.arch, "qwen2");
  EXPECT_TRUE(w->config.attention_bias);
  EXPECT_TRUE(w->config.tie_word_embeddings);
  EXPECT_EQ(w->layers[0].bq.size(), 8u);
  ExpectLoaded(*w, tensors, t);

  // An index entry pointing at a shard that lacks the tensor, and one pointing at no file.
  const bool in_first = shard[0].count("model.norm.weight") > 0;
  index["weight_map"]["model.norm.weight"] =
      in_first ? "model-00002-of-00002.safetensors" : "model-00001-of-00002.safetensors";
  WriteText(dir / "model.safetensors.index.json", index.dump());
  auto wrong = LoadHfWeights(dir.string());
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(wrong.status().message(), HasSubstr("model.norm.weight"));
  index["weight_map"]["model.norm.weight"] = "missing.safetensors";
  WriteText(dir / "model.safetensors.index.json", index.dump());
  auto r = LoadHfWeights(dir.string());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("missing.safetensors"));
}

TEST(SafetensorsTest, MissingTensorAndWrongShapeAreNamed) {
  TinyHf t;
  const fs::path dir = TempDir("missing");
  WriteText(dir / "config.json", ConfigJson(t));
  auto tensors = TinyTensors(t);
  tensors.erase("model.layers.1.mlp.up_proj.weight");
  WriteText(dir / "model.safetensors", Safetensors(tensors));
  auto r = LoadHfWeights(dir.string());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("model.layers.1.mlp.up_proj.weight"));

  tensors = TinyTensors(t);
  tensors["model.norm.weight"] = {"F32", {4}, {1, 2, 3, 4}};
  WriteText(dir / "model.safetensors", Safetensors(tensors));
  r = LoadHfWeights(dir.string());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("model.norm.weight"));

  fs::remove(dir / "model.safetensors");
  EXPECT_EQ(LoadHfWeights(dir.string()).status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, BadHeadersAreErrors) {
  const fs::path dir = TempDir("bad");
  const std::string good = Safetensors({{"x", {"F16", {2, 2}, {1, 2, 3, 4}}}});
  auto open = [&](const std::string& bytes) {
    WriteText(dir / "f.safetensors", bytes);
    return SafetensorsFile::Open((dir / "f.safetensors").string()).status();
  };
  ASSERT_TRUE(open(good).ok());
  {
    auto f = SafetensorsFile::Open((dir / "f.safetensors").string());
    EXPECT_EQ((*f)->ReadTensorF32("x").value(), (std::vector<float>{1, 2, 3, 4}));
    EXPECT_EQ((*f)->ReadTensorF32("y").status().code(), absl::StatusCode::kNotFound);
  }
  // Header length beyond the file.
  std::string bytes = good;
  const uint64_t huge = 1 << 20;
  std::memcpy(bytes.data(), &huge, 8);
  EXPECT_EQ(open(bytes).code(), absl::StatusCode::kInvalidArgument);
  // Not JSON.
  bytes = good;
  bytes[8] = '#';
  EXPECT_EQ(open(bytes).code(), absl::StatusCode::kInvalidArgument);
  // Data offsets beyond the data, and size not matching shape x dtype.
  auto with_header = [](const std::string& h, const std::string& data) {
    const uint64_t n = h.size();
    return std::string(reinterpret_cast<const char*>(&n), 8) + h + data;
  };
  absl::Status s = open(with_header(
      R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(4, '\0')));
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(s.message(), HasSubstr("'x'"));
  s = open(with_header(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
                       std::string(8, '\0')));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = open(with_header(R"({"x":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})",
                       std::string(8, '\0')));
  EXPECT_THAT(s.message(), HasSubstr("F17"));
  s = open(with_header(R"({"x":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})",
                       std::string(8, '\0')));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = open(with_header(R"({"x":{"dtype":"F32","shape":[2]}})", std::string(8, '\0')));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = open(with_header(R"([1,2])", ""));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  // Known but unconvertible dtype: opens, reading is Unimplemented.
  ASSERT_TRUE(open(with_header(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})",
                               std::string(8, '\0')))
                  .ok());
  auto f = SafetensorsFile::Open((dir / "f.safetensors").string());
  EXPECT_EQ((*f)->ReadTensorF32("ids").status().code(), absl::StatusCode::kUnimplemented);
  // Every strict prefix of a valid file fails without crashing.
  for (size_t n = 0; n < good.size(); ++n) EXPECT_FALSE(open(good.substr(0, n)).ok()) << n;
}

TEST(HfConfigTest, DefaultsAndRopeScaling) {
  const fs::path dir = TempDir("config");
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"hidden_size", 4096},
                      {"num_hidden_layers", 32},
                      {"num_attention_heads", 32},
                      {"intermediate_size", 14336},
                      {"vocab_size", 128256},
                      {"rope_theta", 500000.0},
                      {"rope_scaling",
                       {{"rope_type", "llama3"},
                        {"factor", 8.0},
                        {"low_freq_factor", 1.0},
                        {"high_freq_factor", 4.0},
                        {"original_max_position_embeddings", 8192}}},
                      {"head_dim", nullptr}};
  WriteText(dir / "config.json", j.dump());
  auto c = LoadHfConfig(dir.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_kv_heads, 32);   // defaults to num_attention_heads
  EXPECT_EQ(c->head_dim, 128);    // hidden / heads (null is absent)
  EXPECT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_TRUE(c->rope_scaling.enabled);
  EXPECT_EQ(c->rope_scaling.factor, 8.0f);
  EXPECT_EQ(c->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c->rope_scaling.original_max_position, 8192);
  EXPECT_EQ(c->name, dir.filename().string());
  // The file path works as well as the directory.
  EXPECT_TRUE(LoadHfConfig((dir / "config.json").string()).ok());

  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
  WriteText(dir / "config.json", j.dump());
  auto s = LoadHfConfig(dir.string());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(s.status().message(), HasSubstr("yarn"));

  j["rope_scaling"] = nullptr;
  j["head_dim"] = 64;  // explicit head_dim differing from hidden/heads
  WriteText(dir / "config.json", j.dump());
  c = LoadHfConfig(dir.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_FALSE(c->rope_scaling.enabled);

  j.erase("hidden_size");
  WriteText(dir / "config.json", j.dump());
  s = LoadHfConfig(dir.string());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.status().message(), HasSubstr("hidden_size"));

  j["hidden_size"] = "big";
  WriteText(dir / "config.json", j.dump());
  EXPECT_EQ(LoadHfConfig(dir.string()).status().code(), absl::StatusCode::kInvalidArgument);

  j["hidden_size"] = 4096;
  j["architectures"] = {"GPT2LMHeadModel"};
  WriteText(dir / "config.json", j.dump());
  s = LoadHfConfig(dir.string());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(s.status().message(), HasSubstr("GPT2LMHeadModel"));

  j["architectures"] = {"MistralForCausalLM"};
  j["num_key_value_heads"] = 8;
  j["max_position_embeddings"] = 32768;
  j["sliding_window"] = 4096;  // v0.1
  WriteText(dir / "config.json", j.dump());
  s = LoadHfConfig(dir.string());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(s.status().message(), HasSubstr("sliding"));
  j["sliding_window"] = nullptr;  // v0.2
  WriteText(dir / "config.json", j.dump());
  c = LoadHfConfig(dir.string());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, "mistral");
  EXPECT_EQ(c->n_kv_heads, 8);

  WriteText(dir / "config.json", "{not json");
  EXPECT_EQ(LoadHfConfig(dir.string()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadHfConfig((dir / "nope").string()).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace kvq::model
