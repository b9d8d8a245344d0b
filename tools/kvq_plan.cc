// `kvq plan`: the capacity plan of a model, KV format and GPUs, before anything is allocated
// (sharding/shard_planner.h). Reads only the model's shape (GGUF metadata, config.json, or a
// built-in synthetic shape), never the weights.
//   kvq plan --model synthetic:llama-3-8b --kv_format nuq3-1% --gpus 8 --gpu_memory 141GB \
//            --context 1000000
// Prints the bytes per token, each rank's capacity, the largest context that fits, and the ranges
// for --context (or why it does not fit: exit code 1).
#include <cstdio>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kvstore/block_layout.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantized_kv_cache.h"
#include "model/config.h"
#include "model/gguf.h"
#include "model/loader_gguf.h"
#include "model/weights.h"
#include "sharding/gpu_block_geometry.h"
#include "sharding/shard_planner.h"
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
namespace {

// "141GB" = 141e9, "80GiB" = 80 * 2^30, "123" = bytes.
absl::StatusOr<int64_t> ParseBytes(std::string s) {
  s = absl::AsciiStrToLower(s);
  struct Unit { const char* suffix; double scale; };
  const Unit units[] = {{"tib", 1099511627776.0}, {"gib", 1073741824.0}, {"mib", 1048576.0},
                        {"tb", 1e12}, {"gb", 1e9}, {"mb", 1e6}, {"b", 1.0}};
  double scale = 1.0;
  for (const Unit& u : units) {
    const std::string suf = u.suffix;
    if (s.size() > suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0) {
      s.resize(s.size() - suf.size());
      scale = u.scale;
      break;
    }
  }
  double v = 0;
  if (!absl::SimpleAtod(s, &v) || v < 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad byte size '", s, "' (e.g. 141GB, 80GiB)"));
  }
  return static_cast<int64_t>(v * scale);
}

absl::StatusOr<model::ModelConfig> ModelShape(const std::string& spec) {
  model::ModelConfig c;
  if (spec.rfind("synthetic:", 0) == 0) {
    std::string name = spec.substr(10);
    name = name.substr(0, name.find(':'));  // drop a :seed
    KVQ_RETURN_IF_ERROR(model::BuiltinConfig(name, &c));
    return c;
  }
  if (spec.size() > 5 && spec.substr(spec.size() - 5) == ".gguf") {
    KVQ_ASSIGN_OR_RETURN(auto gguf, model::GgufFile::Open(spec));
    return model::GgufModelConfig(*gguf);
  }
  return model::LoadHfConfig(spec);
}

}  // namespace

int Plan() {
  const std::string spec = absl::GetFlag(FLAGS_model);
  if (spec.empty()) return FailStatus(absl::InvalidArgumentError("--model is required"));
  auto config = ModelShape(spec);
  if (!config.ok()) return FailStatus(config.status());
  const std::string fmt_name = absl::GetFlag(FLAGS_kv_format);
  double bpt = 0, canonical = 0;
  if (fmt_name == "fp16" || fmt_name == "fp32") {
    bpt = canonical = 2.0 * config->n_layers * config->kv_dim() * (fmt_name == "fp32" ? 4 : 2);
  } else {
    auto fmt = kvstore::KvFormat::Parse(fmt_name);
    if (!fmt.ok()) return FailStatus(fmt.status());
    const kvstore::KvShape shape{config->n_layers, config->n_kv_heads, config->head_dim};
    canonical = kvstore::ExpectedBytesPerToken(*fmt, shape);
    bpt = absl::GetFlag(FLAGS_canonical_bytes) ? canonical : sharding::ComputeGpuBlockGeometry(
                         shape, *fmt, absl::GetFlag(FLAGS_key_outlier_reserve) > 0
                                          ? absl::GetFlag(FLAGS_key_outlier_reserve)
                                          : sharding::kDefaultKeyOutlierReserve).bytes_per_token();
  }
  const double fraction = absl::GetFlag(FLAGS_kv_memory_fraction);
  if (!(fraction > 0.0 && fraction <= 1.0)) {
    return FailStatus(absl::InvalidArgumentError("--kv_memory_fraction must be in (0, 1]"));
  }
  const int gpus = absl::GetFlag(FLAGS_gpus);
  if (gpus < 1) return FailStatus(absl::InvalidArgumentError("--gpus must be >= 1"));
  auto memory = ParseBytes(absl::GetFlag(FLAGS_gpu_memory));
  if (!memory.ok()) return FailStatus(memory.status());
  auto workspace = ParseBytes(absl::GetFlag(FLAGS_workspace));
  if (!workspace.ok()) return FailStatus(workspace.status());
  const int64_t weights = config->ParameterCount() * 2;  // fp16 on the GPU
  int64_t rank0 = weights + *workspace;
  if (!absl::GetFlag(FLAGS_rank0_reserve).empty()) {
    auto r = ParseBytes(absl::GetFlag(FLAGS_rank0_reserve));
    if (!r.ok()) return FailStatus(r.status());
    rank0 = *r;
  }
  sharding::ShardPlannerOptions o;
  o.bytes_per_token = bpt;
  o.block_tokens = kvstore::kBlockTokens;
  o.min_tokens_per_rank = absl::GetFlag(FLAGS_min_tokens_per_rank);
  // The pool takes `fraction` of what each rank has left after its reserve.
  auto reserve = [&](int64_t r) { return r + static_cast<int64_t>((1.0 - fraction) * static_cast<double>(*memory - r)); };
  o.ranks.push_back({*memory, reserve(rank0)});
  for (int r = 1; r < gpus; ++r) o.ranks.push_back({*memory, reserve(*workspace)});
  auto planner = sharding::ShardPlanner::Create(o);
  if (!planner.ok()) return FailStatus(planner.status());

  std::printf("model        %s (%d layers, %d KV heads x %d, %.2fB parameters)\n",
              config->name.empty() ? spec.c_str() : config->name.c_str(), config->n_layers,
              config->n_kv_heads, config->head_dim, config->ParameterCount() / 1e9);
  std::printf("kv format    %s: %.1f bytes per token (%.2f KiB), %.3f bits per element; %s\n",
              fmt_name.c_str(), bpt, bpt / 1024.0, 8.0 * bpt / (2.0 * config->n_layers * config->kv_dim()),
              bpt == canonical ? "canonical form"
                               : absl::StrFormat("GPU pool blocks (canonical %.1f + key-outlier area)", canonical).c_str());
  std::printf("ranks        %d x %.2f GiB; rank 0 reserves %.2f GiB (weights %.2f GiB + workspace), "
              "workers %.2f GiB; the KV pool takes %.0f%% of the rest\n",
              gpus, *memory / 1073741824.0, rank0 / 1073741824.0, weights / 1073741824.0,
              *workspace / 1073741824.0, 100.0 * fraction);
  for (int r = 0; r < gpus; ++r) {
    std::printf("  rank %-3d   capacity %lld tokens\n", r,
                static_cast<long long>(planner->CapacityTokens(r)));
  }
  std::printf("max context  %lld tokens\n", static_cast<long long>(planner->MaxContextTokens()));
  const int64_t context = absl::GetFlag(FLAGS_context);
  auto ranges = planner->Plan(context);
  if (!ranges.ok()) {
    std::printf("context      %lld tokens: does not fit\n", static_cast<long long>(context));
    return FailStatus(ranges.status());
  }
  std::printf("context      %lld tokens on %zu rank(s):\n%s", static_cast<long long>(context),
              ranges->size(), planner->Describe(*ranges).c_str());
  return 0;
}

}  // namespace kvq::tools
