// Dense-layer kernels vs their references: RMSNorm, query RoPE (positions up to 1e7), SwiGLU,
// embedding gather, residual add, and sampling (greedy and top-k/top-p/min-p/temperature with the
// Philox uniform, which must pick the reference's token). The linear layers (cuBLAS wrapper, row
// GEMV, decode GEMV) are in linear_layers_test.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/dense_ops.h"
#include "kernels/engine_ops.h"
#include "kernels/philox.h"
#include "kernels/reference/dense_ops.h"
#include "kernels/reference/rope.h"
#include "kernels/sampling.h"
#include "model/sampling.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/host_halves.h"

namespace kvq {
namespace {

using kernels::DType;
using testing::DeviceBuffer;
using testing::FromBf16;
using testing::FromHalf;
using testing::MaxAbsError;
using testing::Randn;
using testing::ToBf16;
using testing::ToHalf;

// Tolerances. f16 outputs: half an ulp of fp16 at |y| <= 4 is 2e-3, plus fp32 accumulation;
// bf16: half an ulp at |y| <= 4 is 1.6e-2. f32 elementwise: 1e-5 relative-ish at |y| <= 10.
constexpr double kF16Tol = 3e-3, kBf16Tol = 2e-2, kF32Tol = 2e-5;

class RmsNormTest : public ::testing::TestWithParam<std::tuple<DType, int>> {};
TEST_P(RmsNormTest, MatchesReference) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const auto [dt, dim] = GetParam();
  const int rows = 7;
  auto x = Randn(static_cast<size_t>(rows) * dim, 1), w = Randn(dim, 2);
  const bool bf = dt == DType::kBF16;
  auto rx = bf ? FromBf16(ToBf16(x)) : FromHalf(ToHalf(x));
  auto rw = bf ? FromBf16(ToBf16(w)) : FromHalf(ToHalf(w));
  std::vector<float> want(x.size());
  kernels::RmsNormReference(rx.data(), rw.data(), rows, dim, 1e-5f, want.data());
  DeviceBuffer<uint16_t> dx(bf ? ToBf16(x) : ToHalf(x)), dw(bf ? ToBf16(w) : ToHalf(w)), dy(x.size());
  kernels::RmsNormParams p;
  p.rows = rows;
  p.dim = dim;
  p.dtype = dt;
  p.x = dx.get();
  p.weight = dw.get();
  p.y = dy.get();
  ASSERT_TRUE(kernels::LaunchRmsNorm(p, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  auto got = bf ? FromBf16(dy.Download()) : FromHalf(dy.Download());
  EXPECT_LE(MaxAbsError(got, want).err, bf ? kBf16Tol : kF16Tol);
}
INSTANTIATE_TEST_SUITE_P(Grid, RmsNormTest,
                         ::testing::Combine(::testing::Values(DType::kF16, DType::kBF16),
                                            ::testing::Values(113, 576, 4096)));

TEST(RopeQuery, MatchesReferenceAtLargePositions) {
  KVQ_REQUIRE_CUDA_DEVICE();
  for (int hd : {64, 128}) {
    kernels::RopeParams rp;
    rp.head_dim = hd;
    rp.theta = 500000.0;
    rp.llama3_scaling = hd == 128;
    rp.factor = 8.0;
    const auto inv = kernels::RopeInvFreq(rp);
    const int rows = 5, heads = 3;
    const std::vector<int64_t> pos = {0, 1, 4095, 1000003, 9999999};
    auto q = Randn(static_cast<size_t>(rows) * heads * hd, 3);
    auto want = q;
    for (int r = 0; r < rows; ++r) kernels::ApplyRopeReference(want.data() + r * heads * hd, heads, hd, pos[r], inv);
    DeviceBuffer<float> dq(q);
    DeviceBuffer<int64_t> dp(pos);
    DeviceBuffer<double> di(inv);
    kernels::RopeQueryParams p{rows, heads, hd, dq.get(), dp.get(), di.get()};
    ASSERT_TRUE(kernels::LaunchRopeQuery(p, nullptr).ok());
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    // Both sides compute the angle and the rotation in double and round once: a few ulp of f32.
    EXPECT_LE(MaxAbsError(dq.Download(), want).err, 1e-6) << "head_dim " << hd;
    // Out of place (the engine's rotated copy of k for the chunk's own attention): the same bits
    // as in place, and the input left as it was.
    DeviceBuffer<float> src(q), dst(q.size());
    kernels::RopeQueryParams po = p;
    po.q = src.get();
    po.out = dst.get();
    ASSERT_TRUE(kernels::LaunchRopeQuery(po, nullptr).ok());
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_EQ(dst.Download(), dq.Download()) << "head_dim " << hd;
    EXPECT_EQ(src.Download(), q) << "head_dim " << hd;
    // Queries in place and keys (2 heads) out of place in one launch: the same bits as launches
    // of their own.
    auto k = Randn(static_cast<size_t>(rows) * 2 * hd, 5);
    DeviceBuffer<float> q1(q), k_src(k), k_dst(k.size()), k_alone(k), k_alone_dst(k.size());
    kernels::RopeQueryParams pk = p;
    pk.q = q1.get();
    pk.k = k_src.get();
    pk.k_heads = 2;
    pk.k_out = k_dst.get();
    ASSERT_TRUE(kernels::LaunchRopeQuery(pk, nullptr).ok());
    kernels::RopeQueryParams ka = p;
    ka.n_heads = 2;
    ka.q = k_alone.get();
    ka.out = k_alone_dst.get();
    ASSERT_TRUE(kernels::LaunchRopeQuery(ka, nullptr).ok());
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_EQ(q1.Download(), dq.Download()) << "head_dim " << hd;
    EXPECT_EQ(k_dst.Download(), k_alone_dst.Download()) << "head_dim " << hd;
    EXPECT_EQ(k_src.Download(), k) << "head_dim " << hd;
    // Rows of a stacked q/k/v projection ([q | k | v] per token, in_row_stride): the same bits
    // as the packed launch above, written packed to out and k_out; the stacked rows untouched.
    const int64_t stride = static_cast<int64_t>(heads) * hd + 2 * 2 * hd;
    std::vector<float> st(static_cast<size_t>(rows) * stride, -7.0f);
    for (int r = 0; r < rows; ++r) {
      std::copy(q.begin() + r * heads * hd, q.begin() + (r + 1) * heads * hd, st.begin() + r * stride);
      std::copy(k.begin() + r * 2 * hd, k.begin() + (r + 1) * 2 * hd, st.begin() + r * stride + heads * hd);
    }
    DeviceBuffer<float> d_st(st), q_out(q.size()), k_out(k.size());
    kernels::RopeQueryParams ps = pk;
    ps.q = d_st.get();
    ps.out = q_out.get();
    ps.k = d_st.get() + heads * hd;
    ps.k_out = k_out.get();
    ps.in_row_stride = stride;
    ASSERT_TRUE(kernels::LaunchRopeQuery(ps, nullptr).ok());
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_EQ(q_out.Download(), dq.Download()) << "head_dim " << hd;
    EXPECT_EQ(k_out.Download(), k_alone_dst.Download()) << "head_dim " << hd;
    EXPECT_EQ(d_st.Download(), st) << "head_dim " << hd;
    // A stride shorter than a row, or no packed output: refused with the reason.
    kernels::RopeQueryParams bad = ps;
    bad.in_row_stride = heads * hd - 1;
    EXPECT_FALSE(kernels::LaunchRopeQuery(bad, nullptr).ok());
    bad = ps;
    bad.out = nullptr;
    const absl::Status st_bad = kernels::LaunchRopeQuery(bad, nullptr);
    EXPECT_TRUE(absl::IsInvalidArgument(st_bad)) << st_bad;
  }
}

TEST(SwiGlu, MatchesReference) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const int rows = 5, dim = 333;
  // Fused [rows][2*dim]: gate then up.
  auto gu = Randn(static_cast<size_t>(rows) * 2 * dim, 4, 2.0f);
  std::vector<float> g, u;
  for (int r = 0; r < rows; ++r) {
    g.insert(g.end(), gu.begin() + r * 2 * dim, gu.begin() + r * 2 * dim + dim);
    u.insert(u.end(), gu.begin() + r * 2 * dim + dim, gu.begin() + (r + 1) * 2 * dim);
  }
  std::vector<float> want(g.size());
  kernels::SwiGluReference(g.data(), u.data(), static_cast<int64_t>(g.size()), want.data());
  DeviceBuffer<float> dgu(gu), dout(g.size());
  kernels::SwiGluParams p;
  p.rows = rows;
  p.dim = dim;
  p.dtype = DType::kF32;
  p.gate = dgu.get();
  p.up = dgu.get() + dim;
  p.in_row_stride = 2 * dim;
  p.out = dout.get();
  ASSERT_TRUE(kernels::LaunchSwiGlu(p, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_LE(MaxAbsError(dout.Download(), want).err, kF32Tol);
}

TEST(Embedding, GathersRowsExactly) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const int vocab = 50, dim = 96;
  auto table = FromHalf(ToHalf(Randn(static_cast<size_t>(vocab) * dim, 5)));
  const std::vector<int32_t> ids = {3, 0, 49, 7, -1, 50, 3};
  std::vector<float> want(ids.size() * dim);
  kernels::EmbeddingReference(table.data(), vocab, dim, ids.data(), static_cast<int>(ids.size()), want.data());
  DeviceBuffer<uint16_t> dt(ToHalf(table));
  DeviceBuffer<int32_t> di(ids);
  DeviceBuffer<float> dout(want.size());
  kernels::EmbeddingParams p;
  p.rows = static_cast<int>(ids.size());
  p.dim = dim;
  p.vocab = vocab;
  p.table_dtype = DType::kF16;
  p.out_dtype = DType::kF32;
  p.table = dt.get();
  p.ids = di.get();
  p.out = dout.get();
  ASSERT_TRUE(kernels::LaunchEmbedding(p, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(dout.Download(), want);
}

TEST(ResidualAdd, F32PlusF16) {
  KVQ_REQUIRE_CUDA_DEVICE();
  auto x = Randn(1001, 6), y = FromHalf(ToHalf(Randn(1001, 7)));
  std::vector<float> want(x.size());
  for (size_t i = 0; i < x.size(); ++i) want[i] = x[i] + y[i];
  DeviceBuffer<float> dx(x);
  DeviceBuffer<uint16_t> dy(ToHalf(y));
  kernels::ResidualAddParams p{static_cast<int64_t>(x.size()), DType::kF32, DType::kF16, dx.get(), dy.get()};
  ASSERT_TRUE(kernels::LaunchResidualAdd(p, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_EQ(dx.Download(), want);  // one fp32 addition: exact match
}


TEST(Philox, HostMatchesKnownAnswer) {
  // Random123 known-answer vector for philox4x32-10 with counter = key = 0.
  const kernels::Philox4 r = kernels::Philox4x32_10(kernels::Philox4{{0, 0, 0, 0}}, 0, 0);
  EXPECT_EQ(r.x[0], 0x6627e8d5u);
  EXPECT_EQ(r.x[1], 0xe169c58du);
  EXPECT_EQ(r.x[2], 0xbc57ac4cu);
  EXPECT_EQ(r.x[3], 0x9b00dbd8u);
}

// Device copies of a sampling batch's inputs and its output tokens.
struct SamplingBuffers {
  SamplingBuffers(const std::vector<float>& logits, const std::vector<float>& temp, const std::vector<int32_t>& tk,
                  const std::vector<float>& tp, const std::vector<float>& mp, const std::vector<uint64_t>& seed,
                  const std::vector<uint64_t>& step)
      : l(logits), t(temp), tp_(tp), mp_(mp), k(tk), out(temp.size()), s(seed), st(step) {}
  kernels::SamplingParams Params(int batch, int vocab, int64_t stride) {
    kernels::SamplingParams p;
    p.batch = batch;
    p.vocab = vocab;
    p.logits = l.get();
    p.logits_row_stride = stride;
    p.temperature = t.get();
    p.top_k = k.get();
    p.top_p = tp_.get();
    p.min_p = mp_.get();
    p.seed = s.get();
    p.step = st.get();
    p.tokens = out.get();
    return p;
  }
  DeviceBuffer<float> l, t, tp_, mp_;
  DeviceBuffer<int32_t> k, out;
  DeviceBuffer<uint64_t> s, st;
};

struct SampleCase {
  float temperature;
  int top_k;
  float top_p;
  float min_p;
};
class SamplingTest : public ::testing::TestWithParam<SampleCase> {};
TEST_P(SamplingTest, PicksTheReferenceToken) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const SampleCase c = GetParam();
  const int batch = 64;
  // 32,000 in packed rows (16-byte loads); 32,001 in rows of 32,003 (rows after the first are not
  // 16-byte aligned: the scalar loads, and a tail). Both kernels: one CTA per row, and the
  // cluster of CTAs per row (kernels::SetSamplingClusters).
  const bool default_clusters = kernels::SamplingClusters();
  for (const bool clusters : {false, true}) {
  kernels::SetSamplingClusters(clusters);
  for (const auto [vocab, stride] : {std::pair<int, int>{32000, 32000}, std::pair<int, int>{32001, 32003}}) {
    // Logits on a grid of distinct values (multiples of 1/64 in [-8, 8] shuffled): well separated,
    // so fp32 (GPU) and double (reference) agree on every threshold and boundary.
    std::mt19937 rng(11);
    std::vector<float> logits(static_cast<size_t>(batch) * stride, 1e30f);  // padding is never read
    for (int b = 0; b < batch; ++b) {
      std::vector<float> row(vocab);
      for (int i = 0; i < vocab; ++i) row[i] = -8.0f + 16.0f * (i % 1024) / 1024.0f + (i / 1024) * 1e-3f;
      std::shuffle(row.begin(), row.end(), rng);
      std::copy(row.begin(), row.end(), logits.begin() + static_cast<size_t>(b) * stride);
    }
    std::vector<float> temp(batch, c.temperature), tp(batch, c.top_p), mp(batch, c.min_p);
    std::vector<int32_t> tk(batch, c.top_k);
    std::vector<uint64_t> seed(batch), step(batch);
    for (int b = 0; b < batch; ++b) {
      seed[b] = 0x1234567890ull * (b + 1);
      step[b] = b * 3;
    }
    SamplingBuffers d(logits, temp, tk, tp, mp, seed, step);
    kernels::SamplingParams p = d.Params(batch, vocab, stride);
    ASSERT_TRUE(kernels::LaunchSampling(p, nullptr).ok());
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    const auto got = d.out.Download();
    for (int b = 0; b < batch; ++b) {
      kernels::SamplingRefConfig rc{c.temperature, c.top_k, c.top_p, c.min_p, seed[b], step[b]};
      EXPECT_EQ(got[b], kernels::SampleReference(logits.data() + static_cast<size_t>(b) * stride, vocab, rc))
          << "vocab " << vocab << " sequence " << b << (clusters ? " (clusters)" : "");
    }
  }
  }
  kernels::SetSamplingClusters(default_clusters);
}

// The cluster kernel picks the single-CTA kernel's tokens (every sum in both is an integer sum):
// peaked and flat rows at the real models' vocabularies, every filter, greedy rows mixed in.
TEST(SamplingClusters, SameTokensAsOneCtaPerRow) {
  KVQ_REQUIRE_CUDA_DEVICE();
  for (const int vocab : {49152, 128256}) {
    const int batch = 48;
    std::mt19937 rng(vocab);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> logits(static_cast<size_t>(batch) * vocab);
    for (int b = 0; b < batch; ++b) {
      const float spread = b % 3 == 0 ? 0.3f : b % 3 == 1 ? 3.0f : 8.0f;  // flat ... peaked
      for (int i = 0; i < vocab; ++i) logits[static_cast<size_t>(b) * vocab + i] = spread * nd(rng);
    }
    std::vector<float> temp(batch), tp(batch), mp(batch);
    std::vector<int32_t> tk(batch);
    std::vector<uint64_t> seed(batch), step(batch);
    for (int b = 0; b < batch; ++b) {
      temp[b] = b % 8 == 7 ? 0.0f : 0.5f + 0.1f * static_cast<float>(b % 7);
      tk[b] = b % 4 == 1 ? 40 : 0;
      tp[b] = b % 4 == 2 ? 0.9f : b % 4 == 3 ? 0.5f : 1.0f;
      mp[b] = b % 5 == 4 ? 0.05f : 0.0f;
      seed[b] = 977ull * (b + 3);
      step[b] = b;
    }
    SamplingBuffers d(logits, temp, tk, tp, mp, seed, step);
    const kernels::SamplingParams p = d.Params(batch, vocab, 0);
    std::vector<int32_t> got[2];
    const bool default_clusters = kernels::SamplingClusters();
    for (const bool clusters : {false, true}) {
      kernels::SetSamplingClusters(clusters);
      ASSERT_TRUE(kernels::LaunchSampling(p, nullptr).ok());
      KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
      got[clusters] = d.out.Download();
    }
    kernels::SetSamplingClusters(default_clusters);
    for (int b = 0; b < batch; ++b) EXPECT_EQ(got[1][b], got[0][b]) << "vocab " << vocab << " row " << b;
  }
}

INSTANTIATE_TEST_SUITE_P(Grid, SamplingTest,
                         ::testing::Values(SampleCase{0.0f, 0, 1.0f, 0.0f},   // greedy
                                           SampleCase{1.0f, 0, 1.0f, 0.0f},   // plain
                                           SampleCase{0.7f, 40, 1.0f, 0.0f},  // top-k
                                           SampleCase{1.0f, 0, 0.9f, 0.0f},   // top-p
                                           SampleCase{1.3f, 0, 1.0f, 0.05f},  // min-p
                                           SampleCase{0.8f, 50, 0.8f, 0.02f}));

// The serving step's greedy tokens: the lowest id among each row's largest values, NaN never
// taken, over row strides wider than the vocabulary, vocabularies that are not whole 16-byte
// loads (the scalar path) and the real models' sizes, with planted ties, NaNs and infinities.
TEST(ArgmaxRows, LowestIdAmongTheMaxima) {
  KVQ_REQUIRE_CUDA_DEVICE();
  struct Case {
    int rows, vocab;
    int64_t stride;
  };
  for (const Case c : {Case{5, 49152, 0}, Case{3, 128256, 0}, Case{4, 32000, 32004}, Case{6, 1001, 1003},
                       Case{2, 7, 0}, Case{33, 4096, 0}}) {
    const int64_t stride = c.stride > 0 ? c.stride : c.vocab;
    std::mt19937 rng(c.vocab + c.rows);
    std::normal_distribution<float> nd(0.0f, 3.0f);
    std::vector<float> logits(static_cast<size_t>(c.rows) * stride, 1e30f);  // padding is never read
    for (int r = 0; r < c.rows; ++r) {
      float* row = logits.data() + r * stride;
      for (int i = 0; i < c.vocab; ++i) row[i] = nd(rng);
      const int a = static_cast<int>(rng() % c.vocab), b = static_cast<int>(rng() % c.vocab);
      switch (r % 4) {
        case 0: row[a] = row[b] = 40.0f; break;                                 // a tie
        case 1: row[a] = std::nanf(""); row[b] = 50.0f; break;                  // NaN beside the max
        case 2: row[a] = INFINITY; row[b] = INFINITY; row[0] = std::nanf(""); break;
        default: for (int i = 0; i < c.vocab; ++i) row[i] = -INFINITY; row[b] = std::nanf("");
      }
    }
    DeviceBuffer<float> dl(logits);
    DeviceBuffer<int32_t> dout(c.rows);
    ASSERT_TRUE(kernels::LaunchArgmaxRows(c.rows, c.vocab, dl.get(), c.stride, dout.get(), nullptr).ok());
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    const auto got = dout.Download();
    for (int r = 0; r < c.rows; ++r) {
      const float* row = logits.data() + r * stride;
      int want = -1;
      for (int i = 0; i < c.vocab; ++i) {
        if (!std::isnan(row[i]) && (want < 0 || row[i] > row[want])) want = i;
      }
      EXPECT_EQ(got[r], std::max(want, 0)) << "vocab " << c.vocab << " row " << r;
    }
  }
  DeviceBuffer<int32_t> dout(1);
  EXPECT_FALSE(kernels::LaunchArgmaxRows(1, 10, nullptr, 9, dout.get(), nullptr).ok());  // stride < vocab
}

// The repetition penalty on the device: the penalised rows equal model::ApplyRepetitionPenalty's
// to the bit (positive and negative logits, penalties above and below 1, rows without entries,
// a row stride wider than the vocabulary), and the restoring launch gives the rows back exactly.
TEST(RepetitionPenalty, SameBitsAsTheModelRuleAndRestoredExactly) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const int rows = 5, vocab = 49152;
  const int64_t stride = vocab + 4;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 4.0f);
  std::vector<float> logits(static_cast<size_t>(rows) * stride);
  for (float& x : logits) x = nd(rng);
  const float penalty[rows] = {1.3f, 0.7f, 1.0f, 2.5f, 1.1f};
  std::vector<int32_t> offsets{0};
  std::vector<int32_t> entries;  // id, saved logit
  std::vector<std::vector<int32_t>> ids(rows);
  for (int r = 0; r < rows; ++r) {
    const int n = r == 2 ? 0 : r == 3 ? vocab : 1 + static_cast<int>(rng() % 3000);  // row 3: every id
    std::vector<int32_t> all(vocab);
    for (int i = 0; i < vocab; ++i) all[i] = i;
    std::shuffle(all.begin(), all.end(), rng);
    ids[r].assign(all.begin(), all.begin() + n);
    for (int32_t id : ids[r]) entries.insert(entries.end(), {id, 0});
    offsets.push_back(static_cast<int32_t>(entries.size() / 2));
  }
  DeviceBuffer<float> dl(logits);
  DeviceBuffer<int32_t> doff(offsets);
  DeviceBuffer<float> dpen(std::vector<float>(penalty, penalty + rows));
  DeviceBuffer<int32_t> dent(entries);
  auto* ent = reinterpret_cast<int2*>(dent.get());
  ASSERT_TRUE(kernels::LaunchRepetitionPenalty(rows, dl.get(), stride, doff.get(), dpen.get(), ent, false, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  const auto got = dl.Download();
  int changed = 0;
  for (int r = 0; r < rows; ++r) {
    std::vector<float> want(logits.begin() + r * stride, logits.begin() + r * stride + vocab);
    model::ApplyRepetitionPenalty(want.data(), vocab, ids[r], penalty[r]);
    for (int i = 0; i < vocab; ++i) {
      const float g = got[r * stride + i];
      ASSERT_EQ(std::memcmp(&g, &want[i], 4), 0) << "row " << r << " id " << i << ": " << g << " vs " << want[i];
      changed += g != logits[r * stride + i];
    }
  }
  EXPECT_GT(changed, vocab);
  ASSERT_TRUE(kernels::LaunchRepetitionPenalty(rows, dl.get(), stride, doff.get(), dpen.get(), ent, true, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  const auto back = dl.Download();
  EXPECT_EQ(std::memcmp(back.data(), logits.data(), logits.size() * 4), 0) << "restore";
  EXPECT_FALSE(kernels::LaunchRepetitionPenalty(1, dl.get(), 0, doff.get(), dpen.get(), ent, false, nullptr).ok());
}

}  // namespace
}  // namespace kvq
