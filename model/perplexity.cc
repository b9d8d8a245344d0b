#include "model/perplexity.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvq::model {

double PerplexityResult::ppl() const {
  return tokens > 0 ? std::exp(nll_sum / static_cast<double>(tokens)) : 0.0;
}

absl::StatusOr<PerplexityResult> EvaluatePerplexity(
    const ForwardPass& forward, const std::vector<int32_t>& ids, const PerplexityOptions& o,
    const CacheFactory& make_cache, const std::function<void(const PerplexityResult&)>& progress) {
  if (o.context < 2 || o.stride < 1 || o.stride > o.context) {
    return absl::InvalidArgumentError(absl::StrCat("need context >= 2 and 1 <= stride <= context; got context ",
                                                   o.context, ", stride ", o.stride));
  }
  if (static_cast<int64_t>(ids.size()) < 2) {
    return absl::InvalidArgumentError("need at least 2 tokens to evaluate perplexity");
  }
  const int vocab = forward.config().vocab_size;
  PerplexityResult r;
  int64_t scored_until = 0;  // targets with index < scored_until are done
  const int64_t n = static_cast<int64_t>(ids.size());
  for (int64_t begin = 0; begin < n - 1; begin += o.stride) {
    if (o.max_windows > 0 && r.windows >= o.max_windows) break;
    const int64_t end = std::min<int64_t>(begin + o.context, n);
    KVQ_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache, make_cache());
    ForwardItem item;
    item.cache = cache.get();
    item.tokens = absl::Span<const int32_t>(ids.data() + begin, end - begin);
    item.all_logits = true;
    std::vector<float> logits;
    ForwardOptions fo;
    fo.chunk_through_cache = o.through_cache;
    KVQ_RETURN_IF_ERROR(forward.Run(absl::MakeSpan(&item, 1), fo, &logits));
    // logits row j predicts ids[begin + j + 1].
    const int64_t first_target = std::max(begin + 1, scored_until);
    double nll = 0.0;
#pragma omp parallel for reduction(+ : nll) schedule(static)
    for (int64_t t = first_target; t < end; ++t) {
      const float* row = logits.data() + (t - 1 - begin) * static_cast<int64_t>(vocab);
      float m = row[0];
      for (int i = 1; i < vocab; ++i) m = std::max(m, row[i]);
      double s = 0.0;
      for (int i = 0; i < vocab; ++i) s += std::exp(static_cast<double>(row[i]) - m);
      nll += (m + std::log(s)) - row[ids[t]];
    }
    r.nll_sum += nll;
    r.tokens += std::max<int64_t>(0, end - first_target);
    scored_until = end;
    ++r.windows;
    // Bytes per token from full windows only: a short last window would count its partly
    // filled block against few tokens.
    if (r.last_window_tokens == 0 || end - begin == o.context) {
      r.last_window_kv_bytes = cache->exact_bytes();
      r.last_window_tokens = cache->length();
    }
    if (progress) progress(r);
    if (end == n) break;
  }
  return r;
}

}  // namespace kvq::model
