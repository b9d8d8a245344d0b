// Two kernels:
//  - MergePartsKernel (the usual case), one CTA per row and chunk of channels: the CTA computes
//    the row's weights w_r = exp(lse_r - max) / sum once into shared memory, then `groups` groups
//    of threads each sum a strided subset of the partials over the chunk's channels (16-byte
//    loads where the layout allows; up to 64 groups, so that a group reads one batch of 8
//    partials), and the group sums are added in group order. A row with hundreds of split
//    partials (batch 1 at long contexts: 256 splits) is read by up to 1,024 threads with
//    independent loads instead of by head_dim / 4 threads each walking every partial with an exp
//    per element (51 us for 32 rows x 256 partials on the H200; 2026-12-01), and by several CTAs
//    when there are few rows (channel chunks, not when merging in place).
//  - MergeAttentionKernel: one CTA per row; every thread recomputes the row maximum and weight
//    sum, then owns head_dim / blockDim channels; only for more partials than fit in shared
//    memory.
//  - MergeRowsWarpKernel: one warp per row, for many rows of few partials (a prefill chunk's
//    rows, 3 partials each: 18,432 rows of SmolLM2's 2,048-token chunk took 24 us per layer in
//    MergePartsKernel's one-CTA-per-row shape, ~5x the time to move its bytes; H200, 2026-12-02).
//    Each lane owns head_dim / 32 consecutive channels; every load is issued before any use.
#include "kernels/merge_attention.h"

#include <math_constants.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"
#include "kernels/launch.cuh"
#include "kernels/dtype.h"

namespace kvq::kernels {
namespace {

// o[i] = v, and its conversion into p.o_cast when set.
__device__ __forceinline__ void StoreO(const MergeAttentionParams& p, int64_t i, float v) {
  p.o[i] = v;
  if (p.o_cast == nullptr) return;
  switch (p.o_cast_dtype) {
    case DType::kF32: static_cast<float*>(p.o_cast)[i] = v; break;
    case DType::kF16: static_cast<__half*>(p.o_cast)[i] = internal::FromFloat<__half>(v); break;
    case DType::kBF16:
      static_cast<__nv_bfloat16*>(p.o_cast)[i] = internal::FromFloat<__nv_bfloat16>(v);
      break;
  }
}

// Offset of row's own key or value (MergeAttentionParams::self) in a [seq][kv head][hd] layout.
__device__ __forceinline__ int64_t SelfKvOffset(const SelfKeyPartial& s, int64_t row, int hd,
                                                int64_t seq_stride) {
  const int64_t seq = row / s.n_heads;
  const int h = static_cast<int>(row - seq * s.n_heads);
  return seq * seq_stride + static_cast<int64_t>(h / (s.n_heads / s.n_kv_heads)) * hd;
}

// One thread's share of row's own-key score: sum of q_c k_c over c = c0, c0 + step, ... (the
// caller reduces the shares and multiplies by the scale); *v: the row's own value row.
__device__ __forceinline__ float SelfDotShare(const MergeAttentionParams& p, int64_t row, int c0,
                                              int step, const float** v) {
  const float* qr = p.self.q + row * p.head_dim;
  const float* kr = p.self.k + SelfKvOffset(p.self, row, p.head_dim, p.self.k_seq_stride);
  float d = 0.0f;
  for (int c = c0; c < p.head_dim; c += step) d = fmaf(qr[c], kr[c], d);
  *v = p.self.v + SelfKvOffset(p.self, row, p.head_dim, p.self.v_seq_stride);
  return d;
}

__global__ void MergeAttentionKernel(const MergeAttentionParams p) {
  GridDependencyWait();  // first: see kernels/launch.cuh
  GridDependencyTrigger();
  const int64_t row = blockIdx.x;
  const float* lse_row = p.lse_parts + row * p.lse_row_stride;
  float mx = -CUDART_INF_F;
  for (int r = 0; r < p.n_parts; ++r) mx = fmaxf(mx, lse_row[r * p.lse_part_stride]);
  // The row's own-key partial: every thread sums q . k in the same order (this kernel only runs
  // for more partials than fit in shared memory; one extra dot product per thread is noise).
  float self_lse = -CUDART_INF_F;
  const float* self_v = nullptr;
  if (p.self.q != nullptr) {
    self_lse = SelfDotShare(p, row, 0, 1, &self_v) * p.self.scale;
    mx = fmaxf(mx, self_lse);
  }
  if (mx == -CUDART_INF_F) {  // uniform over the CTA
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) StoreO(p, row * p.head_dim + d, 0.0f);
    __syncthreads();
    if (threadIdx.x == 0) p.lse[row] = -CUDART_INF_F;
    return;
  }
  float sum = 0.0f;
  for (int r = 0; r < p.n_parts; ++r) sum += expf(lse_row[r * p.lse_part_stride] - mx);
  const float w_self = self_v != nullptr ? expf(self_lse - mx) : 0.0f;
  sum += w_self;
  const float inv = 1.0f / sum;
  const float* o_row = p.o_parts + row * p.o_row_stride;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int r = 0; r < p.n_parts; ++r) {
      const float w = expf(lse_row[r * p.lse_part_stride] - mx) * inv;
      if (w != 0.0f) acc = fmaf(w, o_row[r * p.o_part_stride + d], acc);
    }
    if (self_v != nullptr) acc = fmaf(w_self * inv, self_v[d], acc);
    StoreO(p, row * p.head_dim + d, acc);
  }
  __syncthreads();  // every thread has read the lse partials: the output may alias partial 0
  if (threadIdx.x == 0) p.lse[row] = mx + logf(sum);
}

constexpr int kMergeMaxGroups = 64;
constexpr int kMergeMaxSmemParts = 8192;
constexpr int kMergeBatch = 8;         // partials loaded per thread before any is used
constexpr int kMergeSmemFloats = 12288;  // 48 KB of dynamic shared memory

__device__ __forceinline__ float BlockReduce(float v, bool is_max, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  __syncthreads();  // red may still be read by an earlier reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < nw; ++w) v = is_max ? fmaxf(v, red[w]) : v + red[w];
  return v;
}

// Dynamic shared memory: w[n_parts], red[32], sums[groups][chunk_w]. The CTA (row, blockIdx.y)
// writes channels [blockIdx.y * chunk_w, + chunk_w) of the row (every chunk's CTA computes the
// row's weights; chunk 0's writes the lse). Every load the weights do not decide is issued
// before the first reduction: the first round of partials, the lse, the own key's q and k, and
// the own value (a decode step's merge of 9-32 rows x ~20 partials was four dependent DRAM round
// trips, 8 us on the H200, the largest glue kernel of a short-context step; 2026-12-01).
template <int kVec>
__global__ void MergePartsKernel(const MergeAttentionParams p, const int groups, const int chunk_w) {
  GridDependencyWait();  // first: see kernels/launch.cuh
  GridDependencyTrigger();
  extern __shared__ float msm[];
  float* w_s = msm;
  float* red = msm + p.n_parts;
  float* sums = red + 32;
  const int64_t row = blockIdx.x;
  const int d0 = blockIdx.y * chunk_w;
  const bool writes_lse = blockIdx.y == 0;
  const int tid = threadIdx.x, nt = blockDim.x;
  const float* lse_row = p.lse_parts + row * p.lse_row_stride;
  const int ct = chunk_w / kVec;  // channel threads per group
  const int grp = tid / ct, c = (tid % ct) * kVec;  // c: in the chunk
  const float* o_row = p.o_parts + row * p.o_row_stride + d0 + c;
  // kMergeBatch partials per round, all loads issued before any is used (a loop that waited for
  // each load in turn spent ~0.6 us of DRAM latency per partial). Partials of weight 0 (empty
  // splits) are loaded but not added: their o may be anything.
  float x[kMergeBatch][kVec];
  auto load_round = [&](int r0) {
#pragma unroll
    for (int k = 0; k < kMergeBatch; ++k) {
      const int r = r0 + k * groups;
      const float* src = o_row + static_cast<int64_t>(r < p.n_parts ? r : r0) * p.o_part_stride;
      if constexpr (kVec == 4) {
        const float4 v = *reinterpret_cast<const float4*>(src);
        x[k][0] = v.x;
        x[k][1] = v.y;
        x[k][2] = v.z;
        x[k][3] = v.w;
      } else {
        x[k][0] = src[0];
      }
    }
  };
  if (grp < groups) load_round(grp);
  // The row's own-key partial (uniform over the CTA): its score q . k, reduced over the CTA, and
  // this thread's first output channel of its value.
  const float* self_v = nullptr;
  const float self_share = p.self.q != nullptr ? SelfDotShare(p, row, tid, nt, &self_v) : 0.0f;
  const float sv0 = self_v != nullptr && tid < chunk_w ? self_v[d0 + tid] : 0.0f;
  float mx = -CUDART_INF_F;
  for (int r = tid; r < p.n_parts; r += nt) {
    const float l = lse_row[r * p.lse_part_stride];
    w_s[r] = l;
    mx = fmaxf(mx, l);
  }
  const float self_lse = self_v != nullptr ? BlockReduce(self_share, false, red) * p.self.scale : -CUDART_INF_F;
  mx = BlockReduce(fmaxf(mx, self_lse), true, red);  // every lse has been read after this
  if (mx == -CUDART_INF_F) {        // uniform over the CTA
    for (int d = tid; d < chunk_w; d += nt) StoreO(p, row * p.head_dim + d0 + d, 0.0f);
    if (tid == 0 && writes_lse) p.lse[row] = -CUDART_INF_F;
    return;
  }
  float sum = 0.0f;
  for (int r = tid; r < p.n_parts; r += nt) {
    const float e = expf(w_s[r] - mx);
    w_s[r] = e;
    sum += e;
  }
  sum = BlockReduce(sum, false, red);  // also publishes w_s
  const float w_self = self_v != nullptr ? expf(self_lse - mx) : 0.0f;
  sum += w_self;
  const float inv = 1.0f / sum;
  if (grp < groups) {
    float acc[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[i] = 0.0f;
    for (int r0 = grp; r0 < p.n_parts; r0 += groups * kMergeBatch) {
      if (r0 != grp) load_round(r0);
#pragma unroll
      for (int k = 0; k < kMergeBatch; ++k) {
        const int r = r0 + k * groups;
        const float w = r < p.n_parts ? w_s[r] * inv : 0.0f;
        if (w != 0.0f) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[i] = fmaf(w, x[k][i], acc[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) sums[grp * chunk_w + c + i] = acc[i];
  }
  __syncthreads();  // every partial has been read: the output may alias partial 0
  for (int d = tid; d < chunk_w; d += nt) {
    float v = sums[d];
    for (int g = 1; g < groups; ++g) v += sums[g * chunk_w + d];
    if (self_v != nullptr) v = fmaf(w_self * inv, d == tid ? sv0 : self_v[d0 + d], v);
    StoreO(p, row * p.head_dim + d0 + d, v);
  }
  if (tid == 0 && writes_lse) p.lse[row] = mx + logf(sum);
}

constexpr int kRowsMaxParts = 8;    // MergeRowsWarpKernel: partials per row
constexpr int kRowsMinRows = 2048;  // and rows at least (fewer rows: MergePartsKernel's chunks)
constexpr int kRowsWarps = 8;       // rows per CTA

template <int kPer>
__global__ void __launch_bounds__(kRowsWarps * 32) MergeRowsWarpKernel(const MergeAttentionParams p) {
  GridDependencyWait();  // first: see kernels/launch.cuh
  GridDependencyTrigger();
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;  // whole warps
  const int lane = threadIdx.x & 31, n = p.n_parts;
  const float* lse_row = p.lse_parts + row * p.lse_row_stride;
  const float* o_row = p.o_parts + row * p.o_row_stride + lane * kPer;
  float l[kRowsMaxParts], x[kRowsMaxParts][kPer];
#pragma unroll
  for (int r = 0; r < kRowsMaxParts; ++r) {
    if (r < n) l[r] = lse_row[r * p.lse_part_stride];
  }
  // Only partials that hold something are read (a first prefill chunk's rows have one of three:
  // the chunk's own attention; the past's two are empty).
#pragma unroll
  for (int r = 0; r < kRowsMaxParts; ++r) {
    if (r >= n) break;
    if (l[r] == -CUDART_INF_F) {
#pragma unroll
      for (int i = 0; i < kPer; ++i) x[r][i] = 0.0f;
      continue;
    }
    const float* src = o_row + r * p.o_part_stride;
    if constexpr (kPer == 4) {
      const float4 v = *reinterpret_cast<const float4*>(src);
      x[r][0] = v.x;
      x[r][1] = v.y;
      x[r][2] = v.z;
      x[r][3] = v.w;
    } else {
      static_assert(kPer == 2, "MergeRowsWarpKernel: head_dim 64 or 128");
      const float2 v = *reinterpret_cast<const float2*>(src);
      x[r][0] = v.x;
      x[r][1] = v.y;
    }
  }
  float mx = -CUDART_INF_F;
#pragma unroll
  for (int r = 0; r < kRowsMaxParts; ++r) {
    if (r < n) mx = fmaxf(mx, l[r]);
  }
  __syncwarp();  // every lane has read its partials and the lse: the output may alias partial 0
  const int64_t at = row * p.head_dim + lane * kPer;
  if (mx == -CUDART_INF_F) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) StoreO(p, at + i, 0.0f);
    if (lane == 0) p.lse[row] = -CUDART_INF_F;
    return;
  }
  float e[kRowsMaxParts], sum = 0.0f;
#pragma unroll
  for (int r = 0; r < kRowsMaxParts; ++r) {
    if (r >= n) break;
    e[r] = expf(l[r] - mx);
    sum += e[r];
  }
  const float inv = 1.0f / sum;
  float acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.0f;
#pragma unroll
  for (int r = 0; r < kRowsMaxParts; ++r) {
    if (r >= n) break;
    const float w = e[r] * inv;
    if (w != 0.0f) {  // partials of weight 0 (empty) may hold anything
#pragma unroll
      for (int i = 0; i < kPer; ++i) acc[i] = fmaf(w, x[r][i], acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) StoreO(p, at + i, acc[i]);
  if (lane == 0) p.lse[row] = mx + logf(sum);
}

}  // namespace

absl::Status LaunchMergeAttention(const MergeAttentionParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.n_parts < 1 || p.head_dim < 1 || p.head_dim > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchMergeAttention: rows ", p.rows,
                                                   ", n_parts ", p.n_parts, ", head_dim ",
                                                   p.head_dim, " (need n_parts >= 1, head_dim "
                                                   "in [1, 1024])"));
  }
  if (p.rows == 0) return absl::OkStatus();
  if (p.o_parts == nullptr || p.lse_parts == nullptr || p.o == nullptr || p.lse == nullptr) {
    return absl::InvalidArgumentError("LaunchMergeAttention: null pointer");
  }
  if (p.rows > 2147483647) return absl::InvalidArgumentError("LaunchMergeAttention: too many rows");
  if (p.self.q != nullptr) {
    const SelfKeyPartial& sk = p.self;
    if (sk.k == nullptr || sk.v == nullptr || sk.n_heads < 1 || sk.n_kv_heads < 1 ||
        sk.n_heads % sk.n_kv_heads != 0 || p.rows % sk.n_heads != 0 || !(sk.scale > 0.0f)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LaunchMergeAttention: own-key partial needs k and v, n_heads (", sk.n_heads,
          ") a multiple of n_kv_heads (", sk.n_kv_heads, ") dividing rows (", p.rows,
          "), and a positive scale (", sk.scale, ")"));
    }
  }
  const int per = p.head_dim / 32;
  const bool rows_vec = (per == 2 && p.o_row_stride % 2 == 0 && p.o_part_stride % 2 == 0 &&
                         reinterpret_cast<uintptr_t>(p.o_parts) % 8 == 0) ||
                        (per == 4 && p.o_row_stride % 4 == 0 && p.o_part_stride % 4 == 0 &&
                         reinterpret_cast<uintptr_t>(p.o_parts) % 16 == 0);
  if (p.self.q == nullptr && p.rows >= kRowsMinRows && p.n_parts <= kRowsMaxParts && p.head_dim % 32 == 0 &&
      rows_vec) {
    const dim3 grid(static_cast<unsigned>((p.rows + kRowsWarps - 1) / kRowsWarps));
    if (per == 4) {
      KVQ_RETURN_IF_CUDA_ERROR(internal::Launch(MergeRowsWarpKernel<4>, grid, kRowsWarps * 32, 0, stream, p));
    } else {
      KVQ_RETURN_IF_CUDA_ERROR(internal::Launch(MergeRowsWarpKernel<2>, grid, kRowsWarps * 32, 0, stream, p));
    }
  } else if (p.n_parts <= kMergeMaxSmemParts) {
    const bool vec4 = p.head_dim % 4 == 0 && p.o_row_stride % 4 == 0 && p.o_part_stride % 4 == 0 &&
                      reinterpret_cast<uintptr_t>(p.o_parts) % 16 == 0;
    // Channel chunks: few rows with many partials (batch 1 at long contexts: 32 rows x 256 split
    // partials of head dim 128) left one CTA per row on a quarter of the SMs, each reading its
    // row's 128 KB of partials; the fewest chunks of at least 16 channels that make 128 CTAs. Not
    // in place (output aliasing partial 0): a chunk's CTA could then overwrite partial 0's lse
    // while another chunk of the row still reads it.
    const bool in_place = p.o == p.o_parts || p.lse == p.lse_parts;
    int chunks = 1;
    while (vec4 && !in_place && static_cast<int64_t>(p.rows) * chunks < 128 && p.head_dim % (2 * chunks) == 0 &&
           p.head_dim / (2 * chunks) >= 16 && (p.head_dim / (2 * chunks)) % 4 == 0) {
      chunks *= 2;
    }
    const int chunk_w = p.head_dim / chunks;
    const int ct = vec4 ? chunk_w / 4 : chunk_w;
    // Enough groups that each reads at most one batch of kMergeBatch partials (a row's loads all
    // in flight at once), within 1024 threads and 48 KB of shared memory. Few rows with many
    // partials is the case that matters: batch 1 at long contexts leaves few CTAs (at most 8
    // groups, 32 rows x 256 partials of head dim 128 took 12.3 us and 9 rows x 512 partials of
    // head dim 64 took 18.6 us next to 143 / 41 us of attention; H200, 2026-12-01).
    const int smem_groups = static_cast<int>((kMergeSmemFloats - 32 - p.n_parts) / chunk_w);
    const int groups = std::clamp((p.n_parts + kMergeBatch - 1) / kMergeBatch, 1,
                                  std::max(1, std::min({kMergeMaxGroups, 1024 / ct, smem_groups})));
    const int threads = std::min(1024, (groups * ct + 31) / 32 * 32);
    const size_t smem = (static_cast<size_t>(p.n_parts) + 32 + static_cast<size_t>(groups) * chunk_w) * sizeof(float);
    const dim3 grid(p.rows, chunks);
    if (vec4) {
      KVQ_RETURN_IF_CUDA_ERROR(internal::Launch(MergePartsKernel<4>, grid, threads, smem, stream, p, groups, chunk_w));
    } else {
      KVQ_RETURN_IF_CUDA_ERROR(internal::Launch(MergePartsKernel<1>, grid, threads, smem, stream, p, groups, chunk_w));
    }
  } else {
    const int threads = p.head_dim >= 128 ? 128 : 64;
    KVQ_RETURN_IF_CUDA_ERROR(internal::Launch(MergeAttentionKernel, p.rows, threads, 0, stream, p));
  }
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvq::kernels
