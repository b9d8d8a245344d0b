// The data plane of sharded caches on device memory (DESIGN.md: "MPI bootstraps NCCL and carries
// the control plane; NCCL carries the data plane"): float arrays in device memory between rank 0
// and a worker, in the order the control plane's commands give (sharding/worker.h, kAttendDevice
// and kAppendDevice). Implementations (sharding/gpu/device_data_plane.h): NCCL point-to-point when
// every rank drives a GPU of its own, and host staging over the Transport when NCCL cannot be had
// (ranks sharing a GPU, which NCCL refuses): the same protocol either way.
//
// Send and Recv queue transfers; Start() issues what is queued (NCCL: one group on the plane's
// stream) without waiting for it; Wait() returns once everything issued has completed, or fails
// (a peer that stopped: after the transport's deadline). Sources must stay untouched and
// destinations unread until Wait() returns. Host staging may complete a Send or Recv at once.
#pragma once

#include <cstddef>

#include "absl/status/status.h"

namespace kvq::sharding {

class DeviceDataPlane {
 public:
  virtual ~DeviceDataPlane() = default;
  virtual const char* name() const = 0;  // "nccl" or "host-staged"
  virtual absl::Status Send(int peer, const float* device, size_t n) = 0;
  virtual absl::Status Recv(int peer, float* device, size_t n) = 0;
  virtual absl::Status Start() = 0;
  virtual absl::Status Wait() = 0;
};

}  // namespace kvq::sharding
