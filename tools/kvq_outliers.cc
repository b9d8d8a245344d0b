// `kvq outlier-census`: how many key outliers real text produces per 256-token block, relative to
// the format's nominal fraction. Key outliers are variable-length per (layer, head, block) lists
// (per-channel thresholds are calibrated offline, so a block's count depends on its text); the
// GPU pool reserves room for them per block, and this census is the measurement that sizes it.
//   kvq outlier-census --model M --text T --kv_format nuq3-1% --quantizer Q [--context 2048]
//       [--max_windows N]
// Prints one JSON line: blocks seen, per-block totals and per-list counts as multiples of the
// expected count (mean, percentiles, max), and the per-layer mean.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "model/forward.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "sharding/kv_cache_factory.h"
#include "sharding/quantized_cache.h"
#include "tools/kvq_commands.h"
#include "model/fingerprint.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, text);
ABSL_DECLARE_FLAG(int, context);
ABSL_DECLARE_FLAG(int, max_windows);
ABSL_DECLARE_FLAG(std::string, kv_format);
ABSL_DECLARE_FLAG(std::string, quantizer);

namespace kvq::tools {
namespace {

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

}  // namespace

int OutlierCensus() {
  const std::string spec = absl::GetFlag(FLAGS_model);
  auto weights = model::LoadWeights(spec);
  if (!weights.ok()) return FailStatus(weights.status());
  auto tok = model::Tokenizer::FromGgufPath(spec);
  if (!tok.ok()) return FailStatus(tok.status());
  std::ifstream in(absl::GetFlag(FLAGS_text), std::ios::binary);
  if (!in) return FailStatus(absl::NotFoundError("cannot open --text " + absl::GetFlag(FLAGS_text)));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::vector<int32_t> ids = (*tok)->Encode(ss.str(), false, false);
  const model::ModelConfig& c = weights->config;
  auto factory = sharding::KvCacheFactory::Create(c, absl::GetFlag(FLAGS_kv_format), absl::GetFlag(FLAGS_quantizer),
                                                  model::ModelFingerprint(*weights));
  if (!factory.ok()) return FailStatus(factory.status());
  model::Forward fwd(*weights);
  const int context = absl::GetFlag(FLAGS_context);
  const int max_windows = absl::GetFlag(FLAGS_max_windows);
  std::vector<double> block_ratio, list_ratio;
  std::vector<double> layer_sum(c.n_layers, 0.0);
  int64_t layer_lists = 0;
  double expected = 0;
  int windows = 0;
  for (size_t at = 0; at + context <= ids.size() && (max_windows <= 0 || windows < max_windows); at += context) {
    auto cache = (*factory)->Make(0);
    if (!cache.ok()) return FailStatus(cache.status());
    auto* qc = dynamic_cast<sharding::QuantizedCache*>(cache->get());
    if (!qc) return FailStatus(absl::InvalidArgumentError("--kv_format must be a quantized kvstore format"));
    std::vector<int32_t> window(ids.begin() + at, ids.begin() + at + context);
    std::vector<float> logits;
    for (int s = 0; s < context; s += 512) {
      std::vector<int32_t> part(window.begin() + s, window.begin() + std::min(context, s + 512));
      model::ForwardItem item{cache->get(), part, false};
      absl::Status st = fwd.Run(absl::MakeSpan(&item, 1), {}, &logits);
      if (!st.ok()) return FailStatus(st);
    }
    const kvstore::QuantizedKvCache& q = qc->cache();
    const kvstore::BlockLayout& lay = q.layout();
    if (!lay.has_key_outliers) return FailStatus(absl::InvalidArgumentError("this format has no key outliers"));
    for (int64_t b = 0; b < q.num_blocks(); ++b) {
      const int64_t tokens = std::min<int64_t>(kvstore::kBlockTokens, q.length() - b * kvstore::kBlockTokens);
      if (tokens < kvstore::kBlockTokens) continue;  // full blocks only
      expected = static_cast<double>(tokens) * c.head_dim * q.format().outlier_fraction;
      const std::string bytes = q.ExportBlock(b);
      double total = 0;
      for (int l = 0; l < c.n_layers; ++l) {
        for (int h = 0; h < c.n_kv_heads; ++h) {
          uint32_t dir[2];
          std::memcpy(dir, bytes.data() + lay.KeyOutlierDirAt(l, h), 8);
          list_ratio.push_back(dir[1] / expected);
          layer_sum[l] += dir[1] / expected;
          total += dir[1];
        }
      }
      layer_lists += c.n_kv_heads;
      block_ratio.push_back(total / (expected * c.n_layers * c.n_kv_heads));
    }
    ++windows;
  }
  if (block_ratio.empty()) return FailStatus(absl::InvalidArgumentError("text shorter than one --context window"));
  double mean = 0;
  for (double r : block_ratio) mean += r;
  mean /= block_ratio.size();
  std::string per_layer;
  for (int l = 0; l < c.n_layers; ++l) {
    per_layer += absl::StrFormat("%s%.3f", l ? ", " : "", layer_sum[l] / (layer_lists));
  }
  std::printf("{\"kv_format\": \"%s\", \"windows\": %d, \"blocks\": %zu, \"expected_per_list\": %.1f, "
              "\"block_total\": {\"mean\": %.3f, \"p50\": %.3f, \"p99\": %.3f, \"max\": %.3f}, "
              "\"list\": {\"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"max\": %.3f}, \"per_layer_mean\": [%s]}\n",
              absl::GetFlag(FLAGS_kv_format).c_str(), windows, block_ratio.size(), expected, mean,
              Percentile(block_ratio, 0.5), Percentile(block_ratio, 0.99), Percentile(block_ratio, 1.0),
              Percentile(list_ratio, 0.5), Percentile(list_ratio, 0.9), Percentile(list_ratio, 0.99),
              Percentile(list_ratio, 1.0), per_layer.c_str());
  return 0;
}

}  // namespace kvq::tools
