// The shard planner with exact numbers. Memory: H200s of 141 GB (141e9 bytes); rank 0 reserves
// the weights plus workspace (20e9 for Llama-3-8B's 16 GB fp16 weights, 16e9 for LLaMA-2-7B's
// 13.5 GB), workers 4e9 of workspace. Capacity per rank is whole 256-token blocks:
//   fp16 Llama-3-8B = 2 * 32 layers * 8 * 128 * 2 bytes = 131072 B/token = 33554432 B/block
//     rank 0: floor(121e9 / 33554432) = 3606 blocks =   923136 tokens
//     worker: floor(137e9 / 33554432) = 4082 blocks =  1044992 tokens
#include "sharding/shard_planner.h"

#include <cmath>

#include "gtest/gtest.h"
#include "kvstore/block_layout.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantized_kv_cache.h"
#include "sharding/gpu_block_geometry.h"

namespace kvq::sharding {
namespace {

constexpr int64_t kH200Bytes = 141'000'000'000;

ShardPlannerOptions H200s(int n, double bytes_per_token, int64_t rank0_reserve) {
  ShardPlannerOptions o;
  o.bytes_per_token = bytes_per_token;
  o.block_tokens = kvstore::kBlockTokens;
  o.min_tokens_per_rank = 65536;
  o.ranks.push_back({kH200Bytes, rank0_reserve});
  for (int r = 1; r < n; ++r) o.ranks.push_back({kH200Bytes, 4'000'000'000});
  return o;
}

double Bpt(const std::string& format, int layers, int kv_heads, int head_dim) {
  return kvstore::ExpectedBytesPerToken(*kvstore::KvFormat::Parse(format),
                                        kvstore::KvShape{layers, kv_heads, head_dim});
}

// Contiguous from 0 to context, block-aligned boundaries, within each rank's capacity.
void ExpectWellFormed(const ShardPlanner& p, const std::vector<ShardRange>& ranges, int64_t context) {
  ASSERT_FALSE(ranges.empty());
  EXPECT_EQ(ranges.front().begin, 0);
  EXPECT_EQ(ranges.back().end, context);
  for (size_t i = 0; i < ranges.size(); ++i) {
    EXPECT_LE(ranges[i].tokens(), p.CapacityTokens(ranges[i].rank)) << "range " << i;
    if (i > 0) {
      EXPECT_EQ(ranges[i].begin, ranges[i - 1].end);
      EXPECT_EQ(ranges[i].begin % p.options().block_tokens, 0) << "range " << i;
    }
  }
}

TEST(ShardPlannerTest, Fp16Llama3CapacityIsWholeBlocks) {
  const int64_t expected[] = {923136, 1968128, 4058112, 8238080};  // 1, 2, 4, 8 GPUs
  const int gpus[] = {1, 2, 4, 8};
  for (int i = 0; i < 4; ++i) {
    auto p = ShardPlanner::Create(H200s(gpus[i], 131072.0, 20'000'000'000));
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->CapacityTokens(0), 923136);
    if (gpus[i] > 1) EXPECT_EQ(p->CapacityTokens(1), 1044992);
    EXPECT_EQ(p->MaxContextTokens(), expected[i]) << gpus[i] << " GPUs";
  }
}

TEST(ShardPlannerTest, Nuq3Llama3MaxContext) {
  // nuq3-1% on Llama-3-8B: 27558.72 B/token (~26.9 KiB, DESIGN.md's ~27 KiB; 27302.72 before the
  // value-outlier head starts, 8 bytes per token and layer, of 2026-12-02).
  const double bpt = Bpt("nuq3-1%", 32, 8, 128);
  EXPECT_DOUBLE_EQ(bpt, 27558.72);
  // floor(121e9 / (27558.72 * 256)) * 256 = 4390400; floor(137e9 / ...) * 256 = 4971008.
  const int64_t expected[] = {4390400, 9361408, 19303424, 39187456};
  const int gpus[] = {1, 2, 4, 8};
  for (int i = 0; i < 4; ++i) {
    auto p = ShardPlanner::Create(H200s(gpus[i], bpt, 20'000'000'000));
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->MaxContextTokens(), expected[i]) << gpus[i] << " GPUs";
    auto ranges = p->Plan(p->MaxContextTokens());
    ASSERT_TRUE(ranges.ok()) << ranges.status();
    ExpectWellFormed(*p, *ranges, p->MaxContextTokens());
    EXPECT_EQ(ranges->size(), static_cast<size_t>(gpus[i]));
    EXPECT_FALSE(p->Plan(p->MaxContextTokens() + 1).ok());
  }
}

TEST(ShardPlannerTest, Llama2TenMillionTokensNuq2FitsOnEightNotFour) {
  // ~75.4 KiB per token (DESIGN.md: ~74.4 before the value-outlier head starts, 32 bytes per token
  // and layer): 10M tokens are ~719 GiB (DESIGN.md: "~713 GiB").
  const double bpt = Bpt("nuq2-1%", 32, 32, 128);
  EXPECT_DOUBLE_EQ(bpt, 77210.88);
  auto eight = ShardPlanner::Create(H200s(8, bpt, 16'000'000'000));
  auto four = ShardPlanner::Create(H200s(4, bpt, 16'000'000'000));
  ASSERT_TRUE(eight.ok() && four.ok());
  EXPECT_EQ(eight->MaxContextTokens(), 14039040);
  EXPECT_EQ(four->MaxContextTokens(), 6941696);
  auto r8 = eight->Plan(10'000'000);
  ASSERT_TRUE(r8.ok()) << r8.status();
  ExpectWellFormed(*eight, *r8, 10'000'000);
  EXPECT_EQ(r8->size(), 8u);
  auto r4 = four->Plan(10'000'000);
  ASSERT_FALSE(r4.ok());
  EXPECT_EQ(r4.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(r4.status().message().find("6941696"), std::string::npos) << r4.status();
}

TEST(ShardPlannerTest, RangesBalanceBytesWithFreeMemory) {
  // 2M tokens of fp16 on 4 GPUs: 7813 blocks in proportion 3606 : 4082 : 4082 : 4082 of capacity
  // = 1777.29 : 2011.90 x 3, largest remainder -> 1777, 2012, 2012, 2012 blocks.
  auto p = ShardPlanner::Create(H200s(4, 131072.0, 20'000'000'000));
  ASSERT_TRUE(p.ok());
  auto r = p->Plan(2'000'000);
  ASSERT_TRUE(r.ok()) << r.status();
  const std::vector<ShardRange> expected = {
      {0, 0, 454912}, {1, 454912, 969984}, {2, 969984, 1485056}, {3, 1485056, 2000000}};
  EXPECT_EQ(*r, expected);
}

TEST(ShardPlannerTest, ShortSequencesStayOnFewRanks) {
  auto p = ShardPlanner::Create(H200s(8, 131072.0, 20'000'000'000));
  ASSERT_TRUE(p.ok());
  auto one = p->Plan(100'000);  // < 2 x 65536: rank 0 alone, no merge at all
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(*one, (std::vector<ShardRange>{{0, 0, 100'000}}));
  auto three = p->Plan(200'000);  // floor(200000 / 65536) = 3 ranks
  ASSERT_TRUE(three.ok());
  EXPECT_EQ(three->size(), 3u);
  ExpectWellFormed(*p, *three, 200'000);
  // More than rank 0 holds.
  auto two = p->Plan(923136 + 1);
  ASSERT_TRUE(two.ok());
  EXPECT_EQ(two->size(), 8u);  // 923137 / 65536 = 14 ranks wanted: all 8
}

TEST(ShardPlannerTest, TailKeepsRoomForGrowth) {
  ShardPlannerOptions o;
  o.bytes_per_token = 1.0;
  o.block_tokens = 16;
  o.min_tokens_per_rank = 16;
  o.ranks = {{64, 0}, {64, 0}};  // 64 tokens each
  auto p = ShardPlanner::Create(o);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->MaxContextTokens(), 128);
  // 100 + 20 = 120 tokens = 8 blocks, 4 each: rank 0 [0, 64), tail [64, 100) with 28 free >= 20.
  auto r = p->Plan(100, 20);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, (std::vector<ShardRange>{{0, 0, 64}, {1, 64, 100}}));
  EXPECT_FALSE(p->Plan(100, 29).ok());  // 129 > 128
  // Growth bigger than the context: the tail holds it, rank 0 stops at the context's last block
  // boundary (40 + 50 = 90 tokens = 6 blocks, 3 each; rank 0 [0, 32), tail [32, 40) + 50 <= 64).
  auto g = p->Plan(40, 50);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(*g, (std::vector<ShardRange>{{0, 0, 32}, {1, 32, 40}}));
  // No tail can hold 80 tokens of growth (64 each), though 120 tokens fit in all.
  EXPECT_EQ(p->Plan(40, 80).status().code(), absl::StatusCode::kResourceExhausted);
  // An odd block size (boundaries cut kvstore's 256-token blocks and any prefill chunk).
  o.block_tokens = 7;
  o.ranks = {{70, 0}, {70, 0}, {70, 0}};
  auto odd = ShardPlanner::Create(o);
  ASSERT_TRUE(odd.ok());
  auto ro = odd->Plan(100);
  ASSERT_TRUE(ro.ok()) << ro.status();
  ExpectWellFormed(*odd, *ro, 100);
  EXPECT_EQ(ro->size(), 3u);
}

TEST(ShardPlannerTest, RanksWithoutRoomAreSkippedAndBadInputsRefused) {
  ShardPlannerOptions o;
  o.bytes_per_token = 2.0;
  o.block_tokens = 4;
  o.min_tokens_per_rank = 1;
  o.ranks = {{100, 100}, {40, 0}};  // rank 0's reserve takes everything
  auto p = ShardPlanner::Create(o);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->CapacityTokens(0), 0);
  EXPECT_EQ(p->CapacityTokens(1), 20);
  auto r = p->Plan(10);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (std::vector<ShardRange>{{1, 0, 10}}));
  EXPECT_EQ(p->Plan(0).status().code(), absl::StatusCode::kInvalidArgument);
  o.bytes_per_token = 0;
  EXPECT_EQ(ShardPlanner::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.bytes_per_token = 1;
  o.ranks.clear();
  EXPECT_EQ(ShardPlanner::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// The GPU pool's blocks (sharding/gpu_block_geometry.h) against what the pool on the H200 reported
// for the same shapes (engine_bench, benchmarks/RESULTS.md, 2026-12-01, when the default reserve
// was 2.25): canonical bytes (which hold the nominal count of key outliers) plus the area beyond
// it, 1.25x the nominal count; at the default reserve the part beyond nominal scales with it. Formats without key outliers spend exactly the canonical bytes.
// Since 2026-12-02 the shapes with more value outliers than KV heads carry their head starts too
// (block_layout.h; 1 byte per KV head, token and layer): +256 bytes per token on Llama-3-8B, +1,024
// on LLaMA-2-7B, over the bytes measured then.
TEST(GpuBlockGeometryTest, PoolBytesPerTokenAreTheMeasuredOnes) {
  const struct {
    const char* format;
    int layers, kv_heads, head_dim;
    double canonical, pool;
  } cases[] = {
      {"nuq3-1%", 32, 8, 128, 27558.7, 29201.2},   // Llama-3-8B
      {"nuq4-1%", 32, 8, 128, 35750.7, 37393.2},
      {"nuq2-1%", 32, 8, 128, 19366.7, 21009.2},
      {"nuq3-1%", 32, 32, 128, 109978.9, 116548.6},  // LLaMA-2-7B
      {"nuq3-1%", 30, 3, 64, 4854.1, 5143.6},        // SmolLM2-135M
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.format);
    const kvstore::KvShape shape{c.layers, c.kv_heads, c.head_dim};
    const auto f = kvstore::KvFormat::Parse(c.format);
    ASSERT_TRUE(f.ok());
    EXPECT_NEAR(kvstore::ExpectedBytesPerToken(*f, shape), c.canonical, 0.05);
    const GpuBlockGeometry g = ComputeGpuBlockGeometry(shape, *f, 2.25);
    EXPECT_NEAR(g.bytes_per_token(), c.pool, 0.05);
    EXPECT_EQ(g.block_stride_bytes % 16, 0);
    const GpuBlockGeometry d = ComputeGpuBlockGeometry(shape, *f);
    EXPECT_NEAR((d.bytes_per_token() - c.canonical) / (c.pool - c.canonical), (kDefaultKeyOutlierReserve - 1) / 1.25, 0.01);
  }
  const auto nuq3 = kvstore::KvFormat::Parse("nuq3");
  ASSERT_TRUE(nuq3.ok());
  const kvstore::KvShape l3{32, 8, 128};
  EXPECT_EQ(ComputeGpuBlockGeometry(l3, *nuq3).block_stride_bytes,
            kvstore::AlignUp(kvstore::ComputeBlockLayout(*nuq3, l3).fixed_bytes, 16));
  // A larger reserve costs 4 bytes per extra nominal entry.
  const auto f = kvstore::KvFormat::Parse("nuq3-1%");
  EXPECT_GT(ComputeGpuBlockGeometry(l3, *f, 5.0).block_stride_bytes, ComputeGpuBlockGeometry(l3, *f).block_stride_bytes);
}

}  // namespace
}  // namespace kvq::sharding
