// Sampling kernel (math in sampling.h). One CTA of kThreads per sequence; every pass over the
// vocabulary recomputes e_i = exp((l_i - max) / T) (no scratch memory). Threads own contiguous
// id ranges so that the final prefix walk is in id order and deterministic.
#include "kernels/sampling.h"

#include <math_constants.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"
#include "kernels/philox.h"

namespace kvq::kernels {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op, T* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();  // scratch may still be read by a previous reduction
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
  return r;
}

struct Sum {
  template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinI {
  __device__ int operator()(int a, int b) const { return a < b ? a : b; }
};
struct MaxI {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

__global__ void __launch_bounds__(kThreads) SamplingKernel(const SamplingParams p) {
  __shared__ float fscratch[kWarps];
  __shared__ int iscratch[kWarps];
  __shared__ float scan_s[kWarps];
  const int b = blockIdx.x;
  const int64_t stride = p.logits_row_stride > 0 ? p.logits_row_stride : p.vocab;
  const float* lg = p.logits + b * stride;
  const int V = p.vocab;
  const int chunk = (V + kThreads - 1) / kThreads;
  const int i0 = min(V, static_cast<int>(threadIdx.x) * chunk), i1 = min(V, i0 + chunk);

  float mx = -CUDART_INF_F;
  for (int i = i0; i < i1; ++i) mx = fmaxf(mx, lg[i]);
  mx = BlockReduce(mx, Max(), fscratch);
  const float temp = p.temperature[b];
  if (!(temp > 0.0f)) {  // greedy: lowest id among the maxima
    int best = V;
    for (int i = i0; i < i1; ++i) {
      if (lg[i] == mx) { best = i; break; }
    }
    best = BlockReduce(best, MinI(), iscratch);
    if (threadIdx.x == 0) p.tokens[b] = best < V ? best : 0;
    return;
  }
  const float inv_t = 1.0f / temp;
  auto e_of = [&](int i) { return expf((lg[i] - mx) * inv_t); };
  auto count_ge = [&](float tau) {
    int c = 0;
    for (int i = i0; i < i1; ++i) c += e_of(i) >= tau ? 1 : 0;
    return BlockReduce(c, Sum(), iscratch);
  };
  auto mass_ge = [&](float tau) {
    float s = 0.0f;
    for (int i = i0; i < i1; ++i) {
      const float e = e_of(i);
      s += e >= tau ? e : 0.0f;
    }
    return BlockReduce(s, Sum(), fscratch);
  };

  float tau = 0.0f;
  const int k = p.top_k != nullptr ? p.top_k[b] : 0;
  if (k > 0 && k < V) {
    uint32_t lo = 0, hi = 0x3f800001u;  // count(e >= 0) = V >= k; count(e > 1) = 0 < k
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (count_ge(__uint_as_float(mid)) >= k) lo = mid; else hi = mid;
    }
    tau = __uint_as_float(lo);
  }
  const float top_p = p.top_p != nullptr ? p.top_p[b] : 1.0f;
  if (top_p < 1.0f) {
    const float target = top_p * mass_ge(tau);
    uint32_t lo = __float_as_uint(tau), hi = 0x3f800001u;
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (mass_ge(__uint_as_float(mid)) >= target) lo = mid; else hi = mid;
    }
    tau = __uint_as_float(lo);
  }
  const float min_p = p.min_p != nullptr ? p.min_p[b] : 0.0f;
  tau = fmaxf(tau, min_p);

  // Prefix walk in id order over the kept tokens.
  float mine = 0.0f;
  int last_kept = -1;
  for (int i = i0; i < i1; ++i) {
    const float e = e_of(i);
    if (e >= tau) { mine += e; last_kept = i; }
  }
  // Exclusive scan of the per-thread masses: warp scan, then warp totals.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float incl = mine;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float t = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += t;
  }
  if (lane == 31) scan_s[warp] = incl;
  __syncthreads();
  float warp_base = 0.0f, total = 0.0f;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) warp_base += scan_s[w];
    total += scan_s[w];
  }
  const float excl = warp_base + incl - mine;
  const float target = SamplingUniform(p.seed[b], p.step[b]) * total;
  int found = V;
  if (mine > 0.0f && excl <= target && target < excl + mine) {
    float run = excl;
    for (int i = i0; i < i1; ++i) {
      const float e = e_of(i);
      if (e >= tau) {
        run += e;
        if (run > target) { found = i; break; }
      }
    }
    if (found == V) found = last_kept;  // rounding at the end of this thread's range
  }
  found = BlockReduce(found, MinI(), iscratch);
  const int last = BlockReduce(last_kept, MaxI(), iscratch);
  if (threadIdx.x == 0) p.tokens[b] = found < V ? found : max(last, 0);
}

// Argmax: per thread the best (value, id) of its loads, then the CTA's; "better" is a larger
// value, or the same value at a lower id (NaN compares false both ways and is never taken).
constexpr int kArgmaxThreads = 1024;
constexpr int kArgmaxInFlight = 8;  // 16-byte loads per thread per round (latency, not bandwidth)

__device__ __forceinline__ void ArgmaxTake(float v, int i, float& bv, int& bi) {
  if (v > bv || (v == bv && i < bi)) {
    bv = v;
    bi = i;
  }
}

__global__ void __launch_bounds__(kArgmaxThreads)
    ArgmaxRowsKernel(int vocab, const float* __restrict__ logits, int64_t stride, bool wide, int32_t* tokens) {
  __shared__ float sv[kArgmaxThreads / 32];
  __shared__ int si[kArgmaxThreads / 32];
  const float* row = logits + blockIdx.x * stride;
  float bv = -CUDART_INF_F;
  int bi = vocab;  // nothing taken yet
  if (wide) {
    const float4* row4 = reinterpret_cast<const float4*>(row);
    const int n4 = vocab / 4;
    for (int base = threadIdx.x; base < n4; base += kArgmaxThreads * kArgmaxInFlight) {
      float4 x[kArgmaxInFlight];
#pragma unroll
      for (int u = 0; u < kArgmaxInFlight; ++u) {
        const int i = base + u * kArgmaxThreads;
        x[u] = i < n4 ? __ldg(row4 + i) : make_float4(CUDART_NAN_F, CUDART_NAN_F, CUDART_NAN_F, CUDART_NAN_F);
      }
#pragma unroll
      for (int u = 0; u < kArgmaxInFlight; ++u) {
        const int i = 4 * (base + u * kArgmaxThreads);
        ArgmaxTake(x[u].x, i, bv, bi);
        ArgmaxTake(x[u].y, i + 1, bv, bi);
        ArgmaxTake(x[u].z, i + 2, bv, bi);
        ArgmaxTake(x[u].w, i + 3, bv, bi);
      }
    }
    for (int i = 4 * n4 + static_cast<int>(threadIdx.x); i < vocab; i += kArgmaxThreads) ArgmaxTake(row[i], i, bv, bi);
  } else {
    for (int i = threadIdx.x; i < vocab; i += kArgmaxThreads) ArgmaxTake(__ldg(row + i), i, bv, bi);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
    ArgmaxTake(ov, oi, bv, bi);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = sv[lane];
    bi = si[lane];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      ArgmaxTake(ov, oi, bv, bi);
    }
    if (lane == 0) tokens[blockIdx.x] = bi < vocab ? bi : 0;
  }
}

}  // namespace

absl::Status LaunchArgmaxRows(int rows, int vocab, const float* logits, int64_t row_stride, int32_t* tokens,
                              cudaStream_t stream) {
  const int64_t stride = row_stride > 0 ? row_stride : vocab;
  if (rows < 0 || vocab <= 0 || stride < vocab) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchArgmaxRows: rows ", rows, ", vocab ", vocab, ", row stride ", row_stride));
  }
  if (rows == 0) return absl::OkStatus();
  if (logits == nullptr || tokens == nullptr) return absl::InvalidArgumentError("LaunchArgmaxRows: null logits/tokens");
  const bool wide = stride % 4 == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  ArgmaxRowsKernel<<<rows, kArgmaxThreads, 0, stream>>>(vocab, logits, stride, wide, tokens);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchSampling(const SamplingParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.vocab <= 0 || (p.logits_row_stride != 0 && p.logits_row_stride < p.vocab)) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchSampling: batch ", p.batch, ", vocab ",
                                                   p.vocab, ", row stride ", p.logits_row_stride));
  }
  if (p.batch == 0) return absl::OkStatus();
  if (p.logits == nullptr || p.temperature == nullptr || p.seed == nullptr ||
      p.step == nullptr || p.tokens == nullptr) {
    return absl::InvalidArgumentError("LaunchSampling: null logits/temperature/seed/step/tokens");
  }
  SamplingKernel<<<p.batch, kThreads, 0, stream>>>(p);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvq::kernels
