// NCCL over the job's MPI ranks, one GPU per rank: the data plane of sharded attention (q out from
// rank 0, attention partials back) between device buffers, bootstrapped through the control
// plane's Transport (rank 0's ncclUniqueId sent to every rank). DESIGN.md: "MPI bootstraps NCCL and
// carries the control plane; NCCL carries the data plane".
//
// Used by benchmarks/nccl_merge_bench (the per-layer cost of q's broadcast, the partials' gather and
// their merge) and by the sharded caches' data plane (sharding/gpu/device_data_plane.h). Neither
// has run yet: only one GPU has been lent so far, and NCCL refuses two ranks on one GPU (Create
// checks that first and says so; the data plane then stages through the host).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <memory>

#include "absl/status/statusor.h"
#include "sharding/mpi_transport.h"

namespace kvq::sharding {

class NcclComm {
 public:
  // Collective over every rank of `t` (each on its current CUDA device); work goes on `stream`.
  static absl::StatusOr<std::unique_ptr<NcclComm>> Create(Transport* t, cudaStream_t stream);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  cudaStream_t stream() const { return stream_; }
  // `bytes` of `buf` from `root` to every rank (in place).
  absl::Status Broadcast(void* buf, size_t bytes, int root);
  // Every rank's `bytes` of `send` into `recv` on `root` (rank-major; recv holds size() * bytes
  // there and is unused elsewhere).
  absl::Status Gather(const void* send, void* recv, size_t bytes, int root);
  // Point-to-point between device buffers, grouped: every Send and Recv between GroupStart and
  // GroupEnd is issued together at GroupEnd (on the stream).
  absl::Status GroupStart();
  absl::Status GroupEnd();
  absl::Status Send(const void* buf, size_t bytes, int peer);
  absl::Status Recv(void* buf, size_t bytes, int peer);
  // Waits for the stream; a failed or stuck peer shows up here as an error, not a hang (the
  // communicator is created blocking, and ncclCommGetAsyncError is polled).
  absl::Status Synchronize(double timeout_seconds = 60.0);

 private:
  NcclComm() = default;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace kvq::sharding
