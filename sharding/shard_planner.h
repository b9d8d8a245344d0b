// The shard planner: a pure capacity function. Given the bytes one token of KV takes (all layers,
// K and V) and each rank's memory, it says the largest context that fits and, for a context, the
// contiguous token range [begin, end) each rank holds. Nothing is allocated; `kvq plan` prints it.
//
//   capacity(r)   = floor((total_r - reserved_r) / (bytes_per_token * block_tokens)) * block_tokens
//   max context   = sum_r capacity(r)
//   ranks used    = the fewest of 0, 1, 2, ... that hold the context, at least
//                   floor(context / min_tokens_per_rank) (short sequences stay on few ranks: the
//                   merge costs ~20 us per layer and rank and dominates below ~100K tokens)
//   split         = the blocks of (context + growth) divided among the used ranks in proportion to
//                   their capacity (largest remainder), so bytes balance with free memory; every
//                   boundary is a multiple of block_tokens. The last used rank is the tail: decode
//                   appends go to it, so its share includes the growth room and its range ends at
//                   `context` (the sequence grows into it).
// Rank 0 comes first because it holds the weights and runs the scheduler: a short sequence then
// lives on rank 0 alone and needs no transfer at all.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvq::sharding {

struct RankMemory {
  int64_t total_bytes = 0;
  int64_t reserved_bytes = 0;  // rank 0: weights + workspace; workers: workspace
};

struct ShardPlannerOptions {
  double bytes_per_token = 0;  // KvCacheFactory::BytesPerToken() / kvstore::ExpectedBytesPerToken
  std::vector<RankMemory> ranks;  // one per rank, rank 0 first
  int64_t block_tokens = 256;     // kvstore::kBlockTokens; boundaries are multiples of it
  int64_t min_tokens_per_rank = 65536;
};

// Rank `rank` holds tokens [begin, end) of the sequence.
struct ShardRange {
  int rank = 0;
  int64_t begin = 0;
  int64_t end = 0;
  int64_t tokens() const { return end - begin; }
  bool operator==(const ShardRange&) const = default;
};

class ShardPlanner {
 public:
  static absl::StatusOr<ShardPlanner> Create(const ShardPlannerOptions& options);

  const ShardPlannerOptions& options() const { return options_; }
  int num_ranks() const { return static_cast<int>(options_.ranks.size()); }
  // Block-aligned tokens rank r can hold (0 when its reserve takes everything).
  int64_t CapacityTokens(int rank) const { return capacity_[rank]; }
  // The largest single context that fits across all ranks.
  int64_t MaxContextTokens() const { return max_context_; }
  // Ranges for a sequence of `context` tokens that will grow by up to `growth` more (kept free on
  // the tail rank). Ranges are contiguous from 0, in rank order, non-empty except that the tail may
  // be empty when context is a block multiple; ResourceExhausted (naming the limit) when
  // context + growth does not fit.
  absl::StatusOr<std::vector<ShardRange>> Plan(int64_t context, int64_t growth = 0) const;

  // A table of the ranges and bytes per rank, for `kvq plan`.
  std::string Describe(const std::vector<ShardRange>& ranges) const;

 private:
  explicit ShardPlanner(const ShardPlannerOptions& o);
  ShardPlannerOptions options_;
  std::vector<int64_t> capacity_;
  int64_t max_context_ = 0;
};

}  // namespace kvq::sharding
