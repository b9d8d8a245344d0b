// ExpandKv and PrefillAttention (kernels/prefill_attention.h).
//
// ExpandKvKernel. CTA = 32 local tokens x a group of kv heads (grid.y groups), looping over its
// heads (the tokens' cos/sin are formed once per CTA: the angle reduced to [-pi, pi] in double,
// then sincosf, and serve its heads). Per head, in units of 8 channels (16-byte loads and stores):
// dense keys decoded into a shared fp32 tile, __syncthreads, the key outliers of the (at most two)
// blocks the tile touches replace their elements, __syncthreads, RoPE in rotate-half pairs and one
// fp16 rounding on the way out. Values are written dense first; their outliers (indexed over all
// heads of the layer; each CTA applies those of its own heads) overwrite them once its heads are
// out, after a __syncthreads (a CTA's global writes are visible to it after the barrier).
//
// PrefillAttentionKernel (FlashAttention-2 structure). CTA = 64 * kAtoms M rows (query row, head
// of the group) of one kv head and one key split, 4 warps of 16 * kAtoms rows. Q is scaled by
// softmax scale * log2 e and rounded to fp16: kept in mma A fragments (kAtoms 1) or in a shared
// tile read by ldmatrix per k-step (kAtoms 2, so each K/V fragment feeds two mma). K and V tiles of
// 64 keys are copied with cp.async into a double-buffered, XOR-swizzled shared tile (16-byte
// chunk c of row t at c ^ (t & 7): conflict-free ldmatrix), S = Q K^T by ldmatrix +
// mma.m16n8k16 (fp32), the masked online softmax runs on the accumulators in registers (O is
// rescaled only when a row maximum moved), P is rounded to fp16 and reused as the A operand of
// O += P V (V through ldmatrix.trans). Keys past a row's limit are -inf; a row with no visible key
// in the split writes o = 0, lse = -inf.
#include "kernels/prefill_attention.h"

#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda_check.h"
#include "kernels/decode_attention_mma.cuh"
#include "kernels/merge_attention.h"
#include "kernels/prefill_attention_sm90a.h"

namespace kvq::kernels {
namespace {

using decode_attention_mma::Ldsm4;
using decode_attention_mma::Ldsm4T;
using decode_attention_mma::Mma;
using decode_attention_mma::PackF2;
using decode_attention_mma::SmemAddr;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// ExpandKv

constexpr int kExpTokens = 32;
// CTAs a launch should have (grid.y = groups of kv heads): about 4 waves of 4 CTAs on 132 SMs. One
// CTA used to walk every head of its 32 tokens, so short segments had few CTAs, each a long chain
// of per-head barriers (ncu, H200, LLaMA-2-7B: 18 cycles per issued instruction); more groups form
// the tile's cos/sin more often, which costs where the tiles alone fill the GPU (measured: 4-head
// groups took a 4,096-token past from 145 to 80 us but a 131,072-token one from 2,208 to 2,302).
constexpr int kExpTargetCtas = 2048;
constexpr int kExpThreads = 256;
constexpr int kExpMaxHd = 128;

__device__ __forceinline__ float HalfToFloat(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}
__device__ __forceinline__ uint16_t FloatToHalf(float x) { return __half_as_ushort(__float2half_rn(x)); }
__device__ __forceinline__ uint32_t PackHalves(float lo, float hi) {
  return static_cast<uint32_t>(FloatToHalf(lo)) | (static_cast<uint32_t>(FloatToHalf(hi)) << 16);
}
__device__ __forceinline__ void Unpack8(const uint4 w, float (&x)[8]) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    x[2 * e] = HalfToFloat(static_cast<uint16_t>(ws[e] & 0xffffu));
    x[2 * e + 1] = HalfToFloat(static_cast<uint16_t>(ws[e] >> 16));
  }
}
__device__ __forceinline__ uint4 Pack8(const float (&x)[8]) {
  return make_uint4(PackHalves(x[0], x[1]), PackHalves(x[2], x[3]), PackHalves(x[4], x[5]), PackHalves(x[6], x[7]));
}

// The 8 codes [8 g, 8 g + 8) of a token's LSB-first stream of `bits`-bit codes, right-aligned.
__device__ __forceinline__ uint32_t Codes8At(const uint32_t* words, int g, int bits) {
  const int bit = 8 * g * bits;
  const int w = bit >> 5, sh = bit & 31;
  const uint32_t lo = __ldg(words + w);
  return sh + 8 * bits > 32 ? __funnelshift_r(lo, __ldg(words + w + 1), sh) : lo >> sh;
}

__global__ void __launch_bounds__(kExpThreads) ExpandKvKernel(const ExpandKvParams p) {
  __shared__ __align__(16) float ks[kExpTokens][kExpMaxHd];
  __shared__ float2 cs[kExpTokens][kExpMaxHd / 2];
  __shared__ float klut_s[16], vlut_s[16];
  const PagedKvCache& kv = p.kv;
  const KvBlockGeometry& geo = kv.geom;
  const int hd = geo.head_dim, half = hd / 2, n_kv = geo.n_kv_heads;
  const int groups = hd / 8, half_groups = half / 8;
  const int tid = threadIdx.x;
  const int64_t i0 = p.t0 + static_cast<int64_t>(blockIdx.x) * kExpTokens;  // first local token
  const int nt = static_cast<int>(min(static_cast<int64_t>(kExpTokens), p.t0 + p.n - i0));
  const int64_t first_pos = kv.first_positions[p.seq];
  const int nsc = static_cast<int>(min(max(static_cast<int64_t>(kv.sink_tokens) - first_pos, int64_t{0}),
                                       static_cast<int64_t>(kv.sink_tokens)));
  const int seq_len = kv.seq_lens[p.seq];
  const int n_sink = min(seq_len, nsc);
  const int64_t row = kv.TableRow(p.seq);
  const bool quant = kv.codec != KvCodec::kFp16;
  const int bits = static_cast<int>(kv.codec);
  const int C = quant ? (1 << bits) : 0;
  const uint32_t cmask = quant ? (1u << bits) - 1u : 0u;

  if (quant && tid < C) {
    klut_s[tid] = kv.key_lut[static_cast<int64_t>(p.layer) * C + tid];
    vlut_s[tid] = kv.value_lut[static_cast<int64_t>(p.layer) * C + tid];
  }
  // cos/sin of every (token, frequency) of the tile: the angle reduced to [-pi, pi] in double
  // (positions up to 1e7 and more), then sincosf.
  for (int u = tid; u < nt * half; u += kExpThreads) {
    const int t = u / half, f = u % half;
    const int64_t i = i0 + t;
    const bool rot = i < n_sink || !kv.keys_rotated;
    float2 c = make_float2(1.0f, 0.0f);
    if (rot) {
      constexpr double kTwoPi = 6.283185307179586476925286766559;
      const double a = static_cast<double>(first_pos + i) * kv.rope_inv_freq[f];
      const float r = static_cast<float>(a - rint(a * (1.0 / kTwoPi)) * kTwoPi);
      float sn, co;
      sincosf(r, &sn, &co);
      c = make_float2(co, sn);
    }
    cs[t][f] = c;
  }
  // Block tokens of the tile: [jb, je) (empty when the tile is all sinks).
  const int64_t jb = max(i0 - nsc, int64_t{0}), je = max(i0 + nt - nsc, int64_t{0});
  const uint16_t* sink_k = nullptr;
  const uint16_t* sink_v = nullptr;
  const int64_t sink_row = static_cast<int64_t>(n_kv) * hd;
  if (n_sink > 0 && i0 < n_sink) {
    sink_k = kv.sink[p.seq] + static_cast<int64_t>(p.layer) * nsc * sink_row;
    sink_v = kv.sink[p.seq] + static_cast<int64_t>(geo.n_layers) * nsc * sink_row +
             static_cast<int64_t>(p.layer) * nsc * sink_row;
  }
  auto layer_base = [&](int64_t j) -> const uint8_t* {
    const int64_t blk = kv.block_table[row + j / kKvBlockTokens];
    return kv.pool + blk * kv.block_stride_bytes + static_cast<int64_t>(p.layer) * geo.layer_bytes;
  };
  const int k_v = geo.value_outliers_per_token;
  auto vout = [&](int64_t i, int h) { return p.v + (i - p.t0) * p.token_stride + h * p.head_stride; };
  // Per token (every head): its block's layer base and value scaling.
  __shared__ const uint8_t* lb_s[kExpTokens];
  __shared__ float vr_s[kExpTokens], vz_s[kExpTokens];
  __shared__ __align__(16) float kr_s[kExpMaxHd], kz_s[kExpMaxHd];
  if (tid < nt && i0 + tid >= n_sink) {
    const int64_t j = i0 + tid - nsc;
    const uint8_t* lb = layer_base(j);
    lb_s[tid] = lb;
    if (quant) {
      const uint32_t vsc = *reinterpret_cast<const uint32_t*>(lb + geo.value_scales_offset + (j % kKvBlockTokens) * 4);
      vr_s[tid] = HalfToFloat(static_cast<uint16_t>(vsc >> 16));
      vz_s[tid] = HalfToFloat(static_cast<uint16_t>(vsc & 0xffffu));
    }
  }

  const int per_cta = (n_kv + static_cast<int>(gridDim.y) - 1) / static_cast<int>(gridDim.y);
  const int h0 = static_cast<int>(blockIdx.y) * per_cta, h1 = min(h0 + per_cta, n_kv);
  for (int h = h0; h < h1; ++h) {
    const int64_t zr_at = (static_cast<int64_t>(p.layer) * n_kv + h) * hd;
    __syncthreads();  // LUTs, cos/sin and token data in; ks and kr_s of the previous head read
    if (quant) {
      for (int c = tid; c < hd; c += kExpThreads) {
        kr_s[c] = __ldg(kv.key_range + zr_at + c);
        kz_s[c] = __ldg(kv.key_zero_point + zr_at + c);
      }
      __syncthreads();
    }
    // ---- Dense keys (pre-RoPE, fp32) to shared, dense values straight out: 8 channels a unit.
    for (int u = tid; u < nt * groups; u += kExpThreads) {
      const int t = u / groups, g = u % groups, c0 = 8 * g;
      const int64_t i = i0 + t;
      float kx[8], vx[8];
      if (i < n_sink) {
        Unpack8(*reinterpret_cast<const uint4*>(sink_k + i * sink_row + h * hd + c0), kx);
        *reinterpret_cast<uint4*>(vout(i, h) + c0) = *reinterpret_cast<const uint4*>(sink_v + i * sink_row + h * hd + c0);
      } else {
        const int64_t j = i - nsc;
        const int slot = static_cast<int>(j % kKvBlockTokens);
        const uint8_t* lb = lb_s[t];
        const int64_t tok = static_cast<int64_t>(h) * kKvBlockTokens + slot;
        if (!quant) {
          Unpack8(__ldg(reinterpret_cast<const uint4*>(lb + geo.key_codes_offset) + tok * groups + g), kx);
          *reinterpret_cast<uint4*>(vout(i, h) + c0) =
              __ldg(reinterpret_cast<const uint4*>(lb + geo.value_codes_offset) + tok * groups + g);
        } else {
          const uint32_t kc = Codes8At(reinterpret_cast<const uint32_t*>(lb + geo.key_codes_offset) +
                                           tok * geo.key_words_per_token, g, bits);
          const uint32_t vc = Codes8At(reinterpret_cast<const uint32_t*>(lb + geo.value_codes_offset) +
                                           tok * geo.value_words_per_token, g, bits);
          const float vr = vr_s[t], vz = vz_s[t];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            kx[e] = fmaf(klut_s[(kc >> (e * bits)) & cmask], kr_s[c0 + e], kz_s[c0 + e]);
            vx[e] = fmaf(vlut_s[(vc >> (e * bits)) & cmask], vr, vz);
          }
          *reinterpret_cast<uint4*>(vout(i, h) + c0) = Pack8(vx);
        }
      }
      *reinterpret_cast<float4*>(&ks[t][c0]) = make_float4(kx[0], kx[1], kx[2], kx[3]);
      *reinterpret_cast<float4*>(&ks[t][c0 + 4]) = make_float4(kx[4], kx[5], kx[6], kx[7]);
    }
    __syncthreads();
    // ---- Outliers replace their elements. ----
    if (quant && geo.has_key_outliers && je > jb) {
      for (int64_t blk_start = jb / kKvBlockTokens * kKvBlockTokens; blk_start < je; blk_start += kKvBlockTokens) {
        const uint8_t* lb = layer_base(blk_start);
        const uint32_t* dir = reinterpret_cast<const uint32_t*>(lb + geo.key_outlier_dir_offset) + 2 * h;
        const uint32_t first = dir[0], count = dir[1];
        const uint32_t* ents = reinterpret_cast<const uint32_t*>(lb - static_cast<int64_t>(p.layer) * geo.layer_bytes +
                                                                 geo.fixed_bytes) + first;
        for (uint32_t e = tid; e < count; e += kExpThreads) {
          const uint32_t ent = __ldg(ents + e);
          const int64_t j = blk_start + static_cast<int64_t>(ent & 0xffu);
          if (j < jb || j >= je) continue;
          ks[j + nsc - i0][(ent >> 8) & 0xffu] = HalfToFloat(static_cast<uint16_t>(ent >> 16));
        }
      }
    }
    __syncthreads();
    // ---- RoPE (rotate-half pairs) and the fp16 keys: 8 frequencies a unit. ----
    for (int u = tid; u < nt * half_groups; u += kExpThreads) {
      const int t = u / half_groups, f0 = 8 * (u % half_groups);
      float lo[8], hi[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float2 c = cs[t][f0 + e];
        const float a = ks[t][f0 + e], b = ks[t][f0 + e + half];
        lo[e] = a * c.x - b * c.y;
        hi[e] = b * c.x + a * c.y;
      }
      uint16_t* out = p.k + (i0 + t - p.t0) * p.token_stride + h * p.head_stride;
      *reinterpret_cast<uint4*>(out + f0) = Pack8(lo);
      *reinterpret_cast<uint4*>(out + f0 + half) = Pack8(hi);
    }
  }
  // ---- Value outliers (indexed over every head of the layer): once, after this CTA's heads' dense
  // values are out, instead of a scan of all of them per head.
  if (quant && k_v > 0 && je > jb) {
    __syncthreads();
    const int ib = geo.value_outlier_index_bytes;
    for (int u = tid; u < (je - jb) * k_v; u += kExpThreads) {
      const int64_t j = jb + u / k_v;
      const int o = u % k_v;
      const int slot = static_cast<int>(j % kKvBlockTokens);
      const uint8_t* lb = lb_s[j + nsc - i0];
      const uint8_t* idx = lb + geo.value_outlier_index_offset + static_cast<int64_t>(slot) * k_v * ib;
      const int e = ib == 1 ? idx[o] : reinterpret_cast<const uint16_t*>(idx)[o];
      if (e < h0 * hd || e >= h1 * hd) continue;  // this CTA's heads only (the others write theirs)
      const uint16_t x = reinterpret_cast<const uint16_t*>(lb + geo.value_outlier_value_offset)[static_cast<int64_t>(slot) * k_v + o];
      vout(j + nsc, e / hd)[e % hd] = x;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// PrefillAttention

constexpr int kBM = 64;       // the fewest M rows a CTA takes (launch-size check)
constexpr int kBN = 64;       // keys per tile
constexpr int kPaWarps = 4;

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
// 2^x by the SFU (ex2.approx, flush-to-zero: arguments here are <= 0 and -inf gives 0; relative
// error ~2^-22, far below the fp16 rounding of P).
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
template <int kN>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kN));
}

// kAtoms: m16 row blocks per warp. 1: 64 rows per CTA, Q fragments held in registers. 2: 128 rows
// per CTA, Q staged in shared memory and re-read per k-step, so every K and V fragment read from
// shared memory feeds two mma (the FlashAttention-2 shape for head dim 128).
template <int kHd, int kAtoms>
struct PaCfg {
  static constexpr int kBM = 64 * kAtoms;
  static constexpr int kTileHalves = kBN * kHd;
  static constexpr size_t kQBytes = kAtoms > 1 ? static_cast<size_t>(kBM) * kHd * 2 : 0;
  static constexpr size_t kSmemBytes = kQBytes + static_cast<size_t>(2) * 2 * kTileHalves * 2;
};

template <int kHd, int kAtoms, int kMinBlocks>
__global__ void __launch_bounds__(kPaWarps * 32, kMinBlocks)
    PrefillAttentionKernel(const PrefillAttentionParams p, const int keys_per_split) {
  using Cfg = PaCfg<kHd, kAtoms>;
  constexpr int kBMc = Cfg::kBM;
  constexpr int kRowChunks = kHd / 8;   // 16-byte chunks per row
  constexpr int kKSteps = kHd / 16;     // mma k-steps over channels (S)
  constexpr int kNT = kBN / 8;          // key n-tiles (S)
  constexpr int kDT = kHd / 8;          // channel n-tiles (O)
  constexpr int kTileHalves = Cfg::kTileHalves;
  constexpr bool kQSmem = kAtoms > 1;
  extern __shared__ __align__(16) uint16_t pa_smem[];  // [Q: kBM][kHd] (kAtoms > 1), [2][K, V][kBN][kHd]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q4 = lane & 3;
  const int group = p.n_heads / p.n_kv_heads;
  const int hk = blockIdx.y, split = blockIdx.z;
  const int64_t M = static_cast<int64_t>(p.rows) * group;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBMc;

  auto limit_of = [&](int64_t m) -> int {
    if (m >= M) return 0;
    const int64_t r = m / group;
    const int64_t l = p.limit_base + (p.causal ? r : 0);
    return static_cast<int>(min(max(l, int64_t{0}), static_cast<int64_t>(p.n_keys)));
  };
  // Rows of this lane: atom a, half h (row g or g + 8 of the atom).
  int64_t mrow[kAtoms][2];
  int lim[kAtoms][2];
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mrow[a][h] = m0 + warp * 16 * kAtoms + a * 16 + h * 8 + g;
      lim[a][h] = limit_of(mrow[a][h]);
    }
  }
  const int kb = split * keys_per_split;
  const int ke = min(kb + keys_per_split, p.n_keys);
  const int cta_max = p.causal ? limit_of(min(m0 + kBMc, M) - 1) : limit_of(m0);
  const int cta_min = limit_of(m0);  // limits grow with the row
  const int kend = min(ke, cta_max);
  const int n_tiles = kend > kb ? (kend - kb + kBN - 1) / kBN : 0;

  // ---- Q (fp16, pre-scaled into the log2 domain): A fragments in registers, or a shared tile.
  const float qs = (p.scale > 0.0f ? p.scale : rsqrtf(static_cast<float>(kHd))) * kLog2e;
  auto q_row = [&](int64_t m) -> const float* {
    return m < M ? p.q + ((m / group) * p.n_heads + hk * group + m % group) * kHd : nullptr;
  };
  const uint32_t sbase = SmemAddr(pa_smem);
  const uint32_t kvbase = sbase + static_cast<uint32_t>(Cfg::kQBytes);
  uint32_t qf[kQSmem ? 1 : kKSteps][4];
  if constexpr (kQSmem) {
    for (int u = tid; u < kBMc * kRowChunks; u += kPaWarps * 32) {
      const int r = u / kRowChunks, ch = u % kRowChunks;
      const float* src = q_row(m0 + r);
      uint4 w = make_uint4(0, 0, 0, 0);
      if (src != nullptr) {
        const float4 x0 = *reinterpret_cast<const float4*>(src + ch * 8);
        const float4 x1 = *reinterpret_cast<const float4*>(src + ch * 8 + 4);
        w = make_uint4(PackF2(x0.x * qs, x0.y * qs), PackF2(x0.z * qs, x0.w * qs), PackF2(x1.x * qs, x1.y * qs),
                       PackF2(x1.z * qs, x1.w * qs));
      }
      *reinterpret_cast<uint4*>(reinterpret_cast<uint8_t*>(pa_smem) + r * kHd * 2 + ((ch ^ (r & 7)) << 4)) = w;
    }
    // (made visible by the first tile's __syncthreads)
  } else {
    const float* qa = q_row(mrow[0][0]);
    const float* qb = q_row(mrow[0][1]);
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      const int c0 = 16 * kk + 2 * q4, c1 = c0 + 8;
      const float2 a0 = qa ? *reinterpret_cast<const float2*>(qa + c0) : make_float2(0.f, 0.f);
      const float2 b0 = qb ? *reinterpret_cast<const float2*>(qb + c0) : make_float2(0.f, 0.f);
      const float2 a1 = qa ? *reinterpret_cast<const float2*>(qa + c1) : make_float2(0.f, 0.f);
      const float2 b1 = qb ? *reinterpret_cast<const float2*>(qb + c1) : make_float2(0.f, 0.f);
      qf[kk][0] = PackF2(a0.x * qs, a0.y * qs);
      qf[kk][1] = PackF2(b0.x * qs, b0.y * qs);
      qf[kk][2] = PackF2(a1.x * qs, a1.y * qs);
      qf[kk][3] = PackF2(b1.x * qs, b1.y * qs);
    }
  }

  const uint16_t* kg = p.k + hk * p.kv_head_stride;
  const uint16_t* vg = p.v + hk * p.kv_head_stride;
  auto load_tile = [&](int T, int buf) {
    const int key0 = kb + T * kBN;
    const uint32_t kdst = kvbase + static_cast<uint32_t>(buf * 2 * kTileHalves) * 2;
    const uint32_t vdst = kdst + kTileHalves * 2;
    for (int idx = tid; idx < kBN * kRowChunks; idx += kPaWarps * 32) {
      const int t = idx / kRowChunks, ch = idx % kRowChunks;
      const int key = key0 + t;
      const bool ok = key < kend;
      const int64_t off = static_cast<int64_t>(ok ? key : 0) * p.kv_token_stride + ch * 8;
      const uint32_t so = static_cast<uint32_t>(t * kHd * 2 + ((ch ^ (t & 7)) << 4));
      CpAsync16(kdst + so, kg + off, ok);
      CpAsync16(vdst + so, vg + off, ok);
    }
    CpAsyncCommit();
  };

  float acc[kAtoms][kDT][4];
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
    for (int d = 0; d < kDT; ++d) acc[a][d][0] = acc[a][d][1] = acc[a][d][2] = acc[a][d][3] = 0.0f;
  }
  float rm[kAtoms][2], rl[kAtoms][2];
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) rm[a][0] = rm[a][1] = -CUDART_INF_F, rl[a][0] = rl[a][1] = 0.0f;

  if (n_tiles > 0) load_tile(0, 0);
  const int mi = lane >> 3, rr = lane & 7;
  for (int T = 0; T < n_tiles; ++T) {
    const int buf = T & 1;
    if (T + 1 < n_tiles) {
      load_tile(T + 1, buf ^ 1);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const uint32_t kbuf = kvbase + static_cast<uint32_t>(buf * 2 * kTileHalves) * 2;
    const uint32_t vbuf = kbuf + kTileHalves * 2;

    // ---- S = Q K^T ----
    float s[kAtoms][kNT][4];
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
      for (int n = 0; n < kNT; ++n) s[a][n][0] = s[a][n][1] = s[a][n][2] = s[a][n][3] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t qa[kAtoms][4];
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) {
        if constexpr (kQSmem) {
          const int r = warp * 16 * kAtoms + a * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int ch = 2 * kk + (lane >> 4);
          Ldsm4(sbase + static_cast<uint32_t>(r * kHd * 2 + ((ch ^ (r & 7)) << 4)), qa[a]);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[a][e] = qf[kQSmem ? 0 : kk][e];
        }
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        const int t = (2 * np + (mi >> 1)) * 8 + rr;
        const int ch = 2 * kk + (mi & 1);
        uint32_t b[4];
        Ldsm4(kbuf + static_cast<uint32_t>(t * kHd * 2 + ((ch ^ (t & 7)) << 4)), b);
#pragma unroll
        for (int a = 0; a < kAtoms; ++a) {
          Mma(s[a][2 * np], qa[a], b[0], b[1]);
          Mma(s[a][2 * np + 1], qa[a], b[2], b[3]);
        }
      }
    }
    // ---- Mask keys at or past each row's limit. ----
    const int key0 = kb + T * kBN;
    if (key0 + kBN > cta_min) {
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
          const int key = key0 + n * 8 + 2 * q4;
          if (key >= lim[a][0]) s[a][n][0] = -CUDART_INF_F;
          if (key + 1 >= lim[a][0]) s[a][n][1] = -CUDART_INF_F;
          if (key >= lim[a][1]) s[a][n][2] = -CUDART_INF_F;
          if (key + 1 >= lim[a][1]) s[a][n][3] = -CUDART_INF_F;
        }
      }
    }
    // ---- Online softmax (log2 domain). ----
    bool moved = false;
    float corr[kAtoms][2];
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = rm[a][h];
#pragma unroll
        for (int n = 0; n < kNT; ++n) mx = fmaxf(mx, fmaxf(s[a][n][2 * h], s[a][n][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float u = mx == -CUDART_INF_F ? 0.0f : mx;
        corr[a][h] = Exp2(rm[a][h] - u);
        moved |= corr[a][h] != 1.0f;
        rm[a][h] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
          s[a][n][2 * h] = Exp2(s[a][n][2 * h] - u);
          s[a][n][2 * h + 1] = Exp2(s[a][n][2 * h + 1] - u);
          sum += s[a][n][2 * h] + s[a][n][2 * h + 1];
        }
        rl[a][h] = fmaf(rl[a][h], corr[a][h], sum);
      }
    }
    // Rescale only when some row's maximum moved (rare once the first tiles are in): 64 FMULs per
    // atom, lane and tile otherwise, the largest non-tensor cost of the loop (ncu).
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
        for (int d = 0; d < kDT; ++d) {
          acc[a][d][0] *= corr[a][0];
          acc[a][d][1] *= corr[a][0];
          acc[a][d][2] *= corr[a][1];
          acc[a][d][3] *= corr[a][1];
        }
      }
    }
    // ---- O += P V ----
#pragma unroll
    for (int j = 0; j < kBN / 16; ++j) {
      uint32_t pa[kAtoms][4];
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) {
        pa[a][0] = PackF2(s[a][2 * j][0], s[a][2 * j][1]);
        pa[a][1] = PackF2(s[a][2 * j][2], s[a][2 * j][3]);
        pa[a][2] = PackF2(s[a][2 * j + 1][0], s[a][2 * j + 1][1]);
        pa[a][3] = PackF2(s[a][2 * j + 1][2], s[a][2 * j + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        const int t = 16 * j + (mi & 1) * 8 + rr;
        const int ch = 2 * dp + (mi >> 1);
        uint32_t b[4];
        Ldsm4T(vbuf + static_cast<uint32_t>(t * kHd * 2 + ((ch ^ (t & 7)) << 4)), b);
#pragma unroll
        for (int a = 0; a < kAtoms; ++a) {
          Mma(acc[a][2 * dp], pa[a], b[0], b[1]);
          Mma(acc[a][2 * dp + 1], pa[a], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }

  // ---- Epilogue: row sums over the 4 lanes of a row, normalized o and lse. ----
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = rl[a][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int64_t m = mrow[a][h];
      if (m >= M) continue;
      const int64_t out_row = (m / group) * p.n_heads + hk * group + m % group;
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      float* orow = p.o + split * p.o_split_stride + out_row * kHd;
#pragma unroll
      for (int d = 0; d < kDT; ++d) {
        *reinterpret_cast<float2*>(orow + 8 * d + 2 * q4) =
            make_float2(acc[a][d][2 * h] * inv, acc[a][d][2 * h + 1] * inv);
      }
      if (q4 == 0) {
        p.lse[split * p.lse_split_stride + out_row] = l > 0.0f ? (rm[a][h] + log2f(l)) * kLn2 : -CUDART_INF_F;
      }
    }
  }
}

template <int kHd, int kAtoms, int kMinBlocks>
absl::Status LaunchPa(const PrefillAttentionParams& p, int64_t keys_per_split64, cudaStream_t stream) {
  using Cfg = PaCfg<kHd, kAtoms>;
  const int keys_per_split = static_cast<int>(std::min<int64_t>(keys_per_split64, 2147483647 - kBN));
  // Per device: set before every launch (a host-side attribute write, cheap next to the launch).
  KVQ_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(PrefillAttentionKernel<kHd, kAtoms, kMinBlocks>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(Cfg::kSmemBytes)));
  const int64_t M = static_cast<int64_t>(p.rows) * (p.n_heads / p.n_kv_heads);
  const dim3 grid(static_cast<unsigned>((M + Cfg::kBM - 1) / Cfg::kBM), static_cast<unsigned>(p.n_kv_heads),
                  static_cast<unsigned>(p.splits));
  PrefillAttentionKernel<kHd, kAtoms, kMinBlocks><<<grid, kPaWarps * 32, Cfg::kSmemBytes, stream>>>(p, keys_per_split);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

__global__ void ToHalfRowsKernel(int rows, int cols, const float* __restrict__ in, int64_t in_stride,
                                 uint16_t* __restrict__ out, int64_t out_stride) {
  const int64_t total = static_cast<int64_t>(rows) * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols;
    const int c = static_cast<int>(i % cols);
    out[r * out_stride + c] = FloatToHalf(in[r * in_stride + c]);
  }
}

bool Aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

PrefillKernel KernelFromEnv() {
  const char* e = std::getenv("KVQ_PREFILL_KERNEL");
  return e == nullptr ? PrefillKernel::kAuto : ParsePrefillKernel(e).value_or(PrefillKernel::kAuto);
}
std::atomic<PrefillKernel>& KernelChoice() {
  static std::atomic<PrefillKernel> choice{KernelFromEnv()};
  return choice;
}

// Whether the current device runs the wgmma kernel (cached per device).
bool WgmmaOnCurrentDevice() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  int c = cache[dev].load(std::memory_order_relaxed);
  if (c == 0) {
    c = internal::PrefillWgmmaAvailable(dev) ? 1 : 2;
    cache[dev].store(c, std::memory_order_relaxed);
  }
  return c == 1;
}

}  // namespace

void SetPrefillKernel(PrefillKernel kernel) { KernelChoice().store(kernel); }
PrefillKernel GetPrefillKernel() { return KernelChoice().load(); }
const char* PrefillKernelName(PrefillKernel kernel) {
  switch (kernel) {
    case PrefillKernel::kAuto: return "auto";
    case PrefillKernel::kMmaSync: return "mma";
    case PrefillKernel::kWgmma: return "wgmma";
    case PrefillKernel::kWgmmaSerial: return "wgmma-serial";
  }
  return "?";
}
std::optional<PrefillKernel> ParsePrefillKernel(std::string_view name) {
  for (auto k : {PrefillKernel::kAuto, PrefillKernel::kMmaSync, PrefillKernel::kWgmma, PrefillKernel::kWgmmaSerial}) {
    if (name == PrefillKernelName(k)) return k;
  }
  return std::nullopt;
}

absl::Status LaunchExpandKv(const ExpandKvParams& p, cudaStream_t stream) {
  const KvBlockGeometry& geo = p.kv.geom;
  if (geo.head_dim < 16 || geo.head_dim > kExpMaxHd || geo.head_dim % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchExpandKv: head_dim ", geo.head_dim,
                                                   " (need a multiple of 16, <= ", kExpMaxHd, ")"));
  }
  if (p.n < 0 || p.t0 < 0 || p.seq < 0 || p.layer < 0 || p.layer >= geo.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchExpandKv: t0 ", p.t0, ", n ", p.n, ", seq ", p.seq,
                                                   ", layer ", p.layer, " (need t0, n, seq >= 0 and layer < ",
                                                   geo.n_layers, ")"));
  }
  if (p.kv.codec != KvCodec::kFp16 && (p.kv.key_lut == nullptr || p.kv.value_lut == nullptr ||
                                       p.kv.key_range == nullptr || p.kv.key_zero_point == nullptr)) {
    return absl::InvalidArgumentError("LaunchExpandKv: a LUT codec needs key_lut, value_lut, key_range and key_zero_point");
  }
  if (p.kv.codec != KvCodec::kFp16 && (!Aligned16(p.kv.key_range) || !Aligned16(p.kv.key_zero_point))) {
    return absl::InvalidArgumentError("LaunchExpandKv: key_range and key_zero_point must be 16-byte aligned");
  }
  if (p.kv.codec != KvCodec::kFp16 && geo.key_scales_offset >= 0) {
    return absl::InvalidArgumentError("LaunchExpandKv: int per-token key formats are not supported");
  }
  if (p.n == 0) return absl::OkStatus();
  if (p.kv.sink_tokens > 0 && p.kv.sink == nullptr) {
    return absl::InvalidArgumentError("LaunchExpandKv: the format has sink tokens but the view has no sink buffers");
  }
  if (p.k == nullptr || p.v == nullptr || p.kv.pool == nullptr || p.kv.block_table == nullptr ||
      p.kv.seq_lens == nullptr || p.kv.first_positions == nullptr || p.kv.rope_inv_freq == nullptr) {
    return absl::InvalidArgumentError("LaunchExpandKv: null pointer");
  }
  if (p.token_stride % 8 != 0 || p.head_stride % 8 != 0 || !Aligned16(p.k) || !Aligned16(p.v)) {
    return absl::InvalidArgumentError("LaunchExpandKv: output rows must be 16-byte aligned (strides multiples of 8 halves)");
  }
  const int64_t tiles = (static_cast<int64_t>(p.n) + kExpTokens - 1) / kExpTokens;
  if (tiles > 2147483647) return absl::InvalidArgumentError("LaunchExpandKv: too many tokens");
  const int64_t want = (kExpTargetCtas + tiles - 1) / tiles;
  const int groups = static_cast<int>(std::clamp<int64_t>(want, 1, geo.n_kv_heads));
  const int per_cta = (geo.n_kv_heads + groups - 1) / groups;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>((geo.n_kv_heads + per_cta - 1) / per_cta));
  ExpandKvKernel<<<grid, kExpThreads, 0, stream>>>(p);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

int PrefillRowsPerCta(int head_dim) {
  if (GetPrefillKernel() != PrefillKernel::kMmaSync && WgmmaOnCurrentDevice()) return internal::kPrefillWgmmaRows;
  return head_dim == 128 ? PaCfg<128, 2>::kBM : PaCfg<64, 1>::kBM;
}
bool PrefillWgmmaOnCurrentDevice() { return WgmmaOnCurrentDevice(); }

int ChoosePrefillSplits(int rows, int n_heads, int n_kv_heads, int n_keys, int sm_count, int max_splits,
                        int rows_per_cta) {
  if (rows <= 0 || n_kv_heads <= 0 || n_heads < n_kv_heads || n_keys <= 0) return 1;
  const int64_t m = static_cast<int64_t>(rows) * (n_heads / n_kv_heads);
  const int64_t bm = std::max(rows_per_cta, 1);
  const int64_t ctas = (m + bm - 1) / bm * n_kv_heads;
  const int64_t want = 2 * static_cast<int64_t>(std::max(sm_count, 1));  // two waves' worth
  if (ctas >= want) return 1;
  int64_t s = (want + ctas - 1) / ctas;
  s = std::min<int64_t>(s, (n_keys + 4 * kBN - 1) / (4 * kBN));  // >= 4 key tiles per split
  s = std::min<int64_t>(s, std::max(max_splits, 1));
  return static_cast<int>(std::max<int64_t>(s, 1));
}

absl::Status LaunchPrefillAttention(const PrefillAttentionParams& p, cudaStream_t stream) {
  if (p.head_dim != 64 && p.head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchPrefillAttention: head_dim ", p.head_dim,
                                                   " (supported: 64, 128)"));
  }
  if (p.n_kv_heads <= 0 || p.n_heads <= 0 || p.n_heads % p.n_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchPrefillAttention: n_heads ", p.n_heads,
                                                   " must be a positive multiple of n_kv_heads ", p.n_kv_heads));
  }
  if (p.rows < 0 || p.n_keys < 0 || p.splits < 1 || p.splits > 65535 || p.n_kv_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchPrefillAttention: rows ", p.rows, ", n_keys ", p.n_keys,
                                                   ", splits ", p.splits, " (need rows, n_keys >= 0, 1 <= splits <= 65535)"));
  }
  if (p.rows == 0) return absl::OkStatus();
  if (p.q == nullptr || p.o == nullptr || p.lse == nullptr || (p.n_keys > 0 && (p.k == nullptr || p.v == nullptr))) {
    return absl::InvalidArgumentError("LaunchPrefillAttention: null pointer");
  }
  if (p.kv_token_stride % 8 != 0 || p.kv_head_stride % 8 != 0 || !Aligned16(p.k) || !Aligned16(p.v)) {
    return absl::InvalidArgumentError("LaunchPrefillAttention: K/V rows must be 16-byte aligned (strides multiples of 8 halves)");
  }
  const int64_t m = static_cast<int64_t>(p.rows) * (p.n_heads / p.n_kv_heads);
  if ((m + kBM - 1) / kBM > 2147483647) return absl::InvalidArgumentError("LaunchPrefillAttention: too many rows");
  int64_t kps = (static_cast<int64_t>(p.n_keys) + p.splits - 1) / p.splits;
  kps = std::max<int64_t>(kBN, (kps + kBN - 1) / kBN * kBN);
  const PrefillKernel choice = GetPrefillKernel();
  if (choice != PrefillKernel::kMmaSync) {
    const bool wgmma = WgmmaOnCurrentDevice();
    if (!wgmma && choice != PrefillKernel::kAuto) {
      return absl::FailedPreconditionError(absl::StrCat("LaunchPrefillAttention: the ", PrefillKernelName(choice),
                                                        " kernel needs a compute capability 9.0 device (Hopper)"));
    }
    if (wgmma) {
      // H200, 2026-12-01 (benchmarks/RESULTS.md, "Prefill attention on warpgroup MMA"): 621 against
      // 322 TFLOP/s for mma.sync, Llama-3-8B shape, 4096 rows over 32K keys.
      constexpr int64_t kw = internal::kPrefillWgmmaKeys;
      const int64_t kps_w = (kps + kw - 1) / kw * kw;
      return internal::LaunchPrefillAttentionWgmma(
          p, kps_w, choice == PrefillKernel::kWgmmaSerial ? internal::WgmmaSchedule::kSerial : internal::WgmmaSchedule::kPingPong,
          stream);
    }
  }
  // H200, 2026-12-01: hd 128 with two m16 blocks per warp (255 registers, 2 CTAs/SM) runs 14%
  // faster than one (322 vs 282 TFLOP/s, Llama-3-8B shape, 4096 rows over 32K-131K keys); hd 64
  // with one block per warp at 3 CTAs/SM.
  if (p.head_dim == 64) return LaunchPa<64, 1, 3>(p, kps, stream);
  return LaunchPa<128, 2, 2>(p, kps, stream);
}

PrefillPastPlan PlanPrefillPast(int rows, int n_heads, int n_kv_heads, int head_dim, int64_t n_keys,
                                int sm_count, size_t expand_budget_bytes, size_t partial_budget_bytes) {
  PrefillPastPlan plan;
  const int64_t per_token = static_cast<int64_t>(std::max(n_kv_heads, 1)) * std::max(head_dim, 1) * 2;
  int64_t seg = static_cast<int64_t>(expand_budget_bytes) / per_token / kKvBlockTokens * kKvBlockTokens;
  seg = std::max<int64_t>(seg, kKvBlockTokens);
  plan.seg_tokens = std::max<int64_t>(1, std::min(seg, n_keys));
  plan.expand_bytes = static_cast<size_t>(plan.seg_tokens * per_token);
  const size_t part = static_cast<size_t>(std::max(rows, 1)) * std::max(n_heads, 1) * std::max(head_dim, 1) * 4;
  // (splits + 1) slots fit the budget; at least one split whatever the budget.
  const size_t slots = partial_budget_bytes / part;
  const int max_splits = static_cast<int>(std::clamp<size_t>(slots > 1 ? slots - 1 : 1, 1, 65535));
  plan.splits = ChoosePrefillSplits(rows, n_heads, n_kv_heads, static_cast<int>(plan.seg_tokens), sm_count, max_splits,
                                    PrefillRowsPerCta(head_dim));
  if (plan.splits > 1 || n_keys > plan.seg_tokens) plan.partial_bytes = static_cast<size_t>(plan.splits + 1) * part;
  return plan;
}

absl::Status LaunchPrefillPast(const PrefillPastParams& p, cudaStream_t stream) {
  const KvBlockGeometry& geo = p.kv.geom;
  const int hd = geo.head_dim, nkv = geo.n_kv_heads;
  if (p.n_keys <= 0 || p.rows <= 0) return absl::OkStatus();
  if (p.plan.seg_tokens <= 0 || p.plan.splits < 1 || p.xk == nullptr || p.xv == nullptr) {
    return absl::InvalidArgumentError("LaunchPrefillPast: no plan or expand buffers (PlanPrefillPast)");
  }
  const int64_t seg = p.plan.seg_tokens;
  const int64_t n_seg = (p.n_keys + seg - 1) / seg;
  const bool direct = n_seg == 1 && p.plan.splits == 1;
  if (!direct && (p.part_o == nullptr || p.part_lse == nullptr)) {
    return absl::InvalidArgumentError("LaunchPrefillPast: this plan needs partial buffers");
  }
  const int64_t part_o = static_cast<int64_t>(p.rows) * p.n_heads * hd, part_lse = static_cast<int64_t>(p.rows) * p.n_heads;
  const int64_t kvd = static_cast<int64_t>(nkv) * hd;
  for (int64_t si = 0; si < n_seg; ++si) {
    const int64_t s0 = si * seg;
    ExpandKvParams ep;
    ep.kv = p.kv;
    ep.layer = p.layer;
    ep.seq = p.seq;
    ep.t0 = s0;
    ep.n = static_cast<int>(std::min(seg, p.n_keys - s0));
    ep.k = p.xk;
    ep.v = p.xv;
    ep.token_stride = kvd;
    ep.head_stride = hd;
    KVQ_RETURN_IF_ERROR(LaunchExpandKv(ep, stream));
    PrefillAttentionParams pp;
    pp.rows = p.rows;
    pp.n_heads = p.n_heads;
    pp.n_kv_heads = nkv;
    pp.head_dim = hd;
    pp.q = p.q;
    pp.k = p.xk;
    pp.v = p.xv;
    pp.kv_token_stride = kvd;
    pp.kv_head_stride = hd;
    pp.n_keys = ep.n;
    pp.limit_base = p.limit_base - s0;
    pp.causal = p.causal;
    pp.scale = p.scale;
    pp.splits = p.plan.splits;
    pp.o = direct ? p.o : p.part_o + part_o;
    pp.lse = direct ? p.lse : p.part_lse + part_lse;
    pp.o_split_stride = part_o;
    pp.lse_split_stride = part_lse;
    KVQ_RETURN_IF_ERROR(LaunchPrefillAttention(pp, stream));
    if (direct) continue;
    MergeAttentionParams mp;
    mp.rows = p.rows * p.n_heads;
    mp.head_dim = hd;
    // The first segment merges its splits only; later ones also the running result (slot 0).
    mp.n_parts = si == 0 ? p.plan.splits : p.plan.splits + 1;
    mp.o_parts = si == 0 ? p.part_o + part_o : p.part_o;
    mp.lse_parts = si == 0 ? p.part_lse + part_lse : p.part_lse;
    mp.o_row_stride = hd;
    mp.o_part_stride = part_o;
    mp.lse_row_stride = 1;
    mp.lse_part_stride = part_lse;
    const bool last = si + 1 == n_seg;
    mp.o = last ? p.o : p.part_o;
    mp.lse = last ? p.lse : p.part_lse;
    KVQ_RETURN_IF_ERROR(LaunchMergeAttention(mp, stream));
  }
  return absl::OkStatus();
}

absl::Status LaunchToHalfRows(int rows, int cols, const float* in, int64_t in_stride, uint16_t* out,
                              int64_t out_stride, cudaStream_t stream) {
  if (rows < 0 || cols < 0) return absl::InvalidArgumentError("LaunchToHalfRows: negative size");
  if (rows == 0 || cols == 0) return absl::OkStatus();
  if (in == nullptr || out == nullptr) return absl::InvalidArgumentError("LaunchToHalfRows: null pointer");
  const int64_t total = static_cast<int64_t>(rows) * cols;
  const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 4096));
  ToHalfRowsKernel<<<blocks, 256, 0, stream>>>(rows, cols, in, in_stride, out, out_stride);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvq::kernels
