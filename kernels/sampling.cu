// Sampling kernel (math in sampling.h). One CTA of kThreads per sequence; every pass over the
// vocabulary recomputes e_i = exp((l_i - max) / T) (no scratch memory). Threads own contiguous
// id ranges so that the final prefix walk is in id order and deterministic.
#include "kernels/sampling.h"

#include <math_constants.h>

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

}  // namespace

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
