// Token sampling from logits, one CTA per sequence (kernels/sampling.cu):
//   temperature <= 0: greedy argmax (ties: lowest token id).
//   otherwise, with e_i = exp((l_i - max l) / T) (so max e = 1) and Z = sum e_i:
//     top_k  (0 = off): keep e_i >= e_(k), the k-th largest value (ties at it are all kept);
//     top_p  (1 = off): then keep the largest-first prefix whose mass reaches top_p of the kept
//                       mass, i.e. e_i >= tau_p, tau_p the largest tau with
//                       sum_{kept, e_i >= tau} e_i >= top_p * sum_{kept} e_i;
//     min_p  (0 = off): keep e_i >= min_p (= min_p * p_max / p_max);
//   then draw u = SamplingUniform(seed, step) (Philox4x32-10, kernels/philox.h) and return the
//   first kept token id i (in id order) whose running kept mass exceeds u * (kept mass).
// Thresholds are found by radix selection on the fp32 bits of e (exact: they are values of e);
// masses (top_p and the draw) are sums of e in fixed point, units of 2^-32 (order-independent);
// vocab <= 2^20.
// Reference: kernels/reference/sampling.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace kvq::kernels {

struct SamplingParams {
  int batch = 0;
  int vocab = 0;
  const float* logits = nullptr;       // [batch][logits_row_stride], f32
  int64_t logits_row_stride = 0;       // elements; 0 means vocab
  const float* temperature = nullptr;  // [batch]
  const int32_t* top_k = nullptr;      // [batch] (null: all off)
  const float* top_p = nullptr;        // [batch] (null: all 1)
  const float* min_p = nullptr;        // [batch] (null: all 0)
  const uint64_t* seed = nullptr;      // [batch]
  const uint64_t* step = nullptr;      // [batch] counter, e.g. the number of generated tokens
  int32_t* tokens = nullptr;           // [batch] out
};

absl::Status LaunchSampling(const SamplingParams& p, cudaStream_t stream);

// LaunchSampling runs a cluster of 8 CTAs per row on compute capability 9.0+ for vocabularies up
// to 131,072 (on by default; the same tokens as one CTA per row by construction: every sum is an
// integer sum), one CTA per row otherwise. The switch is for A/B timing (engine_bench --ab=cluster)
// and the tests that compare the two.
void SetSamplingClusters(bool on);
bool SamplingClusters();

// Greedy tokens of `rows` rows of f32 logits ([rows][row_stride], row_stride >= vocab; 0 means
// vocab): tokens[r] = the lowest id among the row's largest values (model::Argmax's rule; NaN
// never wins; a row of NaN gives 0). One CTA per row, loads 16 bytes wide when the rows allow.
// The serving step's token choice when no logits need to reach the host.
absl::Status LaunchArgmaxRows(int rows, int vocab, const float* logits, int64_t row_stride, int32_t* tokens,
                              cudaStream_t stream);

// Repetition penalty in place on rows of f32 logits ([rows][row_stride]; model::ApplyRepetitionPenalty's
// rule, IEEE-rounded): for row r, every entry e in entries[offsets[r] .. offsets[r + 1]) names a
// distinct token id e.x < vocab whose logit l becomes l / penalty[r] if l > 0, else l * penalty[r].
// The logit before is kept in e.y (as bits); with restore = true the launch writes those back
// instead (after the pick, when the row goes to the host as it was). One CTA per row; offsets has
// rows + 1 entries, offsets[0] = 0.
absl::Status LaunchRepetitionPenalty(int rows, float* logits, int64_t row_stride, const int32_t* offsets,
                                     const float* penalty, int2* entries, bool restore, cudaStream_t stream);

}  // namespace kvq::kernels
