// The two implementations of the sharded caches' device data plane (sharding/device_data_plane.h)
// and what a GPU worker needs to serve it:
//   NCCL point-to-point (NcclComm) when every rank drives its own GPU: q, new k/v and partials
//     move between device buffers, grouped per command (one group out, one back);
//   host staging over the Transport otherwise (ranks sharing a GPU: NCCL refuses them): the same
//     protocol, each array copied to the host and sent as one message
//     (sharding/host_staged_data_plane.h).
// MakeDeviceDataPlane is collective: every rank of the job calls it at start-up, in the same order
// relative to other messages (it may bootstrap NCCL through the Transport).
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "sharding/device_data_plane.h"
#include "sharding/gpu/nccl_comm.h"
#include "sharding/gpu/stream_device_ops.h"
#include "sharding/mpi_transport.h"
#include "sharding/worker.h"

namespace kvq::sharding {

struct DataPlaneOptions {
  bool try_nccl = true;           // false: host staging even where NCCL would work
  double timeout_seconds = 600;   // Wait's deadline (a peer that stopped)
};

// `ops` (copies on `stream`) must outlive the plane. *why: why NCCL is not used (empty when it is).
absl::StatusOr<std::unique_ptr<DeviceDataPlane>> MakeDeviceDataPlane(Transport* t, cudaStream_t stream,
                                                                     model::DeviceOps* ops,
                                                                     const DataPlaneOptions& options,
                                                                     std::string* why);

// A rank's end of the data plane, made by every rank together at start-up on its GPU: a stream,
// its copies and merges, the plane (rank 0 hands it to ShardedKvCacheFactory::set_data_plane), and
// for a worker the WorkerDevice it serves with (device scratch it receives into).
class GpuPlaneEndpoint {
 public:
  static absl::StatusOr<std::unique_ptr<GpuPlaneEndpoint>> Create(Transport* t, const DataPlaneOptions& options);
  ~GpuPlaneEndpoint();
  WorkerDevice* get() { return &device_; }
  DeviceDataPlane* plane() const { return plane_.get(); }
  // "nccl", or "host-staged (not NCCL: why)".
  const std::string& description() const { return description_; }

 private:
  GpuPlaneEndpoint() = default;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<StreamDeviceOps> ops_;
  std::unique_ptr<DeviceDataPlane> plane_;
  std::array<GrowingDeviceBuffer, 4> scratch_;
  WorkerDevice device_;
  std::string description_;
};

}  // namespace kvq::sharding
