// The `kvq` tool's subcommands. Each returns a process exit code.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace kvq::tools {

std::vector<std::string> CommandNames();
// argv[0] is the command name; flags follow.
int RunCommand(const std::string& name, int argc, char** argv);

// Subcommands implemented in their own files.
int Calibrate();
int Passkey();
int Plan();  // [sharding] tools/kvq_plan.cc
int OutlierCensus();  // tools/kvq_outliers.cc
// Prints the status and returns the exit code for a failure.
int FailStatus(const absl::Status& s);

}  // namespace kvq::tools
