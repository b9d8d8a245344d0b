// GGUF tensor name -> LlamaWeights field. A ggml tensor with dims [ne0, ne1] is ne1 rows of ne0
// floats, i.e. exactly the row-major [out][in] matrix of nn.Linear with ne0 = in_features.
#include "model/loader_gguf.h"

#include <cmath>
#include <cstring>
#include <numbers>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "model/weights.h"

namespace kvq::model {
namespace {

absl::StatusOr<int> GetPositiveInt(const GgufFile& g, const std::string& key) {
  KVQ_ASSIGN_OR_RETURN(int64_t v, g.GetInt(key));
  if (v <= 0 || v > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(g.path(), ": GGUF key '", key, "' = ", v, " is out of range"));
  }
  return static_cast<int>(v);
}

// The rope_freqs.weight tensor that llama.cpp writes for Llama-3.1-style rope scaling holds, per
// rotary pair, the divisor of its frequency. Recover the llama3 parameters by taking the factor
// from the largest divisor and the usual low/high frequency factors, then check that they
// reproduce every divisor; anything else is reported as unsupported.
absl::Status RopeScalingFromFreqFactors(const GgufFile& g, const std::string& arch,
                                        const std::vector<float>& divisors, ModelConfig* c) {
  if (static_cast<int>(divisors.size()) != c->head_dim / 2) {
    return absl::InvalidArgumentError(absl::StrCat(g.path(), ": rope_freqs.weight has ",
                                                   divisors.size(), " entries, expected ",
                                                   c->head_dim / 2));
  }
  RopeScaling s;
  s.enabled = true;
  s.factor = 1.0f;
  for (float d : divisors) s.factor = std::max(s.factor, d);
  s.low_freq_factor = 1.0f;
  s.high_freq_factor = 4.0f;
  s.original_max_position = 8192;
  const std::string orig_key = absl::StrCat(arch, ".rope.scaling.original_context_length");
  if (g.Has(orig_key)) {
    KVQ_ASSIGN_OR_RETURN(s.original_max_position, GetPositiveInt(g, orig_key));
  }
  const double low_wavelen = s.original_max_position / s.low_freq_factor;
  const double high_wavelen = s.original_max_position / s.high_freq_factor;
  for (int i = 0; i < c->head_dim / 2; ++i) {
    const double freq = std::pow(static_cast<double>(c->rope_theta), -2.0 * i / c->head_dim);
    const double wavelen = 2.0 * std::numbers::pi / freq;
    double expect;
    if (wavelen < high_wavelen) {
      expect = 1.0;
    } else if (wavelen > low_wavelen) {
      expect = s.factor;
    } else {
      const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) /
                            (s.high_freq_factor - s.low_freq_factor);
      expect = 1.0 / ((1.0 - smooth) / s.factor + smooth);
    }
    // 1e-3 relative: the divisors are stored as f32 after double math in the converter.
    if (std::fabs(divisors[i] - expect) > 1e-3 * expect) {
      return absl::UnimplementedError(absl::StrFormat(
          "%s: rope_freqs.weight[%d] = %g does not match llama3 rope scaling (factor %g, "
          "low 1, high 4, original %d) which gives %g; this rope scaling is not supported",
          g.path(), i, divisors[i], s.factor, s.original_max_position, expect));
    }
  }
  c->rope_scaling = s;
  return absl::OkStatus();
}

// Dims of `t` with trailing 1s dropped, for shape comparison.
std::vector<int64_t> Squeezed(const GgufFile::TensorInfo& t) {
  std::vector<int64_t> d = t.dims;
  while (d.size() > 1 && d.back() == 1) d.pop_back();
  return d;
}

std::string DimsString(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) absl::StrAppend(&s, i ? ", " : "", d[i]);
  return s + "]";
}

class TensorLoader {
 public:
  explicit TensorLoader(const GgufFile& g) : g_(g) {}

  // Reads tensor `name` whose ggml dims must be `dims` (ne0 first).
  absl::Status Read(const std::string& name, std::vector<int64_t> dims, std::vector<float>* out) {
    const GgufFile::TensorInfo* t = g_.FindTensor(name);
    if (t == nullptr) {
      return absl::NotFoundError(
          absl::StrCat(g_.path(), ": required tensor '", name, "' is missing"));
    }
    if (Squeezed(*t) != dims) {
      return absl::InvalidArgumentError(absl::StrCat(g_.path(), ": tensor '", name, "' has dims ",
                                                     DimsString(t->dims), ", the config needs ",
                                                     DimsString(dims)));
    }
    KVQ_ASSIGN_OR_RETURN(*out, g_.ReadTensorF32(name));
    return absl::OkStatus();
  }

 private:
  const GgufFile& g_;
};

}  // namespace

void UnpermuteRopeRows(std::vector<float>* w, int n_heads, int head_dim, int64_t cols) {
  std::vector<float> src(*w);
  const int half = head_dim / 2;
  const size_t row_bytes = static_cast<size_t>(cols) * sizeof(float);
  for (int h = 0; h < n_heads; ++h) {
    for (int i = 0; i < half; ++i) {
      for (int j = 0; j < 2; ++j) {
        const int64_t hf_row = static_cast<int64_t>(h) * head_dim + j * half + i;
        const int64_t gguf_row = static_cast<int64_t>(h) * head_dim + 2 * i + j;
        std::memcpy(w->data() + hf_row * cols, src.data() + gguf_row * cols, row_bytes);
      }
    }
  }
}

absl::StatusOr<ModelConfig> GgufModelConfig(const GgufFile& g) {
  KVQ_ASSIGN_OR_RETURN(std::string arch, g.GetString("general.architecture"));
  if (arch != "llama" && arch != "qwen2") {
    return absl::UnimplementedError(absl::StrCat(
        g.path(), ": general.architecture '", arch, "' is not supported (llama, qwen2)"));
  }
  const std::string p = arch + ".";
  ModelConfig c;
  c.arch = arch;
  c.attention_bias = arch == "qwen2";
  if (g.Has("general.name")) {
    KVQ_ASSIGN_OR_RETURN(c.name, g.GetString("general.name"));
  } else {
    c.name = g.path().substr(g.path().find_last_of('/') + 1);
  }
  KVQ_ASSIGN_OR_RETURN(c.n_layers, GetPositiveInt(g, p + "block_count"));
  KVQ_ASSIGN_OR_RETURN(c.hidden, GetPositiveInt(g, p + "embedding_length"));
  KVQ_ASSIGN_OR_RETURN(c.intermediate, GetPositiveInt(g, p + "feed_forward_length"));
  KVQ_ASSIGN_OR_RETURN(c.n_heads, GetPositiveInt(g, p + "attention.head_count"));
  c.n_kv_heads = c.n_heads;
  if (g.Has(p + "attention.head_count_kv")) {
    KVQ_ASSIGN_OR_RETURN(c.n_kv_heads, GetPositiveInt(g, p + "attention.head_count_kv"));
  }
  KVQ_ASSIGN_OR_RETURN(c.max_position, GetPositiveInt(g, p + "context_length"));
  KVQ_ASSIGN_OR_RETURN(double eps, g.GetFloat(p + "attention.layer_norm_rms_epsilon"));
  c.rms_norm_eps = static_cast<float>(eps);
  if (g.Has(p + "rope.freq_base")) {
    KVQ_ASSIGN_OR_RETURN(double theta, g.GetFloat(p + "rope.freq_base"));
    c.rope_theta = static_cast<float>(theta);
  }
  if (c.hidden % c.n_heads != 0 && !g.Has(p + "attention.key_length")) {
    return absl::InvalidArgumentError(absl::StrCat(g.path(), ": embedding_length ", c.hidden,
                                                   " is not a multiple of head_count ", c.n_heads,
                                                   " and attention.key_length is absent"));
  }
  c.head_dim = c.hidden / c.n_heads;
  if (g.Has(p + "attention.key_length")) {
    KVQ_ASSIGN_OR_RETURN(c.head_dim, GetPositiveInt(g, p + "attention.key_length"));
  }
  if (g.Has(p + "attention.value_length")) {
    KVQ_ASSIGN_OR_RETURN(int v_dim, GetPositiveInt(g, p + "attention.value_length"));
    if (v_dim != c.head_dim) {
      return absl::UnimplementedError(absl::StrCat(g.path(), ": value head dim ", v_dim,
                                                   " differs from key head dim ", c.head_dim));
    }
  }
  if (g.Has(p + "rope.dimension_count")) {
    KVQ_ASSIGN_OR_RETURN(int rot, GetPositiveInt(g, p + "rope.dimension_count"));
    if (rot != c.head_dim) {
      return absl::UnimplementedError(absl::StrCat(g.path(), ": partial rotary embedding (",
                                                   p, "rope.dimension_count = ", rot,
                                                   ", head dim ", c.head_dim,
                                                   ") is not supported"));
    }
  }
  if (g.Has(p + "vocab_size")) {
    KVQ_ASSIGN_OR_RETURN(c.vocab_size, GetPositiveInt(g, p + "vocab_size"));
  } else if (g.Has("tokenizer.ggml.tokens")) {
    KVQ_ASSIGN_OR_RETURN(auto tokens, g.GetStringArray("tokenizer.ggml.tokens"));
    c.vocab_size = static_cast<int>(tokens.size());
  } else if (const auto* t = g.FindTensor("token_embd.weight"); t != nullptr && t->dims.size() >= 2) {
    c.vocab_size = static_cast<int>(t->dims[1]);
  } else {
    return absl::NotFoundError(absl::StrCat(g.path(), ": no vocab size: neither ", p,
                                            "vocab_size nor tokenizer.ggml.tokens is present"));
  }
  if (g.Has(p + "rope.scaling.type")) {
    KVQ_ASSIGN_OR_RETURN(std::string type, g.GetString(p + "rope.scaling.type"));
    double factor = 1.0;
    if (g.Has(p + "rope.scaling.factor")) {
      KVQ_ASSIGN_OR_RETURN(factor, g.GetFloat(p + "rope.scaling.factor"));
    }
    if (type != "none" && !(type == "linear" && factor == 1.0)) {
      return absl::UnimplementedError(absl::StrCat(g.path(), ": rope scaling type '", type,
                                                   "' (factor ", factor, ") is not supported"));
    }
  }
  c.tie_word_embeddings = g.FindTensor("output.weight") == nullptr;
  if (g.FindTensor("rope_freqs.weight") != nullptr) {
    KVQ_ASSIGN_OR_RETURN(std::vector<float> divisors, g.ReadTensorF32("rope_freqs.weight"));
    KVQ_RETURN_IF_ERROR(RopeScalingFromFreqFactors(g, arch, divisors, &c));
  }
  if (g.FindTensor("blk.0.attn_q.bias") != nullptr) c.attention_bias = true;
  KVQ_RETURN_IF_ERROR(c.Validate());
  return c;
}

absl::StatusOr<LlamaWeights> LoadGgufWeights(const std::string& path) {
  KVQ_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> g, GgufFile::Open(path));
  LlamaWeights w;
  KVQ_ASSIGN_OR_RETURN(w.config, GgufModelConfig(*g));
  const ModelConfig& c = w.config;
  // llama.cpp permutes q/k for its interleaved ("normal") RoPE only in the llama architecture;
  // qwen2 is converted as-is (NEOX RoPE, which is rotate_half).
  const bool permuted = c.arch == "llama";
  const int64_t h = c.hidden, q = c.q_dim(), kv = c.kv_dim(), ff = c.intermediate;
  TensorLoader t(*g);
  KVQ_RETURN_IF_ERROR(t.Read("token_embd.weight", {h, c.vocab_size}, &w.tok_embd));
  KVQ_RETURN_IF_ERROR(t.Read("output_norm.weight", {h}, &w.output_norm));
  if (!c.tie_word_embeddings) {
    KVQ_RETURN_IF_ERROR(t.Read("output.weight", {h, c.vocab_size}, &w.output));
  }
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights& L = w.layers[l];
    const std::string b = absl::StrCat("blk.", l, ".");
    KVQ_RETURN_IF_ERROR(t.Read(b + "attn_norm.weight", {h}, &L.attn_norm));
    KVQ_RETURN_IF_ERROR(t.Read(b + "attn_q.weight", {h, q}, &L.wq));
    KVQ_RETURN_IF_ERROR(t.Read(b + "attn_k.weight", {h, kv}, &L.wk));
    KVQ_RETURN_IF_ERROR(t.Read(b + "attn_v.weight", {h, kv}, &L.wv));
    KVQ_RETURN_IF_ERROR(t.Read(b + "attn_output.weight", {q, h}, &L.wo));
    KVQ_RETURN_IF_ERROR(t.Read(b + "ffn_norm.weight", {h}, &L.ffn_norm));
    KVQ_RETURN_IF_ERROR(t.Read(b + "ffn_gate.weight", {h, ff}, &L.w_gate));
    KVQ_RETURN_IF_ERROR(t.Read(b + "ffn_up.weight", {h, ff}, &L.w_up));
    KVQ_RETURN_IF_ERROR(t.Read(b + "ffn_down.weight", {ff, h}, &L.w_down));
    if (c.attention_bias) {
      KVQ_RETURN_IF_ERROR(t.Read(b + "attn_q.bias", {q}, &L.bq));
      KVQ_RETURN_IF_ERROR(t.Read(b + "attn_k.bias", {kv}, &L.bk));
      KVQ_RETURN_IF_ERROR(t.Read(b + "attn_v.bias", {kv}, &L.bv));
    }
    if (permuted) {
      UnpermuteRopeRows(&L.wq, c.n_heads, c.head_dim, h);
      UnpermuteRopeRows(&L.wk, c.n_kv_heads, c.head_dim, h);
      if (!L.bq.empty()) UnpermuteRopeRows(&L.bq, c.n_heads, c.head_dim, 1);
      if (!L.bk.empty()) UnpermuteRopeRows(&L.bk, c.n_kv_heads, c.head_dim, 1);
    }
  }
  return w;
}

}  // namespace kvq::model
