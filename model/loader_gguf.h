// GGUF (llama.cpp) model files to ModelConfig and LlamaWeights; LoadGgufWeights is declared in
// weights.h. These pieces are exposed for tools that need the shape without the weights, and for
// tests.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/gguf.h"

namespace kvq::model {

// The model shape from `<arch>.*` metadata (arch = general.architecture: llama or qwen2).
// Missing required keys are NotFound naming the key; shapes we cannot run (partial rotary,
// unsupported rope scaling) are Unimplemented.
absl::StatusOr<ModelConfig> GgufModelConfig(const GgufFile& gguf);

// Undoes llama.cpp's q/k row permutation in place: `w` holds n_heads blocks of head_dim rows of
// `cols` floats each (cols = 1 for a bias). Within a head, GGUF row 2*i + j (interleaved RoPE
// pairs) becomes Hugging Face row j*head_dim/2 + i (rotate_half pairs), for i < head_dim/2,
// j in {0, 1}.
void UnpermuteRopeRows(std::vector<float>* w, int n_heads, int head_dim, int64_t cols);

}  // namespace kvq::model
