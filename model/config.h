// The shape and hyper-parameters of a Llama-family decoder (LLaMA 1/2/3, Mistral, SmolLM2,
// Qwen2-style GQA), independent of where the weights come from.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace kvq::model {

// rope_scaling of type "llama3" (Llama-3.1+): frequency-dependent scaling of inv_freq.
struct RopeScaling {
  bool enabled = false;  // false: plain RoPE
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position = 8192;
};

struct ModelConfig {
  std::string name;               // e.g. "SmolLM2-135M-Instruct", "llama-3-8b (synthetic)"
  std::string arch = "llama";     // llama | mistral | qwen2
  int n_layers = 0;
  int hidden = 0;                 // model width
  int n_heads = 0;                // query heads
  int n_kv_heads = 0;             // key/value heads (GQA when < n_heads)
  int head_dim = 0;               // usually hidden / n_heads
  int intermediate = 0;           // MLP width
  int vocab_size = 0;
  int max_position = 0;           // trained context length (informational)
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  float rms_norm_eps = 1e-5f;
  bool tie_word_embeddings = false;
  bool attention_bias = false;    // Qwen2: q/k/v projections carry a bias

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
  int group_size() const { return n_heads / n_kv_heads; }
  // Number of parameters (weights only), for memory planning.
  int64_t ParameterCount() const;
  // Checks internal consistency (positive sizes, n_heads % n_kv_heads == 0, even head_dim, ...).
  absl::Status Validate() const;
  std::string ToString() const;
};

// Built-in shapes for speed and capacity work with synthetic weights.
// name: "smollm2-135m", "llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2-7b".
absl::Status BuiltinConfig(const std::string& name, ModelConfig* out);

}  // namespace kvq::model
