// The one place where internal absl::Status becomes the grpc::Status a client sees.
#pragma once

#include <string_view>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace kvq::server {

// Codes carry over one to one (absl and gRPC share the canonical code space); the message is kept.
grpc::Status ToGrpcStatus(const absl::Status& status);

// "INVALID_ARGUMENT" etc., the label value used by the error metrics.
std::string_view GrpcCodeName(grpc::StatusCode code);

}  // namespace kvq::server
