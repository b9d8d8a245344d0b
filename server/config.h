// kvqd's command-line flags, parsed and validated once into ServerOptions.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "server/server.h"

namespace kvq::server {

struct DaemonConfig {
  ServerOptions server;
  std::string port_file;          // the chosen gRPC port is written here once listening
  std::string metrics_port_file;  // the chosen /metrics port
};

// Reads the flags (after absl::ParseCommandLine) and checks them.
absl::StatusOr<DaemonConfig> DaemonConfigFromFlags();

}  // namespace kvq::server
