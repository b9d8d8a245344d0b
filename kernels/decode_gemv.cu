// See decode_gemv.h.
#include "kernels/decode_gemv.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"
#include "kernels/rope_device.cuh"

namespace kvq::kernels {
namespace {

using internal::FromFloat;
using internal::ToFloat;
using internal::ToFloat8;

// 256 threads: also LaunchRmsNormF32's block, whose reduction order the kRmsNorm input repeats
// (strided fmaf per thread, xor shuffles, warp sums added in warp order) for the same bits.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 4;                 // output columns per warp
// Staged inputs per CTA: with the static shared memory (slice sums, norm partials) under the 48 KB
// a launch may use without opting in (48 KB of staging failed to launch at 4 and 8 rows; H200).
constexpr int kStageBytes = 40 * 1024;


// The segment of column n, and its first column.
__device__ __forceinline__ int SegmentOf(const DecodeGemvParams& p, int n, int* start) {
  int s = 0;
  *start = 0;
  while (s + 1 < p.n_segs && n >= p.seg[s].n_end) {
    *start = p.seg[s].n_end;
    ++s;
  }
  return s;
}

// Output column (and weight row) of slot u, the (u % 4)-th column of a warp: itself, or in a
// rotated segment the pairs (2j, 2j + 1) and (half + 2j, half + 2j + 1) of one head for the
// slots 4j .. 4j + 3 of that head, so that a warp holds both halves of its rotate-half pairs.
__device__ __forceinline__ int SlotColumn(const DecodeGemvParams& p, int u) {
  int start = 0;
  const int s = SegmentOf(p, u, &start);
  if (p.seg[s].rot == nullptr) return u;
  const int hd = p.rope_head_dim, r = (u - start) % hd;
  return u - r + ((r & 3) >> 1) * (hd / 2) + 2 * (r >> 2) + (r & 1);
}

// Column n of row m, v its sum; partner: the sum of the column it forms a rotate-half pair with
// (rotated segments).
template <typename T>
__device__ __forceinline__ void StoreOut(const DecodeGemvParams& p, int m, int n, float v, float partner) {
  int start = 0;
  const GemvSegment& g = p.seg[SegmentOf(p, n, &start)];
  const int64_t col = n - start;
  if (g.c != nullptr) {
    const int64_t at = m * g.ldc + col;
    if (p.c_dtype == DType::kF32) {
      float* c = static_cast<float*>(g.c) + at;
      *c = p.beta != 0.0f ? *c + v : v;
    } else {
      static_cast<T*>(g.c)[at] = FromFloat<T>(v);
    }
  }
  if (g.rot != nullptr) {
    const int half = p.rope_head_dim / 2, r = static_cast<int>(col % p.rope_head_dim);
    const bool hi = r >= half;
    float lo_out, hi_out;
    RopeRotatePair(hi ? partner : v, hi ? v : partner, p.rope_positions[m], p.rope_inv_freq[hi ? r - half : r],
                   &lo_out, &hi_out);
    g.rot[m * g.ld_rot + col] = hi ? hi_out : lo_out;
  }
}

// ksplit (1, 2, 4 or 8) warps share a column group, each summing every ksplit-th 256-element
// slice of K; their sums are added in slice order (more CTAs for few columns, same bits for the
// same shape and split).
template <typename T, GemvInput kIn, int kM>
__global__ void __launch_bounds__(kThreads)
    DecodeGemvKernel(const DecodeGemvParams p, const int kc, const int ksplit) {
  extern __shared__ __align__(16) uint8_t gemv_smem[];
  T* a_s = reinterpret_cast<T*>(gemv_smem);  // [kM][kc]
  __shared__ float red[kM][kWarps];
  __shared__ float inv_rms[kM];
  __shared__ float slice_sums[kWarps][kM][kCols];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = warp / ksplit, slice = warp % ksplit;
  const int K = p.k, N = p.n, rows = p.m;
  const int64_t lda = p.lda > 0 ? p.lda : (kIn == GemvInput::kSwiGlu ? 2 * static_cast<int64_t>(K) : K);

  if constexpr (kIn == GemvInput::kRmsNorm) {
    const float* x = static_cast<const float*>(p.a);
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      float ss = 0.0f;
      if (m < rows) {
        for (int i = tid; i < K; i += kThreads) ss = fmaf(x[m * lda + i], x[m * lda + i], ss);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
      if (lane == 0) red[m][warp] = ss;
    }
    __syncthreads();
    if (tid < rows) {
      float t = 0.0f;
      for (int i = 0; i < kWarps; ++i) t += red[tid][i];
      inv_rms[tid] = 1.0f / sqrtf(t / static_cast<float>(K) + p.eps);
    }
    __syncthreads();
  }

  const int col0 = (blockIdx.x * (kWarps / ksplit) + group) * kCols;  // the warp's first slot
  const T* W = static_cast<const T*>(p.w);
  int wrow[kCols];  // weight rows of the warp's slots (-1 past n)
#pragma unroll
  for (int c = 0; c < kCols; ++c) wrow[c] = col0 + c < N ? SlotColumn(p, col0 + c) : -1;
  float acc[kM][kCols];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[m][c] = 0.0f;
  }
  for (int k0 = 0; k0 < K; k0 += kc) {
    const int kn = min(kc, K - k0);
    if (k0 > 0) __syncthreads();  // every warp is done with the previous chunk
    // Stage a(m, k0 .. k0 + kn) (rows past p.m as zeros).
    for (int i = tid; i < kM * kn; i += kThreads) {
      const int m = i / kn, kk = i - m * kn;
      T v = FromFloat<T>(0.0f);
      if (m < rows) {
        const int64_t k = k0 + kk;
        if constexpr (kIn == GemvInput::kPlain) {
          v = static_cast<const T*>(p.a)[m * lda + k];
        } else if constexpr (kIn == GemvInput::kRmsNorm) {
          v = FromFloat<T>(static_cast<const float*>(p.a)[m * lda + k] * inv_rms[m] * p.norm_weight[k]);
        } else {
          const T* g_row = static_cast<const T*>(p.a) + m * lda;
          const float g = ToFloat(g_row[k]), u = ToFloat(g_row[K + k]);
          v = FromFloat<T>(g / (1.0f + expf(-g)) * u);
        }
      }
      a_s[m * kc + kk] = v;
    }
    __syncthreads();
    // 16-byte pieces of the warp's weight rows, against every row's staged input.
#pragma unroll 2
    for (int kk = (slice * 32 + lane) * 8; kk < kn; kk += ksplit * 32 * 8) {
      uint4 wv[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        wv[c] = wrow[c] >= 0 ? __ldg(reinterpret_cast<const uint4*>(W + static_cast<int64_t>(wrow[c]) * K + k0 + kk))
                             : make_uint4(0u, 0u, 0u, 0u);
      }
      float wf[kCols][8];
#pragma unroll
      for (int c = 0; c < kCols; ++c) ToFloat8<T>(wv[c], wf[c]);
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        if (m < rows) {
          float af[8];
          ToFloat8<T>(*reinterpret_cast<const uint4*>(a_s + m * kc + kk), af);
#pragma unroll
          for (int c = 0; c < kCols; ++c) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m][c] = fmaf(af[e], wf[c][e], acc[m][c]);
          }
        }
      }
    }
  }
  // Sums over the lanes (every lane gets all), then over the group's slices in order; lane
  // m * kCols + c of the group's first warp writes (m, c).
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[m][c] += __shfl_xor_sync(0xffffffffu, acc[m][c], off);
    }
  }
  if (ksplit > 1) {  // uniform
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < kM; ++m) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) slice_sums[warp][m][c] = acc[m][c];
      }
    }
    __syncthreads();
    if (slice != 0) return;
#pragma unroll
    for (int m = 0; m < kM; ++m) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        float t = slice_sums[warp][m][c];
        for (int j = 1; j < ksplit; ++j) t += slice_sums[warp + j][m][c];
        acc[m][c] = t;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      if (lane == m * kCols + c && m < rows && wrow[c] >= 0) StoreOut<T>(p, m, wrow[c], acc[m][c], acc[m][c ^ 2]);
    }
  }
}

template <typename T, GemvInput kIn>
void LaunchRows(const DecodeGemvParams& p, int ksplit, cudaStream_t stream) {
  const int cols = kWarps / ksplit * kCols;
  const int blocks = (p.n + cols - 1) / cols;
  auto go = [&]<int kM>() {
    const int kc = std::min(p.k, kStageBytes / (kM * static_cast<int>(sizeof(T))) / 8 * 8);
    const size_t smem = static_cast<size_t>(kM) * kc * sizeof(T);
    DecodeGemvKernel<T, kIn, kM><<<blocks, kThreads, smem, stream>>>(p, kc, ksplit);
  };
  if (p.m <= 1) {
    go.template operator()<1>();
  } else if (p.m <= 4) {
    go.template operator()<4>();
  } else {
    go.template operator()<8>();
  }
}

template <typename T>
void LaunchTyped(const DecodeGemvParams& p, int ksplit, cudaStream_t stream) {
  switch (p.input) {
    case GemvInput::kPlain: LaunchRows<T, GemvInput::kPlain>(p, ksplit, stream); break;
    case GemvInput::kRmsNorm: LaunchRows<T, GemvInput::kRmsNorm>(p, ksplit, stream); break;
    case GemvInput::kSwiGlu: LaunchRows<T, GemvInput::kSwiGlu>(p, ksplit, stream); break;
  }
}

}  // namespace

absl::Status LaunchDecodeGemv(const DecodeGemvParams& p, cudaStream_t stream) {
  auto bad = [](auto&&... args) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchDecodeGemv: ", args...));
  };
  if (p.m < 1 || p.m > kDecodeGemvMaxRows) return bad("rows ", p.m, " outside [1, ", kDecodeGemvMaxRows, "]");
  if (p.n < 1 || p.k < 8 || p.k % 8 != 0) return bad("n ", p.n, ", k ", p.k, " (k a positive multiple of 8)");
  if (p.w_dtype != DType::kF16 && p.w_dtype != DType::kBF16) {
    return bad("weights in ", DTypeName(p.w_dtype), " (f16 or bf16)");
  }
  if (p.w == nullptr || p.a == nullptr || reinterpret_cast<uintptr_t>(p.w) % 16 != 0) {
    return bad("null input or weight, or weight not 16-byte aligned");
  }
  const int64_t need_lda = p.input == GemvInput::kSwiGlu ? 2 * static_cast<int64_t>(p.k) : p.k;
  if (p.lda != 0 && p.lda < need_lda) return bad("lda ", p.lda, " < ", need_lda);
  if (p.input == GemvInput::kRmsNorm && (p.norm_weight == nullptr || !(p.eps >= 0.0f))) {
    return bad("RMSNorm input needs its weight and eps >= 0");
  }
  if (p.c_dtype != DType::kF32 && p.c_dtype != p.w_dtype) {
    return bad("output in ", DTypeName(p.c_dtype), " (f32 or the weight dtype)");
  }
  if ((p.beta != 0.0f && p.beta != 1.0f) || (p.beta != 0.0f && p.c_dtype != DType::kF32)) {
    return bad("beta ", p.beta, " (0, or 1 with an f32 output)");
  }
  if (p.n_segs < 1 || p.n_segs > 3) return bad("n_segs ", p.n_segs);
  int start = 0;
  for (int s = 0; s < p.n_segs; ++s) {
    const GemvSegment& g = p.seg[s];
    if ((g.c == nullptr && g.rot == nullptr) || g.n_end <= start || (g.c != nullptr && g.ldc < g.n_end - start)) {
      return bad("segment ", s, ": columns [", start, ", ", g.n_end, "), ldc ", g.ldc);
    }
    start = g.n_end;
  }
  if (start != p.n) return bad("segments end at column ", start, ", n is ", p.n);
  start = 0;
  for (int s = 0; s < p.n_segs; ++s) {
    const GemvSegment& g = p.seg[s];
    const int width = g.n_end - start;
    if (g.rot != nullptr) {
      const int hd = p.rope_head_dim;
      if (p.rope_positions == nullptr || p.rope_inv_freq == nullptr || hd < 4 || hd % 4 != 0 ||
          start % hd != 0 || width % hd != 0 || g.ld_rot < width || p.c_dtype != DType::kF32 || p.beta != 0.0f) {
        return bad("rotated segment ", s, ": columns [", start, ", ", g.n_end, "), head dim ", hd,
                   " (a multiple of 4 dividing start and width; positions, inv_freq, f32 output, beta 0)");
      }
    }
    start = g.n_end;
  }
  // K split over up to 8 warps per column group while the CTAs would not fill two waves of the
  // GPU (one CTA per 32 columns reads a small matrix from a few SMs), each slice at least 256
  // elements.
  int dev = 0, sms = 132;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    sms = 132;
  }
  int ksplit = 1;
  while (ksplit < kWarps && (p.n + kWarps / ksplit * kCols - 1) / (kWarps / ksplit * kCols) < 2 * sms &&
         256 * 2 * ksplit <= p.k) {
    ksplit *= 2;
  }
  if (p.w_dtype == DType::kF16) {
    LaunchTyped<__half>(p, ksplit, stream);
  } else {
    LaunchTyped<__nv_bfloat16>(p, ksplit, stream);
  }
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvq::kernels
