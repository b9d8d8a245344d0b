// Dense fp32 weights of a Llama-family model, as the CPU reference backend uses them.
// Every matrix is row-major [out_features][in_features] (the PyTorch nn.Linear convention), and the
// q/k projections are in the Hugging Face layout (RoPE pairs channel i with i + head_dim/2,
// "rotate_half"); GGUF files store llama q/k permuted for interleaved RoPE and are un-permuted at load.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace kvq::model {

struct LayerWeights {
  std::vector<float> attn_norm;  // [hidden]
  std::vector<float> wq;         // [n_heads*head_dim, hidden]
  std::vector<float> wk;         // [n_kv_heads*head_dim, hidden]
  std::vector<float> wv;         // [n_kv_heads*head_dim, hidden]
  std::vector<float> bq, bk, bv; // [q_dim], [kv_dim], [kv_dim]; empty unless attention_bias
  std::vector<float> wo;         // [hidden, n_heads*head_dim]
  std::vector<float> ffn_norm;   // [hidden]
  std::vector<float> w_gate;     // [intermediate, hidden]
  std::vector<float> w_up;       // [intermediate, hidden]
  std::vector<float> w_down;     // [hidden, intermediate]
};

struct LlamaWeights {
  ModelConfig config;
  std::vector<float> tok_embd;     // [vocab, hidden]
  std::vector<float> output_norm;  // [hidden]
  std::vector<float> output;       // [vocab, hidden]; empty when tie_word_embeddings (use tok_embd)
  std::vector<LayerWeights> layers;

  const std::vector<float>& lm_head() const { return output.empty() ? tok_embd : output; }
};

// Reads a GGUF v3 file (llama architecture), dequantizing every tensor to fp32.
absl::StatusOr<LlamaWeights> LoadGgufWeights(const std::string& path);
// Reads a Hugging Face model directory: config.json + model.safetensors or a sharded
// model.safetensors.index.json; fp32/fp16/bf16 tensors.
absl::StatusOr<LlamaWeights> LoadHfWeights(const std::string& dir);
// Reads config.json of a Hugging Face directory (or a file) into a ModelConfig.
absl::StatusOr<ModelConfig> LoadHfConfig(const std::string& path);
// Seeded random weights (normal, std 0.02; norms 1) for any shape: for speed and capacity runs.
// Deterministic per (seed, tensor name).
absl::StatusOr<LlamaWeights> MakeSyntheticWeights(const ModelConfig& config, uint64_t seed);
// Picks the loader from the path: *.gguf file, a directory, or "synthetic:<builtin-name>[:seed]".
absl::StatusOr<LlamaWeights> LoadWeights(const std::string& spec);

}  // namespace kvq::model
