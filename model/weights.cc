// Synthetic weights and the loader dispatch (LoadWeights). The GGUF and Hugging Face loaders live
// in loader_gguf.cc and loader_hf.cc.
#include "model/weights.h"

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <numbers>
#include <string_view>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"

namespace kvq::model {
namespace {

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t Fnv1a64(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) {
    h ^= ch;
    h *= 0x100000001b3ull;
  }
  return h;
}

// Elements per independently seeded chunk: chunks fill in parallel, and the values depend only on
// (seed, name, element index), never on the thread count.
constexpr int64_t kChunk = 1 << 16;

// N(0, std^2) via Box-Muller on splitmix64 streams.
void FillNormal(uint64_t seed, std::string_view name, float stddev, int64_t n,
                std::vector<float>* out) {
  out->resize(static_cast<size_t>(n));
  uint64_t base = seed;
  const uint64_t tensor_seed = SplitMix64(&base) ^ Fnv1a64(name);
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  float* data = out->data();
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t k = 0; k < n_chunks; ++k) {
    uint64_t state = tensor_seed + static_cast<uint64_t>(k) * 0xd1b54a32d192ed03ull;
    const int64_t end = std::min(n, (k + 1) * kChunk);
    for (int64_t i = k * kChunk; i < end; i += 2) {
      // 53-bit uniforms in (0, 1] and [0, 1).
      const double u1 = (static_cast<double>(SplitMix64(&state) >> 11) + 1.0) * 0x1.0p-53;
      const double u2 = static_cast<double>(SplitMix64(&state) >> 11) * 0x1.0p-53;
      const double r = std::sqrt(-2.0 * std::log(u1));
      const double a = 2.0 * std::numbers::pi * u2;
      data[i] = static_cast<float>(stddev * r * std::cos(a));
      if (i + 1 < end) data[i + 1] = static_cast<float>(stddev * r * std::sin(a));
    }
  }
}

}  // namespace

absl::StatusOr<LlamaWeights> MakeSyntheticWeights(const ModelConfig& config, uint64_t seed) {
  KVQ_RETURN_IF_ERROR(config.Validate());
  constexpr float kStd = 0.02f;  // the usual initializer_range of Llama-family configs
  LlamaWeights w;
  w.config = config;
  const ModelConfig& c = w.config;
  const int64_t h = c.hidden, q = c.q_dim(), kv = c.kv_dim(), ff = c.intermediate;
  // Names follow the Hugging Face checkpoint so that "same name, same values" is easy to reason
  // about.
  FillNormal(seed, "model.embed_tokens.weight", kStd, c.vocab_size * h, &w.tok_embd);
  w.output_norm.assign(h, 1.0f);
  if (!c.tie_word_embeddings) FillNormal(seed, "lm_head.weight", kStd, c.vocab_size * h, &w.output);
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights& L = w.layers[l];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    L.attn_norm.assign(h, 1.0f);
    L.ffn_norm.assign(h, 1.0f);
    FillNormal(seed, p + "self_attn.q_proj.weight", kStd, q * h, &L.wq);
    FillNormal(seed, p + "self_attn.k_proj.weight", kStd, kv * h, &L.wk);
    FillNormal(seed, p + "self_attn.v_proj.weight", kStd, kv * h, &L.wv);
    FillNormal(seed, p + "self_attn.o_proj.weight", kStd, h * q, &L.wo);
    FillNormal(seed, p + "mlp.gate_proj.weight", kStd, ff * h, &L.w_gate);
    FillNormal(seed, p + "mlp.up_proj.weight", kStd, ff * h, &L.w_up);
    FillNormal(seed, p + "mlp.down_proj.weight", kStd, h * ff, &L.w_down);
    if (c.attention_bias) {
      FillNormal(seed, p + "self_attn.q_proj.bias", kStd, q, &L.bq);
      FillNormal(seed, p + "self_attn.k_proj.bias", kStd, kv, &L.bk);
      FillNormal(seed, p + "self_attn.v_proj.bias", kStd, kv, &L.bv);
    }
  }
  return w;
}

absl::StatusOr<LlamaWeights> LoadWeights(const std::string& spec) {
  constexpr std::string_view kSynthetic = "synthetic:";
  if (spec.starts_with(kSynthetic)) {
    // synthetic:<builtin-name>[:seed]
    std::vector<std::string> parts = absl::StrSplit(spec.substr(kSynthetic.size()), ':');
    if (parts.empty() || parts.size() > 2 || parts[0].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad model spec '", spec, "': expected synthetic:<name>[:seed]"));
    }
    uint64_t seed = 0;
    if (parts.size() == 2 && !absl::SimpleAtoi(parts[1], &seed)) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad model spec '", spec, "': seed '", parts[1], "' is not an integer"));
    }
    ModelConfig config;
    KVQ_RETURN_IF_ERROR(BuiltinConfig(parts[0], &config));
    return MakeSyntheticWeights(config, seed);
  }
  std::error_code ec;
  if (std::filesystem::is_directory(spec, ec)) return LoadHfWeights(spec);
  if (spec.ends_with(".gguf")) return LoadGgufWeights(spec);
  return absl::InvalidArgumentError(absl::StrCat(
      "bad model spec '", spec,
      "': expected a .gguf file, a Hugging Face model directory or synthetic:<name>[:seed]"));
}

}  // namespace kvq::model
