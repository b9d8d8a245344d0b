// Tensor-core decode attention over a paged KV cache (fp16 or KVQuant LUT codes, per-channel key
// scaling, pre- or post-RoPE keys). The launcher instantiates it for the fp16 codec only (fp16
// formats have no sink tokens); LUT codecs, with or without sinks, take
// decode_attention_lut_mma.cuh, which reuses this file's fragments, staging and RoPE table and is
// where the LUT branches below were carried further. DecodeAttentionKernel (decode_attention.cuh)
// remains the description of the math. Same (o, lse) partial output and split-KV merge.
//
// Thread mapping. CTA = up to 8 warps = up to 8 KV heads of one sequence and one split; warp w
// owns KV head hk = blockIdx.x * warps + w for the whole token range of the split (so no
// combine between warps). All warps walk the same 16-token tiles, so the RoPE cos/sin table of a
// 64-token group is computed once per CTA (shared by all its KV heads and query heads).
//
// Per tile and warp:
//   1. codes (prefetched into registers one tile ahead) are dequantized to fp16 into a per-warp
//      staging tile X[16 tokens][head_dim] (16-byte chunks XOR-swizzled by token): keys through
//      a per-channel fp16 table T[c][code] = fp16(fmaf(lut[code], range_c, zp_c)), values
//      through a float2 pair table (lut[a], lut[b]) and fmaf with the token's fp32 scaling;
//   2. key outliers (sorted by token: a running cursor, one coalesced pass) and value outliers
//      overwrite their element in X (replace, as the reference does);
//   3. keys: ldmatrix A fragments; RoPE in half2 on the fragments (channel c and c + hd/2 sit in
//      the same lane), from the CTA's cos/sin table; S[16 tok][8 heads] = K . Q^T with
//      mma.m16n8k16 (fp16 in, fp32 accumulate); q pre-scaled by scale * log2(e);
//   4. online softmax in the log2 domain on the C fragments (a lane holds heads 2q, 2q+1);
//      P rounded to fp16 (l sums the rounded values, so o is exactly normalized);
//   5. values: X is reused; O^T[hd][8 heads] += V^T . P with ldmatrix.trans A fragments and P
//      transposed through a 256-byte per-warp buffer.
// RoPE table: per 64-token group, entries that are pure functions of the absolute position
// (RopeGroupAnchors below): an exact double anchor per 4096-token block of positions (a double
// sincos of a large angle takes thousands of cycles on the CTA's critical path, so only when a
// split starts and every 64 groups), fp32 steps of 512 and 64 positions from fixed tables to the
// position's 64-token group, then of 8 and 1: relative error ~1e-6, far below the fp16 rounding
// of the rotated keys, and the same bits whichever split or rank shard holds the key.
// Precision: keys, values and P are rounded to fp16 once (|k|, |v| < 4: <= 1e-3 absolute); all
// sums are fp32.
#pragma once

#include <cuda_fp16.h>
#include <math_constants.h>

#include <cstdint>

#include "kernels/code_layout.h"
#include "kernels/decode_attention.h"
#include "kernels/launch.cuh"
#include "kernels/paged_kv.h"

#ifndef KVQ_FP16_PREFETCH_MAX_HD
#define KVQ_FP16_PREFETCH_MAX_HD 64
#endif

namespace kvq::kernels::decode_attention_mma {

inline constexpr int kTile = 16;
inline constexpr int kGroupTiles = 4;  // tiles per cos/sin table fill
inline constexpr int kMaxWarps = 8;     // warps (KV heads) per CTA of this kernel, at most
inline constexpr int kWarpsPerSm = 16;  // both tensor-core decode kernels: 128 registers per thread
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float2 CMul(float2 a, float2 b) {
  return make_float2(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}
static __device__ __noinline__ float2 SinCosD(double angle) {
  double s, c;
  sincos(angle, &s, &c);
  return make_float2(static_cast<float>(c), static_cast<float>(s));
}

// Entries per frequency of the RoPE step tables: e1, and 8 steps of each of st8, s1, s8.
inline constexpr int kRopeStepSlots = 25;

// Entry i of the RoPE step tables of a head with `half` frequencies, written into the layout
// steps = [s8: half x 8][s1: half x 8][st8: half x 8][e1: half] (float2 (cos, sin)):
// slot i / half of frequency f = i % half: 0 -> e1[f] = exp(i w), 1 + 8t + m -> table t (st8, s1,
// s8) step m = exp(i (8, 64, 512)[t] m w), in double, rounded to f32.
__device__ __forceinline__ void RopeStepEntry(const double* inv_freq, int half, int i, float2* steps) {
  const int f = i % half, slot = i / half;
  const int m = (slot - 1) & 7, t = (slot - 1) >> 3;
  float2* dst = slot == 0 ? steps + 24 * half + f : steps + (t == 0 ? 16 : t == 1 ? 8 : 0) * half + f * 8 + m;
  const double step = slot == 0 ? 1.0 : (t == 0 ? 8.0 : t == 1 ? 64.0 : 512.0) * m;
  *dst = SinCosD(inv_freq[f] * step);
}

// RoPE (cos, sin) of a 64-token group, every entry a pure function of the absolute position, so
// that whatever split or rank shard computes a key's score rounds it the same way (with anchors
// at the split start, shards of one sequence differed in the last bits of cos/sin, which fp16
// rounding turned into 1e-5 score differences). For position P, with P0 = P & ~63 (its absolute
// 64-token group) and Pa = P0 & ~4095:
//   z(P) = A(P0) * st8[((P - P0) >> 3)] * e1^((P - P0) & 7),
//   A(P0) = X(Pa) * s8[(P0 >> 9) & 7] * s1[(P0 >> 6) & 7],   X(Pa) = exp(i Pa w) in double,
// st8[r] = exp(i 8 r w), s8[m] = exp(i 512 m w), s1[m] = exp(i 64 m w) (double, rounded to fp32),
// products in fp32: at most 12 roundings, ~1e-6 relative. A group of the kernel (64 tokens from
// gpos) spans at most two absolute groups, whose anchors A live in a[0], a[1]; X(Pa) is computed
// in double only at a restart (the first group of a split, sinks) and when a group enters a new
// 4096-token block (groups advance by exactly 64 positions otherwise).
template <int kHalf>
struct RopeGroupAnchors {
  static constexpr int kSlots = 2 + 2 + 8 + 8 + 8 + 1;  // x[2], a[2], s8[8], s1[8], st8[8], e1
  static constexpr int kBytes = kHalf * kSlots * 8;
  static constexpr int kStepEntries = kRopeStepSlots * kHalf;  // s8, s1, st8, e1: contiguous from s8
  float2* x;    // [2][kHalf]
  float2* a;    // [2][kHalf]
  float2* s8;   // [kHalf][8]
  float2* s1;   // [kHalf][8]
  float2* st8;  // [kHalf][8]
  float2* e1;   // [kHalf]

  __device__ explicit RopeGroupAnchors(uint8_t* base) {
    x = reinterpret_cast<float2*>(base);
    a = x + 2 * kHalf;
    s8 = a + 2 * kHalf;
    s1 = s8 + 8 * kHalf;
    st8 = s1 + 8 * kHalf;
    e1 = st8 + 8 * kHalf;
  }
  // Once per CTA, with a __syncthreads before the first Anchor (entries are written by other
  // threads than the ones that read them there). With `steps` (the table LaunchRopeStepTable
  // writes once per pool, the same entries in this layout: s8, s1, st8, e1) a copy; otherwise the
  // 25 double-precision sincos per frequency spread over all threads (RopeStepEntry; each a chain
  // of dependent FP64 operations on every CTA's path before its first tile).
  __device__ void Init(const double* inv_freq, const void* steps, int tid, int nthreads) {
    if (steps != nullptr) {
      // Four loads of a thread in flight before its stores (one load-store pair per round trip
      // put several DRAM latencies before every CTA's first tile).
      const uint4* src = static_cast<const uint4*>(steps);
      uint4* dst = reinterpret_cast<uint4*>(s8);
      constexpr int kN = kStepEntries / 2, kPer = 4;
      for (int i0 = tid; i0 < kN; i0 += kPer * nthreads) {
        uint4 v[kPer];
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          const int i = i0 + k * nthreads;
          if (i < kN) v[k] = __ldg(src + i);
        }
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          const int i = i0 + k * nthreads;
          if (i < kN) dst[i] = v[k];
        }
      }
      return;
    }
#pragma unroll 1
    for (int i = tid; i < kStepEntries; i += nthreads) RopeStepEntry(inv_freq, kHalf, i, s8);
  }
  // At a group that starts at gpos (CTA-uniform; a __syncthreads before the rows, and before it
  // unless nothing reads a or x between the previous rows and it, as in the LUT kernel);
  // restart unless the previous call's gpos was gpos - 64. X(Pa) from `anchors` (PagedKvCache::
  // rope_anchors: the same SinCosD values, computed once per pool) when it covers Pa: a split's
  // first group otherwise put a double sincos per frequency (the large-argument path) before the
  // CTA's first tile, behind a barrier (18% of the LUT kernel's stall samples at 1K tokens, one
  // tile per CTA; H200, 2026-12-02).
  __device__ void Anchor(int64_t gpos, bool restart, const double* inv_freq, const float2* anchors,
                         int64_t anchor_count, int tid, int nthreads) {
    const int64_t p0 = gpos & ~int64_t{63};
    for (int k = 0; k < 2; ++k) {
      const int64_t q = p0 + 64 * k, qa = q & ~int64_t{4095};
      const bool fresh = restart || (q & 4095) < 64;
      const bool tabled = anchors != nullptr && (qa >> 12) < anchor_count;
      for (int f = tid; f < kHalf; f += nthreads) {
        if (fresh) {
          x[k * kHalf + f] = tabled ? anchors[(qa >> 12) * kHalf + f]
                                    : SinCosD(static_cast<double>(qa) * inv_freq[f]);
        }
        a[k * kHalf + f] = CMul(x[k * kHalf + f], CMul(s8[f * 8 + ((q >> 9) & 7)], s1[f * 8 + ((q >> 6) & 7)]));
      }
    }
  }
  // z at absolute position (gpos & ~63) + 8 * row (row in [0, 16): two absolute groups); the caller steps
  // it by e1[f] for the next 7 positions.
  __device__ float2 RowStart(int f, int row) const {
    return CMul(a[(row >> 3) * kHalf + f], st8[f * 8 + (row & 7)]);
  }
};

// Byte offset of 16-byte chunk `chunk` of staging row `row` (XOR swizzle: conflict-free row
// writes by 8 lanes of consecutive rows and ldmatrix reads of 8 rows).
template <int kHeadDim, KvCodec kCodec>
struct MmaCfg {
  static constexpr bool kQuant = kCodec != KvCodec::kFp16;
  static constexpr int kBits = kQuant ? static_cast<int>(kCodec) : 16;
  static constexpr int kC = kQuant ? (1 << kBits) : 1;
  static constexpr int kHalf = kHeadDim / 2;
  static constexpr int kChunks = kHeadDim / 16;       // mma k-chunks over channels
  static constexpr int kHalfChunks = kChunks / 2;
  static constexpr int kRowChunks = kHeadDim / 8;     // 16-byte chunks per staging row
  static constexpr int kHalfWords = kHalf * kBits / 32;  // code words of half a token row
  static constexpr int kCsWords = kHalfChunks * 8;    // cos/sin half2 words per lane and tile
  static constexpr int kCsStride = kCsWords + 4;      // padded: conflict-free 16-byte reads
  // Per-warp shared memory (bytes): staging tile, P, key table (hi half padded by one channel).
  static constexpr int kStageBytes = kTile * kHeadDim * 2;
  static constexpr int kPBytes = kTile * 8 * 2;
  static constexpr int kKtabBytes = kQuant ? (kHeadDim + 1) * kC * 2 : 0;
  static constexpr int kWarpBytes = (kStageBytes + kPBytes + kKtabBytes + 15) / 16 * 16;
  // Per-CTA: cos/sin table, group anchors, 8-step and 1-step rotations, value pair table.
  static constexpr int kCsBytes = kGroupTiles * 32 * kCsStride * 4;
  static constexpr int kRotBytes = RopeGroupAnchors<kHalf>::kBytes;
  static constexpr int kVpairBytes = kQuant ? kC * kC * 8 : 0;
  static constexpr int kCtaBytes = kCsBytes + kRotBytes + kVpairBytes;
  static size_t SmemBytes(int warps) { return kCtaBytes + static_cast<size_t>(warps) * kWarpBytes; }
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void Ldsm4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Ldsm4T(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Ldsm2T(uint32_t addr, uint32_t (&r)[2]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}
// D = A(16x16 fp16, row) * B(16x8 fp16, col) + D (fp32).
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                   uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t H2Bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 BitsH2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }
// 2^x by the SFU alone (ex2.approx, flush-to-zero): exp2f wraps the same instruction in a range
// test and two multiplies to return denormals. For softmax weights (arguments <= 0, -inf gives 0):
// relative error ~2^-22, and a weight below 2^-126 of the running maximum's is zero in an fp16 P.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint32_t PackF2(float lo, float hi) {
  return H2Bits(__floats2half2_rn(lo, hi));
}
template <int kHeadDim>
__device__ __forceinline__ int StageOff(int row, int chunk) {
  return row * (kHeadDim * 2) + ((chunk ^ (row & 7)) << 4);
}

// Raw data of one tile for one lane: token (lane & 15), channel half (lane >> 4).
template <int kHeadDim, KvCodec kCodec, bool kQuant = (kCodec != KvCodec::kFp16)>
struct Raw;
template <int kHeadDim, KvCodec kCodec>
struct Raw<kHeadDim, kCodec, true> {
  static constexpr int kW = MmaCfg<kHeadDim, kCodec>::kHalfWords;
  uint32_t k[kW], v[kW], vscale;
};
template <int kHeadDim, KvCodec kCodec>
struct Raw<kHeadDim, kCodec, false> {
  uint4 k[kHeadDim / 16], v[kHeadDim / 16];  // half a row: hd/2 halves = hd/16 uint4
};

template <int kWords>
__device__ __forceinline__ void LoadWords(const uint32_t* src, uint32_t (&w)[kWords]) {
  if constexpr (kWords % 4 == 0) {
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const uint4 x = __ldg(reinterpret_cast<const uint4*>(src) + i);
      w[4 * i] = x.x; w[4 * i + 1] = x.y; w[4 * i + 2] = x.z; w[4 * i + 3] = x.w;
    }
  } else if constexpr (kWords % 2 == 0) {
#pragma unroll
    for (int i = 0; i < kWords / 2; ++i) {
      const uint2 x = __ldg(reinterpret_cast<const uint2*>(src) + i);
      w[2 * i] = x.x; w[2 * i + 1] = x.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = __ldg(src + i);
  }
}

// Codes [8 * g8, 8 * g8 + 8) of a half row's code words (kernels/code_layout.h), right-aligned,
// code e at bits [e * CodeStride(kBits), + kBits): for 2 and 3 bits the bit-sliced group's 8 codes
// as nibbles (a half row starts a group), else an LSB-first stream's 8 codes (8 * kBits <= 32).
template <int kBits, int kWords>
__device__ __forceinline__ uint32_t Codes8(const uint32_t (&w)[kWords], int g8) {
  if constexpr (SlicedCodes(kBits)) {
    const int grp = kBits * (g8 >> 2);
    return SlicedNibbles8(w[grp], w[grp + 1], kBits == 3 ? w[grp + 2] : 0u, kBits, g8 & 3);
  }
  const int bit = g8 * 8 * kBits;
  const int wi = bit >> 5, sh = bit & 31;
  if (sh + 8 * kBits > 32) return __funnelshift_r(w[wi], w[wi + 1], sh);
  return w[wi] >> sh;
}

template <int kHeadDim, KvCodec kCodec>
__global__ void __launch_bounds__(kMaxWarps * 32, kWarpsPerSm / kMaxWarps)
    DecodeAttentionMmaKernel(const DecodeAttentionParams p, const int tokens_per_split,
                             float* __restrict__ part_o, float* __restrict__ part_lse) {
  GridDependencyWait();  // first: see kernels/launch.cuh
  GridDependencyTrigger();
  using Cfg = MmaCfg<kHeadDim, kCodec>;
  constexpr bool kQuant = Cfg::kQuant;
  constexpr int kBits = Cfg::kBits;
  constexpr int kC = Cfg::kC;
  constexpr int kHalf = Cfg::kHalf;
  constexpr int kChunks = Cfg::kChunks;
  constexpr int kHC = Cfg::kHalfChunks;
  using RawT = Raw<kHeadDim, kCodec>;

  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* cs_s = reinterpret_cast<uint32_t*>(smem);
  RopeGroupAnchors<kHalf> rot_tab(smem + Cfg::kCsBytes);
  float2* vpair_s = reinterpret_cast<float2*>(smem + Cfg::kCsBytes + Cfg::kRotBytes);

  const PagedKvCache& kv = p.kv;
  const KvBlockGeometry& geo = kv.geom;
  const int nwarps = blockDim.x >> 5;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int hk = blockIdx.x * nwarps + warp;
  const int split = blockIdx.y, b = blockIdx.z;
  const int n_kv = geo.n_kv_heads;
  const bool active = hk < n_kv;
  const int group = p.n_heads / n_kv;
  const bool rope = !kv.keys_rotated;
  const int g = lane >> 2, q4 = lane & 3;
  uint8_t* wsm = smem + Cfg::kCtaBytes + warp * Cfg::kWarpBytes;
  uint8_t* stage = wsm;
  uint8_t* pbuf = wsm + Cfg::kStageBytes;
  __half* ktab = reinterpret_cast<__half*>(wsm + Cfg::kStageBytes + Cfg::kPBytes);

  const int seq_len = kv.seq_lens[b];
  const int n_blk = seq_len;  // no sink tokens on this path
  const int j_begin = split * tokens_per_split;
  const int j_end = min(j_begin + tokens_per_split, n_blk);
  const int64_t first_pos = kv.first_positions[b];
  const float scale = p.scale > 0.0f ? p.scale : 1.0f / sqrtf(static_cast<float>(kHeadDim));
  const float qscale = scale * kLog2e;
  const int k_v = kQuant ? geo.value_outliers_per_token : 0;
  const int hk_c = active ? hk : 0;

  // ---- Per-CTA constants. ----
  if (rope) rot_tab.Init(kv.rope_inv_freq, kv.rope_steps, tid, blockDim.x);
  if constexpr (kQuant) {
    const float* vl = kv.value_lut + p.layer * kC;
    for (int i = tid; i < kC * kC; i += blockDim.x) vpair_s[i] = make_float2(vl[i % kC], vl[i / kC]);
    const float* kl = kv.key_lut + p.layer * kC;
    const int64_t at = (static_cast<int64_t>(p.layer) * n_kv + hk_c) * kHeadDim;
    for (int i = lane; i < kHeadDim * kC; i += 32) {
      const int c = i / kC, code = i % kC;
      ktab[c * kC + code + (c >= kHalf ? kC : 0)] =
          __float2half_rn(fmaf(kl[code], __ldg(kv.key_range + at + c), __ldg(kv.key_zero_point + at + c)));
    }
  }
  // q as mma B fragments: qb[j][0] = q[g][16j + 2q4 .. +1], qb[j][1] = q[g][16j + 2q4 + 8 .. +9].
  uint32_t qb[kChunks][2];
  {
    const bool gv = active && g < group;
    const float* qrow = p.q + (static_cast<int64_t>(b) * p.n_heads + hk_c * group + (gv ? g : 0)) * kHeadDim;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = 16 * j + 2 * q4 + 8 * h;
        qb[j][h] = gv ? PackF2(qrow[c] * qscale, qrow[c + 1] * qscale) : 0u;
      }
    }
  }

  float acc[kChunks][4];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F, l0 = 0.0f, l1 = 0.0f;

  const int n_tiles = j_end > j_begin ? (j_end - j_begin + kTile - 1) / kTile : 0;
  const int64_t kv_row = kv.TableRow(b);
  const int lt = lane & 15, lh = lane >> 4;  // dequant mapping: token, channel half

  auto block_base = [&](int T) -> const uint8_t* {
    const int j = j_begin + T * kTile;
    const int64_t blk = kv.block_table[kv_row + j / kKvBlockTokens];
    return kv.pool + blk * kv.block_stride_bytes + static_cast<int64_t>(p.layer) * geo.layer_bytes;
  };
  auto load_raw = [&](int T, RawT& r) {
    const int j = j_begin + T * kTile;
    const int t = j % kKvBlockTokens + lt;
    const bool ok = active && T < n_tiles && (!kQuant || j + lt < j_end);
    if (!ok) {
      r = RawT{};
      return;
    }
    const uint8_t* lb = block_base(T);
    const int64_t tok = static_cast<int64_t>(hk) * kKvBlockTokens + t;
    if constexpr (kQuant) {
      const int wpt = geo.key_words_per_token;
      LoadWords(reinterpret_cast<const uint32_t*>(lb + geo.key_codes_offset) + tok * wpt + lh * Cfg::kHalfWords, r.k);
      LoadWords(reinterpret_cast<const uint32_t*>(lb + geo.value_codes_offset) + tok * wpt + lh * Cfg::kHalfWords, r.v);
      r.vscale = __ldg(reinterpret_cast<const uint32_t*>(lb + geo.value_scales_offset) + t);
    } else {
      // Coalesced: chunk i * 32 + lane of the tile's contiguous [16 tokens][head_dim] halves.
      const int64_t t0 = static_cast<int64_t>(hk) * kKvBlockTokens + j % kKvBlockTokens;
      const uint4* kp = reinterpret_cast<const uint4*>(lb + geo.key_codes_offset + t0 * kHeadDim * 2);
      const uint4* vp = reinterpret_cast<const uint4*>(lb + geo.value_codes_offset + t0 * kHeadDim * 2);
      const int nv = j_end - j;
#pragma unroll
      for (int i = 0; i < kHeadDim / 16; ++i) {
        const int idx = i * 32 + lane;
        const bool in = idx / Cfg::kRowChunks < nv;
        r.k[i] = in ? __ldg(kp + idx) : make_uint4(0, 0, 0, 0);
        r.v[i] = in ? __ldg(vp + idx) : make_uint4(0, 0, 0, 0);
      }
    }
  };

  // fp16 tiles of head dim 128 are too wide to hold two in registers; head dim 64's next tile fits
  // (32 registers, 120 in all, no spills) and prefetching it made SmolLM2 fp16 decode 4-5% faster
  // (H200, same call: 128K batch 1 50.5 -> 48.2 us, 1M batch 8 1,754 -> 1,684 us; 2026-12-01).
  // KVQ_FP16_PREFETCH_MAX_HD: the widest head dim prefetched (an experiment switch).
  constexpr bool kPrefetch = kQuant || kHeadDim <= KVQ_FP16_PREFETCH_MAX_HD;
  RawT raw;
  if constexpr (kPrefetch) load_raw(0, raw);
  int kcur = 0, kcount = 0;
  const uint32_t* kents = nullptr;
  __syncthreads();

  for (int T = 0; T < n_tiles; ++T) {
    const int j = j_begin + T * kTile;
    const int tin = j % kKvBlockTokens;                   // tile's first token in its block
    const int n_valid = min(kTile, j_end - j);
    const uint8_t* lb = block_base(T);

    // ---- cos/sin table of the 64-token group (CTA-wide). ----
    if (rope && (T % kGroupTiles) == 0) {
      __syncthreads();
      // Entries at absolute positions (RopeGroupAnchors: the same bits whichever split or shard
      // computes them); rows of 8 positions from the absolute group of gpos, 9 rows when gpos is
      // not a multiple of 8.
      const int64_t gpos = first_pos + j;
      rot_tab.Anchor(gpos, /*restart=*/T == 0, kv.rope_inv_freq, static_cast<const float2*>(kv.rope_anchors),
                     kv.rope_anchor_count, tid, blockDim.x);
      __syncthreads();
      const int off = static_cast<int>(gpos & 63);
      const int n_rows = (off & 7) != 0 ? 9 : 8;
      constexpr int kPairs = kHalf / 2;
      for (int u = tid; u < n_rows * kPairs; u += blockDim.x) {
        const int row = (off >> 3) + u / kPairs, fp = u % kPairs, f = 2 * fp;
        float2 z0 = rot_tab.RowStart(f, row), z1 = rot_tab.RowStart(f + 1, row);
        const float2 s0 = rot_tab.e1[f], s1 = rot_tab.e1[f + 1];
        const int jj = f / 16, hi8 = (f % 16) / 8, qq = (f % 8) / 2;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int tau = 8 * row + k - off;  // token in the group
          if (tau >= 0 && tau < kTile * kGroupTiles) {
            const int tile = tau / 16, th = (tau % 16) / 8, gg = tau % 8;
            const int ln = gg * 4 + qq;
            uint32_t* dst = cs_s + (tile * 32 + ln) * Cfg::kCsStride + ((jj * 2 + th) * 2 + hi8) * 2;
            dst[0] = PackF2(z0.x, z1.x);
            dst[1] = PackF2(z0.y, z1.y);
          }
          z0 = CMul(z0, s0);
          z1 = CMul(z1, s1);
        }
      }
      __syncthreads();
    }
    if (!active) {
      continue;
    }

    // Key-outlier cursor: reset at each block.
    if constexpr (kQuant) {
      if (geo.has_key_outliers && tin == 0) {
        const uint32_t* dir = reinterpret_cast<const uint32_t*>(lb + geo.key_outlier_dir_offset) + 2 * hk;
        const int first = static_cast<int>(dir[0]);
        kcount = static_cast<int>(dir[1]);
        kcur = 0;
        kents = reinterpret_cast<const uint32_t*>(lb - static_cast<int64_t>(p.layer) * geo.layer_bytes +
                                                  geo.fixed_bytes) + first;
      }
    }

    RawT cur;
    if constexpr (kPrefetch) {
      cur = raw;
      load_raw(T + 1, raw);
    } else {
      load_raw(T, cur);
    }

    // ---- 1. keys -> staging (fp16, pre-RoPE). ----
    __syncwarp();
    if constexpr (kQuant) {
      const __half* kt = ktab + lh * (kHalf + 1) * kC;
#pragma unroll
      for (int g8 = 0; g8 < kHalf / 8; ++g8) {
        const uint32_t x = Codes8<kBits>(cur.k, g8);
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c0 = 8 * g8 + 2 * e;
          constexpr int kS = CodeStride(kBits);
          const uint32_t a = (x >> (2 * e * kS)) & (kC - 1);
          const uint32_t bb = (x >> ((2 * e + 1) * kS)) & (kC - 1);
          const uint16_t ha = __half_as_ushort(kt[c0 * kC + a]);
          const uint16_t hb = __half_as_ushort(kt[(c0 + 1) * kC + bb]);
          w[e] = static_cast<uint32_t>(ha) | (static_cast<uint32_t>(hb) << 16);
        }
        *reinterpret_cast<uint4*>(stage + StageOff<kHeadDim>(lt, lh * (kHalf / 8) + g8)) =
            make_uint4(w[0], w[1], w[2], w[3]);
      }
      // Key outliers of this tile replace their element.
      if (geo.has_key_outliers) {
        __syncwarp();
        while (true) {
          const int e = kcur + lane;
          bool in = false;
          uint32_t ent = 0;
          if (e < kcount) {
            ent = __ldg(kents + e);
            in = static_cast<int>(ent & 0xffu) < tin + kTile;
          }
          if (in) {
            const int t = static_cast<int>(ent & 0xffu) - tin, c = static_cast<int>((ent >> 8) & 0xffu);
            *reinterpret_cast<uint16_t*>(stage + StageOff<kHeadDim>(t, c >> 3) + (c & 7) * 2) =
                static_cast<uint16_t>(ent >> 16);
          }
          const int n = __popc(__ballot_sync(0xffffffffu, in));
          kcur += n;
          if (n < 32) break;
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kHeadDim / 16; ++i) {
        const int idx = i * 32 + lane;
        *reinterpret_cast<uint4*>(stage + StageOff<kHeadDim>(idx / Cfg::kRowChunks, idx % Cfg::kRowChunks)) = cur.k[i];
      }
    }
    __syncwarp();

    // ---- 2. S = RoPE(K) . Q^T ----
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    {
      const int row = (lane & 7) + ((lane >> 3) & 1) * 8, csel = lane >> 4;
      const uint32_t sbase = SmemAddr(stage);
      const uint32_t* cs = cs_s + ((T % kGroupTiles) * 32 + lane) * Cfg::kCsStride;
#pragma unroll
      for (int jj = 0; jj < kHC; ++jj) {
        uint32_t lo[4], hi[4];
        Ldsm4(sbase + StageOff<kHeadDim>(row, 2 * jj + csel), lo);
        Ldsm4(sbase + StageOff<kHeadDim>(row, 2 * (jj + kHC) + csel), hi);
        if (rope) {
          const uint4 c0 = *reinterpret_cast<const uint4*>(cs + jj * 8);
          const uint4 c1 = *reinterpret_cast<const uint4*>(cs + jj * 8 + 4);
          // words: ((th * 2 + hi8) * 2 + cs): c0 = th0:{hi8=0: cos, sin; hi8=1: cos, sin}, c1 = th1.
          // A regs: 0 = (tok g, hi8 0), 1 = (tok g+8, hi8 0), 2 = (tok g, hi8 1), 3 = (g+8, hi8 1).
          const uint32_t cw[4] = {c0.x, c1.x, c0.z, c1.z};
          const uint32_t sw[4] = {c0.y, c1.y, c0.w, c1.w};
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const __half2 c = BitsH2(cw[r]), sn = BitsH2(sw[r]);
            const __half2 a = BitsH2(lo[r]), bb = BitsH2(hi[r]);
            lo[r] = H2Bits(__hfma2(a, c, __hneg2(__hmul2(bb, sn))));
            hi[r] = H2Bits(__hfma2(bb, c, __hmul2(a, sn)));
          }
        }
        Mma(s, lo, qb[jj][0], qb[jj][1]);
        Mma(s, hi, qb[jj + kHC][0], qb[jj + kHC][1]);
      }
    }
    // Key-outlier cursor already advanced; now the staging tile can take the values.
    __syncwarp();

    // ---- 3. values -> staging. ----
    if constexpr (kQuant) {
      const float vzp = __half2float(__ushort_as_half(static_cast<unsigned short>(cur.vscale & 0xffffu)));
      const float vr = __half2float(__ushort_as_half(static_cast<unsigned short>(cur.vscale >> 16)));
#pragma unroll
      for (int g8 = 0; g8 < kHalf / 8; ++g8) {
        const uint32_t x = Codes8<kBits>(cur.v, g8);
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          constexpr int kS = CodeStride(kBits);
          const float2 lv = vpair_s[((x >> (2 * e * kS)) & (kC - 1)) | (((x >> ((2 * e + 1) * kS)) & (kC - 1)) << kBits)];
          w[e] = PackF2(fmaf(lv.x, vr, vzp), fmaf(lv.y, vr, vzp));
        }
        *reinterpret_cast<uint4*>(stage + StageOff<kHeadDim>(lt, lh * (kHalf / 8) + g8)) =
            make_uint4(w[0], w[1], w[2], w[3]);
      }
      if (k_v > 0) {
        __syncwarp();
        const int ib = geo.value_outlier_index_bytes;
        const int t = tin + lt;
        if (lt < n_valid) {
          const uint8_t* idx = lb + geo.value_outlier_index_offset + static_cast<int64_t>(t) * k_v * ib;
          const uint16_t* val = reinterpret_cast<const uint16_t*>(lb + geo.value_outlier_value_offset) +
                                static_cast<int64_t>(t) * k_v;
          for (int o = lh; o < k_v; o += 2) {
            const int e = ib == 1 ? idx[o] : reinterpret_cast<const uint16_t*>(idx)[o];
            if (e / kHeadDim != hk) continue;
            const int c = e % kHeadDim;
            *reinterpret_cast<uint16_t*>(stage + StageOff<kHeadDim>(lt, c >> 3) + (c & 7) * 2) = val[o];
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kHeadDim / 16; ++i) {
        const int idx = i * 32 + lane;
        *reinterpret_cast<uint4*>(stage + StageOff<kHeadDim>(idx / Cfg::kRowChunks, idx % Cfg::kRowChunks)) = cur.v[i];
      }
    }

    // ---- 4. online softmax (log2 domain); lane: tokens g, g+8; heads 2q4, 2q4+1. ----
    if (g >= n_valid) s[0] = s[1] = -CUDART_INF_F;
    if (g + 8 >= n_valid) s[2] = s[3] = -CUDART_INF_F;
    float mx0 = fmaxf(s[0], s[2]), mx1 = fmaxf(s[1], s[3]);
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);  // finite: n_valid >= 1
    const float corr0 = exp2f(m0 - mn0), corr1 = exp2f(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    const __half2 pg = __floats2half2_rn(exp2f(s[0] - mn0), exp2f(s[1] - mn1));
    const __half2 pg8 = __floats2half2_rn(exp2f(s[2] - mn0), exp2f(s[3] - mn1));
    const float2 fg = __half22float2(pg), fg8 = __half22float2(pg8);
    l0 = fmaf(l0, corr0, fg.x + fg8.x);
    l1 = fmaf(l1, corr1, fg.y + fg8.y);
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      acc[i][0] *= corr0;
      acc[i][1] *= corr1;
      acc[i][2] *= corr0;
      acc[i][3] *= corr1;
    }
    *reinterpret_cast<uint32_t*>(pbuf + g * 16 + q4 * 4) = H2Bits(pg);
    *reinterpret_cast<uint32_t*>(pbuf + (g + 8) * 16 + q4 * 4) = H2Bits(pg8);
    __syncwarp();

    // ---- 5. O^T += V^T . P ----
    {
      uint32_t pb[2];
      Ldsm2T(SmemAddr(pbuf) + (lane & 15) * 16, pb);
      const int mi = lane >> 3, r = lane & 7;
      const int row = r + 8 * (mi >> 1), csel = mi & 1;
      const uint32_t sbase = SmemAddr(stage);
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        uint32_t a[4];
        Ldsm4T(sbase + StageOff<kHeadDim>(row, 2 * i + csel), a);
        Mma(acc[i], a, pb[0], pb[1]);
      }
    }
  }

  if (!active) return;
  // ---- Finish: l over the lanes of equal q4; write heads 2q4, 2q4+1 of channels 16i+g(+8). ----
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const int n_splits = gridDim.y;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = 2 * q4 + h;
    if (head >= group) continue;
    const float l = h ? l1 : l0, m = h ? m1 : m0;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const float lse = l > 0.0f ? (m + log2f(l)) * kLn2 : -CUDART_INF_F;
    const int64_t row = static_cast<int64_t>(b) * p.n_heads + hk * group + head;
    float* orow;
    if (part_o != nullptr) {
      orow = part_o + (row * n_splits + split) * kHeadDim;
      if (g == 0) part_lse[row * n_splits + split] = lse;
    } else {
      orow = p.o + row * kHeadDim;
      if (g == 0) p.lse[row] = lse;
    }
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      orow[16 * i + g] = acc[i][h] * inv;
      orow[16 * i + g + 8] = acc[i][2 + h] * inv;
    }
  }
}

}  // namespace kvq::kernels::decode_attention_mma
