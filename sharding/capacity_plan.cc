#include "sharding/capacity_plan.h"

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kvstore/block_layout.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantized_kv_cache.h"
#include "model/gguf.h"
#include "model/loader_gguf.h"
#include "model/weights.h"
#include "sharding/gpu_block_geometry.h"
#include "sharding/shard_planner.h"

namespace kvq::sharding {

absl::StatusOr<int64_t> ParseByteSize(std::string s) {
  s = absl::AsciiStrToLower(s);
  struct Unit {
    const char* suffix;
    double scale;
  };
  const Unit units[] = {{"tib", 1099511627776.0}, {"gib", 1073741824.0}, {"mib", 1048576.0},
                        {"tb", 1e12},             {"gb", 1e9},            {"mb", 1e6},
                        {"b", 1.0}};
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

absl::StatusOr<CapacityPlan> MakeCapacityPlan(const CapacityPlanRequest& r) {
  if (r.model.empty()) return absl::InvalidArgumentError("--model is required");
  KVQ_ASSIGN_OR_RETURN(const model::ModelConfig config, ModelShape(r.model));
  double bpt = 0, canonical = 0;
  if (r.kv_format == "fp16" || r.kv_format == "fp32") {
    bpt = canonical = 2.0 * config.n_layers * config.kv_dim() * (r.kv_format == "fp32" ? 4 : 2);
  } else {
    KVQ_ASSIGN_OR_RETURN(const kvstore::KvFormat fmt, kvstore::KvFormat::Parse(r.kv_format));
    const kvstore::KvShape shape{config.n_layers, config.n_kv_heads, config.head_dim};
    canonical = kvstore::ExpectedBytesPerToken(fmt, shape);
    const double reserve = r.key_outlier_reserve > 0 ? r.key_outlier_reserve : kDefaultKeyOutlierReserve;
    bpt = r.canonical_bytes ? canonical : ComputeGpuBlockGeometry(shape, fmt, reserve).bytes_per_token();
  }
  if (!(r.kv_memory_fraction > 0.0 && r.kv_memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError("the KV memory fraction must be in (0, 1]");
  }
  if (r.gpus < 1) return absl::InvalidArgumentError("the number of GPUs must be >= 1");
  if (r.gpu_memory_bytes <= 0) return absl::InvalidArgumentError("the memory per GPU must be > 0");
  if (r.workspace_bytes < 0) return absl::InvalidArgumentError("the workspace must be >= 0");
  const int64_t weights = config.ParameterCount() * 2;  // fp16 on the GPU
  const int64_t rank0 = r.rank0_reserve_bytes >= 0 ? r.rank0_reserve_bytes : weights + r.workspace_bytes;
  ShardPlannerOptions o;
  o.bytes_per_token = bpt;
  o.block_tokens = kvstore::kBlockTokens;
  o.min_tokens_per_rank = r.min_tokens_per_rank;
  // The pool takes `fraction` of what each rank has left after its reserve.
  const double fraction = r.kv_memory_fraction;
  const int64_t memory = r.gpu_memory_bytes;
  auto reserve = [&](int64_t x) { return x + static_cast<int64_t>((1.0 - fraction) * static_cast<double>(memory - x)); };
  o.ranks.push_back({memory, reserve(rank0)});
  for (int i = 1; i < r.gpus; ++i) o.ranks.push_back({memory, reserve(r.workspace_bytes)});
  KVQ_ASSIGN_OR_RETURN(const ShardPlanner planner, ShardPlanner::Create(o));

  CapacityPlan p;
  p.bytes_per_token = bpt;
  p.max_context_tokens = planner.MaxContextTokens();
  std::string& s = p.report;
  absl::StrAppendFormat(&s, "model        %s (%d layers, %d KV heads x %d, %.2fB parameters)\n",
                        config.name.empty() ? r.model : config.name, config.n_layers, config.n_kv_heads,
                        config.head_dim, config.ParameterCount() / 1e9);
  absl::StrAppendFormat(&s, "kv format    %s: %.1f bytes per token (%.2f KiB), %.3f bits per element; %s\n",
                        r.kv_format, bpt, bpt / 1024.0, 8.0 * bpt / (2.0 * config.n_layers * config.kv_dim()),
                        bpt == canonical ? std::string("canonical form")
                                         : absl::StrFormat("GPU pool blocks (canonical %.1f + key-outlier area)",
                                                           canonical));
  absl::StrAppendFormat(&s,
                        "ranks        %d x %.2f GiB; rank 0 reserves %.2f GiB (weights %.2f GiB + workspace), "
                        "workers %.2f GiB; the KV pool takes %.0f%% of the rest\n",
                        r.gpus, memory / 1073741824.0, rank0 / 1073741824.0, weights / 1073741824.0,
                        r.workspace_bytes / 1073741824.0, 100.0 * fraction);
  for (int i = 0; i < r.gpus; ++i) {
    absl::StrAppendFormat(&s, "  rank %-3d   capacity %d tokens\n", i, planner.CapacityTokens(i));
  }
  absl::StrAppendFormat(&s, "max context  %d tokens\n", planner.MaxContextTokens());
  if (r.context > 0) {
    auto ranges = planner.Plan(r.context);
    if (!ranges.ok()) {
      absl::StrAppendFormat(&s, "context      %d tokens: does not fit\n", r.context);
      p.context_status = ranges.status();
    } else {
      absl::StrAppendFormat(&s, "context      %d tokens on %d rank(s):\n%s", r.context, ranges->size(),
                            planner.Describe(*ranges));
    }
  }
  return p;
}

}  // namespace kvq::sharding
