// Dense-layer kernels vs their references: RMSNorm, query RoPE (positions up to 1e7), SwiGLU,
// embedding gather, residual add, the cuBLAS GEMM wrapper, and sampling (greedy and
// top-k/top-p/min-p/temperature with the Philox uniform, which must pick the reference's token).
#include <cublas_v2.h>

#include "kernels/cublas_api.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#include "kernels/decode_gemv.h"
#include "kernels/dense_ops.h"
#include "kernels/engine_ops.h"
#include "kernels/gemm.h"
#include "kernels/philox.h"
#include "kernels/reference/dense_ops.h"
#include "kernels/reference/rope.h"
#include "kernels/row_gemv.h"
#include "kernels/sampling.h"
#include "model/sampling.h"
#include "tests/kernels/cuda_test_util.h"

namespace kvq {
namespace {

using kernels::DType;
using testing::DeviceBuffer;
using testing::MaxAbsError;

// Tolerances. f16 outputs: half an ulp of fp16 at |y| <= 4 is 2e-3, plus fp32 accumulation;
// bf16: half an ulp at |y| <= 4 is 1.6e-2. f32 elementwise: 1e-5 relative-ish at |y| <= 10.
constexpr double kF16Tol = 3e-3, kBf16Tol = 2e-2, kF32Tol = 2e-5;

std::vector<uint16_t> ToHalf(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = __half_as_ushort(__float2half_rn(x[i]));
  return h;
}
std::vector<float> FromHalf(const std::vector<uint16_t>& h) {
  std::vector<float> x(h.size());
  for (size_t i = 0; i < h.size(); ++i) x[i] = __half2float(__ushort_as_half(h[i]));
  return x;
}
std::vector<uint16_t> ToBf16(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  for (size_t i = 0; i < x.size(); ++i) h[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
  return h;
}
std::vector<float> FromBf16(const std::vector<uint16_t>& h) {
  std::vector<float> x(h.size());
  for (size_t i = 0; i < h.size(); ++i) x[i] = __bfloat162float(__ushort_as_bfloat16(h[i]));
  return x;
}
std::vector<float> Randn(size_t n, uint32_t seed, float s = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, s);
  std::vector<float> x(n);
  for (float& v : x) v = nd(rng);
  return x;
}

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

class GemmTest : public ::testing::TestWithParam<std::tuple<DType, DType>> {};
TEST_P(GemmTest, MatchesReference) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const auto [ab, cdt] = GetParam();
  const int m = 7, n = 130, k = 257;
  const bool bf = ab == DType::kBF16;
  auto a = Randn(static_cast<size_t>(m) * k, 8), b = Randn(static_cast<size_t>(n) * k, 9);
  auto ra = bf ? FromBf16(ToBf16(a)) : FromHalf(ToHalf(a));
  auto rb = bf ? FromBf16(ToBf16(b)) : FromHalf(ToHalf(b));
  std::vector<float> want(static_cast<size_t>(m) * n);
  kernels::GemmReference(ra.data(), rb.data(), m, n, k, want.data());
  DeviceBuffer<uint16_t> da(bf ? ToBf16(a) : ToHalf(a)), db(bf ? ToBf16(b) : ToHalf(b));
  DeviceBuffer<float> dc32(want.size());
  DeviceBuffer<uint16_t> dc16(want.size());
  cublasHandle_t h;
  ASSERT_EQ(kernels::cublas::Create(&h), CUBLAS_STATUS_SUCCESS);
  kernels::GemmParams p;
  p.m = m;
  p.n = n;
  p.k = k;
  p.ab_dtype = ab;
  p.c_dtype = cdt;
  p.a = da.get();
  p.b = db.get();
  p.c = cdt == DType::kF32 ? static_cast<void*>(dc32.get()) : static_cast<void*>(dc16.get());
  const absl::Status st = kernels::Gemm(h, p, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  kernels::cublas::Destroy(h);
  std::vector<float> got = cdt == DType::kF32 ? dc32.Download()
                           : cdt == DType::kF16 ? FromHalf(dc16.Download())
                                                : FromBf16(dc16.Download());
  // Dot products of 257 N(0,1) pairs: |c| <~ 50. fp32 accumulation: 1e-3; rounding of the
  // output: half an ulp at 64 is 0.016 (f16) and 0.125 (bf16).
  const double tol = cdt == DType::kF32 ? 1e-3 : (cdt == DType::kF16 ? 0.02 : 0.13);
  EXPECT_LE(MaxAbsError(got, want).err, tol);
}
INSTANTIATE_TEST_SUITE_P(Grid, GemmTest,
                         ::testing::Values(std::make_tuple(DType::kF16, DType::kF32),
                                           std::make_tuple(DType::kF16, DType::kF16),
                                           std::make_tuple(DType::kBF16, DType::kF32),
                                           std::make_tuple(DType::kBF16, DType::kBF16)));

// The row GEMV (decode steps' 1-4 rows): against a double reference for every row count, both
// operand dtypes, f32 output with beta 0 and 1 and an output in the operand dtype; k with and
// without whole rounds of 8 x 32 pieces (the unrolled loop and the tail), padded rows (lda, ldw >
// k), n not a multiple of 8 warps. kernels::Gemm takes the same path for one row (bit-identical)
// and cuBLAS for more; with SetRowGemv(false), cuBLAS agrees within the same tolerance.
TEST(RowGemv, MatchesReferenceAndGemmRoutesToIt) {
  KVQ_REQUIRE_CUDA_DEVICE();
  cublasHandle_t h;
  ASSERT_EQ(kernels::cublas::Create(&h), CUBLAS_STATUS_SUCCESS);
  const int n = 130;
  for (const DType ab : {DType::kF16, DType::kBF16}) {
    const bool bf = ab == DType::kBF16;
    for (const int k : {264, 4104}) {
      const int lda = k + 8, ldw = k + 16;
      for (int m = 1; m <= kernels::kRowGemvMaxRows; ++m) {
        for (const DType cdt : {DType::kF32, ab}) {
          for (const float beta : {0.0f, 1.0f}) {
            if (cdt != DType::kF32 && beta != 0.0f) continue;
            SCOPED_TRACE(absl::StrCat(bf ? "bf16" : "f16", " k ", k, " m ", m, " c ", cdt == DType::kF32 ? "f32" : "ab",
                                      " beta ", beta));
            const auto a = Randn(static_cast<size_t>(m) * lda, 20 + m), w = Randn(static_cast<size_t>(n) * ldw, 30);
            const auto c0 = Randn(static_cast<size_t>(m) * n, 40);
            auto ra = bf ? FromBf16(ToBf16(a)) : FromHalf(ToHalf(a));
            auto rw = bf ? FromBf16(ToBf16(w)) : FromHalf(ToHalf(w));
            std::vector<float> want(static_cast<size_t>(m) * n);
            for (int i = 0; i < m; ++i) {
              for (int j = 0; j < n; ++j) {
                double acc = beta != 0.0f ? c0[static_cast<size_t>(i) * n + j] : 0.0;
                for (int e = 0; e < k; ++e) {
                  acc += static_cast<double>(ra[static_cast<size_t>(i) * lda + e]) * rw[static_cast<size_t>(j) * ldw + e];
                }
                want[static_cast<size_t>(i) * n + j] = static_cast<float>(acc);
              }
            }
            DeviceBuffer<uint16_t> da(bf ? ToBf16(a) : ToHalf(a)), dw(bf ? ToBf16(w) : ToHalf(w));
            std::vector<std::vector<float>> outs;
            // LaunchRowGemv, Gemm (routed for one row), Gemm on cuBLAS, LaunchRowGemv without the
            // early start.
            for (int path = 0; path < 4; ++path) {
              DeviceBuffer<float> dc32(c0);
              DeviceBuffer<uint16_t> dc16(static_cast<size_t>(m) * n);
              void* c = cdt == DType::kF32 ? static_cast<void*>(dc32.get()) : static_cast<void*>(dc16.get());
              auto run = [&]() -> absl::Status {
                if (path == 0 || path == 3) {
                  kernels::RowGemvParams r;
                  r.m = m;
                  r.n = n;
                  r.k = k;
                  r.ab_dtype = ab;
                  r.c_dtype = cdt;
                  r.a = da.get();
                  r.lda = lda;
                  r.w = dw.get();
                  r.ldw = ldw;
                  r.c = c;
                  r.beta = beta;
                  EXPECT_TRUE(kernels::RowGemvApplies(r));
                  kernels::SetRowGemvEarlyStart(path == 0);
                  absl::Status rs = kernels::LaunchRowGemv(r, nullptr);
                  kernels::SetRowGemvEarlyStart(true);
                  return rs;
                }
                kernels::SetRowGemv(path == 1);
                kernels::GemmParams g;
                g.m = m;
                g.n = n;
                g.k = k;
                g.ab_dtype = ab;
                g.c_dtype = cdt;
                g.a = da.get();
                g.lda = lda;
                g.b = dw.get();
                g.ldb = ldw;
                g.c = c;
                g.beta = beta;
                absl::Status gs = kernels::Gemm(h, g, nullptr);
                kernels::SetRowGemv(true);
                return gs;
              };
              const absl::Status st = run();
              ASSERT_TRUE(st.ok()) << st;
              KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
              outs.push_back(cdt == DType::kF32 ? dc32.Download()
                             : bf              ? FromBf16(dc16.Download())
                                               : FromHalf(dc16.Download()));
            }
            // Dot products of up to 4,104 N(0,1) pairs (|c| <~ 250): fp32 sums, relative ~1e-6 per
            // term: 2e-3; an output in the operand dtype adds half an ulp at 256 (0.125 f16, 1 bf16).
            const double tol = cdt == DType::kF32 ? 2e-3 : (bf ? 1.0 : 0.125);
            EXPECT_LE(MaxAbsError(outs[0], want).err, tol) << "row GEMV";
            if (m <= kernels::RowGemvRows()) {
              EXPECT_EQ(outs[0], outs[1]) << "kernels::Gemm must take the row GEMV for up to RowGemvRows() rows";
            } else {
              EXPECT_LE(MaxAbsError(outs[1], want).err, tol) << "kernels::Gemm (cuBLAS for more rows)";
            }
            EXPECT_LE(MaxAbsError(outs[2], want).err, tol) << "cuBLAS";
            EXPECT_EQ(outs[0], outs[3]) << "the early start must not change a bit";
          }
        }
      }
    }
  }
  kernels::cublas::Destroy(h);
}

// What the row GEMV takes, checked on the host before any launch (runs without a GPU): every
// refusal names the condition that failed.
TEST(RowGemv, AppliesOnlyToWhatItCanRead) {
  alignas(16) static uint16_t a[64 + 8], w[40 * 64];
  alignas(16) static float c[40];
  kernels::RowGemvParams r;
  r.m = 1;
  r.n = 40;
  r.k = 64;
  r.a = a;
  r.w = w;
  r.c = c;
  EXPECT_TRUE(kernels::RowGemvApplies(r));
  struct Case {
    const char* want;
    std::function<void(kernels::RowGemvParams&)> change;
  };
  const std::vector<Case> cases = {
      {"m must be 1..4", [](kernels::RowGemvParams& q) { q.m = 5; }},
      {"m must be 1..4", [](kernels::RowGemvParams& q) { q.m = 0; }},
      {"n and k must be positive", [](kernels::RowGemvParams& q) { q.n = 0; }},
      {"f16 or bf16", [](kernels::RowGemvParams& q) { q.ab_dtype = DType::kF32; }},
      {"C must be f32 or the operand dtype", [](kernels::RowGemvParams& q) { q.c_dtype = DType::kBF16; }},
      {"multiples of 8", [](kernels::RowGemvParams& q) { q.k = 60; }},
      {"multiples of 8", [](kernels::RowGemvParams& q) { q.lda = 68; }},
      {"lda, ldw >= k", [](kernels::RowGemvParams& q) { q.ldw = 56; }},
      {"null operand", [](kernels::RowGemvParams& q) { q.c = nullptr; }},
      {"16-byte aligned", [](kernels::RowGemvParams& q) { q.a = static_cast<const uint16_t*>(q.a) + 1; }},
      {"16-byte aligned", [](kernels::RowGemvParams& q) { q.w = static_cast<const uint16_t*>(q.w) + 4; }},
      {"beta must be 0 or 1", [](kernels::RowGemvParams& q) { q.beta = 0.5f; }},
  };
  for (const Case& t : cases) {
    kernels::RowGemvParams q = r;
    t.change(q);
    EXPECT_FALSE(kernels::RowGemvApplies(q)) << t.want;
    const absl::Status st = kernels::LaunchRowGemv(q, nullptr);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << t.want;
    EXPECT_NE(st.message().find(t.want), std::string::npos) << st;
  }
  // The routing limit stays within what the kernel takes.
  const int rows = kernels::RowGemvRows();
  kernels::SetRowGemvRows(9);
  EXPECT_EQ(kernels::RowGemvRows(), kernels::kRowGemvMaxRows);
  kernels::SetRowGemvRows(-1);
  EXPECT_EQ(kernels::RowGemvRows(), 0);
  kernels::SetRowGemvRows(rows);
}

TEST(RowGemv, RefusesWhatItCannotReadAndGemmFallsBack) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const int m = 1, n = 40, k = 64;
  const auto a = Randn(k + 8, 50), w = Randn(static_cast<size_t>(n) * k, 51);
  DeviceBuffer<uint16_t> da(ToHalf(a)), dw(ToHalf(w));
  DeviceBuffer<float> dc(static_cast<size_t>(n));
  kernels::RowGemvParams r;
  r.m = m;
  r.n = n;
  r.k = k;
  r.a = da.get() + 1;  // 2-byte aligned only
  r.w = dw.get();
  r.c = dc.get();
  EXPECT_FALSE(kernels::RowGemvApplies(r));
  const absl::Status st = kernels::LaunchRowGemv(r, nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("16-byte aligned"), std::string::npos) << st;
  r.a = da.get();
  r.m = 5;
  EXPECT_FALSE(kernels::RowGemvApplies(r));
  r.m = 1;
  r.k = 60;  // not a multiple of 8
  EXPECT_FALSE(kernels::RowGemvApplies(r));
  // kernels::Gemm with the misaligned A still computes it (on cuBLAS).
  auto ra = FromHalf(ToHalf(a));
  auto rw = FromHalf(ToHalf(w));
  std::vector<float> want(n);
  kernels::GemmReference(ra.data() + 1, rw.data(), m, n, k, want.data());
  cublasHandle_t h;
  ASSERT_EQ(kernels::cublas::Create(&h), CUBLAS_STATUS_SUCCESS);
  kernels::GemmParams g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = da.get() + 1;
  g.b = dw.get();
  g.c = dc.get();
  ASSERT_TRUE(kernels::Gemm(h, g, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  kernels::cublas::Destroy(h);
  EXPECT_LE(MaxAbsError(dc.Download(), want).err, 1e-3);
}

// The decode GEMV: plain inputs against a double reference (three output segments, beta 1, an
// output in the weight dtype), and its RMSNorm / SwiGLU input stages against the kernels they
// replace followed by the plain GEMV: the same bits (same staged inputs, same summation order).
TEST(DecodeGemv, MatchesReferenceAndReplacedKernels) {
  KVQ_REQUIRE_CUDA_DEVICE();
  struct Shape {
    int n, k;
  };
  for (const DType dt : {DType::kF16, DType::kBF16}) {
    auto to16 = [&](const std::vector<float>& x) { return dt == DType::kF16 ? ToHalf(x) : ToBf16(x); };
    auto from16 = [&](const std::vector<uint16_t>& h) { return dt == DType::kF16 ? FromHalf(h) : FromBf16(h); };
    for (const int rows : {1, 3, 8}) {
      for (const Shape sh : {Shape{960, 576}, Shape{37, 64}, Shape{200, 14336}}) {
        const int n = sh.n, k = sh.k;
        const std::string what = absl::StrCat(DTypeName(dt), " m=", rows, " n=", n, " k=", k);
        const std::vector<uint16_t> w16 = to16(Randn(static_cast<size_t>(n) * k, 11, 0.05f));
        const std::vector<uint16_t> a16 = to16(Randn(static_cast<size_t>(rows) * k, 12));
        const std::vector<float> wf = from16(w16), af = from16(a16);
        DeviceBuffer<uint16_t> dw(w16), da(a16);
        // Three segments of widths n0, n1, n2 with row strides wider than the segment.
        const int n0 = n / 3, n1 = n / 3, n2 = n - n0 - n1;
        std::vector<float> init = Randn(static_cast<size_t>(rows) * (n + 3), 13);
        DeviceBuffer<float> c0(std::vector<float>(init.begin(), init.begin() + rows * (n0 + 1))),
            c1(std::vector<float>(init.begin(), init.begin() + rows * (n1 + 1))),
            c2(std::vector<float>(init.begin(), init.begin() + rows * (n2 + 1)));
        kernels::DecodeGemvParams g;
        g.m = rows;
        g.n = n;
        g.k = k;
        g.w_dtype = dt;
        g.w = dw.get();
        g.a = da.get();
        g.beta = 1.0f;
        g.n_segs = 3;
        g.seg[0] = {n0, c0.get(), n0 + 1};
        g.seg[1] = {n0 + n1, c1.get(), n1 + 1};
        g.seg[2] = {n, c2.get(), n2 + 1};
        ASSERT_TRUE(kernels::LaunchDecodeGemv(g, nullptr).ok()) << what;
        KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
        const std::vector<float> got0 = c0.Download(), got1 = c1.Download(), got2 = c2.Download();
        double worst = 0.0;
        for (int m = 0; m < rows; ++m) {
          for (int j = 0; j < n; ++j) {
            double ref = 0.0;
            for (int t = 0; t < k; ++t) ref += static_cast<double>(af[static_cast<size_t>(m) * k + t]) * wf[static_cast<size_t>(j) * k + t];
            const int s = j < n0 ? 0 : j < n0 + n1 ? 1 : 2;
            const int col = j - (s == 0 ? 0 : s == 1 ? n0 : n0 + n1);
            const int ldc = (s == 0 ? n0 : s == 1 ? n1 : n2) + 1;
            const std::vector<float>& got = s == 0 ? got0 : s == 1 ? got1 : got2;
            ref += init[static_cast<size_t>(m) * ldc + col];
            worst = std::max(worst, std::abs(got[static_cast<size_t>(m) * ldc + col] - ref));
          }
        }
        // fp32 sums of k products of magnitude <= ~0.2 (|dot| up to ~6 at k = 14336): 1e-3.
        EXPECT_LE(worst, 1e-3) << what;
        // Each row's column past its segment's width is untouched.
        for (int m = 0; m < rows; ++m) EXPECT_EQ(got0[static_cast<size_t>(m) * (n0 + 1) + n0], init[static_cast<size_t>(m) * (n0 + 1) + n0]) << what;

        // Plain, one segment, f32 (beta 0) and the weight dtype: the second is the first rounded.
        DeviceBuffer<float> y32(static_cast<size_t>(rows) * n);
        DeviceBuffer<uint16_t> y16(static_cast<size_t>(rows) * n);
        auto run_plain = [&](const void* a, float* out32, uint16_t* out16) {
          kernels::DecodeGemvParams q = g;
          q.a = a;
          q.beta = 0.0f;
          q.n_segs = 1;
          q.seg[0] = {n, out32 != nullptr ? static_cast<void*>(out32) : static_cast<void*>(out16), n};
          q.c_dtype = out32 != nullptr ? DType::kF32 : dt;
          return kernels::LaunchDecodeGemv(q, nullptr);
        };
        ASSERT_TRUE(run_plain(da.get(), y32.get(), nullptr).ok()) << what;
        ASSERT_TRUE(run_plain(da.get(), nullptr, y16.get()).ok()) << what;
        KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_EQ(y16.Download(), to16(y32.Download())) << what;

        // Rotated segments (the q/k/v projection of a 9-query / 3-KV-head model of head dim 64):
        // q written rotated only, k unrotated and rotated, v plain == the plain output then
        // LaunchRopeQuery (q in place, k out of place), bit for bit, at positions up to 1e7.
        if (n == 960) {
          const int hd = 64, qd = 576, kvd = 192;
          std::vector<int64_t> pos = {0, 1, 4095, 1000003, 9999999, 17, 300, 77};
          pos.resize(rows);
          kernels::RopeParams rp;
          rp.head_dim = hd;
          rp.theta = 10000.0;
          const auto inv = kernels::RopeInvFreq(rp);
          DeviceBuffer<int64_t> dpos(pos);
          DeviceBuffer<double> dinv(inv);
          DeviceBuffer<float> q(static_cast<size_t>(rows) * qd), kk(static_cast<size_t>(rows) * kvd),
              kr(static_cast<size_t>(rows) * kvd), vv(static_cast<size_t>(rows) * kvd), k_ref(kr.size());
          kernels::DecodeGemvParams rg = g;
          rg.beta = 0.0f;
          rg.n_segs = 3;
          rg.seg[0] = {qd, nullptr, 0, q.get(), qd};
          rg.seg[1] = {qd + kvd, kk.get(), kvd, kr.get(), kvd};
          rg.seg[2] = {n, vv.get(), kvd};
          rg.rope_positions = dpos.get();
          rg.rope_inv_freq = dinv.get();
          rg.rope_head_dim = hd;
          ASSERT_TRUE(kernels::LaunchDecodeGemv(rg, nullptr).ok()) << what;
          ASSERT_TRUE(run_plain(da.get(), y32.get(), nullptr).ok()) << what;
          KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
          const std::vector<float> plain = y32.Download();
          std::vector<float> pq, pk, pv;
          for (int m = 0; m < rows; ++m) {
            const float* r0 = plain.data() + static_cast<size_t>(m) * n;
            pq.insert(pq.end(), r0, r0 + qd);
            pk.insert(pk.end(), r0 + qd, r0 + qd + kvd);
            pv.insert(pv.end(), r0 + qd + kvd, r0 + n);
          }
          DeviceBuffer<float> rq_buf(pq), rk_buf(pk);
          kernels::RopeQueryParams rope{rows, qd / hd, hd, rq_buf.get(), dpos.get(), dinv.get()};
          rope.k = rk_buf.get();
          rope.k_heads = kvd / hd;
          rope.k_out = k_ref.get();
          ASSERT_TRUE(kernels::LaunchRopeQuery(rope, nullptr).ok());
          KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
          EXPECT_EQ(q.Download(), rq_buf.Download()) << what << " rotated q";
          EXPECT_EQ(kr.Download(), k_ref.Download()) << what << " rotated k";
          EXPECT_EQ(kk.Download(), pk) << what << " unrotated k";
          EXPECT_EQ(vv.Download(), pv) << what << " v";
        }

        // RMSNorm input stage == LaunchRmsNormF32 then the plain GEMV, bit for bit.
        const std::vector<float> x = Randn(static_cast<size_t>(rows) * k, 14, 2.0f), gw = Randn(k, 15);
        DeviceBuffer<float> dx(x), dg(gw), fused(static_cast<size_t>(rows) * n), split(static_cast<size_t>(rows) * n);
        DeviceBuffer<uint16_t> h(static_cast<size_t>(rows) * k);
        kernels::DecodeGemvParams r = g;
        r.input = kernels::GemvInput::kRmsNorm;
        r.a = dx.get();
        r.lda = 0;
        r.norm_weight = dg.get();
        r.eps = 1e-5f;
        r.beta = 0.0f;
        r.n_segs = 1;
        r.seg[0] = {n, fused.get(), n};
        ASSERT_TRUE(kernels::LaunchDecodeGemv(r, nullptr).ok()) << what;
        ASSERT_TRUE(kernels::LaunchRmsNormF32(rows, k, 1e-5f, dx.get(), dg.get(), h.get(), dt, nullptr).ok());
        ASSERT_TRUE(run_plain(h.get(), split.get(), nullptr).ok()) << what;
        KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_EQ(fused.Download(), split.Download()) << what << " RMSNorm stage";

        // SwiGLU input stage (gate | up rows of width 2k) == LaunchSwiGlu then the plain GEMV.
        const std::vector<uint16_t> gu16 = to16(Randn(static_cast<size_t>(rows) * 2 * k, 16, 2.0f));
        DeviceBuffer<uint16_t> dgu(gu16), mid(static_cast<size_t>(rows) * k);
        kernels::DecodeGemvParams sg = r;
        sg.input = kernels::GemvInput::kSwiGlu;
        sg.a = dgu.get();
        sg.norm_weight = nullptr;
        ASSERT_TRUE(kernels::LaunchDecodeGemv(sg, nullptr).ok()) << what;
        kernels::SwiGluParams sp;
        sp.rows = rows;
        sp.dim = k;
        sp.dtype = dt;
        sp.gate = dgu.get();
        sp.up = dgu.get() + k;
        sp.in_row_stride = 2 * k;
        sp.out = mid.get();
        ASSERT_TRUE(kernels::LaunchSwiGlu(sp, nullptr).ok());
        ASSERT_TRUE(run_plain(mid.get(), split.get(), nullptr).ok()) << what;
        KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
        EXPECT_EQ(fused.Download(), split.Download()) << what << " SwiGLU stage";
      }
    }
  }
}

// Refusals name what to fix (no GPU needed: checked before any launch).
TEST(DecodeGemv, RefusesBadShapes) {
  std::vector<float> dummy(64);
  alignas(16) static uint16_t w[64];
  kernels::DecodeGemvParams g;
  g.m = 1;
  g.n = 4;
  g.k = 16;
  g.w = w;
  g.a = dummy.data();
  g.seg[0] = {4, dummy.data(), 4};
  auto msg = [&](const kernels::DecodeGemvParams& p) {
    const absl::Status st = kernels::LaunchDecodeGemv(p, nullptr);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    return std::string(st.message());
  };
  kernels::DecodeGemvParams b = g;
  b.m = 9;
  EXPECT_NE(msg(b).find("rows 9"), std::string::npos);
  b = g;
  b.k = 12;
  EXPECT_NE(msg(b).find("multiple of 8"), std::string::npos);
  b = g;
  b.beta = 1.0f;
  b.c_dtype = DType::kF16;
  EXPECT_NE(msg(b).find("beta"), std::string::npos);
  b = g;
  b.seg[0].n_end = 3;
  EXPECT_NE(msg(b).find("segments end at column 3"), std::string::npos);
  b = g;
  b.w_dtype = DType::kF32;
  EXPECT_NE(msg(b).find("f16 or bf16"), std::string::npos);
  b = g;
  b.input = kernels::GemvInput::kRmsNorm;
  EXPECT_NE(msg(b).find("RMSNorm"), std::string::npos);
  b = g;
  b.seg[0].rot = dummy.data();  // rotation without positions / head dim
  EXPECT_NE(msg(b).find("rotated segment 0"), std::string::npos);
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
