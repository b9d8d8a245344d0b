// Dense-layer glue kernels (see dense_ops.h). All memory-bound and simple:
//   RmsNorm      one CTA per row, fp32 sum of squares (warp shuffles + shared memory), then scale.
//   RopeQuery    one thread per (row, head, pair); angle in double (positions up to 10M+).
//   SwiGlu       grid-stride elementwise, silu in fp32.
//   Embedding    one CTA per row, copy with conversion.
//   ResidualAdd  grid-stride elementwise.
// Variants: the dtype of activations (f32, f16, bf16) through explicit switches.
#include "kernels/dense_ops.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda_check.h"
#include "kernels/dtype.h"
#include "kernels/launch.cuh"
#include "kernels/rope_device.cuh"

namespace kvq::kernels {
namespace {

using internal::DTypeTraits;
using internal::FromFloat;
using internal::ToFloat;

constexpr int kNormThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kNormThreads) RmsNormKernel(const RmsNormParams p) {
  GridDependencyWait();
  GridDependencyTrigger();
  const int64_t r = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + r * p.dim;
  const T* w = static_cast<const T*>(p.weight);
  T* y = static_cast<T*>(p.y) + r * p.dim;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < p.dim; i += kNormThreads) {
    const float v = ToFloat(x[i]);
    ss = fmaf(v, v, ss);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  __shared__ float warp_sums[kNormThreads / 32];
  __shared__ float inv_rms;
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.0f;
    for (int i = 0; i < kNormThreads / 32; ++i) t += warp_sums[i];
    inv_rms = 1.0f / sqrtf(t / static_cast<float>(p.dim) + p.eps);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.dim; i += kNormThreads) {
    y[i] = FromFloat<T>(ToFloat(x[i]) * inv_rms * ToFloat(w[i]));
  }
}

__global__ void RopeQueryKernel(const RopeQueryParams p) {
  GridDependencyWait();
  GridDependencyTrigger();
  const int half = p.head_dim / 2;
  const int64_t total_q = static_cast<int64_t>(p.rows) * p.n_heads * half;
  const int64_t total = total_q + (p.k != nullptr ? static_cast<int64_t>(p.rows) * p.k_heads * half : 0);
  for (int64_t at = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; at < total;
       at += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool is_q = at < total_q;  // else an element of the second set (k)
    const int64_t idx = is_q ? at : at - total_q;
    const int heads = is_q ? p.n_heads : p.k_heads;
    const int i = static_cast<int>(idx % half);
    const int64_t rh = idx / half;  // row * heads + head
    const int64_t row = rh / heads;
    const float* src = is_q ? p.q : p.k;
    float* dst = is_q ? (p.out != nullptr ? p.out : p.q) : (p.k_out != nullptr ? p.k_out : const_cast<float*>(p.k));
    const float* v = src + (p.in_row_stride > 0 ? row * p.in_row_stride + (rh - row * heads) * p.head_dim
                                                : rh * p.head_dim);
    float* w = dst + rh * p.head_dim;
    float lo, hi;
    RopeRotatePair(v[i], v[i + half], p.positions[row], p.inv_freq[i], &lo, &hi);
    w[i] = lo;
    w[i + half] = hi;
  }
}

template <typename T>
__global__ void SwiGluKernel(const SwiGluParams p) {
  GridDependencyWait();
  GridDependencyTrigger();
  const int64_t total = static_cast<int64_t>(p.rows) * p.dim;
  const int64_t stride = p.in_row_stride > 0 ? p.in_row_stride : p.dim;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / p.dim, i = idx % p.dim;
    const float g = ToFloat(static_cast<const T*>(p.gate)[r * stride + i]);
    const float u = ToFloat(static_cast<const T*>(p.up)[r * stride + i]);
    static_cast<T*>(p.out)[idx] = FromFloat<T>(g / (1.0f + expf(-g)) * u);
  }
}

template <typename TT, typename TO>
__global__ void EmbeddingKernel(const EmbeddingParams p) {
  GridDependencyWait();
  GridDependencyTrigger();
  const int64_t r = blockIdx.x;
  const int id = p.ids[r];
  TO* out = static_cast<TO*>(p.out) + r * p.dim;
  const bool ok = id >= 0 && id < p.vocab;
  const TT* row = static_cast<const TT*>(p.table) + (ok ? static_cast<int64_t>(id) * p.dim : 0);
  for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
    out[i] = FromFloat<TO>(ok ? ToFloat(row[i]) : 0.0f);
  }
}

template <typename TX, typename TY>
__global__ void ResidualAddKernel(const ResidualAddParams p) {
  GridDependencyWait();
  GridDependencyTrigger();
  TX* x = static_cast<TX*>(p.x);
  const TY* y = static_cast<const TY*>(p.y);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] = FromFloat<TX>(ToFloat(x[i]) + ToFloat(y[i]));
  }
}

int GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535LL * 16));
}

// Calls f.template operator()<T>() with the C++ type of dtype.
template <typename F>
absl::Status WithType(DType t, F&& f) {
  switch (t) {
    case DType::kF32: f.template operator()<float>(); return absl::OkStatus();
    case DType::kF16: f.template operator()<__half>(); return absl::OkStatus();
    case DType::kBF16: f.template operator()<__nv_bfloat16>(); return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", static_cast<int>(t)));
}

}  // namespace

absl::Status LaunchRmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.dim <= 0 || !(p.eps >= 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchRmsNorm: rows ", p.rows, ", dim ", p.dim, ", eps ", p.eps));
  }
  if (p.rows == 0) return absl::OkStatus();
  if (p.x == nullptr || p.weight == nullptr || p.y == nullptr) {
    return absl::InvalidArgumentError("LaunchRmsNorm: null pointer");
  }
  cudaError_t err = cudaSuccess;
  KVQ_RETURN_IF_ERROR(WithType(p.dtype, [&]<typename T>() {
    err = internal::Launch(RmsNormKernel<T>, p.rows, kNormThreads, 0, stream, p);
  }));
  KVQ_RETURN_IF_CUDA_ERROR(err);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchRopeQuery(const RopeQueryParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.n_heads <= 0 || p.head_dim <= 0 || p.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchRopeQuery: rows ", p.rows, ", n_heads ",
                                                   p.n_heads, ", head_dim ", p.head_dim));
  }
  if (p.rows == 0) return absl::OkStatus();
  if (p.q == nullptr || p.positions == nullptr || p.inv_freq == nullptr) {
    return absl::InvalidArgumentError("LaunchRopeQuery: null pointer");
  }
  if (p.k != nullptr && p.k_heads <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchRopeQuery: k_heads ", p.k_heads, " with k set"));
  }
  if (p.in_row_stride != 0) {
    const int64_t widest = static_cast<int64_t>(std::max(p.n_heads, p.k != nullptr ? p.k_heads : 0)) * p.head_dim;
    if (p.in_row_stride < widest || p.out == nullptr || (p.k != nullptr && p.k_out == nullptr)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LaunchRopeQuery: in_row_stride ", p.in_row_stride, " needs to be >= ", widest,
          " and the rotated rows to go to out (and k_out)"));
    }
  }
  const int64_t n = static_cast<int64_t>(p.rows) * (p.n_heads + (p.k != nullptr ? p.k_heads : 0)) * (p.head_dim / 2);
  KVQ_RETURN_IF_CUDA_ERROR(internal::Launch(RopeQueryKernel, GridFor(n, 256), 256, 0, stream, p));
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchSwiGlu(const SwiGluParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.dim <= 0 || (p.in_row_stride != 0 && p.in_row_stride < p.dim)) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchSwiGlu: rows ", p.rows, ", dim ", p.dim,
                                                   ", in_row_stride ", p.in_row_stride));
  }
  if (p.rows == 0) return absl::OkStatus();
  if (p.gate == nullptr || p.up == nullptr || p.out == nullptr) {
    return absl::InvalidArgumentError("LaunchSwiGlu: null pointer");
  }
  const int grid = GridFor(static_cast<int64_t>(p.rows) * p.dim, 256);
  cudaError_t err = cudaSuccess;
  KVQ_RETURN_IF_ERROR(WithType(p.dtype, [&]<typename T>() {
    err = internal::Launch(SwiGluKernel<T>, grid, 256, 0, stream, p);
  }));
  KVQ_RETURN_IF_CUDA_ERROR(err);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchEmbedding(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.dim <= 0 || p.vocab <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchEmbedding: rows ", p.rows, ", dim ",
                                                   p.dim, ", vocab ", p.vocab));
  }
  if (p.rows == 0) return absl::OkStatus();
  if (p.table == nullptr || p.ids == nullptr || p.out == nullptr) {
    return absl::InvalidArgumentError("LaunchEmbedding: null pointer");
  }
  absl::Status inner = absl::OkStatus();
  cudaError_t err = cudaSuccess;
  KVQ_RETURN_IF_ERROR(WithType(p.table_dtype, [&]<typename TT>() {
    inner = WithType(p.out_dtype, [&]<typename TO>() {
      err = internal::Launch(EmbeddingKernel<TT, TO>, p.rows, 256, 0, stream, p);
    });
  }));
  KVQ_RETURN_IF_ERROR(inner);
  KVQ_RETURN_IF_CUDA_ERROR(err);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchResidualAdd(const ResidualAddParams& p, cudaStream_t stream) {
  if (p.n < 0) return absl::InvalidArgumentError(absl::StrCat("LaunchResidualAdd: n ", p.n));
  if (p.n == 0) return absl::OkStatus();
  if (p.x == nullptr || p.y == nullptr) {
    return absl::InvalidArgumentError("LaunchResidualAdd: null pointer");
  }
  const int grid = GridFor(p.n, 256);
  absl::Status inner = absl::OkStatus();
  cudaError_t err = cudaSuccess;
  KVQ_RETURN_IF_ERROR(WithType(p.x_dtype, [&]<typename TX>() {
    inner = WithType(p.y_dtype, [&]<typename TY>() {
      err = internal::Launch(ResidualAddKernel<TX, TY>, grid, 256, 0, stream, p);
    });
  }));
  KVQ_RETURN_IF_ERROR(inner);
  KVQ_RETURN_IF_CUDA_ERROR(err);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvq::kernels
