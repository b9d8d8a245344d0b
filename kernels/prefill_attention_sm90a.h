// Hopper prefill attention (kernels/prefill_attention_sm90a.cu): the PrefillAttention contract of
// kernels/prefill_attention.h for head dim 128 on warpgroup MMA (wgmma, sm_90a). Internal to
// kernels/: LaunchPrefillAttention validates the parameters and picks this kernel where it runs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/prefill_attention.h"

namespace kvq::kernels::internal {

// Keys per tile of the wgmma kernel: key splits must be multiples of it.
inline constexpr int kPrefillWgmmaKeys = 128;
// M rows (query row x head of the group) per CTA.
inline constexpr int kPrefillWgmmaRows = 128;

// True when `device` is compute capability 9.0 and this build carries the sm_90a image.
bool PrefillWgmmaAvailable(int device);

// p already validated by LaunchPrefillAttention (head_dim 128); keys_per_split a multiple of
// kPrefillWgmmaKeys. overlap: the next tile's S = Q K^T is issued before the previous tile's
// O += P V and the softmax runs while the tensor cores work (FlashAttention-3's intra-warpgroup
// pipelining); false: each tile's two products and softmax in sequence.
absl::Status LaunchPrefillAttentionWgmma(const PrefillAttentionParams& p, int64_t keys_per_split, bool overlap,
                                         cudaStream_t stream);

}  // namespace kvq::kernels::internal
