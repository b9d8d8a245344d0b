#include "sharding/shard_planner.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvq::sharding {

ShardPlanner::ShardPlanner(const ShardPlannerOptions& o) : options_(o) {
  const double block_bytes = o.bytes_per_token * static_cast<double>(o.block_tokens);
  for (const RankMemory& m : o.ranks) {
    const int64_t free = std::max<int64_t>(0, m.total_bytes - m.reserved_bytes);
    // Whole blocks only: a block is allocated at once.
    const int64_t blocks = static_cast<int64_t>(std::floor(static_cast<double>(free) / block_bytes));
    capacity_.push_back(blocks * o.block_tokens);
    max_context_ += capacity_.back();
  }
}

absl::StatusOr<ShardPlanner> ShardPlanner::Create(const ShardPlannerOptions& o) {
  if (!(o.bytes_per_token > 0) || !std::isfinite(o.bytes_per_token)) {
    return absl::InvalidArgumentError(absl::StrCat("bytes_per_token must be > 0; got ", o.bytes_per_token));
  }
  if (o.ranks.empty()) return absl::InvalidArgumentError("the plan needs at least one rank");
  if (o.block_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("block_tokens must be >= 1; got ", o.block_tokens));
  }
  if (o.min_tokens_per_rank < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_tokens_per_rank must be >= 1; got ", o.min_tokens_per_rank));
  }
  for (size_t r = 0; r < o.ranks.size(); ++r) {
    if (o.ranks[r].total_bytes < 0 || o.ranks[r].reserved_bytes < 0) {
      return absl::InvalidArgumentError(absl::StrCat("rank ", r, ": memory sizes must be >= 0"));
    }
  }
  return ShardPlanner(o);
}

absl::StatusOr<std::vector<ShardRange>> ShardPlanner::Plan(int64_t context, int64_t growth) const {
  if (context < 0 || growth < 0 || context + growth < 1) {
    return absl::InvalidArgumentError(absl::StrCat("cannot plan context ", context, " + growth ",
                                                   growth, ": need at least one token"));
  }
  const int64_t need = context + growth;
  if (need > max_context_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        need, " tokens do not fit: the largest context on ", num_ranks(), " rank(s) is ",
        max_context_, " tokens (", absl::StrFormat("%.0f", options_.bytes_per_token),
        " bytes per token)"));
  }
  const int64_t bt = options_.block_tokens;
  std::vector<int> usable;
  for (int r = 0; r < num_ranks(); ++r) {
    if (capacity_[r] > 0) usable.push_back(r);
  }
  // Fewest ranks: at least need / min_tokens_per_rank of them, more while they do not hold it.
  size_t k = static_cast<size_t>(std::clamp<int64_t>(need / options_.min_tokens_per_rank, 1,
                                                     static_cast<int64_t>(usable.size())));
  int64_t cap_sum = 0;
  for (size_t i = 0; i < k; ++i) cap_sum += capacity_[usable[i]];
  while (cap_sum < need) cap_sum += capacity_[usable[k++]];  // terminates: need <= max_context_

  // Blocks in proportion to capacity (largest remainder); never above a rank's capacity because
  // blocks <= sum of capacity blocks.
  const int64_t blocks = (need + bt - 1) / bt;
  const int64_t cap_blocks = cap_sum / bt;
  std::vector<int64_t> share(k);
  std::vector<std::pair<double, size_t>> remainder;
  int64_t given = 0;
  for (size_t i = 0; i < k; ++i) {
    const double exact = static_cast<double>(blocks) * static_cast<double>(capacity_[usable[i]] / bt) /
                         static_cast<double>(cap_blocks);
    share[i] = static_cast<int64_t>(std::floor(exact));
    given += share[i];
    remainder.push_back({exact - static_cast<double>(share[i]), i});
  }
  std::stable_sort(remainder.begin(), remainder.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  for (size_t j = 0; given < blocks; ++j, ++given) ++share[remainder[j % k].second];

  // Ranges: every rank but the tail takes its whole share (cut at the last block boundary inside
  // the context); the tail takes the rest and keeps the growth room.
  std::vector<ShardRange> out;
  const int64_t aligned_context = context / bt * bt;
  int64_t start = 0;
  for (size_t i = 0; i + 1 < k; ++i) {
    const int64_t end = std::min(start + share[i] * bt, aligned_context);
    if (end > start) out.push_back({usable[i], start, end});
    start = std::max(start, end);
  }
  const int tail = usable[k - 1];
  if (need - start > capacity_[tail]) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the tail rank ", tail, " cannot hold tokens [", start, ", ", context, ") plus ", growth,
        " tokens of growth (capacity ", capacity_[tail], " tokens)"));
  }
  out.push_back({tail, start, context});
  return out;
}

std::string ShardPlanner::Describe(const std::vector<ShardRange>& ranges) const {
  std::string s = absl::StrFormat("%-5s %-28s %14s %12s %14s %6s\n", "rank", "range", "tokens",
                                  "KV GiB", "capacity", "fill");
  for (const ShardRange& r : ranges) {
    const double gib = static_cast<double>(r.tokens()) * options_.bytes_per_token / (1ull << 30);
    const int64_t cap = capacity_[r.rank];
    absl::StrAppendFormat(&s, "%-5d %-28s %14d %12.2f %14d %5.1f%%\n", r.rank,
                          absl::StrCat("[", r.begin, ", ", r.end, ")"), r.tokens(), gib, cap,
                          cap > 0 ? 100.0 * static_cast<double>(r.tokens()) / cap : 0.0);
  }
  return s;
}

}  // namespace kvq::sharding
