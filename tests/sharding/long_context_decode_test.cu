// Decode attention at 1M tokens against an unfused GPU reference (issue #4: "long-context cases
// (>= 1M tokens) compare against an unfused GPU reference validated on small shapes").
//
// Each case builds a real cache of 1,048,613 tokens: random pre-RoPE keys and values (N(0, 1),
// key thresholds at +-2.576 so ~1% of key elements are outliers) appended through the engine's
// own path (sharding::GpuKvCache -> the quantize-append kernels), no replicated blocks. Query rows
// with different key ends (a batch of mixed lengths over one sequence) go through
// GpuKvCache::Attend, i.e. the fused decode kernel the engine runs (the LUT kernel for nuq formats,
// the fp16 kernel for fp16). The unfused reference: kernels::LaunchExpandKv (the cache dequantized
// to fp16 post-RoPE K/V, kvstore's ReadBack rounded once; expand_kv_test checks it against the
// CPU), then RefAttentionPartials below, a plain attention over those K/V in double (a warp per
// token at a time, online softmax), its partials merged on the host in double. The reference is
// validated on a small shape first: a 3,000-token cache of the same kind against the CPU oracle
// (the GPU cache serialized into kvstore::QuantizedKvCache, AttendPast in double).
//
// Every query head looks at a planted token far from the others (its query is that token's
// expanded key, scaled so the token's score is ~15 against a background of ~1M random scores),
// so each output mixes one token a million positions away with the whole background: a fused
// kernel that rotated keys at slightly wrong positions, or dropped or double-counted a block,
// would miss. Negative control: the same reference with every key rotated one position later is
// far outside the tolerances.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/engine_ops.h"
#include "kernels/prefill_attention.h"
#include "kernels/reference/rope.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantized_kv_cache.h"
#include "kvstore/quantizer.h"
#include "sharding/gpu/gpu_kv_cache.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/kv_pool_test_util.h"

namespace kvq {
namespace {

using sharding::GpuKvCache;
using sharding::GpuKvOptions;
using sharding::GpuKvPool;
using testing::DeviceBuffer;

// Tolerances (worst element; the fused kernel and the reference against each other, and both
// against the CPU oracle on the short context). All read the same stored bytes and differ in
// rounding: the fused kernel multiplies fp16 LUT values by fp16 cos/sin and adds the zero point
// through a separate product (fp32 sums), the reference rounds each post-RoPE key and value to fp16
// once and sums in double, the oracle uses the unrounded values in double. At the planted token,
// whose ~128 products all have the score's sign, one fp16 rounding each moves the score by at most
// |s| 2^-11 = 7.3e-3 at s = 15, and lse (a log-sum dominated by that token) by as much: 1e-2. o is
// a convex combination of values of magnitude <= ~4 whose weights move by that relative amount
// times the planted token's share, and by fp16 rounding of the values (2^-11 relative): 5e-3. The
// negative control must be 20x outside.
constexpr double kOutTol = 5e-3;
constexpr double kLseTol = 1e-2;
// Score (scale q.k) of each query head's planted token.
constexpr double kPlantedScore = 15.0;

// Partial attention of query row r, head h over tokens [c * chunk, min((c + 1) * chunk, end_r))
// of fp16 K/V [token][n_kv][kHd]: scores scale * q.k and the online softmax in double, one warp
// per token at a time (lanes over channels), the block's 8 warps merged through shared memory.
// part[((r * n_heads + h) * chunks + c) * (kHd + 2)] = {m, l, o[kHd]} (m = -inf, l = 0, o = 0
// for an empty range).
template <int kHd>
__global__ void RefAttentionPartials(const float* q, const __half* k, const __half* v, const int64_t* ends,
                                     int n_heads, int n_kv, int group, double scale, int64_t chunk, int chunks,
                                     double* part) {
  constexpr int kPer = kHd / 32, kWarps = 8;
  const int c = blockIdx.x, h = blockIdx.y, r = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = h / group;
  const int64_t t0 = c * chunk, t1 = min(t0 + chunk, ends[r]);
  double qd[kPer], o[kPer];
  for (int i = 0; i < kPer; ++i) {
    qd[i] = q[(static_cast<int64_t>(r) * n_heads + h) * kHd + lane + 32 * i];
    o[i] = 0.0;
  }
  double m = -INFINITY, l = 0.0;
  for (int64_t t = t0 + warp; t < t1; t += kWarps) {
    const __half* kr = k + (t * n_kv + g) * kHd;
    const __half* vr = v + (t * n_kv + g) * kHd;
    double s = 0.0;
    for (int i = 0; i < kPer; ++i) s += qd[i] * static_cast<double>(__half2float(kr[lane + 32 * i]));
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    s *= scale;
    if (s > m) {
      const double corr = exp(m - s);  // 0 for the first token
      l *= corr;
      for (int i = 0; i < kPer; ++i) o[i] *= corr;
      m = s;
    }
    const double p = exp(s - m);
    l += p;
    for (int i = 0; i < kPer; ++i) o[i] += p * static_cast<double>(__half2float(vr[lane + 32 * i]));
  }
  __shared__ double sm[kWarps], sl[kWarps], so[kWarps][kHd];
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
  }
  for (int i = 0; i < kPer; ++i) so[warp][lane + 32 * i] = o[i];
  __syncthreads();
  if (warp != 0) return;
  double mm = -INFINITY;
  for (int w = 0; w < kWarps; ++w) mm = fmax(mm, sm[w]);
  double* out = part + ((static_cast<int64_t>(r) * n_heads + h) * chunks + c) * (kHd + 2);
  double ll = 0.0, oo[kPer] = {};
  if (mm > -INFINITY) {
    for (int w = 0; w < kWarps; ++w) {
      if (sm[w] == -INFINITY) continue;
      const double f = exp(sm[w] - mm);
      ll += sl[w] * f;
      for (int i = 0; i < kPer; ++i) oo[i] += so[w][lane + 32 * i] * f;
    }
  }
  if (lane == 0) {
    out[0] = mm;
    out[1] = ll;
  }
  for (int i = 0; i < kPer; ++i) out[2 + lane + 32 * i] = oo[i];
}

struct Attention {
  std::vector<float> o, lse;  // [rows][n_heads][hd], [rows][n_heads]
};

// The reference over expanded K/V for query rows q (device) with key ends `ends`.
Attention RefAttention(const float* dq, const uint16_t* xk, const uint16_t* xv, const std::vector<int64_t>& ends,
                       int n_heads, int n_kv, int hd) {
  const int rows = static_cast<int>(ends.size());
  const int64_t chunk = 4096;
  const int64_t max_end = *std::max_element(ends.begin(), ends.end());
  const int chunks = static_cast<int>(std::max<int64_t>(1, (max_end + chunk - 1) / chunk));
  DeviceBuffer<int64_t> dends(ends);
  DeviceBuffer<double> part(static_cast<size_t>(rows) * n_heads * chunks * (hd + 2));
  const dim3 grid(chunks, n_heads, rows);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  const int group = n_heads / n_kv;
  auto kh = reinterpret_cast<const __half*>(xk);
  auto vh = reinterpret_cast<const __half*>(xv);
  if (hd == 128) {
    RefAttentionPartials<128><<<grid, 256>>>(dq, kh, vh, dends.get(), n_heads, n_kv, group, scale, chunk, chunks,
                                             part.get());
  } else {
    RefAttentionPartials<64><<<grid, 256>>>(dq, kh, vh, dends.get(), n_heads, n_kv, group, scale, chunk, chunks,
                                            part.get());
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<double> p = part.Download();
  Attention a;
  a.o.assign(static_cast<size_t>(rows) * n_heads * hd, 0.0f);
  a.lse.assign(static_cast<size_t>(rows) * n_heads, -INFINITY);
  for (int r = 0; r < rows; ++r) {
    for (int h = 0; h < n_heads; ++h) {
      const double* base = p.data() + (static_cast<size_t>(r) * n_heads + h) * chunks * (hd + 2);
      double m = -INFINITY;
      for (int c = 0; c < chunks; ++c) m = std::max(m, base[c * (hd + 2)]);
      if (m == -INFINITY) continue;
      double l = 0.0;
      std::vector<double> o(hd, 0.0);
      for (int c = 0; c < chunks; ++c) {
        const double* pc = base + c * (hd + 2);
        if (pc[0] == -INFINITY) continue;
        const double f = std::exp(pc[0] - m);
        l += pc[1] * f;
        for (int d = 0; d < hd; ++d) o[d] += pc[2 + d] * f;
      }
      for (int d = 0; d < hd; ++d) a.o[(static_cast<size_t>(r) * n_heads + h) * hd + d] = static_cast<float>(o[d] / l);
      a.lse[static_cast<size_t>(r) * n_heads + h] = static_cast<float>(m + std::log(l));
    }
  }
  return a;
}

struct Case {
  std::string name;
  std::string format;
  int n_kv_heads, head_dim, group;
  int64_t first_position;  // > 0: a shard of a longer sequence (no sink tokens)
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return info.param.name; }

// A sequence in the engine's GPU pool, filled with random keys and values through the append
// kernels, and its expansion to fp16 post-RoPE K/V.
class Filled {
 public:
  Filled(const Case& c, int64_t tokens, uint64_t seed) : c_(c) {
    EXPECT_EQ(cudaStreamCreate(&stream_), cudaSuccess);
    auto fmt = kvstore::KvFormat::Parse(c.format);
    EXPECT_TRUE(fmt.ok()) << fmt.status();
    format_ = *fmt;
    format_.sink_tokens = format_.quantized() ? 1 : 0;
    const kvstore::KvShape shape{1, c.n_kv_heads, c.head_dim};
    std::mt19937 rng(static_cast<uint32_t>(seed));
    if (format_.quantized()) {
      // Per-channel key thresholds at the 1% two-sided quantiles of N(0, 1), +-10% per channel.
      kvstore::QuantizerData d = testing::MakeRandomQuantizer(shape, format_, rng)->data();
      std::uniform_real_distribution<float> u(0.9f, 1.1f);
      for (size_t i = 0; i < d.key_lower.size(); ++i) {
        d.key_lower[i] = -2.576f * u(rng);
        d.key_upper[i] = 2.576f * u(rng);
      }
      auto q = kvstore::Quantizer::Create(std::move(d));
      EXPECT_TRUE(q.ok()) << q.status();
      quantizer_ = std::make_shared<const kvstore::Quantizer>(std::move(q).value());
    }
    rope_.head_dim = c.head_dim;
    rope_.theta = 500000.0;
    GpuKvOptions o;
    const int64_t kv_dim = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
    o.capacity_bytes = tokens * kv_dim * 4 * 6 / 5 + (int64_t{256} << 20);  // fp16 fits with 20% room
    o.max_sink_slots = 2;
    auto pool = GpuKvPool::Create(shape, format_, quantizer_, rope_, o, stream_);
    EXPECT_TRUE(pool.ok()) << pool.status();
    if (!pool.ok()) return;
    pool_ = *pool;
    cache_ = std::make_unique<GpuKvCache>(pool_, c.n_kv_heads * c.group, c.first_position);
    const int64_t step = 16384;
    DeviceBuffer<float> k(static_cast<size_t>(step * kv_dim)), v(static_cast<size_t>(step * kv_dim));
    for (int64_t t = 0; t < tokens; t += step) {
      const int n = static_cast<int>(std::min(step, tokens - t));
      EXPECT_TRUE(kernels::LaunchFillNormal(n * kv_dim, seed * 1000 + 2 * (t / step), 0.0f, 1.0f, k.get(),
                                            kernels::DType::kF32, stream_).ok());
      EXPECT_TRUE(kernels::LaunchFillNormal(n * kv_dim, seed * 1000 + 2 * (t / step) + 1, 0.0f, 1.0f, v.get(),
                                            kernels::DType::kF32, stream_).ok());
      const absl::Status st = cache_->AppendDevice(0, k.get(), v.get(), n);
      EXPECT_TRUE(st.ok()) << st;
      if (!st.ok()) return;
      cache_->Commit(n);
    }
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    int overflowed = 0;
    EXPECT_EQ(cudaMemcpy(&overflowed, pool_->overflow_flag(), sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(overflowed, 0) << "key-outlier areas overflowed: entries dropped";
    EXPECT_EQ(cache_->length(), tokens);
  }
  ~Filled() {
    cache_.reset();
    pool_.reset();
    if (stream_) cudaStreamDestroy(stream_);
  }
  bool ok() const { return cache_ != nullptr && cache_->length() > 0; }
  GpuKvCache& cache() { return *cache_; }
  const std::shared_ptr<const kvstore::Quantizer>& quantizer() const { return quantizer_; }
  const kernels::RopeParams& rope() const { return rope_; }

  // Local tokens [0, length) as fp16 K (RoPE at first_position + shift + i) and V, [token][n_kv][hd].
  void Expand(int64_t shift, DeviceBuffer<uint16_t>* xk, DeviceBuffer<uint16_t>* xv) {
    const int64_t n = cache_->length(), kv_dim = static_cast<int64_t>(c_.n_kv_heads) * c_.head_dim;
    xk->Resize(static_cast<size_t>(n * kv_dim));
    xv->Resize(static_cast<size_t>(n * kv_dim));
    const std::vector<int32_t> table = cache_->blocks();
    DeviceBuffer<int32_t> dtable(table.empty() ? std::vector<int32_t>{0} : table);
    DeviceBuffer<int32_t> dlen(std::vector<int32_t>{static_cast<int32_t>(n)});
    DeviceBuffer<int64_t> dfirst(std::vector<int64_t>{c_.first_position + shift});
    DeviceBuffer<const uint16_t*> dsink(std::vector<const uint16_t*>{cache_->sink()});
    kernels::ExpandKvParams p;
    p.kv = pool_->view();
    p.kv.block_table = dtable.get();
    p.kv.max_blocks_per_seq = std::max<int>(1, static_cast<int>(table.size()));
    p.kv.seq_lens = dlen.get();
    p.kv.first_positions = dfirst.get();
    p.kv.sink = dsink.get();
    p.layer = 0;
    p.seq = 0;
    p.t0 = 0;
    p.n = static_cast<int>(n);
    p.k = xk->get();
    p.v = xv->get();
    p.token_stride = kv_dim;
    p.head_stride = c_.head_dim;
    const absl::Status st = kernels::LaunchExpandKv(p, stream_);
    EXPECT_TRUE(st.ok()) << st;
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  }

 private:
  Case c_;
  cudaStream_t stream_ = nullptr;
  kvstore::KvFormat format_;
  std::shared_ptr<const kvstore::Quantizer> quantizer_;
  kernels::RopeParams rope_;
  std::shared_ptr<GpuKvPool> pool_;
  std::unique_ptr<GpuKvCache> cache_;
};

// Query rows whose head h looks at a planted token of its row's range: q = that token's expanded
// key, scaled so that its score (scale q.k) is kPlantedScore.
std::vector<float> PlantedQueries(const std::vector<uint16_t>& planted_keys, int rows, int n_heads, int hd) {
  std::vector<float> q(static_cast<size_t>(rows) * n_heads * hd);
  for (size_t rh = 0; rh < static_cast<size_t>(rows) * n_heads; ++rh) {
    double n2 = 0.0;
    std::vector<double> kk(hd);
    for (int d = 0; d < hd; ++d) {
      kk[d] = HalfBitsToFloat(planted_keys[rh * hd + d]);
      n2 += kk[d] * kk[d];
    }
    const double beta = kPlantedScore * std::sqrt(static_cast<double>(hd)) / std::max(n2, 1e-6);
    for (int d = 0; d < hd; ++d) q[rh * hd + d] = static_cast<float>(beta * kk[d]);
  }
  return q;
}

// The planted token of row r, head h: spread over the row's range, head by head.
int64_t PlantedToken(int64_t end, int h, int n_heads) { return (static_cast<int64_t>(h) + 1) * (end - 1) / (n_heads + 1); }

// Expanded key rows of the planted tokens, [rows][n_heads][hd].
std::vector<uint16_t> PlantedKeys(const DeviceBuffer<uint16_t>& xk, const std::vector<int64_t>& ends, int n_heads,
                                  int n_kv, int hd) {
  const int group = n_heads / n_kv;
  std::vector<uint16_t> out(ends.size() * n_heads * hd);
  for (size_t r = 0; r < ends.size(); ++r) {
    for (int h = 0; h < n_heads; ++h) {
      const int64_t t = PlantedToken(ends[r], h, n_heads);
      EXPECT_EQ(cudaMemcpy(out.data() + (r * n_heads + h) * hd, xk.get() + (t * n_kv + h / group) * hd, hd * 2,
                           cudaMemcpyDeviceToHost), cudaSuccess);
    }
  }
  return out;
}

double MaxAbs(const std::vector<float>& a, const std::vector<float>& b) { return testing::MaxAbsError(a, b).err; }

class LongContextDecodeTest : public ::testing::TestWithParam<Case> {};

// The reference on a small shape: expansion + RefAttention against the CPU oracle (and the fused
// kernel too), 3,000 tokens.
TEST_P(LongContextDecodeTest, ReferenceMatchesCpuOracleOnShortContext) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const Case& c = GetParam();
  const int n_heads = c.n_kv_heads * c.group, hd = c.head_dim;
  Filled f(c, 3000, 11);
  ASSERT_TRUE(f.ok());
  DeviceBuffer<uint16_t> xk, xv;
  f.Expand(0, &xk, &xv);
  const std::vector<int64_t> ends = {3000, 2999, 1001, 257, 2};
  const std::vector<float> q = PlantedQueries(PlantedKeys(xk, ends, n_heads, c.n_kv_heads, hd),
                                              static_cast<int>(ends.size()), n_heads, hd);
  DeviceBuffer<float> dq(q);
  const Attention ref = RefAttention(dq.get(), xk.get(), xv.get(), ends, n_heads, c.n_kv_heads, hd);
  auto bytes = f.cache().Serialize();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto cpu = kvstore::QuantizedKvCache::Deserialize(*bytes, f.quantizer(), f.rope());
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  Attention oracle, fused;
  fused.o.resize(q.size());
  fused.lse.resize(ends.size() * n_heads);
  f.cache().Attend(0, q.data(), static_cast<int>(ends.size()), ends.data(), fused.o.data(), fused.lse.data());
  for (size_t r = 0; r < ends.size(); ++r) {
    auto part = (*cpu)->AttendPast(0, q.data() + r * n_heads * hd, 1, n_heads, 0, ends[r]);
    ASSERT_TRUE(part.ok()) << part.status();
    oracle.o.insert(oracle.o.end(), part->o.begin(), part->o.end());
    oracle.lse.insert(oracle.lse.end(), part->lse.begin(), part->lse.end());
  }
  // The reference and the oracle differ only by the fp16 rounding of the expanded keys and values.
  const double ro = MaxAbs(ref.o, oracle.o), rl = MaxAbs(ref.lse, oracle.lse);
  const double fo = MaxAbs(fused.o, oracle.o), fl = MaxAbs(fused.lse, oracle.lse);
  std::printf("[long-ctx] %-22s 3,000 tokens: reference vs CPU oracle |do| %.2e |dlse| %.2e; fused vs CPU |do| %.2e |dlse| %.2e\n",
              c.name.c_str(), ro, rl, fo, fl);
  EXPECT_LE(ro, kOutTol);
  EXPECT_LE(rl, kLseTol);
  EXPECT_LE(fo, kOutTol);
  EXPECT_LE(fl, kLseTol);
}

// 1,048,613 tokens: the fused kernel against the reference, and the negative control.
TEST_P(LongContextDecodeTest, FusedMatchesReferenceAtOneMillionTokens) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const Case& c = GetParam();
  const int n_heads = c.n_kv_heads * c.group, hd = c.head_dim;
  const int64_t n = (int64_t{1} << 20) + 37;
  Filled f(c, n, 29);
  ASSERT_TRUE(f.ok());
  DeviceBuffer<uint16_t> xk, xv;
  f.Expand(0, &xk, &xv);
  // Rows: the whole sequence, one token less, a block boundary (256-token blocks) plus one, a
  // length inside the first block, and one token (the sink or, in a shard, its first key).
  const std::vector<int64_t> ends = {n, n - 1, 700 * 256 + 1, 65537, 17, 1};
  const std::vector<float> q = PlantedQueries(PlantedKeys(xk, ends, n_heads, c.n_kv_heads, hd),
                                              static_cast<int>(ends.size()), n_heads, hd);
  DeviceBuffer<float> dq(q);
  const Attention ref = RefAttention(dq.get(), xk.get(), xv.get(), ends, n_heads, c.n_kv_heads, hd);
  Attention fused;
  fused.o.resize(q.size());
  fused.lse.resize(ends.size() * n_heads);
  f.cache().Attend(0, q.data(), static_cast<int>(ends.size()), ends.data(), fused.o.data(), fused.lse.data());
  const double fo = MaxAbs(fused.o, ref.o), fl = MaxAbs(fused.lse, ref.lse);
  // How much of each row's softmax the planted token holds (reference), to show what is compared.
  double lo_w = 1.0, hi_w = 0.0;
  for (size_t r = 0; r + 1 < ends.size(); ++r) {
    for (int h = 0; h < n_heads; ++h) {
      const double w = std::exp(kPlantedScore - ref.lse[r * n_heads + h]);
      lo_w = std::min(lo_w, w);
      hi_w = std::max(hi_w, w);
    }
  }
  // Negative control: keys rotated one position later.
  DeviceBuffer<uint16_t> sk, sv;
  f.Expand(1, &sk, &sv);
  const Attention shifted = RefAttention(dq.get(), sk.get(), sv.get(), ends, n_heads, c.n_kv_heads, hd);
  const double so = MaxAbs(fused.o, shifted.o), sl = MaxAbs(fused.lse, shifted.lse);
  std::printf("[long-ctx] %-22s %lld tokens: fused vs reference |do| %.2e |dlse| %.2e (planted token %.0f-%.0f%% of "
              "the softmax); vs keys one position later |do| %.2e |dlse| %.2e\n",
              c.name.c_str(), static_cast<long long>(n), fo, fl, 100 * lo_w, 100 * hi_w, so, sl);
  EXPECT_LE(fo, kOutTol);
  EXPECT_LE(fl, kLseTol);
  EXPECT_GT(std::max(so / kOutTol, sl / kLseTol), 20.0) << "the comparison does not see a one-position RoPE shift";
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, LongContextDecodeTest,
    ::testing::Values(Case{"llama3_8b_nuq3_1pct", "nuq3-1%", 8, 128, 4, 0},
                      Case{"llama3_8b_nuq2_1pct", "nuq2-1%", 8, 128, 4, 0},
                      Case{"llama3_8b_nuq4_1pct", "nuq4-1%", 8, 128, 4, 0},
                      Case{"llama3_8b_fp16", "fp16", 8, 128, 4, 0},
                      Case{"llama3_8b_nuq3_1pct_shard9M", "nuq3-1%", 8, 128, 4, 9000000},
                      Case{"smollm2_nuq3_1pct", "nuq3-1%", 3, 64, 3, 0},
                      Case{"smollm2_fp16", "fp16", 3, 64, 3, 0}),
    CaseName);

}  // namespace
}  // namespace kvq
