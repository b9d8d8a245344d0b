// Tensor-core decode attention for LUT codecs (nuqB / intB per-channel, B = 2, 3, 4), with or
// without fp16 sink tokens. Same (o, lse) partials and split-KV merge as the other kernels; the
// thread mapping, staging tile, ldmatrix/mma fragments and the RoPE cos/sin table scheme are those
// of decode_attention_mma.cuh (read that first). What differs is where the dequantization
// arithmetic goes: the staging tile holds raw LUT values (fp16), and every per-channel / per-token
// affine factor is moved out of the per-element path into the mma operands.
//
// Keys. A key is k_c = r_c l_c + z_c (l = key_lut[code], per-channel range r and zero point z),
// rotated by RoPE in rotate-half pairs (c, c + hd/2) at the token's angles th_c. Expanding
//   q . R(th) k = sum_{c < hd/2} cos_c (q_c k_c + q_c' k_c') + sin_c (q_c' k_c - q_c k_c')
// (c' = c + hd/2) gives
//   s = (l o cos) . Q1 + (l o sin) . Q2 + cos . Zc + sin . Zs
// with, per query head (all scaled by softmax scale * log2 e):
//   Q1_c = q_c r_c,  Q2_c = q_c' r_c,  Q1_c' = q_c' r_c',  Q2_c' = -q_c r_c'
//   Zc_f = q_f z_f + q_f' z_f',  Zs_f = q_f' z_f - q_f z_f'          (f < hd/2)
// where "o cos" multiplies channel c and c' by cos th_c. So the A operands are the staged LUT
// values times the cos/sin table (two HMUL2 per register, the cost of the rotation it replaces),
// the per-channel scaling lives in the B operands (q, built once per CTA), and the zero-point
// term is an mma of the cos/sin table itself. 24 mma per tile instead of 8; tensor cores are idle
// in this kernel anyway. Post-RoPE keys use the same code with cos = 1, sin = 0.
// A key outlier x replaces l by (x - z_c) / r_c in the staging tile.
//
// Values. v = r_t l + zp_t with per-token fp16 scaling, so
//   o = sum_t p_t v_t = sum_t (p_t r_t) l_t + (sum_t p_t zp_t) 1:
// the P operand carries p_t r_t (fp16), the zero points go to one fp32 accumulator per head, and
// the staged values are LUT values. A value outlier x replaces l by (x - zp_t) / r_t.
// Both tables are pair tables: entry (a | b << B) = half2(lut[a], lut[b]), one 32-bit shared load
// per two channels, one table per layer for all KV heads of the CTA — except at 2 and 3 bits, where
// the codes are bit-sliced (kernels/code_layout.h) and the tables are the 4- or 8-entry fp16 LUTs
// held as byte tables in four registers (kernels/lut_decode.cuh): eight codes become byte-permute
// selectors in 1-4 instructions and four PRMT give four channels, no shared-memory lookups (the 3-bit pair table's
// 64 entries took two wavefronts per lookup from bank conflicts: lut_core_bench, H200, 2026-12-02).
// At 4 bits the pair table stays: 16-entry byte tables in eight registers (bits 0-2 of a code
// pick a byte in both halves with four PRMT, bit 3 the half with two more, two interleave: 11
// instructions per four channels) were faster only with 16-warp CTAs and slower with 8 or fewer
// warps (nuq4-1% at 1M: LLaMA-2-7B 5,257 -> 5,058 us, Llama-3-8B 1,358 -> 1,403, SmolLM2 322 ->
// 359; H200, same call, 2026-12-03 00:11 UTC).
//
// Sink tokens (fp16, pre-RoPE, outside blocks; split 0 only): up to 4 extra tiles before the block
// tiles, staged from the sink buffers as l = (k - z_c) / r_c and v with r = 1, zp = 0, rotated at
// their own positions with a cos/sin group anchored at first_position (always rotated, also for
// post-RoPE formats). Sink buffers must be 16-byte aligned (read in uint4).
//
// Precision: l, cos/sin and their products are fp16 (relative 2^-11), all sums fp32. P (= p r) goes
// in as two fp16 parts, hi = fp16(P) and lo = fp16(P - hi), one mma each (the tensor cores are idle
// here): relative 2^-22, so o no longer depends on where splits and rank shards cut the keys (each
// rounds p against its own running max; with P in one fp16, sharded and single-rank o differed by
// 3.5e-4 on SmolLM2, enough to flip a code of the next layer's keys and with it a greedy token). An
// outlier whose (x - zero point) / range exceeds the fp16 range (range clamped to 2^-14 by the
// quantizer and a huge outlier) is clamped to +-65504.
#pragma once

#include <cuda_fp16.h>
#include <math_constants.h>

#include <cstdint>

#include "kernels/decode_attention.h"
#include "kernels/decode_attention_mma.cuh"
#include "kernels/launch.cuh"
#include "kernels/lut_decode.cuh"
#include "kernels/lut_group_table.cuh"
#include "kernels/paged_kv.h"

namespace kvq::kernels::decode_attention_lut_mma {

using decode_attention_mma::BitsH2;
using decode_attention_mma::CMul;
using decode_attention_mma::Exp2;
using decode_attention_mma::Codes8;
using decode_attention_mma::H2Bits;
using decode_attention_mma::kGroupTiles;
using decode_attention_mma::kLn2;
using decode_attention_mma::kLog2e;
using decode_attention_mma::kTile;
using decode_attention_mma::Ldsm2T;
using decode_attention_mma::Ldsm4;
using decode_attention_mma::Ldsm4T;
using decode_attention_mma::LoadWords;
using decode_attention_mma::Mma;
using decode_attention_mma::PackF2;
using decode_attention_mma::SinCosD;
using decode_attention_mma::SmemAddr;
using decode_attention_mma::StageOff;
using lut_decode::Decode4;
using lut_decode::Decode8;
using lut_decode::LoadByteTable;
using lut_decode::LutByteTable;
using lut_decode::Prmt;

// Timing ablations (wrong results; never in a normal build): KVQ_LUT_ABLATE is a bit mask that
// removes 1 the value-outlier patching, 2 the key-outlier scan, 4 every cos/sin group table after
// the first, 8 the low part of P (8 of the 16 P.V mma), 16 the zero-point mma (8 of the 24 score
// mma), 32 the group table's rows (anchors and barriers kept), 64 the group table's two barriers
// (rows and anchors kept: races), 128 the value-outlier walk (head starts still loaded), to time
// what each costs on the kernel's critical path (kernels_bench binaries built with
// -DKVQ_LUT_ABLATE=N next to the normal one).
#ifdef KVQ_LUT_ABLATE
inline constexpr int kLutAblate = KVQ_LUT_ABLATE;
#else
inline constexpr int kLutAblate = 0;
#endif

// Warps (KV heads) per CTA, at most 16: one CTA of 16 warps per SM holds as many warps as two of
// 8 (the 128-register cap), and every group's cos/sin table is built once for 16 heads instead
// of twice for 8. LLaMA-2-7B (32 KV heads: 2 CTAs per position range instead of 4), against the
// 8-warp build in the same call (H200, 2026-12-02 23:54 UTC): nuq3-1% 3-4% and nuq2-1% 4-6%
// faster at 128K-1M and batches 1-32 (1M batch 1 nuq3-1% 4,096 -> 3,962-3,981 us; 128K batch 32
// 16,875-17,000 -> 16,166-16,266), nuq4-1% unchanged (its pair-table lookups, not the table, set
// its pace); the whole LLaMA-2-7B decode step at 128K 2.4-3.4% faster. Caches of <= 8 heads run
// the same code (ptxas: the same registers and spills). The fp16 kernel keeps 8
// (decode_attention_mma::kMaxWarps): at 16 it measured 0.5-1.5% slower.
// -DKVQ_LUT_MAX_WARPS=8 on decode_attention.cu and decode_attention_mma.cu (scripts/
// build_variant.sh) builds the 8-warp launch for A/B runs.
#ifndef KVQ_LUT_MAX_WARPS
#define KVQ_LUT_MAX_WARPS 16
#endif
inline constexpr int kLutMaxWarps = KVQ_LUT_MAX_WARPS;
static_assert(kLutMaxWarps == 8 || kLutMaxWarps == 16, "8 or 16 warps per CTA");
inline constexpr int kLutMinCtas = decode_attention_mma::kWarpsPerSm / kLutMaxWarps;

template <int kHeadDim, int kBits>
struct LutMmaCfg {
  static constexpr int kC = 1 << kBits;
  static constexpr int kPairs = kC * kC;              // pair-table entries
  static constexpr int kHalf = kHeadDim / 2;
  static constexpr int kChunks = kHeadDim / 16;
  static constexpr int kHC = kChunks / 2;
  static constexpr int kHalfWords = kHalf * kBits / 32;
  // cos/sin table (kernels/lut_group_table.cuh): per tile and lane, for each lo chunk jj: the 4
  // cos half2 of the lane's A registers (reg r = token half + 2 * column half), then the 4 sin half2.
  static constexpr int kCsWords = kHC * 8;
  static constexpr int kCsStride = kCsWords + 4;      // conflict-free 16-byte reads
  static constexpr int kStageBytes = kTile * kHeadDim * 2;
  static constexpr int kPBytes = 2 * kTile * 8 * 2;  // P as fp16 hi parts, then lo parts
  static constexpr int kZrBytes = kHeadDim * 8;       // float2 {zero point, 1 / range}
  static constexpr int kZBytes = 2 * kHC * 32 * 16;   // Q2 and zero-point B fragments [jj][lane]
  static constexpr int kWarpBytes = (kStageBytes + kPBytes + kZrBytes + kZBytes + 15) / 16 * 16;
  static constexpr int kCsBytes = kGroupTiles * 32 * kCsStride * 4;
  static constexpr int kRotBytes = decode_attention_mma::RopeGroupAnchors<kHalf>::kBytes;
  static constexpr int kPairBytes = 2 * kPairs * 4;   // key and value pair tables
  static constexpr int kCtaBytes = kCsBytes + kRotBytes + kPairBytes;
  static size_t SmemBytes(int warps) { return kCtaBytes + static_cast<size_t>(warps) * kWarpBytes; }
};

template <int kW>
struct LutRaw {
  uint32_t k[kW], v[kW], vscale;
};

__device__ __forceinline__ float HalfLo(uint32_t u) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
}
__device__ __forceinline__ float HalfHi(uint32_t u) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
}
__device__ __forceinline__ uint16_t ClampedHalf(float x) {
  return __half_as_ushort(__float2half_rn(fminf(fmaxf(x, -65504.0f), 65504.0f)));
}
__device__ __forceinline__ uint32_t HMul2(uint32_t a, uint32_t b) {
  return H2Bits(__hmul2(BitsH2(a), BitsH2(b)));
}
__device__ __forceinline__ void PrefetchL1(const void* ptr) {
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(ptr));
}

template <int kHeadDim, KvCodec kCodec>
__global__ void __launch_bounds__(kLutMaxWarps * 32, kLutMinCtas)
    DecodeAttentionLutMmaKernel(const DecodeAttentionParams p, const int tokens_per_split,
                                float* __restrict__ part_o, float* __restrict__ part_lse) {
  GridDependencyWait();  // first: see kernels/launch.cuh
  GridDependencyTrigger();
  static_assert(kCodec != KvCodec::kFp16);
  constexpr int kBits = static_cast<int>(kCodec);
  using Cfg = LutMmaCfg<kHeadDim, kBits>;
  constexpr int kC = Cfg::kC;
  constexpr int kPairs = Cfg::kPairs;
  constexpr int kHalf = Cfg::kHalf;
  constexpr int kChunks = Cfg::kChunks;
  constexpr int kHC = Cfg::kHC;
  constexpr int kW = Cfg::kHalfWords;
  using RawT = LutRaw<kW>;

  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* cs_s = reinterpret_cast<uint32_t*>(smem);
  decode_attention_mma::RopeGroupAnchors<kHalf> rot_tab(smem + Cfg::kCsBytes);
  uint32_t* kpair_s = reinterpret_cast<uint32_t*>(smem + Cfg::kCsBytes + Cfg::kRotBytes);
  uint32_t* vpair_s = kpair_s + kPairs;

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
  float2* zr_s = reinterpret_cast<float2*>(wsm + Cfg::kStageBytes + Cfg::kPBytes);
  uint4* zb_s = reinterpret_cast<uint4*>(wsm + Cfg::kStageBytes + Cfg::kPBytes + Cfg::kZrBytes);
  uint4* q2b_s = zb_s + kHC * 32;

  const int seq_len = kv.seq_lens[b];
  const int64_t first_pos = kv.first_positions[b];
  const int n_sink_cap = static_cast<int>(
      min(max(static_cast<int64_t>(kv.sink_tokens) - first_pos, int64_t{0}),
          static_cast<int64_t>(kv.sink_tokens)));
  const int n_sink = min(seq_len, n_sink_cap);
  const int n_blk = max(seq_len - n_sink_cap, 0);
  const int j_begin = split * tokens_per_split;
  const int j_end = min(j_begin + tokens_per_split, n_blk);
  const int n_tiles = j_end > j_begin ? (j_end - j_begin + kTile - 1) / kTile : 0;
  const int n_stiles = (split == 0 && n_sink > 0) ? (n_sink + kTile - 1) / kTile : 0;
  const int64_t blk_pos0 = first_pos + n_sink_cap;  // position of block token 0
  const float scale = p.scale > 0.0f ? p.scale : 1.0f / sqrtf(static_cast<float>(kHeadDim));
  const float qscale = scale * kLog2e;
  const int k_v = (kLutAblate & 1) ? 0 : geo.value_outliers_per_token;
  const bool key_outliers = !(kLutAblate & 2) && geo.has_key_outliers;
  const int hk_c = active ? hk : 0;

  const int64_t kv_row = kv.TableRow(b);
  auto base_of = [&](int64_t blk) -> const uint8_t* {
    return kv.pool + blk * kv.block_stride_bytes + static_cast<int64_t>(p.layer) * geo.layer_bytes;
  };
  auto block_base = [&](int T) -> const uint8_t* {
    const int j = j_begin + T * kTile;
    return base_of(kv.block_table[kv_row + j / kKvBlockTokens]);
  };
  // Block tile 0's block-table entry, loaded first and used after the constants below (its round
  // trip overlaps theirs).
  const int64_t blk0 = active && n_tiles > 0 ? kv.block_table[kv_row + j_begin / kKvBlockTokens] : 0;

  // ---- Per-CTA constants: rotation steps, pair tables; per warp: key scaling. ----
  if (rope || n_stiles > 0) rot_tab.Init(kv.rope_inv_freq, kv.rope_steps, tid, blockDim.x);
  {
    const float* kl = kv.key_lut + p.layer * kC;
    const float* vl = kv.value_lut + p.layer * kC;
    if constexpr (SlicedCodes(kBits)) {  // byte tables: words 0-3 of each (16-byte aligned)
      if (tid < 8) (tid < 4 ? kpair_s : vpair_s)[tid & 3] = LutByteTable(tid < 4 ? kl : vl, kC, tid & 3);
    } else {
      for (int i = tid; i < kPairs; i += blockDim.x) {
        kpair_s[i] = PackF2(kl[i % kC], kl[i / kC]);
        vpair_s[i] = PackF2(vl[i % kC], vl[i / kC]);
      }
    }
  }
  const int64_t zr_at = (static_cast<int64_t>(p.layer) * n_kv + hk_c) * kHeadDim;
  {  // all of a lane's loads before its stores (a load-store loop waited a DRAM round trip each)
    float zz[kHeadDim / 32], rr[kHeadDim / 32];
#pragma unroll
    for (int e = 0; e < kHeadDim / 32; ++e) {
      zz[e] = __ldg(kv.key_zero_point + zr_at + lane + 32 * e);
      rr[e] = __ldg(kv.key_range + zr_at + lane + 32 * e);
    }
#pragma unroll
    for (int e = 0; e < kHeadDim / 32; ++e) zr_s[lane + 32 * e] = make_float2(zz[e], 1.0f / rr[e]);
  }

  // B operands (column g = query head g of the group): q1/q2 over all channels, zc/zs over the
  // hd/2 frequencies; fragment rows 2q4, 2q4+1 (h = 0) and 2q4+8, 2q4+9 (h = 1) of each chunk.
  // q1 stays in registers; q2 ({jj, jj + hd/32} per lane) and zc/zs ({zc0, zc1, zs0, zs1}) are
  // read from shared memory per tile, 16 bytes per lane each (registers are short).
  uint32_t q1[kChunks][2];
  {
    const bool gv = active && g < group;
    const float* qrow = p.q + (static_cast<int64_t>(b) * p.n_heads + hk_c * group + (gv ? g : 0)) * kHeadDim;
    const float* zp = kv.key_zero_point + zr_at;
    const float* rg = kv.key_range + zr_at;
    // Per rotate-half pair of this lane's fragment rows, c = 16 jj + 2 q4 + 8 h (+ 0, 1) and
    // c + hd/2: q, range and zero point loaded once each as float2 (12 loads per pair instead of
    // 40 scalar loads with their addresses: this block was 14% of the kernel's stall samples at
    // 1K tokens with one tile per CTA; H200, 2026-12-02). The arithmetic per element is the
    // scalar form's, in the same order (the same bits):
    //   q1[c] = q_c r_c,  q2[c] = q_{c+hd/2} r_c,  q1[c+hd/2] = q_{c+hd/2} r_{c+hd/2},
    //   q2[c+hd/2] = -q_c r_{c+hd/2},  zc_c = q_c z_c + q_{c+hd/2} z_{c+hd/2},
    //   zs_c = q_{c+hd/2} z_c - q_c z_{c+hd/2}  (r and all of zc/zs times the scale).
    // Needs q, key_range and key_zero_point 8-byte aligned (LaunchDecodeAttention checks q).
#pragma unroll
    for (int jj = 0; jj < kHC; ++jj) {
      uint32_t zc[2], zs[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = 16 * jj + 2 * q4 + 8 * h;
        const float2 qa2 = *reinterpret_cast<const float2*>(qrow + c);
        const float2 qb2 = *reinterpret_cast<const float2*>(qrow + c + kHalf);
        const float2 ra2 = __ldg(reinterpret_cast<const float2*>(rg + c));
        const float2 rb2 = __ldg(reinterpret_cast<const float2*>(rg + c + kHalf));
        const float2 za2 = __ldg(reinterpret_cast<const float2*>(zp + c));
        const float2 zb2 = __ldg(reinterpret_cast<const float2*>(zp + c + kHalf));
        const float qa_[2] = {qa2.x, qa2.y}, qb_[2] = {qb2.x, qb2.y};
        const float ra_[2] = {ra2.x, ra2.y}, rb_[2] = {rb2.x, rb2.y};
        const float za_[2] = {za2.x, za2.y}, zb_[2] = {zb2.x, zb2.y};
        float a1lo[2], a2lo[2], a1hi[2], a2hi[2], ac[2], as[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float qa = qa_[e], qb = qb_[e], za = za_[e], zb = zb_[e];
          const float rlo = ra_[e] * qscale, rhi = rb_[e] * qscale;
          a1lo[e] = qa * rlo;
          a2lo[e] = qb * rlo;
          a1hi[e] = qb * rhi;
          a2hi[e] = -qa * rhi;
          ac[e] = (qa * za + qb * zb) * qscale;
          as[e] = (qb * za - qa * zb) * qscale;
        }
        q1[jj][h] = gv ? PackF2(a1lo[0], a1lo[1]) : 0u;
        q1[jj + kHC][h] = gv ? PackF2(a1hi[0], a1hi[1]) : 0u;
        uint32_t* q2w = reinterpret_cast<uint32_t*>(q2b_s + jj * 32 + lane);
        q2w[h] = gv ? PackF2(a2lo[0], a2lo[1]) : 0u;
        q2w[2 + h] = gv ? PackF2(a2hi[0], a2hi[1]) : 0u;
        zc[h] = gv ? PackF2(ac[0], ac[1]) : 0u;
        zs[h] = gv ? PackF2(as[0], as[1]) : 0u;
      }
      zb_s[jj * 32 + lane] = make_uint4(zc[0], zc[1], zs[0], zs[1]);
    }
  }

  float acc[kChunks][4];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
  float m0 = -CUDART_INF_F, m1 = -CUDART_INF_F, l0 = 0.0f, l1 = 0.0f, z0 = 0.0f, z1 = 0.0f;

  const int lt = lane & 15, lh = lane >> 4;  // staging mapping: token, channel half
  // Staging row chunk lh * hd/16 of token lt; chunk + g8 is at srow ^ (g8 << 4) (the XOR swizzle
  // keeps g8's bits apart from the row's).
  const int srow = StageOff<kHeadDim>(lt, lh * (kHalf / 8));

  // Raw codes of this lane's token and channel half, loaded one tile ahead: the keys right after
  // the current keys are staged, the values and scales right after the current ones are used (one
  // register copy of each, not two).
  // Addresses as 32-bit byte offsets from the block's layer base (LaunchDecodeAttention checks
  // layer_bytes < 2^31) with the words per token known at compile time (it checks that too): the
  // 64-bit products and runtime multiplies they replace were ~200 of the ~1,100 instructions per
  // tile (ncu, Llama-3-8B nuq3-1% 1M, H200, 2026-12-02). The caller only asks for tiles of active
  // warps and T <= n_tiles (tile n_tiles has no valid token).
  constexpr int kRowBytes = kHeadDim * kBits / 8;  // code bytes per token row
  const int lane_row = (hk_c * kKvBlockTokens + lt) * kRowBytes + lh * kW * 4;
  const int vo_row = k_v * geo.value_outlier_index_bytes;  // index bytes per token
  // Value-outlier head starts (block_layout.h): each warp reads only its head's entries of a token
  // instead of scanning all k_v (LLaMA-2-7B, 41 outliers over 32 heads: 1.71x faster; Llama-3-8B,
  // 10 over 8: 1%; H200, 2026-12-02). Head dim 128 only: at 64 (SmolLM2: 2 outliers over 3 heads,
  // no starts) the untaken branch alone cost 2.4%; the scan stays correct everywhere.
  constexpr bool kWalk = kHeadDim == 128;
  const bool walk_starts = kWalk && k_v > 0 && geo.value_outlier_head_start_offset >= 0;
  auto at = [](const uint8_t* base, int64_t offset, int bytes) { return base + (static_cast<int>(offset) + bytes); };
  auto tin_of = [&](int T) { return (j_begin + T * kTile) & (kKvBlockTokens - 1); };
  auto tok_ok = [&](int T) { return j_begin + T * kTile + lt < j_end; };
  auto load_k = [&](int T, const uint8_t* base, RawT& r) {
    if (!tok_ok(T)) {
#pragma unroll
      for (int i = 0; i < kW; ++i) r.k[i] = 0u;
      return;
    }
    LoadWords(reinterpret_cast<const uint32_t*>(at(base, geo.key_codes_offset, lane_row + tin_of(T) * kRowBytes)), r.k);
  };
  auto load_v = [&](int T, const uint8_t* base, RawT& r) {
    if (!tok_ok(T)) {
#pragma unroll
      for (int i = 0; i < kW; ++i) r.v[i] = 0u;
      r.vscale = 0u;
      return;
    }
    const int tin = tin_of(T);
    LoadWords(reinterpret_cast<const uint32_t*>(at(base, geo.value_codes_offset, lane_row + tin * kRowBytes)), r.v);
    r.vscale = __ldg(reinterpret_cast<const uint32_t*>(at(base, geo.value_scales_offset, (tin + lt) * 4)));
  };

  // Sink buffer of this sequence: K [n_layers][n_sink_cap][n_kv][hd], then V.
  const int64_t sink_row = static_cast<int64_t>(n_kv) * kHeadDim;
  const uint16_t* sink_k = nullptr;
  const uint16_t* sink_v = nullptr;
  if (n_stiles > 0) {
    sink_k = kv.sink[b] + static_cast<int64_t>(p.layer) * n_sink_cap * sink_row + hk_c * kHeadDim;
    sink_v = sink_k + static_cast<int64_t>(geo.n_layers) * n_sink_cap * sink_row;
  }

  // Key-outlier cursor of block `lb`: its entries for this warp's KV head and, when tin > 0 (a split
  // that starts inside a block; splits start on any tile), the first entry of a token >= tin
  // (entries are sorted by token).
  int kcur = 0, kcount = 0;
  const uint32_t* kents = nullptr;
  auto key_cursor = [&](const uint8_t* lb, int tin) {
    const uint32_t* dir = reinterpret_cast<const uint32_t*>(lb + geo.key_outlier_dir_offset) + 2 * hk;
    const int first = static_cast<int>(dir[0]);
    kcount = static_cast<int>(dir[1]);
    kents = reinterpret_cast<const uint32_t*>(lb - static_cast<int64_t>(p.layer) * geo.layer_bytes +
                                              geo.fixed_bytes) + first;
    kcur = 0;
    if (tin != 0) {
      // 32 probes per round (a binary search was ~9 dependent loads at each split start: 6% of
      // the kernel's stall samples at 1K tokens; H200, 2026-12-01). The answer stays in
      // [lo, hi]; the probes below tin are a prefix.
      int lo = 0, hi = kcount;
      while (lo < hi) {
        const int step = (hi - lo + 31) / 32;
        const int probe = lo + lane * step;
        const bool below = probe < hi && static_cast<int>(__ldg(kents + probe) & 0xffu) < tin;
        const int nb = __popc(__ballot_sync(0xffffffffu, below));
        if (nb == 0) break;  // entry lo is the first >= tin
        const int last = lo + (nb - 1) * step;  // the last probe below tin
        lo = last + 1;
        hi = min(hi, last + step);  // the probe after it (when there was one) is >= tin
      }
      kcur = lo;
    }
  };

  RawT cur;
  // Base of the block holding the current block tile, carried from tile to tile (the block table
  // is read once per block, one tile ahead: at the last tile of a block, for the next one).
  const uint8_t* blk_base = active && n_tiles > 0 ? base_of(blk0) : nullptr;
  if (active && n_tiles > 0) {
    load_k(0, blk_base, cur);
    load_v(0, blk_base, cur);
    // Block tile 0's cursor before the barrier and the cos/sin table rather than inside the tile,
    // where its dependent loads (directory, probes) stood between the table and the keys.
    if (key_outliers) key_cursor(blk_base, j_begin % kKvBlockTokens);
  }
  __syncthreads();

  for (int T = -n_stiles; T < n_tiles; ++T) {
    const bool sink_tile = T < 0;
    const int ts = T + n_stiles;                       // sink tile index (when sink_tile)
    const int j = j_begin + T * kTile;                 // block token (when !sink_tile)
    const int tin = sink_tile ? 0 : j % kKvBlockTokens;
    const int n_valid = sink_tile ? min(kTile, n_sink - ts * kTile) : min(kTile, j_end - j);
    const int tig = sink_tile ? ts : T % kGroupTiles;  // tile in its cos/sin group

    // ---- cos/sin table of the group (CTA-wide): sinks form one group of <= 4 tiles. ----
    if ((sink_tile ? T == -n_stiles : (T % kGroupTiles) == 0) && (!(kLutAblate & 4) || T == -n_stiles || T == 0)) {
      const bool rot = sink_tile || rope;
      // Entries at absolute positions (rot_tab: the same bits whichever split or shard computes
      // them); rows of 8 positions from the absolute group of gpos, 9 rows when gpos is not a
      // multiple of 8. The anchors need no barrier before them: only the rows below read them,
      // each thread's anchors are its own, and the last rows were built before the previous
      // group's closing barrier. One barrier then keeps the rows from overwriting the table
      // before every warp has finished the previous group's tiles, and makes the anchors visible.
      const int64_t gpos = sink_tile ? first_pos : blk_pos0 + j;
      if (rot) {
        rot_tab.Anchor(gpos, /*restart=*/sink_tile || T == 0, kv.rope_inv_freq,
                       static_cast<const float2*>(kv.rope_anchors), kv.rope_anchor_count, tid, blockDim.x);
      }
      if (!(kLutAblate & 64)) __syncthreads();
      if (!(kLutAblate & 32)) BuildGroupTable<kHalf, Cfg::kCsStride>(cs_s, rot_tab, rot, gpos, tid, blockDim.x);
      if (!(kLutAblate & 64)) __syncthreads();
    }
    if (!active) continue;

    const uint8_t* lb = sink_tile ? nullptr : blk_base;
    // Next block tile's block (the current one unless this tile ends a block).
    const bool next_block = !sink_tile && tin + kTile == kKvBlockTokens;
    const uint8_t* nb = !sink_tile && next_block && T + 1 < n_tiles ? block_base(T + 1) : lb;
    if (!sink_tile) blk_base = nb;
    // Key-outlier cursor at each block start after the first (block tile 0's: before the loop).
    if (!sink_tile && key_outliers && T > 0 && tin == 0) key_cursor(lb, 0);
    // The lane's first key-outlier entry of this tile, loaded before the key decode (as the value
    // head starts are) so the scan below does not wait for it: that wait was 5% of the stall
    // samples; loaded early, Llama-3-8B nuq3-1% at 1M 1,120 -> 1,085 us, LLaMA-2-7B 4,340 ->
    // 4,182, SmolLM2 325 -> 317 (H200, same call, 2026-12-02 18:29 UTC).
    uint32_t kent0 = 0;
    if (!sink_tile && key_outliers && kcur + lane < kcount) kent0 = __ldg(kents + kcur + lane);

    // Sinks: zero point 0, range 1 (the block tiles' codes wait in cur).
    const uint32_t vscale = sink_tile ? 0x3c000000u : cur.vscale;

    // ---- 1. keys -> staging: LUT values l (fp16). ----
    __syncwarp();
    if (sink_tile) {
      const int t = ts * kTile + lt;
      const uint4* src = reinterpret_cast<const uint4*>(sink_k + static_cast<int64_t>(t) * sink_row + lh * kHalf);
#pragma unroll
      for (int g8 = 0; g8 < kHalf / 8; ++g8) {
        const uint4 x = t < n_sink ? src[g8] : make_uint4(0, 0, 0, 0);
        const uint32_t xw[4] = {x.x, x.y, x.z, x.w};
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = lh * kHalf + 8 * g8 + 2 * e;
          const float2 za = zr_s[c], zb = zr_s[c + 1];
          w[e] = t < n_sink ? PackF2((HalfLo(xw[e]) - za.x) * za.y, (HalfHi(xw[e]) - zb.x) * zb.y) : 0u;
        }
        *reinterpret_cast<uint4*>(stage + (srow ^ (g8 << 4))) =
            make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
      uint32_t kt[4];
      if constexpr (SlicedCodes(kBits)) LoadByteTable(kpair_s, kt);
#pragma unroll
      for (int g8 = 0; g8 < kHalf / 8; ++g8) {
        const uint32_t x = Codes8<kBits>(cur.k, g8);
        uint32_t w[4];
        if constexpr (SlicedCodes(kBits)) {
          Decode8(kt, x, w);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) w[e] = kpair_s[(x >> (2 * e * kBits)) & (kPairs - 1)];
        }
        *reinterpret_cast<uint4*>(stage + (srow ^ (g8 << 4))) =
            make_uint4(w[0], w[1], w[2], w[3]);
      }
      load_k(T + 1, nb, cur);
      // Outlier data of the next tile into L1 now: its loads are dependent chains (directory ->
      // entries, index -> value) that would otherwise put two or three memory round trips on
      // every tile's critical path.
      if (T + 1 < n_tiles) {
        if (key_outliers) {
          if (next_block) {
            if (lane == 0) PrefetchL1(nb + geo.key_outlier_dir_offset + 8 * hk);
          } else if (lane < 2 && kcur + 32 * lane < kcount) {
            PrefetchL1(kents + kcur + 32 * lane);
          }
        }
        if (k_v > 0) {
          const int t0 = (tin + kTile) & (kKvBlockTokens - 1);
          if (lane * 128 < kTile * vo_row) {
            PrefetchL1(at(nb, geo.value_outlier_index_offset, t0 * vo_row + lane * 128));
          }
          if (lane * 128 < kTile * k_v * 2) {
            PrefetchL1(at(nb, geo.value_outlier_value_offset, t0 * k_v * 2 + lane * 128));
          }
          if (walk_starts && lane >= 30 && hk + lane - 30 < n_kv) {
            PrefetchL1(at(nb, geo.value_outlier_head_start_offset, (hk + lane - 30) * kKvBlockTokens + t0));
          }
        }
      }
      // Key outliers of this tile replace their element by (x - z) / r.
      if (key_outliers) {
        __syncwarp();
        bool first = true;
        while (true) {
          const int e = kcur + lane;
          bool in = false;
          uint32_t ent = 0;
          if (e < kcount) {
            ent = first ? kent0 : __ldg(kents + e);
            in = static_cast<int>(ent & 0xffu) < tin + kTile;
          }
          first = false;
          if (in) {
            const int t = static_cast<int>(ent & 0xffu) - tin, c = static_cast<int>((ent >> 8) & 0xffu);
            const float2 zr = zr_s[c];
            *reinterpret_cast<uint16_t*>(stage + StageOff<kHeadDim>(t, c >> 3) + (c & 7) * 2) =
                ClampedHalf((HalfLo(ent >> 16) - zr.x) * zr.y);
          }
          const int n = __popc(__ballot_sync(0xffffffffu, in));
          kcur += n;
          if (n < 32) break;
        }
      }
    }
    __syncwarp();

    // ---- 2. S = (l o cos) Q1 + (l o sin) Q2 + cos Zc + sin Zs ----
    // Two independent accumulators (cos and sin terms): one chain of 24 dependent mma would put
    // ~24 mma latencies on the tile's critical path; four chains cost 8 more registers, which the
    // kernel at its 128-register cap pays in spills: two are ~3% faster than four (H200, 1M,
    // nuq2/3/4-1%, 2026-12-01), and one CTA per SM with no register cap is 37% slower (the
    // kernel is bound by latency and needs the 16 warps per SM that 128 registers allow).
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    {
      float sb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const int row = (lane & 7) + ((lane >> 3) & 1) * 8, csel = lane >> 4;
      const uint32_t sbase = SmemAddr(stage);
      const uint32_t* cs = cs_s + (tig * 32 + lane) * Cfg::kCsStride;
#pragma unroll
      for (int jj = 0; jj < kHC; ++jj) {
        uint32_t lo[4], hi[4];
        Ldsm4(sbase + StageOff<kHeadDim>(row, 2 * jj + csel), lo);
        Ldsm4(sbase + StageOff<kHeadDim>(row, 2 * (jj + kHC) + csel), hi);
        const uint4 c4 = *reinterpret_cast<const uint4*>(cs + jj * 8);
        const uint4 s4 = *reinterpret_cast<const uint4*>(cs + jj * 8 + 4);
        const uint32_t cw[4] = {c4.x, c4.y, c4.z, c4.w};
        const uint32_t sw[4] = {s4.x, s4.y, s4.z, s4.w};
        const uint4 q2v = q2b_s[jj * 32 + lane];
        uint32_t a[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = HMul2(lo[r], cw[r]);
        Mma(s, a, q1[jj][0], q1[jj][1]);
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = HMul2(lo[r], sw[r]);
        Mma(sb, a, q2v.x, q2v.y);
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = HMul2(hi[r], cw[r]);
        Mma(s, a, q1[jj + kHC][0], q1[jj + kHC][1]);
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = HMul2(hi[r], sw[r]);
        Mma(sb, a, q2v.z, q2v.w);
        const uint4 z4 = zb_s[jj * 32 + lane];
        if (!(kLutAblate & 16)) {
          Mma(s, cw, z4.x, z4.y);
          Mma(sb, sw, z4.z, z4.w);
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) s[r] += sb[r];
    }
    __syncwarp();

    // ---- 3. values -> staging: LUT values (sinks: the fp16 values, r = 1, zp = 0). ----
    if (sink_tile) {
      const int t = ts * kTile + lt;
      const uint4* src = reinterpret_cast<const uint4*>(sink_v + static_cast<int64_t>(t) * sink_row + lh * kHalf);
#pragma unroll
      for (int g8 = 0; g8 < kHalf / 8; ++g8) {
        *reinterpret_cast<uint4*>(stage + (srow ^ (g8 << 4))) =
            t < n_sink ? src[g8] : make_uint4(0, 0, 0, 0);
      }
    } else {
      // This token's value-outlier range in this head (head starts), loaded before the value
      // decode hides their latency: 3% faster than loading them after it, where the walk waited on
      // them (H200, 2026-12-02; held in a register from one tile ahead instead: 0.3-1.3% slower,
      // the register lives through the scores and costs spills).
      int vo0 = 0, vo1 = 0;
      if (walk_starts && lt < n_valid) {
        const uint8_t* hs = at(lb, geo.value_outlier_head_start_offset, hk * kKvBlockTokens + tin + lt);
        vo0 = __ldg(hs);
        vo1 = hk + 1 < n_kv ? __ldg(hs + kKvBlockTokens) : k_v;
      }
      uint32_t vt[4];
      if constexpr (SlicedCodes(kBits)) LoadByteTable(vpair_s, vt);
#pragma unroll
      for (int g8 = 0; g8 < kHalf / 8; ++g8) {
        const uint32_t x = Codes8<kBits>(cur.v, g8);
        uint32_t w[4];
        if constexpr (SlicedCodes(kBits)) {
          Decode8(vt, x, w);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) w[e] = vpair_s[(x >> (2 * e * kBits)) & (kPairs - 1)];
        }
        *reinterpret_cast<uint4*>(stage + (srow ^ (g8 << 4))) =
            make_uint4(w[0], w[1], w[2], w[3]);
      }
      if (k_v > 0) {
        __syncwarp();
        const int t = tin + lt;
        if (lt < n_valid) {
          const float vzp = HalfLo(vscale), vr = HalfHi(vscale);
          const uint8_t* idx = at(lb, geo.value_outlier_index_offset, t * vo_row);
          const uint16_t* val = reinterpret_cast<const uint16_t*>(at(lb, geo.value_outlier_value_offset, t * k_v * 2));
          auto patch_x = [&](int e, uint16_t xbits) {
            const int c = e % kHeadDim;
            const float x = __half2float(__ushort_as_half(xbits));
            // (Times a reciprocal of vr taken once per token: no faster; H200, 2026-12-02.)
            *reinterpret_cast<uint16_t*>(stage + StageOff<kHeadDim>(lt, c >> 3) + (c & 7) * 2) =
                ClampedHalf((x - vzp) / vr);
          };
          auto patch = [&](int e, int o) { patch_x(e, val[o]); };
          // The token's entries, split between its two lanes; each load waits for the previous
          // (ncu, 2026-12-01: 14% of the stall samples; without the patching the kernel is 15%
          // faster). Tried and slower (H200): four index loads issued before any is used,
          // 1,311-1,314 against 1,277 us; each 64-token group's rows copied into shared memory by
          // the CTA, 1,341-1,351 us; 2026-12-02: the tile's entries over all 32 lanes, every lane's
          // index and value loads issued first, 1,434 against 1,206 us, and the same with 16-byte
          // loads (8 entries per lane), 1,390 us (both executed 20% more instructions); two
          // 16-bit indices per 32-bit load, no faster (1,170-1,175 us either way); each lane's next
          // index loaded before the current one is used, 1,192 against 1,157 us.
          // One loop per index width (the width test and the second load out of the loop), the
          // index walked by pointer.
          auto scan = [&](auto* ip) {
            for (int o = lh; o < k_v; o += 2) {
              const int e = ip[o];
              if (e / kHeadDim == hk) patch(e, o);
            }
          };
          // With head starts (block_layout.h: k_v > n_kv_heads), only this head's entries
          // [start[hk][t], start[hk + 1][t]): ~k_v / n_kv per token instead of k_v, each entry's
          // index and value loaded together (their addresses no longer wait for a comparison).
          auto walk = [&](auto* ip) {
            for (int o = vo0 + lh; o < vo1; o += 2) {
              const int e = ip[o];
              const uint16_t xbits = val[o];
              patch_x(e, xbits);
            }
          };
          // Four arms, not one loop body per index width with the walk/scan test inside: that
          // shorter form computed a flag per tile and was 1% slower (Llama-3-8B nuq3-1% 1M 1,109
          // against 1,120 us, LLaMA-2-7B 4,290 against 4,340; H200, same call, 2026-12-02).
          if ((kLutAblate & 128) && walk_starts) {
            if (vo1 - vo0 > 200) patch(vo0, 0);  // keeps the head-start loads, never taken
          } else if (walk_starts) {
            if (geo.value_outlier_index_bytes == 1) {
              walk(idx);
            } else {
              walk(reinterpret_cast<const uint16_t*>(idx));
            }
          } else if (geo.value_outlier_index_bytes == 1) {
            scan(idx);
          } else {
            scan(reinterpret_cast<const uint16_t*>(idx));
          }
        }
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
    // Exp2, not exp2f: the latter's denormal path was 18 instructions per tile (ncu, 2026-12-02).
    const float corr0 = Exp2(m0 - mn0), corr1 = Exp2(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    const float p0 = Exp2(s[0] - mn0), p1 = Exp2(s[1] - mn1);
    const float p2 = Exp2(s[2] - mn0), p3 = Exp2(s[3] - mn1);
    // Per-token value scaling of tokens g and g+8 (held by staging lanes g and g+8).
    const uint32_t vs_g = __shfl_sync(0xffffffffu, vscale, g);
    const uint32_t vs_g8 = __shfl_sync(0xffffffffu, vscale, g + 8);
    if (!sink_tile) load_v(T + 1, nb, cur);
    const float zg = HalfLo(vs_g), rg = HalfHi(vs_g), zg8 = HalfLo(vs_g8), rg8 = HalfHi(vs_g8);
    l0 = fmaf(l0, corr0, p0 + p2);
    l1 = fmaf(l1, corr1, p1 + p3);
    z0 = fmaf(z0, corr0, fmaf(p0, zg, p2 * zg8));
    z1 = fmaf(z1, corr1, fmaf(p1, zg, p3 * zg8));
    if (__any_sync(0xffffffffu, corr0 != 1.0f || corr1 != 1.0f)) {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        acc[i][0] *= corr0;
        acc[i][1] *= corr1;
        acc[i][2] *= corr0;
        acc[i][3] *= corr1;
      }
    }
    {
      const float a0 = p0 * rg, a1 = p1 * rg, a2 = p2 * rg8, a3 = p3 * rg8;
      const uint32_t h01 = PackF2(a0, a1), h23 = PackF2(a2, a3);
      *reinterpret_cast<uint32_t*>(pbuf + g * 16 + q4 * 4) = h01;
      *reinterpret_cast<uint32_t*>(pbuf + (g + 8) * 16 + q4 * 4) = h23;
      *reinterpret_cast<uint32_t*>(pbuf + kTile * 16 + g * 16 + q4 * 4) =
          PackF2(a0 - HalfLo(h01), a1 - HalfHi(h01));
      *reinterpret_cast<uint32_t*>(pbuf + kTile * 16 + (g + 8) * 16 + q4 * 4) =
          PackF2(a2 - HalfLo(h23), a3 - HalfHi(h23));
    }
    __syncwarp();

    // ---- 5. O^T += L_V^T . (P r) ----
    {
      uint32_t pb[2], pl[2];
      Ldsm2T(SmemAddr(pbuf) + (lane & 15) * 16, pb);
      Ldsm2T(SmemAddr(pbuf) + kTile * 16 + (lane & 15) * 16, pl);
      const int mi = lane >> 3, r = lane & 7;
      const int row = r + 8 * (mi >> 1), csel = mi & 1;
      const uint32_t sbase = SmemAddr(stage);
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        uint32_t a[4];
        Ldsm4T(sbase + StageOff<kHeadDim>(row, 2 * i + csel), a);
        Mma(acc[i], a, pb[0], pb[1]);
        if (!(kLutAblate & 8)) Mma(acc[i], a, pl[0], pl[1]);
      }
    }
  }

  if (!active) return;
  // ---- Finish: l and the zero-point sums over the lanes of equal q4. ----
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    z0 += __shfl_xor_sync(0xffffffffu, z0, off);
    z1 += __shfl_xor_sync(0xffffffffu, z1, off);
  }
  const int n_splits = gridDim.y;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int head = 2 * q4 + h;
    if (head >= group) continue;
    const float l = h ? l1 : l0, m = h ? m1 : m0, zsum = h ? z1 : z0;
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
      orow[16 * i + g] = (acc[i][h] + zsum) * inv;
      orow[16 * i + g + 8] = (acc[i][2 + h] + zsum) * inv;
    }
  }
}

}  // namespace kvq::kernels::decode_attention_lut_mma
