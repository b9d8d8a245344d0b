// See engine_ops.h. All memory-bound or tiny; simplicity over peak speed, except that every
// access pattern is coalesced (lanes read consecutive elements).
#include "kernels/engine_ops.h"

#include <math_constants.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"

namespace kvq::kernels {
namespace {

using internal::FromFloat;

constexpr int kThreads = 256;

// Rows of up to kNormCached * kThreads elements keep x and the weight in registers from the one
// pass that loads both (a second pass re-read them after the reduction: two dependent DRAM round
// trips in a 4.3 us kernel, twice per layer of a decode step; H200, 2026-12-01). The sum of
// squares is formed in the same order either way (thread-strided partial sums, warp shuffles,
// warp sums in warp order), which the decode GEMV's RMSNorm input stage repeats bit for bit.
constexpr int kNormCached = 16;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    RmsNormF32Kernel(int dim, float eps, const float* __restrict__ x, const float* __restrict__ w,
                     T* __restrict__ y) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * dim;
  T* yr = y + r * dim;
  const bool cached = dim <= kNormCached * kThreads;
  float xc[kNormCached], wc[kNormCached];
  float ss = 0.0f;
  if (cached) {
#pragma unroll
    for (int e = 0; e < kNormCached; ++e) {
      const int i = threadIdx.x + e * kThreads;
      xc[e] = i < dim ? xr[i] : 0.0f;
      wc[e] = i < dim ? w[i] : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kNormCached; ++e) {
      if (threadIdx.x + e * kThreads < dim) ss = fmaf(xc[e], xc[e], ss);
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += kThreads) ss = fmaf(xr[i], xr[i], ss);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  __shared__ float warp_sums[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
  __syncthreads();
  float t = 0.0f;
  for (int i = 0; i < kThreads / 32; ++i) t += warp_sums[i];
  const float inv_rms = 1.0f / sqrtf(t / static_cast<float>(dim) + eps);
  if (cached) {
#pragma unroll
    for (int e = 0; e < kNormCached; ++e) {
      const int i = threadIdx.x + e * kThreads;
      if (i < dim) yr[i] = FromFloat<T>(xc[e] * inv_rms * wc[e]);
    }
  } else {
    for (int i = threadIdx.x; i < dim; i += kThreads) yr[i] = FromFloat<T>(xr[i] * inv_rms * w[i]);
  }
}

__global__ void AddBiasKernel(int rows, int dim, int64_t stride, float* x, const float* bias) {
  const int64_t total = static_cast<int64_t>(rows) * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / dim;
    const int c = static_cast<int>(i % dim);
    x[r * stride + c] += bias[c];
  }
}

// One warp per (row, head); lane holds elements lane + 32 * e of the head.
template <int kEpl>
__global__ void __launch_bounds__(128) ChunkAttentionKernel(const ChunkAttentionParams p) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= p.rows * p.n_heads) return;
  const int r = warp / p.n_heads, h = warp % p.n_heads;
  const int hk = h / (p.n_heads / p.n_kv_heads);
  const int hd = p.head_dim;
  float q[kEpl], acc[kEpl];
  const float* qr = p.q + (static_cast<int64_t>(r) * p.n_heads + h) * hd;
#pragma unroll
  for (int e = 0; e < kEpl; ++e) {
    q[e] = qr[lane + 32 * e] * p.scale;
    acc[e] = 0.0f;
  }
  float m = -CUDART_INF_F, l = 0.0f;
  const int j_end = r + p.key_offset;
  for (int j = p.row_begin != nullptr ? p.row_begin[r] : 0; j <= j_end; ++j) {
    const int64_t off = (static_cast<int64_t>(j) * p.n_kv_heads + hk) * hd;
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < kEpl; ++e) s = fmaf(q[e], p.k[off + lane + 32 * e], s);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float m_new = fmaxf(m, s);
    const float alpha = expf(m - m_new);  // exp(-inf) = 0 on the first key
    const float w = expf(s - m_new);
    l = l * alpha + w;
#pragma unroll
    for (int e = 0; e < kEpl; ++e) acc[e] = fmaf(acc[e], alpha, w * p.v[off + lane + 32 * e]);
    m = m_new;
  }
  float* orow = p.o + (static_cast<int64_t>(r) * p.n_heads + h) * hd;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
  for (int e = 0; e < kEpl; ++e) orow[lane + 32 * e] = acc[e] * inv;
  if (lane == 0) p.lse[static_cast<int64_t>(r) * p.n_heads + h] = l > 0.0f ? m + logf(l) : -CUDART_INF_F;
}

template <typename T>
__global__ void ConvertKernel(int64_t n, const float* __restrict__ in, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = FromFloat<T>(in[i]);
  }
}

__device__ __forceinline__ uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

template <typename T>
__global__ void FillNormalKernel(int64_t n, uint64_t seed, float mean, float std, T* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t r = SplitMix64(seed * 0x100000001b3ull + static_cast<uint64_t>(i));
    const float u1 = (static_cast<float>(r >> 40) + 1.0f) * (1.0f / 16777217.0f);  // (0, 1]
    const float u2 = static_cast<float>((r >> 16) & 0xffffffu) * (1.0f / 16777216.0f);
    const float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    out[i] = FromFloat<T>(mean + std * z);
  }
}

__global__ void FillKernel(int64_t n, float value, float* x) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = value;
  }
}

__global__ void GatherRowsKernel(int dim, const float* __restrict__ src,
                                 const int32_t* __restrict__ idx, float* __restrict__ dst) {
  const int64_t i = blockIdx.x;
  const float* s = src + static_cast<int64_t>(idx[i]) * dim;
  float* d = dst + i * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) d[c] = s[c];
}

__global__ void InitKvBlocksKernel(const InitKvBlocksParams p) {
  uint8_t* blk = p.pool + static_cast<int64_t>(p.ids[blockIdx.x]) * p.block_stride_bytes;
  uint4* w = reinterpret_cast<uint4*>(blk);
  const int64_t n16 = p.block_stride_bytes / 16;
  for (int64_t i = threadIdx.x; i < n16; i += blockDim.x) w[i] = make_uint4(0, 0, 0, 0);
  if (p.dir_offset < 0) return;
  __syncthreads();
  const int lists = p.n_layers * p.n_kv_heads;
  const uint32_t hw = static_cast<uint32_t>(p.key_outlier_header_words);
  uint32_t* var = reinterpret_cast<uint32_t*>(blk + p.fixed_bytes);
  for (int i = threadIdx.x; i < lists; i += blockDim.x) {
    const int l = i / p.n_kv_heads, h = i % p.n_kv_heads;
    uint32_t* dir = reinterpret_cast<uint32_t*>(blk + l * p.layer_bytes + p.dir_offset) + 2 * h;
    // Growable lists start empty with no region; fixed ones at their reservation.
    dir[0] = hw > 0 ? hw : static_cast<uint32_t>(i) * static_cast<uint32_t>(p.key_outlier_capacity);
    dir[1] = 0;
  }
  if (hw > 0 && threadIdx.x == 0) var[0] = hw;
}

unsigned GridFor(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}

}  // namespace

absl::Status LaunchRmsNormF32(int rows, int dim, float eps, const float* x, const float* weight,
                              void* y, DType y_dtype, cudaStream_t stream) {
  if (rows < 0 || dim <= 0) return absl::InvalidArgumentError(absl::StrCat("RmsNormF32: rows ", rows, ", dim ", dim));
  if (rows == 0) return absl::OkStatus();
  switch (y_dtype) {
    case DType::kF32:
      RmsNormF32Kernel<float><<<rows, kThreads, 0, stream>>>(dim, eps, x, weight, static_cast<float*>(y));
      break;
    case DType::kF16:
      RmsNormF32Kernel<__half><<<rows, kThreads, 0, stream>>>(dim, eps, x, weight, static_cast<__half*>(y));
      break;
    case DType::kBF16:
      RmsNormF32Kernel<__nv_bfloat16><<<rows, kThreads, 0, stream>>>(dim, eps, x, weight,
                                                                      static_cast<__nv_bfloat16*>(y));
      break;
  }
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchAddBias(int rows, int dim, int64_t stride, float* x, const float* bias,
                           cudaStream_t stream) {
  if (rows == 0 || dim == 0) return absl::OkStatus();
  AddBiasKernel<<<GridFor(static_cast<int64_t>(rows) * dim, kThreads), kThreads, 0, stream>>>(rows, dim, stride, x, bias);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchChunkAttention(const ChunkAttentionParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0 ||
      p.head_dim % 32 != 0 || p.head_dim > 256 || p.head_dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("ChunkAttention: heads ", p.n_heads, "/",
                                                   p.n_kv_heads, ", head_dim ", p.head_dim));
  }
  if (p.rows == 0) return absl::OkStatus();
  const int64_t warps = static_cast<int64_t>(p.rows) * p.n_heads;
  const unsigned grid = static_cast<unsigned>((warps + 3) / 4);
  switch (p.head_dim / 32) {
    case 1: ChunkAttentionKernel<1><<<grid, 128, 0, stream>>>(p); break;
    case 2: ChunkAttentionKernel<2><<<grid, 128, 0, stream>>>(p); break;
    case 4: ChunkAttentionKernel<4><<<grid, 128, 0, stream>>>(p); break;
    case 8: ChunkAttentionKernel<8><<<grid, 128, 0, stream>>>(p); break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("ChunkAttention: head_dim ", p.head_dim,
                                                     " (32, 64, 128 or 256)"));
  }
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchConvertF32(int64_t n, const float* in, void* out, DType out_dtype,
                              cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  const unsigned g = GridFor(n, kThreads);
  switch (out_dtype) {
    case DType::kF32: ConvertKernel<float><<<g, kThreads, 0, stream>>>(n, in, static_cast<float*>(out)); break;
    case DType::kF16: ConvertKernel<__half><<<g, kThreads, 0, stream>>>(n, in, static_cast<__half*>(out)); break;
    case DType::kBF16:
      ConvertKernel<__nv_bfloat16><<<g, kThreads, 0, stream>>>(n, in, static_cast<__nv_bfloat16*>(out));
      break;
  }
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchFillNormal(int64_t n, uint64_t seed, float mean, float std, void* out, DType dtype,
                              cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  const unsigned g = GridFor(n, kThreads);
  switch (dtype) {
    case DType::kF32: FillNormalKernel<float><<<g, kThreads, 0, stream>>>(n, seed, mean, std, static_cast<float*>(out)); break;
    case DType::kF16: FillNormalKernel<__half><<<g, kThreads, 0, stream>>>(n, seed, mean, std, static_cast<__half*>(out)); break;
    case DType::kBF16:
      FillNormalKernel<__nv_bfloat16><<<g, kThreads, 0, stream>>>(n, seed, mean, std, static_cast<__nv_bfloat16*>(out));
      break;
  }
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchFillF32(int64_t n, float value, float* x, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  FillKernel<<<GridFor(n, kThreads), kThreads, 0, stream>>>(n, value, x);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchGatherRows(int n, int dim, const float* src, const int32_t* idx, float* dst,
                              cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  GatherRowsKernel<<<n, 256, 0, stream>>>(dim, src, idx, dst);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchInitKvBlocks(const InitKvBlocksParams& p, cudaStream_t stream) {
  if (p.n == 0) return absl::OkStatus();
  if (p.block_stride_bytes % 16 != 0) {
    return absl::InvalidArgumentError("InitKvBlocks: block stride must be a multiple of 16");
  }
  InitKvBlocksKernel<<<p.n, 256, 0, stream>>>(p);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvq::kernels
