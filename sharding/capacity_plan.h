// The capacity plan of a model, KV format and set of GPUs, before anything is allocated: bytes
// per token (the GPU pool's blocks, key-outlier area included, or the canonical form), each rank's
// capacity, the largest context that fits, and the ranges of a given context (shard_planner.h).
// Reads only the model's shape (GGUF metadata, config.json or a built-in synthetic shape), never
// the weights. Shared by `kvq plan` and `kvqd --plan`.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/config.h"

namespace kvq::sharding {

struct CapacityPlanRequest {
  std::string model;                 // *.gguf, HF directory, or synthetic:<name>[:seed]
  std::string kv_format = "fp16";
  int gpus = 1;
  int64_t gpu_memory_bytes = 0;      // per GPU
  int64_t workspace_bytes = int64_t{2} << 30;  // reserved on every rank
  int64_t rank0_reserve_bytes = -1;  // < 0: fp16 weights + workspace
  double kv_memory_fraction = 0.90;  // the pool's share of what is left (--gpu_memory_fraction)
  double key_outlier_reserve = 0;    // <= 0: kDefaultKeyOutlierReserve
  bool canonical_bytes = false;      // count the canonical (session-file) bytes per token
  int64_t min_tokens_per_rank = 65536;
  int64_t context = 0;               // ranges for this context; 0: capacities only
};

struct CapacityPlan {
  std::string report;           // lines for a terminal
  int64_t max_context_tokens = 0;
  double bytes_per_token = 0;
  absl::Status context_status;  // OK, or why `context` does not fit
};

// "141GB" = 141e9, "80GiB" = 80 * 2^30, "123" = bytes.
absl::StatusOr<int64_t> ParseByteSize(std::string s);
// The shape of a model spec without loading weights.
absl::StatusOr<model::ModelConfig> ModelShape(const std::string& spec);
// Invalid inputs are an error; a context that does not fit is reported in context_status.
absl::StatusOr<CapacityPlan> MakeCapacityPlan(const CapacityPlanRequest& request);

}  // namespace kvq::sharding
