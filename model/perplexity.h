// Perplexity of a model on a token stream, with sliding windows of a given context and stride
// (Hugging Face's recipe: each window scores only the targets not scored by an earlier window).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "model/forward.h"

namespace kvq::model {

struct PerplexityOptions {
  int context = 2048;
  int stride = 2048;
  int max_windows = 0;  // 0: all windows
  // Evaluate as if every token had been decoded from the cache (see ForwardOptions).
  bool through_cache = true;
};

struct PerplexityResult {
  double nll_sum = 0.0;
  int64_t tokens = 0;  // scored targets
  int windows = 0;
  // Exact KV bytes held after the last full-context window (the first window if none is full),
  // and its tokens: effective bits per element.
  int64_t last_window_kv_bytes = 0;
  int64_t last_window_tokens = 0;
  double ppl() const;
};

using CacheFactory = std::function<absl::StatusOr<std::unique_ptr<KvCache>>()>;

absl::StatusOr<PerplexityResult> EvaluatePerplexity(
    const ForwardPass& forward, const std::vector<int32_t>& ids, const PerplexityOptions& options,
    const CacheFactory& make_cache,
    const std::function<void(const PerplexityResult&)>& progress = nullptr);

}  // namespace kvq::model
