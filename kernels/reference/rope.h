// Rotary position embedding, "rotate_half" (GPT-NeoX / Hugging Face Llama) convention: channel i
// of a head is paired with channel i + head_dim/2 and rotated by angle pos * inv_freq[i].
// Angles are computed in double so that positions in the millions keep full precision.
#pragma once

#include <cstdint>
#include <vector>

namespace kvq::kernels {

struct RopeParams {
  int head_dim = 0;
  double theta = 10000.0;
  // rope_scaling type "llama3" (Llama-3.1+).
  bool llama3_scaling = false;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int original_max_position = 8192;
};

// inv_freq[i] for i in [0, head_dim/2), with llama3 scaling applied when enabled.
std::vector<double> RopeInvFreq(const RopeParams& p);

// Rotates x[h*head_dim + c] for every head h in place, at position pos.
void ApplyRopeReference(float* x, int n_heads, int head_dim, int64_t pos,
                        const std::vector<double>& inv_freq);

}  // namespace kvq::kernels
