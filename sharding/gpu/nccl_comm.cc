#include "sharding/gpu/nccl_comm.h"

#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvq::sharding {
namespace {

absl::Status NcclStatus(ncclResult_t r, const char* what) {
  if (r == ncclSuccess || r == ncclInProgress) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("NCCL ", what, ": ", ncclGetErrorString(r)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<NcclComm>> NcclComm::Create(Transport* t, cudaStream_t stream) {
  auto c = std::unique_ptr<NcclComm>(new NcclComm());
  c->rank_ = t->rank();
  c->size_ = t->size();
  c->stream_ = stream;
  // Every rank's device identity (PCI bus id) to rank 0, which refuses duplicates with a clear
  // message (NCCL's own is "Duplicate GPU detected") and then sends out the unique id.
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return absl::InternalError("NCCL: no current CUDA device");
  char bus[32] = {};
  if (cudaDeviceGetPCIBusId(bus, sizeof bus, dev) != cudaSuccess) return absl::InternalError("NCCL: no PCI bus id");
  ncclUniqueId id{};
  if (c->rank_ == 0) {
    std::vector<std::string> buses = {bus};
    for (int r = 1; r < c->size_; ++r) {
      KVQ_ASSIGN_OR_RETURN(std::string b, t->Receive(r));
      buses.push_back(b);
    }
    for (int r = 1; r < c->size_; ++r) {
      for (int q = 0; q < r; ++q) {
        if (buses[q] == buses[r]) {
          for (int w = 1; w < c->size_; ++w) (void)t->Send(w, std::string_view());  // the others fail at once too
          return absl::FailedPreconditionError(absl::StrCat("NCCL needs one GPU per rank: ranks ", q, " and ", r,
                                                            " are both on GPU ", buses[r]));
        }
      }
    }
    KVQ_RETURN_IF_ERROR(NcclStatus(ncclGetUniqueId(&id), "ncclGetUniqueId"));
    for (int r = 1; r < c->size_; ++r) {
      KVQ_RETURN_IF_ERROR(t->Send(r, std::string_view(reinterpret_cast<const char*>(&id), sizeof id)));
    }
  } else {
    KVQ_RETURN_IF_ERROR(t->Send(0, std::string_view(bus)));
    KVQ_ASSIGN_OR_RETURN(std::string m, t->Receive(0));
    if (m.size() != sizeof id) {
      return absl::FailedPreconditionError("NCCL: rank 0 refused the communicator (see its log)");
    }
    std::memcpy(&id, m.data(), sizeof id);
  }
  KVQ_RETURN_IF_ERROR(NcclStatus(ncclCommInitRank(&c->comm_, c->size_, id, c->rank_), "ncclCommInitRank"));
  return c;
}

NcclComm::~NcclComm() {
  if (comm_ != nullptr) ncclCommDestroy(comm_);
}

absl::Status NcclComm::Broadcast(void* buf, size_t bytes, int root) {
  return NcclStatus(ncclBroadcast(buf, buf, bytes, ncclChar, root, comm_, stream_), "broadcast");
}

absl::Status NcclComm::Gather(const void* send, void* recv, size_t bytes, int root) {
  KVQ_RETURN_IF_ERROR(NcclStatus(ncclGroupStart(), "group start"));
  if (rank_ == root) {
    for (int r = 0; r < size_; ++r) {
      KVQ_RETURN_IF_ERROR(NcclStatus(
          ncclRecv(static_cast<char*>(recv) + static_cast<size_t>(r) * bytes, bytes, ncclChar, r, comm_, stream_),
          "recv"));
    }
  }
  KVQ_RETURN_IF_ERROR(NcclStatus(ncclSend(send, bytes, ncclChar, root, comm_, stream_), "send"));
  return NcclStatus(ncclGroupEnd(), "group end");
}

absl::Status NcclComm::GroupStart() { return NcclStatus(ncclGroupStart(), "group start"); }
absl::Status NcclComm::GroupEnd() { return NcclStatus(ncclGroupEnd(), "group end"); }

absl::Status NcclComm::Send(const void* buf, size_t bytes, int peer) {
  if (comm_ == nullptr) return absl::FailedPreconditionError("NCCL communicator was aborted");
  return NcclStatus(ncclSend(buf, bytes, ncclChar, peer, comm_, stream_), "send");
}

absl::Status NcclComm::Recv(void* buf, size_t bytes, int peer) {
  if (comm_ == nullptr) return absl::FailedPreconditionError("NCCL communicator was aborted");
  return NcclStatus(ncclRecv(buf, bytes, ncclChar, peer, comm_, stream_), "recv");
}

absl::Status NcclComm::Synchronize(double timeout_seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_seconds);
  while (true) {
    const cudaError_t e = cudaStreamQuery(stream_);
    if (e == cudaSuccess) return absl::OkStatus();
    if (e != cudaErrorNotReady) return absl::InternalError(absl::StrCat("NCCL stream: ", cudaGetErrorString(e)));
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(comm_, &async);
    if (async != ncclSuccess && async != ncclInProgress) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      return NcclStatus(async, "collective");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      return absl::DeadlineExceededError(absl::StrCat("NCCL: a collective did not finish within ", timeout_seconds,
                                                      " s (a rank stopped?)"));
    }
    std::this_thread::yield();
  }
}

}  // namespace kvq::sharding
