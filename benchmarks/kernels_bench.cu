// Decode-attention benchmark: one layer of decode attention (kernels/decode_attention.h) over a
// paged cache of synthetic data, swept over context, batch, model shape and KV format.
// Reports, per point: median time (CUDA events), the bytes the kernel must read (codes, scales,
// outliers, q/o), achieved GB/s, that as a fraction of the streaming-read bandwidth measured in
// the same run (ReadKernel below: the floor of a kernel that reads its bytes once) and of the
// device-to-device copy bandwidth (cudaMemcpy D2D, counting read + write: the convention of the
// tables before 2026-12-02), and the speedup over the fp16 kernel at the same point. A markdown
// table is printed last; --json=FILE writes JSON. benchmarks/decode_table.py runs this and
// PyTorch's SDPA (benchmarks/sdpa_bench.py --decode) and prints one table with both baselines.
//
//   kernels_bench [--quick] [--contexts=32768,1048576] [--batches=1,8] [--shapes=llama3-8b,...]
//                 [--formats=fp16,nuq3-1%] [--iters=7] [--mem_gb=48] [--sink=0] [--json=out.json]
//                 [--prefill_rows=4096] [--prefill_kernels=auto,mma,wgmma,wgmma-serial]
//
// --prefill_rows=N (batch-1 points only) also times N query rows of one prefill chunk over the
// same past through kernels::LaunchPrefillPast (expand to fp16 in segments + tensor-core flash
// attention + merges), the tensor-core kernel alone over an fp16 K/V of the same shape, and the
// chunk's causal self-attention (N x N): time, TFLOP/s (4 * N * n_heads * keys * head_dim for
// the past, half that for the causal chunk), and the quantize-append of the N tokens into fresh
// blocks, printed as a second table. PyTorch's SDPA on the same shapes: benchmarks/sdpa_bench.py.
// --prefill_kernels runs those measurements once per named kernel (kernels::SetPrefillKernel), in
// the same process, for A/B tables.
//
// --sink=N gives quantized formats N fp16 sink tokens (the engine's default is 1; 0 keeps the
// pool uniform and matches the earlier tables); context counts them.
//
// Memory: one layer, blocks of a sequence are distinct; when batch * blocks would exceed
// --mem_gb the block table wraps around a pool of that size (>= 1 GiB, far above L2, so the
// data still comes from HBM). Keep --mem_gb <= ~60 on an 80 GB H100.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "benchmarks/bench_cuda_check.h"
#include "kernels/decode_attention.h"
#include "kernels/engine_ops.h"
#include "kernels/kv_append.h"
#include "kernels/prefill_attention.h"
#include "kernels/paged_kv.h"
#include "kernels/reference/rope.h"
#include "kvstore/block_layout.h"
#include "kvstore/kernel_geometry.h"
#include "kvstore/kv_format.h"

namespace {

using kvq::kernels::KvCodec;

struct Shape {
  std::string name;
  int n_heads, n_kv_heads, head_dim;
};
const std::vector<Shape> kShapes = {
    {"llama3-8b", 32, 8, 128}, {"llama2-7b", 32, 32, 128}, {"smollm2-135m", 9, 3, 64}};

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t c = s.find(',', at);
    const std::string t = s.substr(at, c == std::string::npos ? std::string::npos : c - at);
    if (!t.empty()) out.push_back(t);
    if (c == std::string::npos) break;
    at = c + 1;
  }
  return out;
}

__device__ __forceinline__ uint32_t Hash(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Random contents: fp16 halves in (-1, 1) for the fp16 codec, random bits otherwise.
__global__ void FillKernel(uint32_t* words, int64_t n, bool fp16, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t h = Hash(seed * 0x9E3779B97F4A7C15ull + i);
    if (fp16) {
      const float a = (h & 0xffff) / 65536.0f * 2.0f - 1.0f, b = (h >> 16) / 65536.0f * 2.0f - 1.0f;
      words[i] = __half_as_ushort(__float2half_rn(a)) |
                 (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(b))) << 16);
    } else {
      words[i] = h;
    }
  }
}

// Valid scales, outlier indices and key-outlier directories/entries for every pool block.
__global__ void FixupKernel(uint8_t* pool, int64_t stride, kvq::kernels::KvBlockGeometry g,
                            int key_entries, int cap) {
  uint8_t* blk = pool + blockIdx.x * stride;
  const int L = g.n_kv_heads * g.head_dim;
  for (int t = threadIdx.x; t < kvq::kernels::kKvBlockTokens; t += blockDim.x) {
    uint16_t* sc = reinterpret_cast<uint16_t*>(blk + g.value_scales_offset + t * 4);
    sc[0] = 0;       // zp 0
    sc[1] = 0x3c00;  // range 1
    // Outlier o of token t: spread over the layer vector, ascending.
    auto element = [&](int o) { return (o * L) / g.value_outliers_per_token + (t % 7); };
    for (int o = 0; o < g.value_outliers_per_token; ++o) {
      const int e = element(o);
      uint8_t* idx = blk + g.value_outlier_index_offset +
                     (static_cast<int64_t>(t) * g.value_outliers_per_token + o) * g.value_outlier_index_bytes;
      if (g.value_outlier_index_bytes == 1) *idx = static_cast<uint8_t>(e);
      else *reinterpret_cast<uint16_t*>(idx) = static_cast<uint16_t>(e);
      reinterpret_cast<uint16_t*>(blk + g.value_outlier_value_offset)
          [static_cast<int64_t>(t) * g.value_outliers_per_token + o] = 0x4400;  // 4.0
    }
    if (g.value_outlier_head_start_offset >= 0) {
      int o = 0;
      for (int h = 0; h < g.n_kv_heads; ++h) {
        while (o < g.value_outliers_per_token && element(o) < h * g.head_dim) ++o;
        blk[g.value_outlier_head_start_offset + h * kvq::kernels::kKvBlockTokens + t] = static_cast<uint8_t>(o);
      }
    }
  }
  if (!g.has_key_outliers) return;
  for (int h = 0; h < g.n_kv_heads; ++h) {
    uint32_t* dir = reinterpret_cast<uint32_t*>(blk + g.key_outlier_dir_offset) + 2 * h;
    if (threadIdx.x == 0) {
      dir[0] = h * cap;
      dir[1] = key_entries;
    }
    uint32_t* ents = reinterpret_cast<uint32_t*>(blk + g.fixed_bytes) + h * cap;
    for (int e = threadIdx.x; e < key_entries; e += blockDim.x) {
      const int tok = static_cast<int>((static_cast<int64_t>(e) * 256) / key_entries);
      ents[e] = static_cast<uint32_t>(tok) | ((e * 37 % g.head_dim) << 8) | (0x4400u << 16);
    }
  }
}


// Keeps every SM busy for about `ms` milliseconds (at ~2 GHz), so that the first timed row does
// not run while the GPU's clocks ramp up from idle: without it the first row of a run measured up
// to 9% slower than the same call repeated (Llama-3-8B fp16 at 128K, batch 1: 167.0 against 153.6
// us; H200, 2026-12-01).
__global__ void SpinKernel(long long cycles, int* sink) {
  const long long t0 = clock64();
  int x = threadIdx.x;
  while (clock64() - t0 < cycles) x = x * 1664525 + 1013904223;
  if (x == 0x7fffffff) *sink = x;
}

void WarmUp(int sm_count, double ms) {
  int* sink;
  CK(cudaMalloc(&sink, sizeof(int)));
  for (int i = 0; i < 10; ++i) {
    SpinKernel<<<sm_count * 4, 256>>>(static_cast<long long>(ms * 2e5), sink);  // 10 x ms/10
  }
  CK(cudaDeviceSynchronize());
  CK(cudaFree(sink));
}

// Median over iters runs of f (after one warm-up run), in microseconds, by CUDA events.
template <typename F>
double MedianUs(int iters, F&& f) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int it = 0; it < iters + 1; ++it) {
    CK(cudaEventRecord(e0));
    f();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float t;
    CK(cudaEventElapsedTime(&t, e0, e1));
    if (it >= 1) ms.push_back(t);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1e3;
}

double CopyBandwidthGBs(int iters) {
  const size_t bytes = size_t{2} << 30;
  void *a, *b;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&b, bytes));
  CK(cudaMemset(a, 1, bytes));
  const double us = MedianUs(iters, [&] { CK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  CK(cudaFree(a));
  CK(cudaFree(b));
  return 2.0 * bytes / (us * 1e-6) / 1e9;  // read + write
}

// Streaming read of a buffer: 16-byte non-caching loads, four in flight per thread, folded into
// one word per thread that is stored only when it equals a value no input produces, so no load is
// dead code. The "read bandwidth" of this file: what a kernel that only reads can reach.
__global__ void ReadKernel(const uint4* __restrict__ src, size_t n, uint32_t* __restrict__ sink) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  uint32_t acc = 0;
  size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 x[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) x[u] = __ldcs(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= x[u].x ^ x[u].y ^ x[u].z ^ x[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 x = __ldcs(src + i);
    acc ^= x.x ^ x.y ^ x.z ^ x.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;  // the buffer is all 0x01010101 words: never true
}

// Median read bandwidth over a 4 GiB buffer (far above L2), best launch shape of a few.
double ReadBandwidthGBs(int sm_count, int iters) {
  const size_t bytes = size_t{4} << 30;
  void* a;
  uint32_t* sink;
  CK(cudaMalloc(&a, bytes));
  CK(cudaMalloc(&sink, sizeof(uint32_t)));
  CK(cudaMemset(a, 1, bytes));
  double best = 0.0;
  for (const int per_sm : {4, 8, 16}) {
    const double us = MedianUs(iters, [&] {
      ReadKernel<<<sm_count * per_sm, 256>>>(static_cast<const uint4*>(a), bytes / 16, sink);
    });
    best = std::max(best, bytes / (us * 1e-6) / 1e9);
  }
  CK(cudaFree(a));
  CK(cudaFree(sink));
  return best;
}

struct PrefillRow {
  std::string shape, format, kernel;
  int64_t context;
  int rows;
  double past_us, expand_us, fa_us, chunk_us, past_tflops, fa_tflops, chunk_tflops, append_us;
  int splits;
  int64_t seg_tokens;
};

#define CKS(x)                                                                                  \
  do {                                                                                          \
    const absl::Status s_ = (x);                                                                \
    if (!s_.ok()) {                                                                             \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, std::string(s_.message()).c_str()); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

// N query rows over the cache `kv` (batch row 0, ctx local tokens): the engine's prefill path and
// its parts.
// Quantize-append of `rows` new tokens (normal random k, v) of one layer into fresh blocks of a
// separate pool with the same geometry (fixed key-outlier reservations of key_cap entries): what a
// prefill chunk's append costs (independent of the context before it).
double AppendUs(const kvq::kernels::PagedKvCache& kv, int rows, int key_cap, int iters) {
  const kvq::kernels::KvBlockGeometry& g = kv.geom;
  const int nb = (rows + kvq::kernels::kKvBlockTokens - 1) / kvq::kernels::kKvBlockTokens;
  const size_t elems = static_cast<size_t>(rows) * g.n_kv_heads * g.head_dim;
  uint8_t* pool;
  int32_t *ids, *lens;
  float *k, *v;
  CK(cudaMalloc(&pool, static_cast<size_t>(nb) * kv.block_stride_bytes));
  CK(cudaMalloc(&ids, nb * 4));
  CK(cudaMalloc(&lens, 4));
  CK(cudaMalloc(&k, elems * 4));
  CK(cudaMalloc(&v, elems * 4));
  std::vector<int32_t> hid(nb);
  for (int i = 0; i < nb; ++i) hid[i] = i;
  CK(cudaMemcpy(ids, hid.data(), nb * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(lens, 0, 4));
  CKS(kvq::kernels::LaunchFillNormal(static_cast<int64_t>(elems), 3, 0.0f, 1.0f, k, kvq::kernels::DType::kF32, nullptr));
  CKS(kvq::kernels::LaunchFillNormal(static_cast<int64_t>(elems), 4, 0.0f, 1.0f, v, kvq::kernels::DType::kF32, nullptr));
  kvq::kernels::InitKvBlocksParams ip;
  ip.pool = pool;
  ip.block_stride_bytes = kv.block_stride_bytes;
  ip.ids = ids;
  ip.n = nb;
  ip.n_layers = g.n_layers;
  ip.n_kv_heads = g.n_kv_heads;
  ip.layer_bytes = g.layer_bytes;
  ip.fixed_bytes = g.fixed_bytes;
  ip.dir_offset = g.has_key_outliers ? g.key_outlier_dir_offset : -1;
  ip.key_outlier_capacity = key_cap;
  int* overflow;
  CK(cudaMalloc(&overflow, 4));
  kvq::kernels::KvAppendParams ap;
  ap.kv = kv;
  ap.kv.pool = pool;
  ap.kv.block_table = ids;
  ap.kv.max_blocks_per_seq = nb;
  ap.kv.block_table_stride = -1;
  ap.kv.seq_lens = lens;
  ap.kv.key_outlier_capacity = key_cap;
  ap.kv.key_outlier_header_words = 0;
  ap.pool = pool;
  ap.sink = const_cast<uint16_t* const*>(kv.sink);
  ap.batch = 1;
  ap.n_new = rows;
  ap.k = k;
  ap.v = v;
  ap.overflow = overflow;
  const double us = MedianUs(iters, [&] {
    CKS(kvq::kernels::LaunchInitKvBlocks(ip, nullptr));  // fresh blocks every time (timed with it)
    CKS(kvq::kernels::LaunchKvAppend(ap, nullptr));
  });
  const double init_us = MedianUs(iters, [&] { CKS(kvq::kernels::LaunchInitKvBlocks(ip, nullptr)); });
  for (void* ptr : {static_cast<void*>(pool), static_cast<void*>(ids), static_cast<void*>(lens),
                    static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(overflow)}) {
    CK(cudaFree(ptr));
  }
  return us - init_us;
}

PrefillRow RunPrefill(const kvq::kernels::PagedKvCache& kv, const Shape& sh, const std::string& fmt,
                      int64_t ctx, int rows, int sm_count, int iters, int key_cap) {
  PrefillRow r{sh.name, fmt, kvq::kernels::PrefillKernelName(kvq::kernels::GetPrefillKernel()), ctx, rows, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0};
  const int hd = sh.head_dim, nh = sh.n_heads, nkv = sh.n_kv_heads;
  const auto plan = kvq::kernels::PlanPrefillPast(rows, nh, nkv, hd, ctx, sm_count, kvq::kernels::kPrefillExpandBudgetBytes,
                                                  kvq::kernels::kPrefillPartialBudgetBytes);
  r.splits = plan.splits;
  r.seg_tokens = plan.seg_tokens;
  float *dq, *dout, *dlse, *po = nullptr, *pl = nullptr;
  uint16_t *xk, *xv, *ck, *cv;
  const size_t qn = static_cast<size_t>(rows) * nh * hd;
  CK(cudaMalloc(&dq, qn * 4));
  CK(cudaMalloc(&dout, qn * 4));
  CK(cudaMalloc(&dlse, static_cast<size_t>(rows) * nh * 4));
  CK(cudaMemset(dq, 0, qn * 4));  // q = 0: every key weighs the same; the work does not depend on it
  CK(cudaMalloc(&xk, plan.expand_bytes));
  CK(cudaMalloc(&xv, plan.expand_bytes));
  if (plan.partial_bytes > 0) {
    CK(cudaMalloc(&po, plan.partial_bytes));
    CK(cudaMalloc(&pl, plan.partial_bytes / hd));
  }
  kvq::kernels::PrefillPastParams pp;
  pp.kv = kv;
  pp.n_keys = ctx;
  pp.rows = rows;
  pp.n_heads = nh;
  pp.q = dq;
  pp.limit_base = ctx;
  pp.o = dout;
  pp.lse = dlse;
  pp.plan = plan;
  pp.xk = xk;
  pp.xv = xv;
  pp.part_o = po;
  pp.part_lse = pl;
  r.past_us = MedianUs(iters, [&] { CKS(kvq::kernels::LaunchPrefillPast(pp, nullptr)); });
  // Expansion alone (every segment into the same buffer).
  r.expand_us = MedianUs(iters, [&] {
    for (int64_t s0 = 0; s0 < ctx; s0 += plan.seg_tokens) {
      kvq::kernels::ExpandKvParams ep;
      ep.kv = kv;
      ep.t0 = s0;
      ep.n = static_cast<int>(std::min<int64_t>(plan.seg_tokens, ctx - s0));
      ep.k = xk;
      ep.v = xv;
      ep.token_stride = static_cast<int64_t>(nkv) * hd;
      ep.head_stride = hd;
      CKS(kvq::kernels::LaunchExpandKv(ep, nullptr));
    }
  });
  // The `rows` queries over token-major fp16 K/V ([n_keys][nkv][hd]), every key visible.
  auto over = [&](const uint16_t* k, const uint16_t* v, int n_keys) {
    kvq::kernels::PrefillAttentionParams a;
    a.rows = rows;
    a.n_heads = nh;
    a.n_kv_heads = nkv;
    a.head_dim = hd;
    a.q = dq;
    a.k = k;
    a.v = v;
    a.kv_token_stride = static_cast<int64_t>(nkv) * hd;
    a.kv_head_stride = hd;
    a.n_keys = n_keys;
    a.limit_base = n_keys;
    a.o = dout;
    a.lse = dlse;
    return a;
  };
  // The tensor-core kernel alone over one contiguous fp16 K/V of min(ctx, seg) keys, scaled to ctx.
  {
    kvq::kernels::PrefillAttentionParams fp = over(xk, xv, static_cast<int>(std::min<int64_t>(ctx, plan.seg_tokens)));
    fp.splits = plan.splits;
    fp.o = po != nullptr ? po : dout;
    fp.lse = pl != nullptr ? pl : dlse;
    fp.o_split_stride = static_cast<int64_t>(qn);
    fp.lse_split_stride = static_cast<int64_t>(rows) * nh;
    if (plan.splits > 1 && po == nullptr) fp.splits = 1;
    const double us = MedianUs(iters, [&] { CKS(kvq::kernels::LaunchPrefillAttention(fp, nullptr)); });
    r.fa_us = us * static_cast<double>(ctx) / fp.n_keys;
  }
  // The chunk's causal self-attention (rows x rows).
  {
    CK(cudaMalloc(&ck, static_cast<size_t>(rows) * nkv * hd * 2));
    CK(cudaMalloc(&cv, static_cast<size_t>(rows) * nkv * hd * 2));
    CK(cudaMemcpy(ck, xk, std::min(plan.expand_bytes, static_cast<size_t>(rows) * nkv * hd * 2), cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy(cv, xv, std::min(plan.expand_bytes, static_cast<size_t>(rows) * nkv * hd * 2), cudaMemcpyDeviceToDevice));
    kvq::kernels::PrefillAttentionParams cp = over(ck, cv, rows);
    cp.limit_base = 1;
    cp.causal = true;
    r.chunk_us = MedianUs(iters, [&] { CKS(kvq::kernels::LaunchPrefillAttention(cp, nullptr)); });
  }
  r.append_us = AppendUs(kv, rows, key_cap, iters);
  const double past_flop = 4.0 * rows * nh * static_cast<double>(ctx) * hd;
  const double chunk_flop = 2.0 * rows * nh * static_cast<double>(rows) * hd;
  r.past_tflops = past_flop / (r.past_us * 1e-6) / 1e12;
  r.fa_tflops = past_flop / (r.fa_us * 1e-6) / 1e12;
  r.chunk_tflops = chunk_flop / (r.chunk_us * 1e-6) / 1e12;
  for (void* ptr : {static_cast<void*>(dq), static_cast<void*>(dout), static_cast<void*>(dlse),
                    static_cast<void*>(po), static_cast<void*>(pl), static_cast<void*>(xk),
                    static_cast<void*>(xv), static_cast<void*>(ck), static_cast<void*>(cv)}) {
    if (ptr != nullptr) CK(cudaFree(ptr));
  }
  return r;
}

struct Row {
  std::string shape, format;
  int64_t context;
  int batch;
  double us, mbytes, gbs, frac_copy, frac_read, vs_fp16;
  bool ok;
  std::string note;
};

// The speedup column: "—" when no fp16 row of the same shape, context and batch ran (--formats
// without fp16, or a forced split count).
std::string Speedup(double vs_fp16, const char* prefix) {
  if (vs_fp16 <= 0.0) return "—";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%s%.2f", prefix, vs_fp16);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::vector<int64_t> contexts = {32768, 131072, 524288, 1048576};
  std::vector<int> batches = {1, 8, 32};
  std::vector<std::string> shapes = {"llama3-8b", "llama2-7b", "smollm2-135m"};
  std::vector<std::string> formats = {"fp16", "nuq4-1%", "nuq3-1%", "nuq2-1%"};
  int iters = 7;
  // Split counts to time for every decode row (0: the launcher's choice); more than one value
  // prints one row per count, e.g. --splits=0,64,128,256 to check ChooseDecodeSplits.
  std::vector<int> split_list = {0};
  double mem_gb = 48.0;
  int sink = 0;
  std::string json;
  int prefill_rows = 0;
  std::vector<kvq::kernels::PrefillKernel> prefill_kernels = {kvq::kernels::GetPrefillKernel()};
  std::vector<PrefillRow> prows;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&](const char* k) -> const char* {
      const size_t n = std::strlen(k);
      return a.compare(0, n, k) == 0 ? a.c_str() + n : nullptr;
    };
    if (a == "--quick") {
      quick = true;
    } else if (const char* v = val("--contexts=")) {
      contexts.clear();
      for (auto& s : Split(v)) contexts.push_back(std::atoll(s.c_str()));
    } else if (const char* v = val("--batches=")) {
      batches.clear();
      for (auto& s : Split(v)) batches.push_back(std::atoi(s.c_str()));
    } else if (const char* v = val("--shapes=")) {
      shapes = Split(v);
    } else if (const char* v = val("--formats=")) {
      formats = Split(v);
    } else if (const char* v = val("--iters=")) {
      iters = std::max(1, std::atoi(v));
    } else if (const char* v = val("--mem_gb=")) {
      mem_gb = std::atof(v);
    } else if (const char* v = val("--sink=")) {
      sink = std::max(0, std::min(64, std::atoi(v)));
    } else if (const char* v = val("--prefill_rows=")) {
      prefill_rows = std::max(0, std::atoi(v));
    } else if (const char* v = val("--prefill_kernels=")) {
      prefill_kernels.clear();
      for (const std::string& k : Split(v)) {
        const auto kernel = kvq::kernels::ParsePrefillKernel(k);
        if (!kernel) {
          std::fprintf(stderr, "--prefill_kernels: unknown kernel %s (auto, mma, wgmma, wgmma-serial)\n", k.c_str());
          return 2;
        }
        prefill_kernels.push_back(*kernel);
      }
    } else if (const char* v = val("--splits=")) {
      split_list.clear();
      for (auto& t : Split(v)) split_list.push_back(std::max(0, std::atoi(t.c_str())));
      if (split_list.empty()) split_list = {0};
    } else if (const char* v = val("--json=")) {
      json = v;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  if (quick) {
    bool custom_ctx = false;
    for (int i = 1; i < argc; ++i) custom_ctx |= std::strncmp(argv[i], "--contexts=", 11) == 0;
    if (!custom_ctx) contexts = {131072, 1048576};
    batches = {1, 8};
    shapes = {"llama3-8b", "smollm2-135m"};
    iters = std::min(iters, 5);
  }
  int dev = 0;
  cudaDeviceProp prop;
  CK(cudaGetDevice(&dev));
  CK(cudaGetDeviceProperties(&prop, dev));
  WarmUp(prop.multiProcessorCount, 500.0);
  const double copy_gbs = CopyBandwidthGBs(5);
  const double read_gbs = ReadBandwidthGBs(prop.multiProcessorCount, 5);
  std::printf("# device: %s, %d SMs, L2 %d MiB; D2D copy %.0f GB/s (read + write); streaming read %.0f GB/s\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_gbs, read_gbs);

  std::vector<Row> rows;
  std::map<std::string, double> fp16_us;  // key: shape/context/batch
  for (const std::string& sname : shapes) {
    const Shape* sh = nullptr;
    for (const Shape& s : kShapes) if (s.name == sname) sh = &s;
    if (sh == nullptr) { std::fprintf(stderr, "unknown shape %s\n", sname.c_str()); return 2; }
    for (int64_t ctx : contexts) {
      for (int batch : batches) {
        for (const std::string& fname : formats) {
          Row r{sh->name, fname, ctx, batch, 0, 0, 0, 0, 0, 0, false, ""};
          auto fmt = kvq::kvstore::KvFormat::Parse(fname);
          if (!fmt.ok()) { std::fprintf(stderr, "%s\n", std::string(fmt.status().message()).c_str()); return 2; }
          kvq::kvstore::KvFormat f = *fmt;
          f.sink_tokens = f.quantized() ? sink : 0;
          const kvq::kvstore::KvShape kshape{1, sh->n_kv_heads, sh->head_dim};
          const auto lay = kvq::kvstore::ComputeBlockLayout(f, kshape);
          const auto geo = kvq::kvstore::ToKernelGeometry(lay);
          const int key_entries = lay.has_key_outliers
              ? static_cast<int>(std::lround(f.outlier_fraction * 256 * sh->head_dim)) : 0;
          const int cap = key_entries;
          const int64_t stride =
              (lay.fixed_bytes + static_cast<int64_t>(sh->n_kv_heads) * cap * 4 + 15) / 16 * 16;
          const int64_t blocks_per_seq = (ctx + 255) / 256;
          const int64_t want_blocks = blocks_per_seq * batch;
          const int64_t max_pool_blocks = static_cast<int64_t>(mem_gb * (1ull << 30)) / stride;
          if (max_pool_blocks < blocks_per_seq && max_pool_blocks * stride < (1ll << 30)) {
            r.note = "pool too small";
            rows.push_back(r);
            continue;
          }
          const int64_t pool_blocks = std::min(want_blocks, max_pool_blocks);
          if (pool_blocks < want_blocks) r.note = "pool wraps";
          uint8_t* pool;
          CK(cudaMalloc(&pool, pool_blocks * stride));
          FillKernel<<<4096, 256>>>(reinterpret_cast<uint32_t*>(pool), pool_blocks * stride / 4,
                                    !f.quantized(), 17);
          if (f.quantized()) FixupKernel<<<static_cast<unsigned>(pool_blocks), 256>>>(pool, stride, geo, key_entries, cap);
          CK(cudaGetLastError());
          // Block j of sequence b. When the pool wraps, sequence b starts b * (pool / batch) blocks
          // in, so the blocks read at one moment (same j, every sequence) are distinct: with
          // `(b * blocks_per_seq + j) % pool` only pool / blocks_per_seq start offsets existed
          // (three for LLaMA-2-7B fp16 at 1M in 48 GiB), and sequences reading the same blocks at
          // the same time hit in L2 (that row measured 115% of the read bandwidth, 2026-12-02).
          const int64_t stagger = pool_blocks < want_blocks ? std::max<int64_t>(1, pool_blocks / batch) : blocks_per_seq;
          std::vector<int32_t> table(want_blocks);
          for (int64_t i = 0; i < want_blocks; ++i) {
            table[i] = static_cast<int32_t>(((i / blocks_per_seq) * stagger + i % blocks_per_seq) % pool_blocks);
          }
          std::vector<int32_t> lens(batch, static_cast<int32_t>(ctx));
          std::vector<int64_t> firsts(batch, 0);
          kvq::kernels::RopeParams rp;
          rp.head_dim = sh->head_dim;
          rp.theta = 500000.0;
          const auto inv = kvq::kernels::RopeInvFreq(rp);
          const int C = f.quantized() ? (1 << f.bits) : 0;
          std::vector<float> lut(std::max(C, 1));
          for (int j = 0; j < C; ++j) lut[j] = -1.0f + 2.0f * j / (C - 1);
          std::vector<float> kzp(static_cast<size_t>(sh->n_kv_heads) * sh->head_dim, 0.0f), kr(kzp.size(), 1.0f);
          int32_t *dtable, *dlens;
          int64_t* dfirst;
          double* dinv;
          float *dlut, *dkzp, *dkr, *dq, *dout, *dlse;
          void* ws;
          const int max_splits = 4096;
          const size_t ws_bytes = kvq::kernels::DecodeAttentionWorkspaceBytes(batch, sh->n_heads, sh->head_dim, max_splits);
          CK(cudaMalloc(&dtable, table.size() * 4));
          CK(cudaMalloc(&dlens, batch * 4));
          CK(cudaMalloc(&dfirst, batch * 8));
          CK(cudaMalloc(&dinv, inv.size() * 8));
          CK(cudaMalloc(&dlut, lut.size() * 4));
          CK(cudaMalloc(&dkzp, kzp.size() * 4));
          CK(cudaMalloc(&dkr, kr.size() * 4));
          const size_t qn = static_cast<size_t>(batch) * sh->n_heads * sh->head_dim;
          CK(cudaMalloc(&dq, qn * 4));
          CK(cudaMalloc(&dout, qn * 4));
          CK(cudaMalloc(&dlse, static_cast<size_t>(batch) * sh->n_heads * 4));
          CK(cudaMalloc(&ws, ws_bytes));
          CK(cudaMemcpy(dtable, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
          CK(cudaMemcpy(dlens, lens.data(), batch * 4, cudaMemcpyHostToDevice));
          CK(cudaMemcpy(dfirst, firsts.data(), batch * 8, cudaMemcpyHostToDevice));
          CK(cudaMemcpy(dinv, inv.data(), inv.size() * 8, cudaMemcpyHostToDevice));
          // The RoPE step tables once, as the engine's pool has them.
          void* dsteps = nullptr;
          CK(cudaMalloc(&dsteps, kvq::kernels::RopeStepTableBytes(sh->head_dim)));
          CKS(kvq::kernels::LaunchRopeStepTable(dinv, sh->head_dim, dsteps, nullptr));
          void* danchors = nullptr;
          CK(cudaMalloc(&danchors, kvq::kernels::RopeAnchorTableBytes(sh->head_dim, kvq::kernels::kRopeAnchorDefaultCount)));
          CKS(kvq::kernels::LaunchRopeAnchorTable(dinv, sh->head_dim, kvq::kernels::kRopeAnchorDefaultCount, danchors, nullptr));
          CK(cudaMemcpy(dlut, lut.data(), lut.size() * 4, cudaMemcpyHostToDevice));
          CK(cudaMemcpy(dkzp, kzp.data(), kzp.size() * 4, cudaMemcpyHostToDevice));
          CK(cudaMemcpy(dkr, kr.data(), kr.size() * 4, cudaMemcpyHostToDevice));
          CK(cudaMemset(dq, 0, qn * 4));
          // Sink buffers: one fp16 buffer (zeros) shared by every sequence.
          uint16_t* dsink = nullptr;
          const uint16_t** dsink_ptrs = nullptr;
          if (f.sink_tokens > 0) {
            const size_t halves = static_cast<size_t>(2) * f.sink_tokens * sh->n_kv_heads * sh->head_dim;
            CK(cudaMalloc(&dsink, halves * 2));
            CK(cudaMemset(dsink, 0, halves * 2));
            std::vector<const uint16_t*> ptrs(batch, dsink);
            CK(cudaMalloc(&dsink_ptrs, batch * sizeof(void*)));
            CK(cudaMemcpy(dsink_ptrs, ptrs.data(), batch * sizeof(void*), cudaMemcpyHostToDevice));
          }

          kvq::kernels::DecodeAttentionParams p;
          p.kv.geom = geo;
          p.kv.codec = f.quantized() ? static_cast<KvCodec>(f.bits) : KvCodec::kFp16;
          p.kv.pool = pool;
          p.kv.block_stride_bytes = stride;
          p.kv.block_table = dtable;
          p.kv.max_blocks_per_seq = static_cast<int>(blocks_per_seq);
          p.kv.seq_lens = dlens;
          p.kv.first_positions = dfirst;
          p.kv.key_lut = p.kv.value_lut = dlut;
          p.kv.key_zero_point = dkzp;
          p.kv.key_range = dkr;
          p.kv.rope_inv_freq = dinv;
          p.kv.rope_steps = dsteps;
          p.kv.rope_anchors = danchors;
          p.kv.rope_anchor_count = kvq::kernels::kRopeAnchorDefaultCount;
          p.kv.sink_tokens = f.sink_tokens;
          p.kv.sink = dsink_ptrs;
          p.layer = 0;
          p.batch = batch;
          p.n_heads = sh->n_heads;
          p.q = dq;
          p.o = dout;
          p.lse = dlse;
          p.max_seq_len = static_cast<int>(ctx);
          p.workspace = ws;
          p.workspace_bytes = ws_bytes;
          cudaEvent_t e0, e1;
          CK(cudaEventCreate(&e0));
          CK(cudaEventCreate(&e1));
          // Median over `iters` samples of kQueued calls queued back to back, per call: the GPU
          // time of the attention kernel and the merge, without the host's launch latency (the
          // engine replays decode steps as CUDA graphs). Timing single calls between events
          // added ~25 us at 128K tokens, batch 1 (H200, 2026-12-01).
          const Row r_auto = r;
          for (const int forced : split_list) {
            r = r_auto;
            p.num_splits = forced;
            if (forced > 0) {
              r.note = "splits=" + std::to_string(forced) + " " + r.note;
            } else if (split_list.size() > 1) {
              r.note = "auto splits=" + std::to_string(kvq::kernels::ChooseDecodeSplits(
                           batch, sh->n_kv_heads, static_cast<int>(ctx), p.kv.codec,
                           prop.multiProcessorCount, sh->head_dim)) + " " + r.note;
            }
            constexpr int kQueued = 4;
            std::vector<float> ms;
            absl::Status st = absl::OkStatus();
            for (int it = 0; it < iters + 1 && st.ok(); ++it) {
              // One untimed call first: the GPU is busy while the host enqueues the timed calls
              // (without it the host's launch latency of the first call fell inside the timing).
              st = kvq::kernels::LaunchDecodeAttention(p, nullptr);
              CK(cudaEventRecord(e0));
              for (int k = 0; k < kQueued && st.ok(); ++k) st = kvq::kernels::LaunchDecodeAttention(p, nullptr);
              CK(cudaEventRecord(e1));
              CK(cudaEventSynchronize(e1));
              float t;
              CK(cudaEventElapsedTime(&t, e0, e1));
              if (it >= 1) ms.push_back(t / kQueued);
            }
            CK(cudaDeviceSynchronize());
            if (!st.ok()) {
              r.note += std::string(st.message());
            } else {
              std::sort(ms.begin(), ms.end());
              r.us = ms[ms.size() / 2] * 1e3;
              // Bytes that must be read: K and V codes of every token and kv head, value scales,
              // value outliers and their head starts once per token, key-outlier directories and
              // entries, q and o.
              const double tok = static_cast<double>(ctx) * batch;
              double bytes = tok * sh->n_kv_heads * (lay.key_words_per_token + lay.value_words_per_token) * 4.0;
              if (f.quantized()) {
                bytes += tok * 4.0;
                bytes += tok * lay.value_outliers_per_token * (lay.value_outlier_index_bytes + 2.0);
                if (lay.value_outlier_head_start_offset >= 0) bytes += tok * sh->n_kv_heads;
                if (lay.has_key_outliers) {
                  bytes += static_cast<double>(want_blocks) * sh->n_kv_heads * (8.0 + key_entries * 4.0);
                }
              }
              bytes += 2.0 * qn * 4.0;
              r.mbytes = bytes / 1e6;
              r.gbs = bytes / (r.us * 1e-6) / 1e9;
              r.frac_copy = r.gbs / copy_gbs;
              r.frac_read = r.gbs / read_gbs;
              r.ok = true;
              const std::string key = sh->name + "/" + std::to_string(ctx) + "/" + std::to_string(batch);
              if (!f.quantized() && forced == 0) fp16_us[key] = r.us;
              r.vs_fp16 = fp16_us.count(key) ? fp16_us[key] / r.us : 0.0;
            }
            for (const kvq::kernels::PrefillKernel pk : prefill_kernels) {
              if (prefill_rows <= 0 || batch != 1 || !st.ok() || forced != 0) break;
              kvq::kernels::SetPrefillKernel(pk);
              PrefillRow pr = RunPrefill(p.kv, *sh, fname, ctx, prefill_rows, prop.multiProcessorCount, iters, cap);
              std::printf("%-13s ctx=%-8lld prefill rows=%d %-9s %-12s past %9.1f us (%.0f TFLOP/s; expand %.1f us, "
                          "kernel alone %.0f TFLOP/s, splits %d, segment %lld) chunk %.1f us (%.0f TFLOP/s)\n",
                          sh->name.c_str(), static_cast<long long>(ctx), prefill_rows, fname.c_str(), pr.kernel.c_str(),
                          pr.past_us, pr.past_tflops, pr.expand_us, pr.fa_tflops, pr.splits,
                          static_cast<long long>(pr.seg_tokens), pr.chunk_us, pr.chunk_tflops);
              std::fflush(stdout);
              prows.push_back(pr);
            }
            std::printf("%-13s ctx=%-8lld batch=%-3d %-9s %10.1f us %9.1f MB %7.0f GB/s %5.1f%% read  %s vs fp16 %s\n",
                        r.shape.c_str(), static_cast<long long>(ctx), batch, fname.c_str(), r.us,
                        r.mbytes, r.gbs, 100 * r.frac_read, Speedup(r.vs_fp16, "x").c_str(), r.note.c_str());
            std::fflush(stdout);
            rows.push_back(r);
          }
          cudaEventDestroy(e0);
          cudaEventDestroy(e1);
          for (void* ptr : {static_cast<void*>(pool), static_cast<void*>(dtable), static_cast<void*>(dlens),
                            static_cast<void*>(dfirst), static_cast<void*>(dinv), static_cast<void*>(dlut),
                            static_cast<void*>(dkzp), static_cast<void*>(dkr), static_cast<void*>(dq),
                            static_cast<void*>(dout), static_cast<void*>(dlse), ws,
                            static_cast<void*>(dsink), static_cast<void*>(dsink_ptrs), dsteps, danchors}) {
            if (ptr != nullptr) CK(cudaFree(ptr));
          }
        }
      }
    }
  }
  std::printf("\n## Decode attention, one layer (%s, streaming read %.0f GB/s, D2D copy %.0f GB/s)\n\n",
              prop.name, read_gbs, copy_gbs);
  std::printf("| shape | context | batch | format | time (us) | MB read | GB/s | of read BW | of copy BW | speedup vs fp16 | note |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %lld | %d | %s | %.1f | %.1f | %.0f | %.1f%% | %.1f%% | %s | %s |\n", r.shape.c_str(),
                static_cast<long long>(r.context), r.batch, r.format.c_str(), r.us, r.mbytes, r.gbs,
                100 * r.frac_read, 100 * r.frac_copy, Speedup(r.vs_fp16, "").c_str(), r.note.c_str());
  }
  if (!prows.empty()) {
    std::printf("\n## Prefill attention over a cached past, one layer (%s)\n\n", prop.name);
    std::printf("| shape | past | query rows | format | kernel | past: expand + attend + merge (us) | TFLOP/s | of which expand (us) | "
                "tensor-core kernel alone, TFLOP/s | causal chunk %dx%d (us) | chunk TFLOP/s | append of the %d "
                "tokens (us) | append / (past + chunk) |\n",
                prefill_rows, prefill_rows, prefill_rows);
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (const PrefillRow& r : prows) {
      std::printf("| %s | %lld | %d | %s | %s | %.1f | %.0f | %.1f | %.0f | %.1f | %.0f | %.1f | %.3f |\n", r.shape.c_str(),
                  static_cast<long long>(r.context), r.rows, r.format.c_str(), r.kernel.c_str(), r.past_us, r.past_tflops,
                  r.expand_us, r.fa_tflops, r.chunk_us, r.chunk_tflops, r.append_us,
                  r.append_us / (r.past_us + r.chunk_us));
    }
  }
  if (!json.empty()) {
    FILE* fj = std::fopen(json.c_str(), "w");
    if (fj != nullptr) {
      std::fprintf(fj, "{\"device\": \"%s\", \"copy_gbs\": %.1f, \"read_gbs\": %.1f, \"rows\": [\n", prop.name,
                   copy_gbs, read_gbs);
      for (size_t i = 0; i < rows.size(); ++i) {
        const Row& r = rows[i];
        std::fprintf(fj, "  {\"shape\": \"%s\", \"context\": %lld, \"batch\": %d, \"format\": \"%s\", "
                         "\"us\": %.2f, \"mbytes\": %.2f, \"gbs\": %.1f, \"frac_copy\": %.4f, "
                         "\"frac_read\": %.4f, \"vs_fp16\": %.3f, \"ok\": %s, \"note\": \"%s\"}%s\n",
                     r.shape.c_str(), static_cast<long long>(r.context), r.batch, r.format.c_str(), r.us,
                     r.mbytes, r.gbs, r.frac_copy, r.frac_read, r.vs_fp16, r.ok ? "true" : "false", r.note.c_str(), i + 1 < rows.size() ? "," : "");
      }
      std::fprintf(fj, "]}\n");
      std::fclose(fj);
    }
  }
  return 0;
}
