// Prefill attention on tensor cores: many query rows against one sequence's keys, for chunked
// prefill (kernels/prefill_attention.cu; ExpandKv in kernels/expand_kv.cu, the Hopper kernels in
// kernels/prefill_attention_sm90a.cu).
//
// A prefill chunk of n tokens attends (a) the sequence's cached past and (b) the chunk itself.
// Running the decode kernel once per query row (what the engine did first) reads the whole past n
// times; here the past is read once per 64 query rows:
//
//   ExpandKv          the paged cache's local tokens [t0, t0 + n) of one sequence and layer ->
//                     contiguous fp16 K (RoPE applied at each token's position) and V: LUT decode
//                     with the per-channel key / per-token value scaling, key and value outliers
//                     replacing their elements, fp16 sink tokens, fp16 codec copied. Exactly the
//                     dequantization of kvstore::QuantizedKvCache::ReadBack, rounded to fp16 once
//                     after RoPE (fp32 in between).
//   PrefillAttention  flash attention (mma.sync m16n8k16, fp16 operands, fp32 accumulation and
//                     online softmax in the log2 domain) of fp32 queries over such fp16 K/V, with a
//                     per-row visible length (causal or not), split over key ranges, writing the
//                     same normalized (o, lse) partials as the decode kernel, so the engine merges
//                     past, chunk and splits with kernels/merge_attention.h. On Hopper, head dim
//                     64 and 128 run on warpgroup MMA instead (kernels/prefill_attention_sm90a.cu:
//                     wgmma with Q, K and V in 128-byte-swizzled shared memory, P from registers),
//                     1.9x the mma.sync kernel's rate; see PrefillKernel below.
//
// The engine expands the past in segments of a bounded number of tokens (its workspace), runs
// PrefillAttention per segment into partial slots and merges. The expansion moves ~2.4 bytes
// per element against 2 * rows * group multiply-adds per element for the attention, so it is
// noise for chunks of hundreds of rows (RESULTS.md has the measured split).
//
// GQA: the M dimension of a CTA's tile is (query row, head of the group) pairs of one kv head, so
// each K/V tile read from shared memory serves every query head of its group.
// Supported: PrefillAttention head_dim 64 and 128, ExpandKv head_dim a multiple of 16 <= 128 (and
// 16-byte aligned output rows); any group
// size; keys per launch < 2^31. Precondition the launchers cannot check (device memory):
// ExpandKv's t0 + n <= seq_lens[seq].
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "absl/status/status.h"
#include "kernels/paged_kv.h"

namespace kvq::kernels {

struct ExpandKvParams {
  PagedKvCache kv;  // the view; only batch row `seq` is read
  int layer = 0;
  int seq = 0;
  int64_t t0 = 0;   // first local token (local token i < n_sink is sink token i)
  int n = 0;        // tokens to expand; t0 + n <= seq_lens[seq]
  // Output element (token t0 + i, kv head h, channel d) at i * token_stride + h * head_stride + d.
  uint16_t* k = nullptr;  // fp16, RoPE applied at first_positions[seq] + t0 + i
  uint16_t* v = nullptr;  // fp16
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};
absl::Status LaunchExpandKv(const ExpandKvParams& p, cudaStream_t stream);

struct PrefillAttentionParams {
  int rows = 0;        // query rows (tokens)
  int n_heads = 0;     // query heads, a multiple of n_kv_heads
  int n_kv_heads = 0;
  int head_dim = 0;    // 64 or 128
  const float* q = nullptr;  // [rows][n_heads][head_dim], RoPE applied
  // Key t of kv head h, channel d, at t * kv_token_stride + h * kv_head_stride + d (fp16 bits;
  // 16-byte aligned rows: strides multiples of 8).
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  int64_t kv_token_stride = 0;
  int64_t kv_head_stride = 0;
  int n_keys = 0;
  // Row r sees keys [0, clamp(limit_base + (causal ? r : 0), 0, n_keys)).
  int64_t limit_base = 0;
  bool causal = false;
  float scale = 0.0f;  // softmax scale; <= 0: 1/sqrt(head_dim)
  // Key-range splits (grid.z; each a multiple of 64 keys); split s writes its partial at
  // o + s * o_split_stride + (r * n_heads + head) * head_dim and lse + s * lse_split_stride +
  // r * n_heads + head (natural log; o = 0, lse = -inf where the row sees none of its keys).
  int splits = 1;
  float* o = nullptr;
  float* lse = nullptr;
  int64_t o_split_stride = 0;
  int64_t lse_split_stride = 0;
};
absl::Status LaunchPrefillAttention(const PrefillAttentionParams& p, cudaStream_t stream);

// The kernel LaunchPrefillAttention runs (head dims 64 and 128):
//   kAuto         kWgmma on devices of compute capability 9.0 (Hopper), else kMmaSync;
//   kMmaSync      FlashAttention-2 structure on mma.sync (any sm_90 device; the fallback);
//   kWgmma        warpgroup MMA (sm_90a only): TMA producer warp, two consumer warpgroups in
//                 ping-pong (kernels/prefill_attention_sm90a.h);
//   kWgmmaSerial  warpgroup MMA fed by cp.async, each tile's products and softmax in sequence
//                 (what kWgmma falls back to where TMA cannot describe K/V; A/B otherwise).
// Process-wide; the initial value comes from KVQ_PREFILL_KERNEL (auto, mma, wgmma, wgmma-serial).
// Asking for a wgmma kernel on a device without it makes launches fail with FailedPrecondition.
enum class PrefillKernel { kAuto, kMmaSync, kWgmma, kWgmmaSerial };
// Whether the current device runs the wgmma kernels (compute capability 9.0 and this build's
// sm_90a image).
bool PrefillWgmmaOnCurrentDevice();
void SetPrefillKernel(PrefillKernel kernel);
PrefillKernel GetPrefillKernel();
const char* PrefillKernelName(PrefillKernel kernel);
// The kernel of that name (PrefillKernelName), or nullopt.
std::optional<PrefillKernel> ParsePrefillKernel(std::string_view name);

// Splits that fill the device for this launch shape: >= 1, <= max_splits, at least 4 key tiles
// (256 keys) per split; 1 when the rows alone give two CTAs per SM.
// rows_per_cta: M rows (query row x head of the group) per CTA of the kernel the launch will take
// (PrefillRowsPerCta: 128 for the wgmma kernels, else 128 at head dim 128 and 64 at 64; it asks the
// current device).
int ChoosePrefillSplits(int rows, int n_heads, int n_kv_heads, int n_keys, int sm_count, int max_splits,
                        int rows_per_cta = 64);
int PrefillRowsPerCta(int head_dim);

// Query rows of one sequence over the local tokens [0, n_keys) of its paged cache: per segment of
// plan.seg_tokens tokens, ExpandKv into (xk, xv) and PrefillAttention with plan.splits splits;
// with several segments or splits the partials go to (part_o, part_lse) (plan.partial_bytes) and
// are merged into a running result there, the last merge writing (o, lse).
// Device memory the engine lets one prefill launch take (what kernels_bench measures with): the
// expanded K (and as much V) of one segment, and the split partials of one segment plus the
// running result.
inline constexpr size_t kPrefillExpandBudgetBytes = size_t{128} << 20;
inline constexpr size_t kPrefillPartialBudgetBytes = size_t{256} << 20;

struct PrefillPastPlan {
  int64_t seg_tokens = 0;
  int splits = 1;
  size_t expand_bytes = 0;   // each of xk and xv
  size_t partial_bytes = 0;  // part_o (part_lse: partial_bytes / head_dim); 0: not needed
};
PrefillPastPlan PlanPrefillPast(int rows, int n_heads, int n_kv_heads, int head_dim, int64_t n_keys,
                                int sm_count, size_t expand_budget_bytes, size_t partial_budget_bytes);

struct PrefillPastParams {
  PagedKvCache kv;  // batch row `seq`: its table row, seq_lens[seq] >= n_keys, first position, sink
  int layer = 0;
  int seq = 0;
  int64_t n_keys = 0;
  int rows = 0;
  int n_heads = 0;
  const float* q = nullptr;  // [rows][n_heads][head_dim], RoPE applied
  int64_t limit_base = 0;    // row r sees local tokens [0, limit_base + (causal ? r : 0))
  bool causal = false;
  float scale = 0.0f;
  float* o = nullptr;        // [rows][n_heads][head_dim]
  float* lse = nullptr;      // [rows][n_heads]
  PrefillPastPlan plan;
  uint16_t* xk = nullptr;
  uint16_t* xv = nullptr;
  float* part_o = nullptr;
  float* part_lse = nullptr;
};
absl::Status LaunchPrefillPast(const PrefillPastParams& p, cudaStream_t stream);

// f32 -> fp16 rows with arbitrary strides: out[r * out_stride + c] = half(in[r * in_stride + c]).
absl::Status LaunchToHalfRows(int rows, int cols, const float* in, int64_t in_stride, uint16_t* out,
                              int64_t out_stride, cudaStream_t stream);

}  // namespace kvq::kernels
