#include "sharding/gpu/device_data_plane.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda_check.h"
#include "sharding/host_staged_data_plane.h"

namespace kvq::sharding {
namespace {

class NcclDataPlane : public DeviceDataPlane {
 public:
  NcclDataPlane(std::unique_ptr<NcclComm> comm, double timeout) : comm_(std::move(comm)), timeout_(timeout) {}
  ~NcclDataPlane() override {
    if (open_) (void)comm_->GroupEnd();
  }
  const char* name() const override { return "nccl"; }
  absl::Status Send(int peer, const float* device, size_t n) override {
    KVQ_RETURN_IF_ERROR(Open());
    return comm_->Send(device, n * sizeof(float), peer);
  }
  absl::Status Recv(int peer, float* device, size_t n) override {
    KVQ_RETURN_IF_ERROR(Open());
    return comm_->Recv(device, n * sizeof(float), peer);
  }
  absl::Status Start() override {
    if (!open_) return absl::OkStatus();
    open_ = false;
    return comm_->GroupEnd();
  }
  absl::Status Wait() override {
    KVQ_RETURN_IF_ERROR(Start());
    return comm_->Synchronize(timeout_);
  }

 private:
  absl::Status Open() {
    if (open_) return absl::OkStatus();
    KVQ_RETURN_IF_ERROR(comm_->GroupStart());
    open_ = true;
    return absl::OkStatus();
  }
  std::unique_ptr<NcclComm> comm_;
  double timeout_;
  bool open_ = false;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceDataPlane>> MakeDeviceDataPlane(Transport* t, cudaStream_t stream,
                                                                     model::DeviceOps* ops,
                                                                     const DataPlaneOptions& options,
                                                                     std::string* why) {
  why->clear();
  if (options.try_nccl && t->size() > 1) {
    absl::StatusOr<std::unique_ptr<NcclComm>> comm = NcclComm::Create(t, stream);
    if (comm.ok()) return std::unique_ptr<DeviceDataPlane>(new NcclDataPlane(std::move(*comm), options.timeout_seconds));
    // Every rank fails together (NcclComm::Create tells the others when rank 0 refuses).
    *why = std::string(comm.status().message());
  } else {
    *why = options.try_nccl ? "one rank" : "host staging requested";
  }
  return std::unique_ptr<DeviceDataPlane>(new HostStagedDataPlane(t, ops));
}

absl::StatusOr<std::unique_ptr<GpuPlaneEndpoint>> GpuPlaneEndpoint::Create(Transport* t,
                                                                         const DataPlaneOptions& options) {
  auto d = std::unique_ptr<GpuPlaneEndpoint>(new GpuPlaneEndpoint());
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&d->stream_, cudaStreamNonBlocking));
  d->ops_ = std::make_unique<StreamDeviceOps>(d->stream_);
  std::string why;
  KVQ_ASSIGN_OR_RETURN(d->plane_, MakeDeviceDataPlane(t, d->stream_, d->ops_.get(), options, &why));
  d->description_ = why.empty() ? std::string(d->plane_->name())
                                : absl::StrCat(d->plane_->name(), " (not NCCL: ", why, ")");
  d->device_.plane = d->plane_.get();
  d->device_.ops = d->ops_.get();
  GpuPlaneEndpoint* self = d.get();
  d->device_.scratch = [self](int slot, size_t n) -> absl::StatusOr<float*> {
    if (slot < 0 || slot >= static_cast<int>(self->scratch_.size())) {
      return absl::InvalidArgumentError(absl::StrCat("scratch slot ", slot));
    }
    return self->scratch_[slot].Get(n, self->stream_);
  };
  return d;
}

GpuPlaneEndpoint::~GpuPlaneEndpoint() {
  plane_.reset();
  ops_.reset();
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

}  // namespace kvq::sharding
