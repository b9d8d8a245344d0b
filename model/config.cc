#include "model/config.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvq::model {

int64_t ModelConfig::ParameterCount() const {
  const int64_t h = hidden, q = q_dim(), kv = kv_dim(), ff = intermediate;
  int64_t per_layer = 2 * h            // attn_norm, ffn_norm
                      + h * q + 2 * h * kv + q * h  // wq, wk, wv, wo
                      + 3 * h * ff;    // gate, up, down
  if (attention_bias) per_layer += q + 2 * kv;
  int64_t total = static_cast<int64_t>(vocab_size) * h + h + per_layer * n_layers;
  if (!tie_word_embeddings) total += static_cast<int64_t>(vocab_size) * h;
  return total;
}

absl::Status ModelConfig::Validate() const {
  auto bad = [this](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("model config '", name, "': ", why));
  };
  if (arch != "llama" && arch != "mistral" && arch != "qwen2") {
    return bad(absl::StrCat("unknown arch '", arch, "' (llama, mistral, qwen2)"));
  }
  if (n_layers <= 0) return bad(absl::StrCat("n_layers = ", n_layers, " must be positive"));
  if (hidden <= 0) return bad(absl::StrCat("hidden = ", hidden, " must be positive"));
  if (n_heads <= 0) return bad(absl::StrCat("n_heads = ", n_heads, " must be positive"));
  if (n_kv_heads <= 0) return bad(absl::StrCat("n_kv_heads = ", n_kv_heads, " must be positive"));
  if (n_heads % n_kv_heads != 0) {
    return bad(absl::StrCat("n_heads = ", n_heads, " is not a multiple of n_kv_heads = ",
                            n_kv_heads));
  }
  if (head_dim <= 0 || head_dim % 2 != 0) {
    return bad(absl::StrCat("head_dim = ", head_dim, " must be positive and even (RoPE pairs)"));
  }
  if (intermediate <= 0) {
    return bad(absl::StrCat("intermediate = ", intermediate, " must be positive"));
  }
  if (vocab_size <= 0) return bad(absl::StrCat("vocab_size = ", vocab_size, " must be positive"));
  if (max_position < 0) return bad("max_position must not be negative");
  if (!(rope_theta > 0.0f)) return bad(absl::StrCat("rope_theta = ", rope_theta, " must be > 0"));
  if (!(rms_norm_eps > 0.0f)) {
    return bad(absl::StrCat("rms_norm_eps = ", rms_norm_eps, " must be > 0"));
  }
  if (rope_scaling.enabled) {
    const RopeScaling& s = rope_scaling;
    if (!(s.factor >= 1.0f) || !(s.low_freq_factor > 0.0f) ||
        !(s.high_freq_factor > s.low_freq_factor) || s.original_max_position <= 0) {
      return bad(absl::StrFormat(
          "llama3 rope_scaling needs factor >= 1, 0 < low_freq_factor < high_freq_factor and "
          "original_max_position > 0 (got %g, %g, %g, %d)",
          s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position));
    }
  }
  return absl::OkStatus();
}

std::string ModelConfig::ToString() const {
  std::string s = absl::StrFormat(
      "%s [%s]: %d layers, hidden %d, heads %d/%d kv x %d, ffn %d, vocab %d, max_pos %d, "
      "rope_theta %g, eps %g",
      name, arch, n_layers, hidden, n_heads, n_kv_heads, head_dim, intermediate, vocab_size,
      max_position, rope_theta, rms_norm_eps);
  if (rope_scaling.enabled) {
    absl::StrAppendFormat(&s, ", llama3 rope scaling (factor %g, low %g, high %g, orig %d)",
                          rope_scaling.factor, rope_scaling.low_freq_factor,
                          rope_scaling.high_freq_factor, rope_scaling.original_max_position);
  }
  if (tie_word_embeddings) s += ", tied embeddings";
  if (attention_bias) s += ", qkv bias";
  absl::StrAppendFormat(&s, ", %.1fM params", ParameterCount() / 1e6);
  return s;
}

absl::Status BuiltinConfig(const std::string& name, ModelConfig* out) {
  ModelConfig c;
  c.name = name + " (synthetic)";
  if (name == "smollm2-135m") {
    c.n_layers = 30; c.hidden = 576; c.n_heads = 9; c.n_kv_heads = 3; c.head_dim = 64;
    c.intermediate = 1536; c.vocab_size = 49152; c.max_position = 8192;
    c.rope_theta = 100000.0f; c.rms_norm_eps = 1e-5f; c.tie_word_embeddings = true;
  } else if (name == "llama-2-7b") {
    c.n_layers = 32; c.hidden = 4096; c.n_heads = 32; c.n_kv_heads = 32; c.head_dim = 128;
    c.intermediate = 11008; c.vocab_size = 32000; c.max_position = 4096;
    c.rope_theta = 10000.0f; c.rms_norm_eps = 1e-5f;
  } else if (name == "llama-3-8b") {
    c.n_layers = 32; c.hidden = 4096; c.n_heads = 32; c.n_kv_heads = 8; c.head_dim = 128;
    c.intermediate = 14336; c.vocab_size = 128256; c.max_position = 8192;
    c.rope_theta = 500000.0f; c.rms_norm_eps = 1e-5f;
  } else if (name == "mistral-7b") {  // v0.2: no sliding window, theta 1e6, 32K context
    c.arch = "mistral";
    c.n_layers = 32; c.hidden = 4096; c.n_heads = 32; c.n_kv_heads = 8; c.head_dim = 128;
    c.intermediate = 14336; c.vocab_size = 32000; c.max_position = 32768;
    c.rope_theta = 1000000.0f; c.rms_norm_eps = 1e-5f;
  } else if (name == "qwen2-7b") {
    c.arch = "qwen2";
    c.n_layers = 28; c.hidden = 3584; c.n_heads = 28; c.n_kv_heads = 4; c.head_dim = 128;
    c.intermediate = 18944; c.vocab_size = 152064; c.max_position = 32768;
    c.rope_theta = 1000000.0f; c.rms_norm_eps = 1e-6f; c.attention_bias = true;
  } else {
    return absl::NotFoundError(absl::StrCat(
        "no built-in model config '", name,
        "' (smollm2-135m, llama-2-7b, llama-3-8b, mistral-7b, qwen2-7b)"));
  }
  *out = std::move(c);
  return out->Validate();
}

}  // namespace kvq::model
