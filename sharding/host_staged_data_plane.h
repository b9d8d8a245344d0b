// The device data plane (sharding/device_data_plane.h) staged through the host: every array is
// copied to the host (DeviceOps::ToHost) and sent as one Transport message; a receive takes the
// next message from the peer and copies it in (DeviceOps::ToDevice). The fallback where NCCL
// cannot run (ranks sharing a GPU), and the CPU backend's plane (DeviceOps over host memory), which
// is how CI runs the device commands. Transfers complete in Send and Recv; Start and Wait have
// nothing left to do.
#pragma once

#include <cstddef>

#include "absl/status/status.h"
#include "model/forward.h"
#include "sharding/device_data_plane.h"
#include "sharding/mpi_transport.h"

namespace kvq::sharding {

class HostStagedDataPlane : public DeviceDataPlane {
 public:
  // Both must outlive the plane.
  HostStagedDataPlane(Transport* t, model::DeviceOps* ops) : t_(t), ops_(ops) {}
  const char* name() const override { return "host-staged"; }
  absl::Status Send(int peer, const float* device, size_t n) override;
  absl::Status Recv(int peer, float* device, size_t n) override;
  absl::Status Start() override { return absl::OkStatus(); }
  absl::Status Wait() override { return absl::OkStatus(); }

 private:
  Transport* t_;
  model::DeviceOps* ops_;
};

}  // namespace kvq::sharding
