#include "sharding/gpu/stream_device_ops.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda_check.h"
#include "kernels/merge_attention.h"

namespace kvq::sharding {

GrowingDeviceBuffer::~GrowingDeviceBuffer() {
  if (p_ != nullptr) cudaFree(p_);  // cudaFree waits for the device's work on it
}

absl::StatusOr<float*> GrowingDeviceBuffer::Get(size_t n, cudaStream_t stream) {
  if (n <= n_ && p_ != nullptr) return p_;
  if (p_ != nullptr) {
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
    KVQ_RETURN_IF_CUDA_ERROR(cudaFree(p_));
    p_ = nullptr;
  }
  const size_t want = std::max({n, n_ + n_ / 2, size_t{1}});
  n_ = 0;
  KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p_, want * sizeof(float)));
  n_ = want;
  return p_;
}

absl::Status StreamDeviceOps::ToHost(const float* device, size_t n, float* host) {
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host, device, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status StreamDeviceOps::ToDevice(const float* host, size_t n, float* device) {
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(device, host, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::StatusOr<model::DeviceOps::Parts> StreamDeviceOps::PartsScratch(int parts, int64_t rows, int head_dim) {
  if (parts < 1 || rows < 1 || head_dim < 1) {
    return absl::InvalidArgumentError(absl::StrCat("partials scratch of ", parts, " x ", rows, " x ", head_dim));
  }
  KVQ_ASSIGN_OR_RETURN(float* base, scratch_.Get(static_cast<size_t>(parts) * rows * (head_dim + 1), stream_));
  return Parts{base, base + static_cast<size_t>(parts) * rows * head_dim};
}

absl::Status StreamDeviceOps::MergeParts(const Parts& p, int parts, int64_t rows, int head_dim, float* o,
                                         float* lse) {
  kernels::MergeAttentionParams mp;
  mp.rows = static_cast<int>(rows);
  mp.n_parts = parts;
  mp.head_dim = head_dim;
  mp.o_parts = p.o;
  mp.o_row_stride = head_dim;
  mp.o_part_stride = rows * head_dim;
  mp.lse_parts = p.lse;
  mp.lse_row_stride = 1;
  mp.lse_part_stride = rows;
  mp.o = o;
  mp.lse = lse;
  KVQ_RETURN_IF_ERROR(kernels::LaunchMergeAttention(mp, stream_));
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

}  // namespace kvq::sharding
