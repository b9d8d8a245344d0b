// Linear layers vs their references: the cuBLAS GEMM wrapper (kernels::Gemm), the row GEMV it
// sends decode steps' few rows to (kernels/row_gemv.h), and the decode GEMV with its RMSNorm /
// SwiGLU / RoPE stages (kernels/decode_gemv.h).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cublas_api.h"
#include "kernels/decode_gemv.h"
#include "kernels/dense_ops.h"
#include "kernels/engine_ops.h"
#include "kernels/gemm.h"
#include "kernels/reference/dense_ops.h"
#include "kernels/reference/rope.h"
#include "kernels/row_gemv.h"
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
              const kernels::RowGemvParams r{.m = m, .n = n, .k = k, .ab_dtype = ab, .c_dtype = cdt, .a = da.get(),
                                             .lda = lda, .w = dw.get(), .ldw = ldw, .c = c, .beta = beta};
              const kernels::GemmParams g{.m = m, .n = n, .k = k, .ab_dtype = ab, .c_dtype = cdt, .a = da.get(),
                                          .lda = lda, .b = dw.get(), .ldb = ldw, .c = c, .beta = beta};
              auto run = [&]() -> absl::Status {
                if (path == 0 || path == 3) {
                  EXPECT_TRUE(kernels::RowGemvApplies(r));
                  kernels::SetRowGemvEarlyStart(path == 0);
                  absl::Status rs = kernels::LaunchRowGemv(r, nullptr);
                  kernels::SetRowGemvEarlyStart(true);
                  return rs;
                }
                kernels::SetRowGemv(path == 1);
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
  const kernels::RowGemvParams r{.m = 1, .n = 40, .k = 64, .a = a, .w = w, .c = c};
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
  kernels::RowGemvParams r{.m = m, .n = n, .k = k, .a = da.get() + 1 /* 2-byte aligned only */, .w = dw.get(), .c = dc.get()};
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
  const kernels::GemmParams g{.m = m, .n = n, .k = k, .a = da.get() + 1, .b = dw.get(), .c = dc.get()};
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

}  // namespace
}  // namespace kvq
