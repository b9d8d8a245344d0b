// The prefill launchers' contracts (kernels/prefill_attention.h), apart from the numerics in
// prefill_attention_test.cu: parameter validation (before any CUDA call: most run without a
// device), the kernel selector, and how splits and the past's segments are planned (host only).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/prefill_attention.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/prefill_test_util.h"

namespace kvq {
namespace {

using testing::DeviceBuffer;
using testing::ExpectInvalid;
using testing::kMinSplitKeys;
using testing::TokenMajorParams;

// ---- Launch validation ----

TEST(PrefillAttentionLauncher, RejectsBadShapes) {
  kernels::PrefillAttentionParams p;
  p.rows = 4;
  p.n_heads = 8;
  p.n_kv_heads = 2;
  p.head_dim = 96;
  p.n_keys = 10;
  ExpectInvalid(kernels::LaunchPrefillAttention(p, nullptr), "head_dim");
  p.head_dim = 128;
  p.n_heads = 6;
  p.n_kv_heads = 4;
  ExpectInvalid(kernels::LaunchPrefillAttention(p, nullptr), "n_heads");
  p.n_kv_heads = 0;
  ExpectInvalid(kernels::LaunchPrefillAttention(p, nullptr), "n_heads");
  p.n_heads = 8;
  p.n_kv_heads = 2;
  p.splits = 0;
  ExpectInvalid(kernels::LaunchPrefillAttention(p, nullptr), "splits");
  p.splits = 1;
  p.rows = -1;
  ExpectInvalid(kernels::LaunchPrefillAttention(p, nullptr), "rows");
  p.rows = 4;
  p.n_keys = -1;
  ExpectInvalid(kernels::LaunchPrefillAttention(p, nullptr), "n_keys");
  // Every shape valid, every pointer null.
  p.n_keys = 10;
  ExpectInvalid(kernels::LaunchPrefillAttention(p, nullptr), "null");
  // No rows: nothing to do, even without buffers.
  p.rows = 0;
  EXPECT_TRUE(kernels::LaunchPrefillAttention(p, nullptr).ok());
}

// The kernel selector: names, and a wgmma kernel asked for where it cannot run (no Hopper device:
// CI, or another GPU) is refused with FailedPrecondition before anything is launched; auto falls
// back. Skips on a device that has the kernels (the pointers here are not device memory).
TEST(PrefillAttentionLauncher, RefusesAWgmmaKernelWithoutHopper) {
  for (auto k : {kernels::PrefillKernel::kAuto, kernels::PrefillKernel::kMmaSync, kernels::PrefillKernel::kWgmma,
                 kernels::PrefillKernel::kWgmmaSerial}) {
    EXPECT_NE(std::string(kernels::PrefillKernelName(k)), "?");
  }
  if (kernels::PrefillWgmmaOnCurrentDevice()) GTEST_SKIP() << "this device runs the wgmma kernels";
  float host[8] = {};
  uint16_t halves[16] = {};
  kernels::PrefillAttentionParams p = TokenMajorParams(1, 2, 1, 128, 1, 1, halves, halves);
  p.q = host;
  p.o = host;
  p.lse = host;
  const kernels::PrefillKernel before = kernels::GetPrefillKernel();
  for (auto k : {kernels::PrefillKernel::kWgmma, kernels::PrefillKernel::kWgmmaSerial}) {
    kernels::SetPrefillKernel(k);
    EXPECT_EQ(kernels::GetPrefillKernel(), k);
    const absl::Status st = kernels::LaunchPrefillAttention(p, nullptr);
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    EXPECT_NE(std::string(st.message()).find("compute capability 9.0"), std::string::npos) << st;
  }
  kernels::SetPrefillKernel(before);
  // PrefillRowsPerCta follows the kernel that runs: mma.sync here.
  EXPECT_EQ(kernels::PrefillRowsPerCta(64), 64);
}

TEST(PrefillAttentionLauncher, RejectsMisalignedKv) {
  // Real buffers so that a launcher that failed to validate would read valid memory.
  KVQ_REQUIRE_CUDA_DEVICE();
  DeviceBuffer<float> q(4 * 8 * 64), o(4 * 8 * 64), lse(4 * 8);
  DeviceBuffer<uint16_t> kv(16 * 2 * 64 + 64);
  kernels::PrefillAttentionParams p;
  p.rows = 4;
  p.n_heads = 8;
  p.n_kv_heads = 2;
  p.head_dim = 64;
  p.q = q.get();
  p.o = o.get();
  p.lse = lse.get();
  p.k = p.v = kv.get();
  p.n_keys = 16;
  p.limit_base = 16;
  p.kv_token_stride = 2 * 64 + 4;  // not a multiple of 8 halves
  p.kv_head_stride = 64;
  ExpectInvalid(kernels::LaunchPrefillAttention(p, nullptr), "aligned");
  p.kv_token_stride = 2 * 64;
  p.k = kv.get() + 4;  // 8-byte aligned only
  ExpectInvalid(kernels::LaunchPrefillAttention(p, nullptr), "aligned");
  p.k = kv.get();
  EXPECT_TRUE(kernels::LaunchPrefillAttention(p, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
}

TEST(ToHalfRowsLauncher, RejectsBadArguments) {
  ExpectInvalid(kernels::LaunchToHalfRows(-1, 8, nullptr, 8, nullptr, 8, nullptr), "negative");
  ExpectInvalid(kernels::LaunchToHalfRows(2, 8, nullptr, 8, nullptr, 8, nullptr), "null");
  EXPECT_TRUE(kernels::LaunchToHalfRows(0, 8, nullptr, 8, nullptr, 8, nullptr).ok());
}

// ---- ChoosePrefillSplits (host) ----

TEST(ChoosePrefillSplits, StaysInRange) {
  for (int rows : {1, 17, 64, 200, 1000, 8192}) {
    for (const auto& [n_heads, n_kv] : {std::pair{8, 8}, std::pair{32, 8}, std::pair{24, 3},
                                         std::pair{64, 8}}) {
      for (int n_keys : {0, 1, 64, 65, 300, 5000, 100000, 2000000}) {
        for (int sms : {1, 16, 132}) {
          for (int max_splits : {1, 2, 4, 16, 64}) {
            const int s = kernels::ChoosePrefillSplits(rows, n_heads, n_kv, n_keys, sms, max_splits);
            SCOPED_TRACE(absl::StrCat("rows ", rows, ", heads ", n_heads, "/", n_kv, ", keys ",
                                      n_keys, ", sms ", sms, ", max ", max_splits));
            ASSERT_GE(s, 1);
            ASSERT_LE(s, max_splits);
            // No split without keys: each holds a multiple of 64.
            ASSERT_LE(s, std::max(1, (n_keys + kMinSplitKeys - 1) / kMinSplitKeys));
          }
        }
      }
    }
  }
}

TEST(ChoosePrefillSplits, OneWhenTheRowsFillTheDevice) {
  // 4096 rows x group 4 = 256 M tiles of 64 per kv head, x 8 kv heads: 2048 CTAs on 132 SMs.
  EXPECT_EQ(kernels::ChoosePrefillSplits(4096, 32, 8, 100000, 132, 16), 1);
  EXPECT_EQ(kernels::ChoosePrefillSplits(2048, 64, 8, 8192, 132, 64), 1);
  // A single split allowed, or too few keys for two.
  EXPECT_EQ(kernels::ChoosePrefillSplits(1, 8, 8, 100000, 132, 1), 1);
  EXPECT_EQ(kernels::ChoosePrefillSplits(1, 8, 8, 64, 132, 16), 1);
  EXPECT_EQ(kernels::ChoosePrefillSplits(1, 8, 8, 0, 132, 16), 1);
}

TEST(ChoosePrefillSplits, CountsTheCtasOfTheKernelTaken) {
  // 512 rows x group 4 over 8 kv heads: 256 CTAs of 64 rows (nearly two waves on 132 SMs: 2
  // splits) but 128 CTAs of 128 rows (the head-dim-128 kernel: 3 splits).
  EXPECT_EQ(kernels::PrefillRowsPerCta(128), 128);
  // The wgmma kernels take 128 rows at every head dim; mma.sync 64 at head dim 64.
  const bool wgmma = kernels::GetPrefillKernel() != kernels::PrefillKernel::kMmaSync && kernels::PrefillWgmmaOnCurrentDevice();
  EXPECT_EQ(kernels::PrefillRowsPerCta(64), wgmma ? 128 : 64);
  EXPECT_EQ(kernels::ChoosePrefillSplits(512, 32, 8, 100000, 132, 64, 64), 2);
  EXPECT_EQ(kernels::ChoosePrefillSplits(512, 32, 8, 100000, 132, 64, kernels::PrefillRowsPerCta(128)), 3);
}

// The engine's plan for one prefill launch over a cached past (host only).
TEST(PlanPrefillPast, BoundsTheExpansionAndThePartials) {
  const size_t expand = size_t{128} << 20, partials = size_t{256} << 20;
  // Llama-3-8B shape, 4096 rows over 1M keys: segments of 128 MiB / (8 heads x 128 x 2 bytes) =
  // 65,536 tokens; the rows fill the device (one split); 16 segments merge through two partial
  // slots of 4096 x 32 x 128 floats.
  auto p = kernels::PlanPrefillPast(4096, 32, 8, 128, 1 << 20, 132, expand, partials);
  EXPECT_EQ(p.seg_tokens, 65536);
  EXPECT_EQ(p.expand_bytes, size_t{128} << 20);
  EXPECT_EQ(p.splits, 1);
  EXPECT_EQ(p.partial_bytes, size_t{2} * 4096 * 32 * 128 * 4);
  // The same rows over a past that fits one segment: no partials at all.
  p = kernels::PlanPrefillPast(4096, 32, 8, 128, 20000, 132, expand, partials);
  EXPECT_EQ(p.seg_tokens, 20000);
  EXPECT_EQ(p.splits, 1);
  EXPECT_EQ(p.partial_bytes, 0u);
  // 16 rows: split over the keys, partial slots within the budget.
  p = kernels::PlanPrefillPast(16, 32, 8, 128, 100000, 132, expand, partials);
  EXPECT_GT(p.splits, 1);
  EXPECT_EQ(p.partial_bytes, static_cast<size_t>(p.splits + 1) * 16 * 32 * 128 * 4);
  EXPECT_LE(p.partial_bytes, partials);
  // A partial budget smaller than two slots still gives a usable plan (one split).
  p = kernels::PlanPrefillPast(4096, 32, 8, 128, 1 << 20, 132, expand, size_t{1} << 20);
  EXPECT_EQ(p.splits, 1);
}

TEST(ChoosePrefillSplits, SplitsASmallChunkOverALongPast) {
  // One row, 8 kv heads: 8 CTAs on 132 SMs; even 16 splits leave SMs idle, so take them all.
  EXPECT_EQ(kernels::ChoosePrefillSplits(1, 8, 8, 100000, 132, 16), 16);
  // More SMs never means fewer splits.
  int prev = 1;
  for (int sms : {1, 8, 32, 66, 132, 264}) {
    const int s = kernels::ChoosePrefillSplits(17, 32, 8, 50000, sms, 64);
    EXPECT_GE(s, prev) << "sms " << sms;
    prev = s;
  }
  EXPECT_GT(prev, 1);
}

}  // namespace
}  // namespace kvq
