// Shared by the prefill kernels' tests (expand_kv_test.cu, prefill_attention_test.cu,
// prefill_launch_test.cu): a batch of quantized caches with random K/V uploaded as a paged device
// view, random queries, PrefillAttention parameters over token-major K/V, and the launchers'
// InvalidArgument check.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_replace.h"
#include "kernels/prefill_attention.h"
#include "kernels/reference/rope.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantized_kv_cache.h"
#include "tests/kernels/kv_pool_test_util.h"

namespace kvq::testing {

inline constexpr int kPrefillTestLayer = 1;          // of 2: per-layer offsets are exercised
inline constexpr int kMinSplitKeys = 64;  // every key split is a multiple of 64 keys (prefill_attention.h)
inline constexpr uint16_t kUnwritten = 0x7d55;  // an fp16 NaN payload no float conversion produces

inline std::string FormatTag(const std::string& f) {
  return absl::StrReplaceAll(f, {{"-", "_"}, {"%", "pct"}, {".", "p"}});
}

// A batch of sequence caches (random K/V, one shape, format and quantizer) and its device view.
struct Past {
  kvstore::KvShape shape;
  kernels::RopeParams rope;
  std::shared_ptr<const kvstore::Quantizer> quant;
  std::vector<std::unique_ptr<kvstore::QuantizedKvCache>> caches;
  std::unique_ptr<DevicePagedKv> dev;
};

inline void BuildPast(const std::string& format, int head_dim, int n_kv_heads, const std::vector<int>& lens,
                      int64_t first_position, uint32_t seed, Past* past) {
  auto fmt = kvstore::KvFormat::Parse(format);
  ASSERT_TRUE(fmt.ok()) << fmt.status();
  past->shape = kvstore::KvShape{2, n_kv_heads, head_dim};
  past->rope.head_dim = head_dim;
  past->rope.theta = 500000.0;
  std::mt19937 rng(seed);
  past->quant = MakeRandomQuantizer(past->shape, *fmt, rng);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<const kvstore::QuantizedKvCache*> ptrs;
  MakeRandomCaches(past->shape, *fmt, past->quant, past->rope, lens, first_position, rng, nd, &past->caches, &ptrs);
  if (::testing::Test::HasFatalFailure()) return;
  past->dev = UploadCaches(ptrs, past->quant.get(), past->rope);
}

// PrefillAttention over contiguous token-major K/V ([n_keys][n_kv][hd]), not causal.
inline kernels::PrefillAttentionParams TokenMajorParams(int rows, int n_heads, int n_kv, int hd, int n_keys,
                                                 int64_t limit_base, const uint16_t* k, const uint16_t* v) {
  kernels::PrefillAttentionParams p;
  p.rows = rows;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv;
  p.head_dim = hd;
  p.k = k;
  p.v = v;
  p.kv_token_stride = static_cast<int64_t>(n_kv) * hd;
  p.kv_head_stride = hd;
  p.n_keys = n_keys;
  p.limit_base = limit_base;
  return p;
}

inline std::vector<float> RandomQ(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> q(n);
  for (float& x : q) x = nd(rng) * 0.6f;
  return q;
}

inline void ExpectInvalid(const absl::Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find(needle), std::string::npos)
      << "message should mention \"" << needle << "\": " << s;
}

}  // namespace kvq::testing
