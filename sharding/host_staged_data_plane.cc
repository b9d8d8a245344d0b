#include "sharding/host_staged_data_plane.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvq::sharding {

absl::Status HostStagedDataPlane::Send(int peer, const float* device, size_t n) {
  std::string bytes(n * sizeof(float), '\0');
  KVQ_RETURN_IF_ERROR(ops_->ToHost(device, n, reinterpret_cast<float*>(bytes.data())));
  return t_->Send(peer, std::move(bytes));
}

absl::Status HostStagedDataPlane::Recv(int peer, float* device, size_t n) {
  KVQ_ASSIGN_OR_RETURN(std::string bytes, t_->Receive(peer));
  if (bytes.size() != n * sizeof(float)) {
    return absl::DataLossError(
        absl::StrCat("data plane: rank ", peer, " sent ", bytes.size(), " bytes; expected ", n * sizeof(float)));
  }
  return ops_->ToDevice(reinterpret_cast<const float*>(bytes.data()), n, device);
}

}  // namespace kvq::sharding
