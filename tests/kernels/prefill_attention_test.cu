// Prefill attention (kernels/prefill_attention.h), GPU vs reference (ExpandKv itself:
// expand_kv_test.cu):
//  - PrefillAttention over the expanded past vs AttendPast (double accumulation over the same
//    dequantized cache), not causal, with 1, 3 and the chosen number of key splits merged by
//    LaunchMergeAttention;
//  - causal rows (row r sees keys [0, limit_base + r)) vs AttendPast per row, including rows that
//    see nothing and splits a row does not reach (o = 0, lse = -inf there);
//  - a chunk attending itself from fp32 K/V through LaunchToHalfRows, token-major (padded) and
//    head-major, vs a double-precision reference over the same fp16 K/V;
//  - every kernel (mma.sync, wgmma, wgmma-serial) on one shape, and every device of the process.
// Launcher validation, the kernel selector and the split / segment planning:
// prefill_launch_test.cu.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/half.h"
#include "kernels/merge_attention.h"
#include "kernels/prefill_attention.h"
#include "kernels/reference/rope.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantized_kv_cache.h"
#include "kvstore/quantizer.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/kv_pool_test_util.h"
#include "tests/kernels/prefill_test_util.h"

namespace kvq {
namespace {

using testing::BuildPast;
using testing::DeviceBuffer;
using testing::ExpectInvalid;
using testing::FormatTag;
using testing::kUnwritten;
using testing::MaxAbsError;
using testing::Past;
using testing::RandomQ;
using testing::TokenMajorParams;
constexpr int kLayer = testing::kPrefillTestLayer;

// ---- Tolerances (worst element) ----
//
// PrefillAttention vs AttendPast (double accumulation over the unrounded fp32 K/V): the GPU rounds
// K and V (ExpandKv), Q * scale * log2 e and P to fp16, relative 2^-11 each, and accumulates in
// fp32.
//  o: a row that sees one key returns that value rounded to fp16: half an ulp, <= 2^-9 ~ 2e-3 for
//     |v| in [4, 8) (the largest dense values of N(0, 1) data; outliers are exact fp16). Rounding
//     P moves o by sum_t p_t e_t (v_t - o) and logit errors by sum_t p_t ds_t (v_t - o): random
//     signs, ~1e-4 each over many keys. 3e-3 = the single-value bound + 1e-3.
//  lse: a softmax-weighted mean of logit errors. A logit s = scale * q.k moves by
//     scale * sum_d q_d k_d (e_q + e_k): ~2e-4 rms for q ~ N(0, 0.6^2), k ~ N(0, 1.2^2) (independent
//     errors add in quadrature over head_dim), a rounded key outlier (|k| up to ~20) adds <= 1e-3.
//     2e-3 is 4 sigma of the worst rows plus an outlier.
// Measured on an H200 over this grid: o 8.6e-4, lse 4.9e-4.
constexpr double kPastOutTol = 3e-3;
constexpr double kPastLseTol = 2e-3;
// PrefillAttention vs a double reference over the very fp16 K/V it reads (the attention alone):
// V needs no rounding, only the Q and P roundings and fp32 accumulation remain (see above); the
// same bounds hold with more margin. Measured on an H200: o 7.2e-4, lse 6.4e-4 (a one-key row:
// the whole logit error of Q's rounding shows).
constexpr double kSelfOutTol = 3e-3;
constexpr double kSelfLseTol = 2e-3;

using testing::kMinSplitKeys;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- PrefillAttention: helpers ----

// The whole past [0, len) of batch row `seq`, token-major ([len][n_kv][hd]), expanded in segments
// of up to 300 tokens (t0 > 0 into an offset output), left on the device.
void ExpandAll(const kernels::PagedKvCache& view, int seq, int len, int64_t L,
               DeviceBuffer<uint16_t>* k, DeviceBuffer<uint16_t>* v) {
  k->Resize(static_cast<size_t>(len) * L);
  v->Resize(static_cast<size_t>(len) * L);
  for (int t0 = 0; t0 < len; t0 += 300) {
    kernels::ExpandKvParams p;
    p.kv = view;
    p.layer = kLayer;
    p.seq = seq;
    p.t0 = t0;
    p.n = std::min(300, len - t0);
    p.k = k->get() + t0 * L;
    p.v = v->get() + t0 * L;
    p.token_stride = L;
    p.head_stride = view.geom.head_dim;
    const absl::Status st = kernels::LaunchExpandKv(p, nullptr);
    ASSERT_TRUE(st.ok()) << st;
  }
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
}

struct PrefillOut {
  std::vector<float> o_parts, lse_parts;  // [splits][rows * n_heads][hd], [splits][rows * n_heads]
  std::vector<float> o, lse;              // merged: [rows * n_heads][hd], [rows * n_heads]
};

// LaunchPrefillAttention (p: shape, K/V and limits; q, outputs and splits are set here) into
// partial slots pre-filled with NaN, so that an output the kernel fails to write shows, then
// LaunchMergeAttention over the slots when splits > 1.
void RunPrefill(kernels::PrefillAttentionParams p, const std::vector<float>& q, int splits,
                PrefillOut* out) {
  const size_t rh = static_cast<size_t>(p.rows) * p.n_heads;
  const size_t hd = static_cast<size_t>(p.head_dim);
  DeviceBuffer<float> dq(q);
  DeviceBuffer<float> dop(std::vector<float>(splits * rh * hd, kNaN));
  DeviceBuffer<float> dlp(std::vector<float>(splits * rh, kNaN));
  p.q = dq.get();
  p.splits = splits;
  p.o = dop.get();
  p.lse = dlp.get();
  p.o_split_stride = static_cast<int64_t>(rh * hd);
  p.lse_split_stride = static_cast<int64_t>(rh);
  const absl::Status st = kernels::LaunchPrefillAttention(p, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  out->o_parts = dop.Download();
  out->lse_parts = dlp.Download();
  if (splits == 1) {
    out->o = out->o_parts;
    out->lse = out->lse_parts;
    return;
  }
  DeviceBuffer<float> dout(rh * hd), dlse(rh);
  kernels::MergeAttentionParams m;
  m.rows = static_cast<int>(rh);
  m.n_parts = splits;
  m.head_dim = p.head_dim;
  m.o_parts = dop.get();
  m.o_row_stride = p.head_dim;
  m.o_part_stride = static_cast<int64_t>(rh * hd);
  m.lse_parts = dlp.get();
  m.lse_row_stride = 1;
  m.lse_part_stride = static_cast<int64_t>(rh);
  m.o = dout.get();
  m.lse = dlse.get();
  const absl::Status mst = kernels::LaunchMergeAttention(m, nullptr);
  ASSERT_TRUE(mst.ok()) << mst;
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  out->o = dout.Download();
  out->lse = dlse.Download();
}

// Every partial written (no NaN left of the fill, no lse = +inf) and o = 0 where lse = -inf.
void ExpectPartialsWritten(const PrefillOut& out, size_t rows_x_heads, int hd) {
  int64_t bad = 0;
  size_t first = 0;
  for (size_t i = 0; i < out.lse_parts.size(); ++i) {
    const float l = out.lse_parts[i];
    bool ok = !std::isnan(l) && l != INFINITY;
    for (int d = 0; d < hd && ok; ++d) {
      const float x = out.o_parts[i * hd + d];
      ok = !std::isnan(x) && (l != -INFINITY || x == 0.0f);
    }
    if (!ok && bad++ == 0) first = i;
  }
  EXPECT_EQ(bad, 0) << "partials unwritten, or lse = -inf with o != 0; first: split "
                    << first / rows_x_heads << ", (row, head) " << first % rows_x_heads
                    << ", lse " << out.lse_parts[first];
}

// Rows whose visible keys all lie in [0, 64) sit entirely in split 0 (every split holds a
// multiple of 64 keys): every other split must report o = 0, lse = -inf for them; rows that see
// no key, every split.
void ExpectEmptySplits(const PrefillOut& out, const std::vector<int>& limits, int n_heads, int hd,
                       int splits) {
  const size_t rh = limits.size() * n_heads;
  int64_t bad = 0;
  std::string first;
  for (int s = 0; s < splits; ++s) {
    for (size_t r = 0; r < limits.size(); ++r) {
      if (!(limits[r] == 0 || (s > 0 && limits[r] <= kMinSplitKeys))) continue;
      for (int h = 0; h < n_heads; ++h) {
        const size_t row = s * rh + r * n_heads + h;
        bool ok = out.lse_parts[row] == -INFINITY;
        for (int d = 0; d < hd && ok; ++d) ok = out.o_parts[row * hd + d] == 0.0f;
        if (!ok && bad++ == 0) {
          first = absl::StrCat("split ", s, ", row ", r, " (limit ", limits[r], "), head ", h,
                               ": lse ", out.lse_parts[row]);
        }
      }
    }
  }
  EXPECT_EQ(bad, 0) << "(row, head) partials of splits the row cannot see are not empty; first: "
                    << first;
}

// Worst element of o ([rows][n_heads][hd]: per_head = hd) or lse (per_head = 1) within tol.
void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, double tol,
                 int n_heads, int per_head, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  if (got.empty()) return;
  const auto e = MaxAbsError(got, want);
  const size_t per_row = static_cast<size_t>(n_heads) * per_head;
  EXPECT_LE(e.err, tol) << what << " of row " << e.index / per_row << ", head "
                        << (e.index % per_row) / per_head << ", element " << e.index % per_head
                        << " = " << got[e.index] << ", want " << want[e.index];
}

// ---- PrefillAttention over the expanded past, not causal ----

struct PastCase {
  std::string format;
  int head_dim;
  int n_kv_heads;
  int group;
  int len;   // past tokens (= keys)
  int rows;  // query rows
  int64_t first_position;
  float scale;  // 0: 1/sqrt(head_dim)
};

std::string PastName(const ::testing::TestParamInfo<PastCase>& info) {
  const PastCase& c = info.param;
  return absl::StrCat(FormatTag(c.format), "_hd", c.head_dim, "_kv", c.n_kv_heads, "_g", c.group,
                      "_len", c.len, "_rows", c.rows, "_pos", c.first_position,
                      c.scale > 0 ? "_scaled" : "");
}

class PrefillPastTest : public ::testing::TestWithParam<PastCase> {};

TEST_P(PrefillPastTest, MatchesAttendPast) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const PastCase& c = GetParam();
  const uint32_t seed = 1000 + c.len + c.rows + c.head_dim;
  Past past;
  ASSERT_NO_FATAL_FAILURE(
      BuildPast(c.format, c.head_dim, c.n_kv_heads, {c.len}, c.first_position, seed, &past));
  const kvstore::QuantizedKvCache& cache = *past.caches[0];
  const int n_heads = c.n_kv_heads * c.group;
  const int64_t L = past.shape.ElementsPerTokenPerLayer();
  DeviceBuffer<uint16_t> dk, dv;
  ASSERT_NO_FATAL_FAILURE(ExpandAll(past.dev->view, 0, c.len, L, &dk, &dv));

  const std::vector<float> q =
      RandomQ(static_cast<size_t>(c.rows) * n_heads * c.head_dim, seed + 1);
  auto want = cache.AttendPast(kLayer, q.data(), c.rows, n_heads, 0, c.len,
                               static_cast<double>(c.scale));
  ASSERT_TRUE(want.ok()) << want.status();

  kernels::PrefillAttentionParams p;
  p.rows = c.rows;
  p.n_heads = n_heads;
  p.n_kv_heads = c.n_kv_heads;
  p.head_dim = c.head_dim;
  p.k = dk.get();
  p.v = dv.get();
  p.kv_token_stride = L;
  p.kv_head_stride = c.head_dim;
  p.n_keys = c.len;
  p.causal = false;
  p.scale = c.scale;
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int chosen = kernels::ChoosePrefillSplits(c.rows, n_heads, c.n_kv_heads, c.len, sms, 16);
  // (splits, limit_base): 3 splits with fewer than 129 keys leave trailing splits empty for every
  // row; limit_base past n_keys is clamped to it.
  const int64_t len = c.len;
  const std::vector<int> limits(c.rows, c.len);
  for (const auto& [splits, limit_base] : {std::pair{1, len}, std::pair{3, len},
                                           std::pair{3, len + 1000}, std::pair{chosen, len}}) {
    SCOPED_TRACE(absl::StrCat("splits ", splits, ", limit_base ", limit_base));
    p.limit_base = limit_base;
    PrefillOut out;
    ASSERT_NO_FATAL_FAILURE(RunPrefill(p, q, splits, &out));
    ExpectPartialsWritten(out, static_cast<size_t>(c.rows) * n_heads, c.head_dim);
    ExpectEmptySplits(out, limits, n_heads, c.head_dim, splits);
    ExpectClose(out.o, want->o, kPastOutTol, n_heads, c.head_dim, "o");
    ExpectClose(out.lse, want->lse, kPastLseTol, n_heads, 1, "lse");
  }
}

std::vector<PastCase> PastCases() {
  std::vector<PastCase> cs;
  for (int hd : {64, 128}) {
    cs.push_back({"fp16", hd, 2, 4, 700, 64, 0, 0.0f});
    cs.push_back({"nuq4-1%", hd, 2, 4, 300, 17, 0, 0.0f});
    cs.push_back({"nuq3-1%", hd, 3, 3, 113, 200, 0, 0.0f});
    cs.push_back({"nuq2-1%", hd, 2, 8, 256, 1, 0, 0.0f});
    cs.push_back({"nuq3", hd, 1, 1, 1, 17, 0, 0.0f});
    cs.push_back({"nuq4-0.1%-sink5", hd, 2, 4, 700, 17, 0, 0.0f});
    cs.push_back({"int3-pc-post-1%-sink3", hd, 2, 4, 300, 64, 0, 0.0f});
    cs.push_back({"int4-pc-pre", hd, 2, 3, 257, 17, 0, 0.0f});
    cs.push_back({"nuq3-1%", hd, 2, 4, 700, 64, 5000000, 0.0f});
    cs.push_back({"fp16", hd, 3, 1, 1000, 200, 5000000, 0.0f});
    // An explicit softmax scale (not 1/sqrt(hd)), and GQA group 8 over a long-ish past.
    cs.push_back({"nuq4-1%", hd, 1, 8, 520, 33, 0, 0.07f});
  }
  return cs;
}

INSTANTIATE_TEST_SUITE_P(Grid, PrefillPastTest, ::testing::ValuesIn(PastCases()), PastName);

// ---- PrefillAttention over the expanded past, causal ----

struct CausalCase {
  std::string format;
  int head_dim;
  int n_kv_heads;
  int group;
  int len;  // keys
  int rows;
  int64_t limit_base;  // row r sees keys [0, clamp(limit_base + r, 0, len))
  int splits;
  int64_t first_position;
};

std::string CausalName(const ::testing::TestParamInfo<CausalCase>& info) {
  const CausalCase& c = info.param;
  return absl::StrCat(FormatTag(c.format), "_hd", c.head_dim, "_kv", c.n_kv_heads, "_g", c.group,
                      "_len", c.len, "_rows", c.rows, "_base",
                      c.limit_base < 0 ? absl::StrCat("m", -c.limit_base) : absl::StrCat(c.limit_base),
                      "_s", c.splits, "_pos", c.first_position);
}

class PrefillCausalTest : public ::testing::TestWithParam<CausalCase> {};

TEST_P(PrefillCausalTest, MatchesAttendPastPerRow) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const CausalCase& c = GetParam();
  const uint32_t seed = 2000 + c.len + c.rows + c.head_dim;
  Past past;
  ASSERT_NO_FATAL_FAILURE(
      BuildPast(c.format, c.head_dim, c.n_kv_heads, {c.len}, c.first_position, seed, &past));
  const kvstore::QuantizedKvCache& cache = *past.caches[0];
  const int n_heads = c.n_kv_heads * c.group;
  const int64_t L = past.shape.ElementsPerTokenPerLayer();
  const size_t row_elems = static_cast<size_t>(n_heads) * c.head_dim;
  DeviceBuffer<uint16_t> dk, dv;
  ASSERT_NO_FATAL_FAILURE(ExpandAll(past.dev->view, 0, c.len, L, &dk, &dv));

  const std::vector<float> q = RandomQ(c.rows * row_elems, seed + 1);
  std::vector<int> limits(c.rows);
  std::vector<float> want_o, want_lse;
  for (int r = 0; r < c.rows; ++r) {
    limits[r] = static_cast<int>(std::clamp<int64_t>(c.limit_base + r, 0, c.len));
    auto ref = cache.AttendPast(kLayer, q.data() + r * row_elems, 1, n_heads, 0, limits[r]);
    ASSERT_TRUE(ref.ok()) << ref.status();
    want_o.insert(want_o.end(), ref->o.begin(), ref->o.end());
    want_lse.insert(want_lse.end(), ref->lse.begin(), ref->lse.end());
  }

  kernels::PrefillAttentionParams p;
  p.rows = c.rows;
  p.n_heads = n_heads;
  p.n_kv_heads = c.n_kv_heads;
  p.head_dim = c.head_dim;
  p.k = dk.get();
  p.v = dv.get();
  p.kv_token_stride = L;
  p.kv_head_stride = c.head_dim;
  p.n_keys = c.len;
  p.limit_base = c.limit_base;
  p.causal = true;
  PrefillOut out;
  ASSERT_NO_FATAL_FAILURE(RunPrefill(p, q, c.splits, &out));
  ExpectPartialsWritten(out, static_cast<size_t>(c.rows) * n_heads, c.head_dim);
  ExpectEmptySplits(out, limits, n_heads, c.head_dim, c.splits);
  ExpectClose(out.o, want_o, kPastOutTol, n_heads, c.head_dim, "o");
  ExpectClose(out.lse, want_lse, kPastLseTol, n_heads, 1, "lse");
}

std::vector<CausalCase> CausalCases() {
  return {
      // The last chunk of a prompt: rows past 200 clamp at n_keys.
      {"nuq3-1%", 128, 2, 4, 700, 200, 500, 3, 0},
      // Every row sees <= 64 keys: splits 1 and 2 are empty for all of them.
      {"fp16", 64, 2, 4, 300, 64, 1, 3, 0},
      // limit_base 0: row 0 sees nothing (o = 0, lse = -inf after the merge as well).
      {"nuq4-1%-sink5", 128, 1, 8, 113, 17, 0, 2, 0},
      // Negative limit_base: rows 0..20 see nothing; one split.
      {"nuq2-1%", 64, 3, 3, 256, 100, -20, 1, 0},
      // Post-RoPE keys with rotated sinks, the last row exactly at n_keys.
      {"int3-pc-post-1%-sink3", 128, 2, 4, 700, 64, 637, 3, 0},
      // A rank shard: more splits than the chunk needs, limits crossing split boundaries.
      {"nuq3-1%", 64, 2, 4, 1000, 200, 700, 4, 5000000},
      // Group 1 (M rows = query rows), 128-key tiles partially masked.
      {"int4-pc-pre", 128, 3, 1, 257, 150, 40, 2, 0},
  };
}

INSTANTIATE_TEST_SUITE_P(Grid, PrefillCausalTest, ::testing::ValuesIn(CausalCases()), CausalName);

// ---- A chunk attending itself: fp32 K/V -> ToHalfRows -> PrefillAttention ----

// Plain double-precision attention: q [rows][n_heads][hd] over k, v [n_keys][n_kv][hd] (floats),
// row r seeing keys [0, clamp(limit_base + (causal ? r : 0), 0, n_keys)), scale 1/sqrt(hd), query
// head h reading kv head h / (n_heads / n_kv); natural-log lse; o = 0 and lse = -inf for a row
// that sees no key.
void AttentionReference(const std::vector<float>& q, const std::vector<float>& k,
                        const std::vector<float>& v, int rows, int n_heads, int n_kv, int hd,
                        int n_keys, int64_t limit_base, bool causal, std::vector<float>* o,
                        std::vector<float>* lse) {
  const int group = n_heads / n_kv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  o->assign(static_cast<size_t>(rows) * n_heads * hd, 0.0f);
  lse->assign(static_cast<size_t>(rows) * n_heads, -INFINITY);
  std::vector<double> s(n_keys), acc(hd);
  for (int r = 0; r < rows; ++r) {
    const int lim = static_cast<int>(std::clamp<int64_t>(limit_base + (causal ? r : 0), 0, n_keys));
    if (lim == 0) continue;
    for (int h = 0; h < n_heads; ++h) {
      const size_t row = static_cast<size_t>(r) * n_heads + h;
      const float* qv = q.data() + row * hd;
      const int hk = h / group;
      double mx = -INFINITY;
      for (int t = 0; t < lim; ++t) {
        const float* kv = k.data() + (static_cast<size_t>(t) * n_kv + hk) * hd;
        double dot = 0.0;
        for (int d = 0; d < hd; ++d) dot += static_cast<double>(qv[d]) * kv[d];
        s[t] = dot * scale;
        mx = std::max(mx, s[t]);
      }
      double sum = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int t = 0; t < lim; ++t) {
        const double p = std::exp(s[t] - mx);
        sum += p;
        const float* vv = v.data() + (static_cast<size_t>(t) * n_kv + hk) * hd;
        for (int d = 0; d < hd; ++d) acc[d] += p * vv[d];
      }
      for (int d = 0; d < hd; ++d) (*o)[row * hd + d] = static_cast<float>(acc[d] / sum);
      (*lse)[row] = static_cast<float>(mx + std::log(sum));
    }
  }
}

struct SelfCase {
  int head_dim;
  int n_kv_heads;
  int group;
  int rows;  // = keys: the chunk's own tokens
  bool head_major;
  int splits;
};

std::string SelfName(const ::testing::TestParamInfo<SelfCase>& info) {
  const SelfCase& c = info.param;
  return absl::StrCat("hd", c.head_dim, "_kv", c.n_kv_heads, "_g", c.group, "_rows", c.rows,
                      c.head_major ? "_headmajor" : "_tokenmajor", "_s", c.splits);
}

class PrefillSelfTest : public ::testing::TestWithParam<SelfCase> {};

TEST_P(PrefillSelfTest, ChunkAttendsItself) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const SelfCase& c = GetParam();
  const int H = c.n_kv_heads, D = c.head_dim, n = c.rows;
  const int n_heads = H * c.group;
  const int64_t L = static_cast<int64_t>(H) * D;
  std::mt19937 rng(3000 + n + D + H);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  // K/V as the engine has them after the QKV projection and RoPE: fp32 [n][n_kv][hd].
  std::vector<float> k(static_cast<size_t>(n) * L), v(k.size());
  for (float& x : k) x = nd(rng) * 1.2f;
  for (float& x : v) x = nd(rng);
  for (size_t i = 0; i < k.size(); i += 97) k[i] *= 4.0f;
  const std::vector<float> q = RandomQ(static_cast<size_t>(n) * n_heads * D, 3001 + n);

  // Token-major with 8 halves of padding after each head; head-major with 8 tokens' worth of
  // padding after each head. Strides stay multiples of 8 (16-byte rows).
  const int64_t hs = c.head_major ? static_cast<int64_t>(n + 8) * D : D + 8;
  const int64_t ts = c.head_major ? D : H * hs;
  const size_t elems = c.head_major ? static_cast<size_t>(H * hs) : static_cast<size_t>(n * ts);
  DeviceBuffer<float> dkf(k), dvf(v);
  DeviceBuffer<uint16_t> dk(std::vector<uint16_t>(elems, kUnwritten));
  DeviceBuffer<uint16_t> dv(std::vector<uint16_t>(elems, kUnwritten));
  for (auto [src, dst] : {std::make_pair(dkf.get(), dk.get()), std::make_pair(dvf.get(), dv.get())}) {
    if (c.head_major) {
      for (int h = 0; h < H; ++h) {
        const absl::Status st = kernels::LaunchToHalfRows(n, D, src + h * D, L, dst + h * hs, D, nullptr);
        ASSERT_TRUE(st.ok()) << st;
      }
    } else {
      const absl::Status st = kernels::LaunchToHalfRows(n * H, D, src, D, dst, hs, nullptr);
      ASSERT_TRUE(st.ok()) << st;
    }
  }
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());

  // The conversion: round to nearest even, exactly FloatToHalfBits; padding untouched.
  const std::vector<uint16_t> hk = dk.Download(), hv = dv.Download();
  std::vector<float> k16(k.size()), v16(v.size());
  std::vector<bool> written(elems, false);
  int64_t bad = 0, stray = 0;
  for (int t = 0; t < n; ++t) {
    for (int h = 0; h < H; ++h) {
      for (int d = 0; d < D; ++d) {
        const size_t at = static_cast<size_t>(t * ts + h * hs + d);
        const size_t src = (static_cast<size_t>(t) * H + h) * D + d;
        written[at] = true;
        bad += hk[at] != FloatToHalfBits(k[src]);
        bad += hv[at] != FloatToHalfBits(v[src]);
        k16[src] = HalfBitsToFloat(hk[at]);
        v16[src] = HalfBitsToFloat(hv[at]);
      }
    }
  }
  for (size_t at = 0; at < elems; ++at) {
    if (!written[at]) stray += (hk[at] != kUnwritten) + (hv[at] != kUnwritten);
  }
  EXPECT_EQ(bad, 0) << "ToHalfRows differs from round-to-nearest-even";
  EXPECT_EQ(stray, 0) << "ToHalfRows wrote outside its rows";

  std::vector<float> want_o, want_lse;
  AttentionReference(q, k16, v16, n, n_heads, H, D, n, 1, true, &want_o, &want_lse);

  kernels::PrefillAttentionParams p;
  p.rows = n;
  p.n_heads = n_heads;
  p.n_kv_heads = H;
  p.head_dim = D;
  p.k = dk.get();
  p.v = dv.get();
  p.kv_token_stride = ts;
  p.kv_head_stride = hs;
  p.n_keys = n;
  p.limit_base = 1;  // row r sees the chunk's tokens [0, r]
  p.causal = true;
  PrefillOut out;
  ASSERT_NO_FATAL_FAILURE(RunPrefill(p, q, c.splits, &out));
  ExpectPartialsWritten(out, static_cast<size_t>(n) * n_heads, D);
  std::vector<int> limits(n);
  for (int r = 0; r < n; ++r) limits[r] = std::min(r + 1, n);
  ExpectEmptySplits(out, limits, n_heads, D, c.splits);
  ExpectClose(out.o, want_o, kSelfOutTol, n_heads, D, "o");
  ExpectClose(out.lse, want_lse, kSelfLseTol, n_heads, 1, "lse");
}

INSTANTIATE_TEST_SUITE_P(Grid, PrefillSelfTest,
                         ::testing::Values(SelfCase{64, 2, 4, 1, false, 1},
                                           SelfCase{64, 2, 4, 113, true, 1},
                                           SelfCase{128, 2, 4, 113, false, 2},
                                           SelfCase{128, 3, 3, 200, true, 3},
                                           SelfCase{64, 1, 8, 64, false, 1},
                                           SelfCase{64, 4, 2, 257, true, 2},
                                           SelfCase{128, 8, 1, 300, false, 1},
                                           SelfCase{128, 1, 1, 1000, true, 4}),
                         SelfName);

// Random fp16 K/V of `elems` elements (normal; every spike_every-th key element x 5, 0: none): the
// bits for the device and their values for the reference.
struct HalfKv {
  std::vector<uint16_t> kh, vh;
  std::vector<float> k, v;
};
HalfKv RandomHalfKv(size_t elems, uint32_t seed, size_t spike_every) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  HalfKv kv{std::vector<uint16_t>(elems), std::vector<uint16_t>(elems), std::vector<float>(elems),
            std::vector<float>(elems)};
  for (size_t i = 0; i < elems; ++i) {
    kv.kh[i] = FloatToHalfBits(nd(rng) * (spike_every > 0 && i % spike_every == 0 ? 5.0f : 1.0f));
    kv.vh[i] = FloatToHalfBits(nd(rng));
    kv.k[i] = HalfBitsToFloat(kv.kh[i]);
    kv.v[i] = HalfBitsToFloat(kv.vh[i]);
  }
  return kv;
}

// The hd128 kernel needs more than 48 KiB of dynamic shared memory, an attribute that is set per
// device: every device of the process must launch it. Skips with fewer than two devices.
TEST(PrefillAttentionDevices, LaunchesOnEveryDevice) {
  KVQ_REQUIRE_CUDA_DEVICE();
  int n_dev = 0;
  KVQ_ASSERT_CUDA(cudaGetDeviceCount(&n_dev));
  if (n_dev < 2) GTEST_SKIP() << "one CUDA device";
  const int n = 70, H = 1, D = 128, n_heads = 2;
  const HalfKv kv = RandomHalfKv(static_cast<size_t>(n) * H * D, 4000, 0);
  const std::vector<float> q = RandomQ(static_cast<size_t>(n) * n_heads * D, 4001);
  std::vector<float> want_o, want_lse;
  AttentionReference(q, kv.k, kv.v, n, n_heads, H, D, n, n, false, &want_o, &want_lse);
  for (int dev = 0; dev < n_dev; ++dev) {
    SCOPED_TRACE(absl::StrCat("device ", dev));
    KVQ_ASSERT_CUDA(cudaSetDevice(dev));
    DeviceBuffer<uint16_t> dk(kv.kh), dv(kv.vh);
    PrefillOut out;
    ASSERT_NO_FATAL_FAILURE(RunPrefill(TokenMajorParams(n, n_heads, H, D, n, n, dk.get(), dv.get()), q, 1, &out));
    ExpectClose(out.o, want_o, kSelfOutTol, n_heads, D, "o");
    ExpectClose(out.lse, want_lse, kSelfLseTol, n_heads, 1, "lse");
  }
  KVQ_ASSERT_CUDA(cudaSetDevice(0));
}

// Every kernel (kernels::PrefillKernel) at head dims 64 and 128 against the double reference and against each
// other on one shape that exercises what differs between them: tiles of 64 vs 128 keys, 128-row
// CTAs cut mid-group (group 3), causal limits that end inside a tile, a key split that is not a
// multiple of either tile, rows past M. A wgmma kernel the device lacks must refuse with
// FailedPrecondition (only compute capability 9.0 has it); on Hopper all three must run.
class PrefillAttentionKernels : public ::testing::TestWithParam<int> {};

TEST_P(PrefillAttentionKernels, EveryKernelMatchesTheReference) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const int H = 2, group = 3, D = GetParam(), rows = 301, n_keys = 1000;
  const int n_heads = H * group;
  const int64_t limit_base = 650;  // row r sees min(650 + r, 1000) keys
  const HalfKv kv = RandomHalfKv(static_cast<size_t>(n_keys) * H * D, 5000, 89);
  const std::vector<float> q = RandomQ(static_cast<size_t>(rows) * n_heads * D, 5001);
  std::vector<float> want_o, want_lse;
  AttentionReference(q, kv.k, kv.v, rows, n_heads, H, D, n_keys, limit_base, true, &want_o, &want_lse);
  DeviceBuffer<uint16_t> dk(kv.kh), dv(kv.vh);
  kernels::PrefillAttentionParams p = TokenMajorParams(rows, n_heads, H, D, n_keys, limit_base, dk.get(), dv.get());
  p.causal = true;
  const bool hopper = kernels::PrefillWgmmaOnCurrentDevice();
  const kernels::PrefillKernel before = kernels::GetPrefillKernel();
  std::vector<std::vector<float>> outs;
  for (const auto kernel : {kernels::PrefillKernel::kMmaSync, kernels::PrefillKernel::kWgmma,
                            kernels::PrefillKernel::kWgmmaSerial}) {
    SCOPED_TRACE(kernels::PrefillKernelName(kernel));
    kernels::SetPrefillKernel(kernel);
    if (kernel != kernels::PrefillKernel::kMmaSync && !hopper) {
      kernels::PrefillAttentionParams pr = p;
      DeviceBuffer<float> dq(q), dout(q.size()), dlse(static_cast<size_t>(rows) * n_heads);
      pr.q = dq.get();
      pr.o = dout.get();
      pr.lse = dlse.get();
      const absl::Status st = kernels::LaunchPrefillAttention(pr, nullptr);
      EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
      continue;
    }
    for (int splits : {1, 3}) {
      SCOPED_TRACE(absl::StrCat("splits ", splits));
      PrefillOut out;
      ASSERT_NO_FATAL_FAILURE(RunPrefill(p, q, splits, &out));
      ExpectPartialsWritten(out, static_cast<size_t>(rows) * n_heads, D);
      ExpectClose(out.o, want_o, kSelfOutTol, n_heads, D, "o");
      ExpectClose(out.lse, want_lse, kSelfLseTol, n_heads, 1, "lse");
      if (splits == 1) outs.push_back(out.o);
    }
  }
  kernels::SetPrefillKernel(before);
  // The kernels round P to fp16 at different points of the softmax (64- vs 128-key tiles), so they
  // agree to the reference's tolerance, not bit for bit.
  for (size_t i = 1; i < outs.size(); ++i) ExpectClose(outs[i], outs[0], kSelfOutTol, n_heads, D, "o vs mma.sync");
}

INSTANTIATE_TEST_SUITE_P(HeadDims, PrefillAttentionKernels, ::testing::Values(64, 128),
                         [](const ::testing::TestParamInfo<int>& info) { return absl::StrCat("hd", info.param); });

}  // namespace
}  // namespace kvq
