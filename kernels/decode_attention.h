// Decode attention over a paged KV cache (fp16 or KVQuant nuq/int per-channel codes), one query
// token per sequence, GQA, split-KV; writes (o, lse) per query head. See decode_attention.cuh for
// the math and the thread mapping.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "kernels/dtype.h"
#include "kernels/merge_attention.h"
#include "kernels/paged_kv.h"

namespace kvq::kernels {

struct DecodeAttentionParams {
  PagedKvCache kv;
  int layer = 0;
  int batch = 0;
  int n_heads = 0;            // query heads; a multiple of kv.geom.n_kv_heads (<= 8 per kv head)
  const float* q = nullptr;   // [batch][n_heads][head_dim], RoPE already applied at the query
  float scale = 0.0f;         // softmax scale; <= 0 means 1/sqrt(head_dim)
  float* o = nullptr;         // [batch][n_heads][head_dim], normalized
  float* lse = nullptr;       // [batch][n_heads], natural log; -inf for an empty cache
  int max_seq_len = 0;        // >= every seq_lens[s] (host-side bound; sizes the grid)
  int num_splits = 0;         // 0: choose from the device's SM count
  void* workspace = nullptr;  // DecodeAttentionWorkspaceBytes(...) bytes when num_splits > 1
  size_t workspace_bytes = 0;
  // Optional, for a decode step whose new token is not in the cache yet: that token's own
  // partial (o = its v, lse = scale * q . k) merged into o and lse with the split partials, in
  // the same merge kernel (SelfKeyPartial; self.q is normally q, self.scale <= 0 takes scale).
  // With one split the kernel's o and lse are merged with it in place.
  SelfKeyPartial self;
  // Optional: o also written converted to o_cast_dtype (MergeAttentionParams::o_cast); forces
  // the merge launch with one split too.
  void* o_cast = nullptr;
  DType o_cast_dtype = DType::kF16;
};

// The dispatch key: one template instance per descriptor.
struct DecodeAttentionDesc {
  int head_dim = 0;
  KvCodec codec = KvCodec::kFp16;
  int max_group = 0;  // bucket of the GQA group size: 1, 4 or 8
  std::string ToString() const;
  bool operator==(const DecodeAttentionDesc&) const = default;
};

// Splits the launcher uses for these sizes when num_splits == 0 (>= 1): whole waves of CTAs over
// 64-token groups, and at short contexts (no more CTAs than SMs) down to one 16-token tile per
// split (KVQ_DECODE_MIN_SPLIT_TILES, read once: 1 by default, 4 keeps whole groups). codec: the
// cache's (PagedKvCache::codec), which sets the warps per CTA. Sink buffers (PagedKvCache::sink)
// must be 16-byte aligned: the LUT kernel reads them in uint4.
int ChooseDecodeSplits(int batch, int n_kv_heads, int max_seq_len, KvCodec codec, int sm_count,
                       int head_dim = 128);
// Warps per tensor-core decode CTA (one per KV head): up to 8 for fp16, 16 for LUT codecs.
int DecodeCtaWarps(int n_kv_heads, KvCodec codec);
// Resident tensor-core decode CTAs per SM for a cache with n_kv_heads, as the split choice counts
// them: the register limit (16 warps per SM), and the shared memory of the largest instance of
// that head dim (4-bit LUT).
int DecodeCtasPerSm(int n_kv_heads, int head_dim, KvCodec codec);
size_t DecodeAttentionWorkspaceBytes(int batch, int n_heads, int head_dim, int num_splits);

// The RoPE step tables of the tensor-core decode kernels (PagedKvCache::rope_steps): computed
// once from inv_freq [head_dim / 2] into `out` (RopeStepTableBytes(head_dim) bytes, 16-byte
// aligned), the same values each CTA would otherwise compute.
size_t RopeStepTableBytes(int head_dim);
absl::Status LaunchRopeStepTable(const double* inv_freq, int head_dim, void* out, cudaStream_t stream);

// The RoPE anchor table of the tensor-core decode kernels (PagedKvCache::rope_anchors,
// rope_anchor_count): exp(i 4096 a w) for the first `count` 4096-position blocks a, [count][head_dim
// / 2] float2 (cos, sin), the values the kernels would compute in double (the same bits).
// kRopeAnchorDefaultCount covers positions below 2^24 (16.8M; 2 MB at head dim 128).
inline constexpr int64_t kRopeAnchorDefaultCount = 4096;
size_t RopeAnchorTableBytes(int head_dim, int64_t count);
absl::Status LaunchRopeAnchorTable(const double* inv_freq, int head_dim, int64_t count, void* out,
                                   cudaStream_t stream);

absl::Status LaunchDecodeAttention(const DecodeAttentionParams& p, cudaStream_t stream);

}  // namespace kvq::kernels
