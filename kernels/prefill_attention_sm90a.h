// Hopper prefill attention (kernels/prefill_attention_sm90a.cu): the PrefillAttention contract of
// kernels/prefill_attention.h for head dims 64 and 128 on warpgroup MMA (wgmma, sm_90a). Internal to
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

// How the kernel orders a tile's work:
//   kPingPong  a producer warp loads the K/V ring with TMA (mbarriers per stage, no CTA barrier in
//              the loop) and the two warpgroups take turns on the tensor cores (FlashAttention-3's
//              inter-warpgroup ping-pong); falls back to kSerial where the tensor maps cannot be made;
//   kSerial    all threads load the ring with cp.async one tile ahead; per tile S = Q K^T,
//              softmax, O += P V in sequence, one CTA barrier per tile.
enum class WgmmaSchedule { kPingPong, kSerial };

// p already validated by LaunchPrefillAttention (head_dim 64 or 128); keys_per_split a multiple of
// kPrefillWgmmaKeys.
absl::Status LaunchPrefillAttentionWgmma(const PrefillAttentionParams& p, int64_t keys_per_split,
                                         WgmmaSchedule schedule, cudaStream_t stream);

}  // namespace kvq::kernels::internal
