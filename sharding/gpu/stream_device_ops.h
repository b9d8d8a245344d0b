// model::DeviceOps on one CUDA stream of the current device: what a cache that works on device
// memory needs from its caller (copies to and from the host, the merge of attention partials).
// The GPU forward pass hands one to sharded caches whose shards on rank 0 are GPU caches; tests
// use it to drive those caches directly. Every call synchronizes the stream before returning.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/forward.h"

namespace kvq::sharding {

// Device floats that only grow (by half again, at least what is asked): a new size waits for the
// stream, frees the old buffer and allocates; otherwise the buffer is handed out as it is.
class GrowingDeviceBuffer {
 public:
  GrowingDeviceBuffer() = default;
  ~GrowingDeviceBuffer();
  GrowingDeviceBuffer(const GrowingDeviceBuffer&) = delete;
  GrowingDeviceBuffer& operator=(const GrowingDeviceBuffer&) = delete;
  absl::StatusOr<float*> Get(size_t n, cudaStream_t stream);

 private:
  float* p_ = nullptr;
  size_t n_ = 0;
};

class StreamDeviceOps : public model::DeviceOps {
 public:
  explicit StreamDeviceOps(cudaStream_t stream) : stream_(stream) {}
  StreamDeviceOps(const StreamDeviceOps&) = delete;
  StreamDeviceOps& operator=(const StreamDeviceOps&) = delete;

  absl::Status ToHost(const float* device, size_t n, float* host) override;
  absl::Status ToDevice(const float* host, size_t n, float* device) override;
  // One buffer, grown as needed (between calls) and kept.
  absl::StatusOr<Parts> PartsScratch(int parts, int64_t rows, int head_dim) override;
  // kernels::LaunchMergeAttention over the [parts][rows] layout.
  absl::Status MergeParts(const Parts& p, int parts, int64_t rows, int head_dim, float* o, float* lse) override;

 private:
  cudaStream_t stream_;
  GrowingDeviceBuffer scratch_;
};

}  // namespace kvq::sharding
