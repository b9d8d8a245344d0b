// MergeAttentionKernel: one CTA per row; every thread recomputes the (cheap) row maximum and
// weight sum over the partials' lse, then owns head_dim / blockDim channels of the output.
#include "kernels/merge_attention.h"

#include <math_constants.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"

namespace kvq::kernels {
namespace {

__global__ void MergeAttentionKernel(const MergeAttentionParams p) {
  const int64_t row = blockIdx.x;
  const float* lse_row = p.lse_parts + row * p.lse_row_stride;
  float mx = -CUDART_INF_F;
  for (int r = 0; r < p.n_parts; ++r) mx = fmaxf(mx, lse_row[r * p.lse_part_stride]);
  if (mx == -CUDART_INF_F) {  // uniform over the CTA
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) p.o[row * p.head_dim + d] = 0.0f;
    __syncthreads();
    if (threadIdx.x == 0) p.lse[row] = -CUDART_INF_F;
    return;
  }
  float sum = 0.0f;
  for (int r = 0; r < p.n_parts; ++r) sum += expf(lse_row[r * p.lse_part_stride] - mx);
  const float inv = 1.0f / sum;
  const float* o_row = p.o_parts + row * p.o_row_stride;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int r = 0; r < p.n_parts; ++r) {
      const float w = expf(lse_row[r * p.lse_part_stride] - mx) * inv;
      if (w != 0.0f) acc = fmaf(w, o_row[r * p.o_part_stride + d], acc);
    }
    p.o[row * p.head_dim + d] = acc;
  }
  __syncthreads();  // every thread has read the lse partials: the output may alias partial 0
  if (threadIdx.x == 0) p.lse[row] = mx + logf(sum);
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
  const int threads = p.head_dim >= 128 ? 128 : 64;
  MergeAttentionKernel<<<p.rows, threads, 0, stream>>>(p);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvq::kernels
