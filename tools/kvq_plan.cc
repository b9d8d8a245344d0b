// `kvq plan`: the capacity plan of a model, KV format and GPUs, before anything is allocated
// (sharding/capacity_plan.h, the same report as `kvqd --plan`). Reads only the model's shape
// (GGUF metadata, config.json, or a built-in synthetic shape), never the weights.
//   kvq plan --model synthetic:llama-3-8b --kv_format nuq3-1% --gpus 8 --gpu_memory 141GB \
//            --context 1000000
// Prints the bytes per token, each rank's capacity, the largest context that fits, and the ranges
// for --context (or why it does not fit: exit code 1).
#include <cstdio>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "common/status.h"
#include "sharding/capacity_plan.h"
#include "tools/kvq_commands.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, kv_format);
ABSL_DECLARE_FLAG(int, context);
ABSL_FLAG(int, gpus, 1, "plan: number of GPUs (ranks)");
ABSL_FLAG(std::string, gpu_memory, "141GB", "plan: memory per GPU (e.g. 141GB, 80GiB, bytes)");
ABSL_FLAG(std::string, rank0_reserve, "",
          "plan: bytes rank 0 keeps for weights and workspace (empty: fp16 weights + workspace)");
ABSL_FLAG(double, key_outlier_reserve, 0,
          "plan: room per block for this many times the nominal count of key outliers (0: the default; "
          "as kvqd's flag of the same name)");
ABSL_FLAG(std::string, workspace, "2GiB", "plan: workspace bytes reserved on every rank");
ABSL_FLAG(double, kv_memory_fraction, 0.90,
          "plan: share of what is left after the reserve that the KV pool takes (the engine's "
          "--gpu_memory_fraction)");
ABSL_FLAG(bool, canonical_bytes, false,
          "plan: count the canonical bytes per token (the session-file form) instead of the GPU "
          "pool's, which include the per-block key-outlier area");
ABSL_FLAG(int64_t, min_tokens_per_rank, 65536,
          "plan: fewest tokens a rank holds before a sequence spreads to another");

namespace kvq::tools {

int Plan() {
  sharding::CapacityPlanRequest r;
  r.model = absl::GetFlag(FLAGS_model);
  r.kv_format = absl::GetFlag(FLAGS_kv_format);
  r.gpus = absl::GetFlag(FLAGS_gpus);
  auto memory = sharding::ParseByteSize(absl::GetFlag(FLAGS_gpu_memory));
  if (!memory.ok()) return FailStatus(memory.status());
  r.gpu_memory_bytes = *memory;
  auto workspace = sharding::ParseByteSize(absl::GetFlag(FLAGS_workspace));
  if (!workspace.ok()) return FailStatus(workspace.status());
  r.workspace_bytes = *workspace;
  if (!absl::GetFlag(FLAGS_rank0_reserve).empty()) {
    auto x = sharding::ParseByteSize(absl::GetFlag(FLAGS_rank0_reserve));
    if (!x.ok()) return FailStatus(x.status());
    r.rank0_reserve_bytes = *x;
  }
  r.kv_memory_fraction = absl::GetFlag(FLAGS_kv_memory_fraction);
  r.key_outlier_reserve = absl::GetFlag(FLAGS_key_outlier_reserve);
  r.canonical_bytes = absl::GetFlag(FLAGS_canonical_bytes);
  r.min_tokens_per_rank = absl::GetFlag(FLAGS_min_tokens_per_rank);
  r.context = absl::GetFlag(FLAGS_context);
  auto plan = sharding::MakeCapacityPlan(r);
  if (!plan.ok()) return FailStatus(plan.status());
  std::fputs(plan->report.c_str(), stdout);
  if (!plan->context_status.ok()) return FailStatus(plan->context_status);
  return 0;
}

}  // namespace kvq::tools
