// Decode attention over a paged KV cache: fp16 keys/values, or KVQuant LUT codes (nuqB and
// intB-pc-pre/post), dequantized in registers in one fused pass.
//
// Math, per sequence s, query head h (kv head hk = h / group), local tokens t of the cache:
//   k_t  = decode(K codes)          fp16: the half; LUT: fmaf(key_lut[code], range_c, zp_c) with
//                                   per-channel (calibrated) scaling; key outliers REPLACE the
//                                   dense value of their (token, channel)
//   k_t' = RoPE(k_t, pos_t)         rotate-half convention (kernels/reference/rope.h); skipped for
//                                   keys stored rotated (post-RoPE formats, plain fp16 baseline);
//                                   sink tokens (fp16, outside blocks) are always rotated
//   v_t  = decode(V codes)          fmaf(value_lut[code], r_t, zp_t) with per-token fp16 scaling;
//                                   value outliers replace their element
//   s_t  = scale * q_h . k_t'       computed as (scale*log2 e * q) . k' so softmax uses exp2
//   o_h  = sum_t exp(s_t - lse) v_t,   lse = log sum_t exp(s_t)    (natural log on output)
// Split-KV: the block tokens of a sequence are cut into block-aligned ranges (grid.y); each CTA
// writes a normalized partial (o, lse) and kernels/merge_attention.cu merges them by
//   lse = log sum_r exp(lse_r), o = sum_r exp(lse_r - lse) o_r — the rule used across GPUs too.
//
// Layout (kvstore/block_layout.h, mirrored by kernels/paged_kv.h): per (block, layer, kv head),
// codes are token-major: the head_dim codes of one token are contiguous, head_dim*B/32 words
// packed as kernels/code_layout.h says (fp16: head_dim halves). Value scales {zp, r} fp16 per
// token; value outliers [token][k_v] (index over all kv heads of the layer, fp16 value); key outliers are
// uint32 entries token | channel << 8 | half << 16 in the block's variable section, sorted by
// token, located through a per-(layer, head) directory {first, count}.
//
// Thread mapping. CTA = (kv head, split, sequence), 4 warps. Every query head of the GQA group
// is handled by the same CTA, so K and V are read once per group. A "slot" of
// kLanesPerToken = head_dim/8 lanes works on one token at a time; lane `lt` of a slot owns the
// 4 RoPE pairs (4lt+k, half+4lt+k), k < 4, i.e. 8 channels, so rotation is lane-local. q, the
// per-channel key scaling and the V accumulators of those 8 channels stay in registers. Each
// slot streams kTokensPerSlot consecutive tokens per step (all loads issued before use), keeps
// its own online-softmax state (m, l, acc) in the log2 domain, and the 8 (hd128) or 16 (hd64)
// slot states are combined through shared memory at the end. Partial dot products are summed
// over the slot's lanes with xor shuffles (full mask; every lane reaches every shuffle).
//
// RoPE angles. A position can be 10M, so pos * inv_freq must not be formed in fp32 (an fp32
// angle near 1e7 rad has an ulp of 1 rad). Per KV block and slot, the angle of the slot's first
// token is formed and reduced in double (double(pos) * inv_freq[i], sincos in double; inv_freq
// is RopeInvFreq() in double, exactly the reference's). Later tokens of the block advance the
// (cos, sin) pair in fp32 by complex multiplication with exp(i*theta) and exp(i*kStep*theta)
// (also from double): at most 256/kStep + kTokensPerSlot multiplications before the next exact
// anchor, i.e. a relative error of a few 1e-7 — far below fp16 key precision. Sink tokens and
// key outliers use a full double-precision angle per element.
//
// Outliers as corrections. A key outlier (t, c, x) adds (x - dense_tc) * (q . R(pos_t) e_c) to
// s_t before the softmax update (the slot's lanes share the token's entries; per-token entry
// ranges come from a binary search over the block's sorted entries, staged in shared memory).
// A value outlier adds p_t * (x - dense) to acc[c] through a per-slot shared-memory buffer
// (atomicAdd), rescaled together with acc when the slot's running max moves.
//
// Variants (explicit table in decode_attention.cu): head_dim {64, 128} (KVQ_CUDA_HEAD_DIMS),
// codec {fp16, LUT 2/3/4 bits} (KVQ_CUDA_BITS), GQA group bucket {1, 4, 8} (runtime group <=
// bucket). Not supported: int per-token formats (per-token key scaling), head_dim other than 64
// or 128, groups larger than 8.
#pragma once

#include <cuda_fp16.h>
#include <math_constants.h>

#include <cstdint>

#include "kernels/code_layout.h"
#include "kernels/decode_attention.h"
#include "kernels/launch.cuh"
#include "kernels/paged_kv.h"

namespace kvq::kernels::decode_attention_internal {

inline constexpr int kWarps = 4;
inline constexpr int kThreads = kWarps * 32;
inline constexpr int kPairsPerLane = 4;
inline constexpr int kKeyOutlierSmem = 1024;  // entries of one (block, layer, head) staged in smem
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

template <int kHeadDim, KvCodec kCodec, int kMaxGroup>
struct Config {
  static constexpr bool kQuant = kCodec != KvCodec::kFp16;
  static constexpr int kBits = kQuant ? static_cast<int>(kCodec) : 16;
  static constexpr int kHalf = kHeadDim / 2;
  static constexpr int kLanesPerToken = kHalf / kPairsPerLane;  // 16 (hd128) or 8 (hd64)
  static constexpr int kSlotsPerWarp = 32 / kLanesPerToken;
  static constexpr int kSlots = kWarps * kSlotsPerWarp;
  // Tokens per slot and step (all their loads are issued before first use). 4 for the compact
  // codes would put more bytes in flight but spills at group 8 (ptxas -v); see the report.
  static constexpr int kTokensPerSlot = 2;
  static constexpr int kStep = kSlots * kTokensPerSlot;
  static_assert(kHeadDim % 32 == 0 && 32 % kLanesPerToken == 0);
  static_assert(kKvBlockTokens % kStep == 0, "block-aligned steps");
  static_assert(kMaxGroup >= 1 && kMaxGroup <= 8);
};

__device__ __forceinline__ float HalfBits(uint32_t bits16) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16 & 0xffffu)));
}

// Codes [first, first + 4) of a token (first a multiple of 4), right-aligned, code k at bits
// [k * CodeStride(kBits), + kBits).
template <int kBits>
__device__ __forceinline__ uint32_t LoadCodeWindow(const uint32_t* words, int first) {
  if constexpr (SlicedCodes(kBits)) {
    const uint32_t* grp = words + kBits * (first >> 5);
    const int j = first & 31;
    return SlicedNibbles8(__ldg(grp), __ldg(grp + 1), kBits == 3 ? __ldg(grp + 2) : 0u, kBits, j >> 3) >> (4 * (j & 7));
  }
  const int bit = first * kBits;
  const int w = bit >> 5, sh = bit & 31;
  return __ldg(words + w) >> sh;  // 4 codes of a stream width that divides 32 (4 bits)
}

// Any single code (for outlier corrections).
__device__ __forceinline__ uint32_t LoadCode(const uint32_t* words, int i, int bits) {
  if (SlicedCodes(bits)) return SlicedCode(words, i, bits);
  const int bit = i * bits;
  const int w = bit >> 5, sh = bit & 31;
  uint32_t x = __ldg(words + w) >> sh;
  if (sh + bits > 32) x = __funnelshift_r(__ldg(words + w), __ldg(words + w + 1), sh);
  return x & ((1u << bits) - 1u);
}

// cos/sin of an angle formed in double (positions up to 10M); out of line to keep the
// double-precision range reduction's registers out of the hot loop.
static __device__ __noinline__ float2 SinCosPrecise(double angle) {
  double s, c;
  sincos(angle, &s, &c);
  return make_float2(static_cast<float>(c), static_cast<float>(s));
}

template <int kLanes>
__device__ __forceinline__ float SlotSum(float v) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// First index in the token-sorted key-outlier entries whose token is >= t.
__device__ __forceinline__ int LowerBoundToken(const uint32_t* ents, int n, int t) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (static_cast<int>(ents[mid] & 0xffu) < t) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Raw (undecoded) data a lane loads for one token: its 8 key and 8 value channels.
template <bool kQuant> struct RawToken;
template <> struct RawToken<false> { uint2 k_lo, k_hi, v_lo, v_hi; };
template <> struct RawToken<true> { uint32_t k_lo, k_hi, v_lo, v_hi, v_scale; };

template <int kHeadDim, KvCodec kCodec, int kMaxGroup>
__global__ void __launch_bounds__(kThreads)
    DecodeAttentionKernel(const DecodeAttentionParams p, const int tokens_per_split,
                          float* __restrict__ part_o, float* __restrict__ part_lse) {
  GridDependencyWait();  // first: see kernels/launch.cuh
  GridDependencyTrigger();
  using Cfg = Config<kHeadDim, kCodec, kMaxGroup>;
  constexpr bool kQuant = Cfg::kQuant;
  constexpr int kBits = Cfg::kBits;
  constexpr int kHalf = Cfg::kHalf;
  constexpr int kLPT = Cfg::kLanesPerToken;
  constexpr int kU = Cfg::kTokensPerSlot;
  constexpr int kStep = Cfg::kStep;
  constexpr int kSlots = Cfg::kSlots;

  __shared__ float q_s[kMaxGroup][kHeadDim];             // q * scale * log2(e)
  __shared__ float slot_s[kSlots][kMaxGroup][kHeadDim];  // value-outlier corrections, then acc
  __shared__ float ml_s[kSlots][kMaxGroup][2];
  __shared__ float klut_s[16], vlut_s[16];
  __shared__ uint32_t kents_s[kQuant ? kKeyOutlierSmem : 1];
  __shared__ int tok_start_s[kQuant ? kKvBlockTokens + 1 : 1];

  const PagedKvCache& kv = p.kv;
  const KvBlockGeometry& geo = kv.geom;
  const int hk = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int n_kv = geo.n_kv_heads;
  const int group = p.n_heads / n_kv;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int lt = lane % kLPT;
  const int slot = warp * Cfg::kSlotsPerWarp + lane / kLPT;
  const bool rope = !kv.keys_rotated;

  const int seq_len = kv.seq_lens[b];
  const int64_t first_pos = kv.first_positions[b];
  const int n_sink_cap = static_cast<int>(
      min(max(static_cast<int64_t>(kv.sink_tokens) - first_pos, int64_t{0}),
          static_cast<int64_t>(kv.sink_tokens)));
  const int n_sink = min(seq_len, n_sink_cap);
  const int n_blk = max(seq_len - n_sink_cap, 0);
  const int j_begin = split * tokens_per_split;
  const int j_end = min(j_begin + tokens_per_split, n_blk);
  const float scale = p.scale > 0.0f ? p.scale : 1.0f / sqrtf(static_cast<float>(kHeadDim));
  const float qscale = scale * kLog2e;
  const int k_v = kQuant ? geo.value_outliers_per_token : 0;

  for (int i = tid; i < kMaxGroup * kHeadDim; i += kThreads) {
    const int gi = i / kHeadDim, c = i % kHeadDim;
    q_s[gi][c] =
        gi < group ? p.q[(static_cast<int64_t>(b) * p.n_heads + hk * group + gi) * kHeadDim + c] *
                         qscale
                   : 0.0f;
  }
  if constexpr (kQuant) {
    constexpr int kC = 1 << kBits;
    if (tid < kC) {
      klut_s[tid] = kv.key_lut[p.layer * kC + tid];
      vlut_s[tid] = kv.value_lut[p.layer * kC + tid];
    }
  }
  for (int i = tid; i < kSlots * kMaxGroup * kHeadDim; i += kThreads) (&slot_s[0][0][0])[i] = 0.0f;
  __syncthreads();

  // Channel of owned element k (0..3: low half, 4..7: high half).
  auto channel = [lt](int k) { return k < 4 ? 4 * lt + k : kHalf + 4 * lt + (k - 4); };

  float qr[kMaxGroup][8];
#pragma unroll
  for (int gi = 0; gi < kMaxGroup; ++gi) {
#pragma unroll
    for (int k = 0; k < 8; ++k) qr[gi][k] = q_s[gi][channel(k)];
  }
  float kzp[8], krg[8];
  if constexpr (kQuant) {
    const int64_t at = (static_cast<int64_t>(p.layer) * n_kv + hk) * kHeadDim;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      kzp[k] = __ldg(kv.key_zero_point + at + channel(k));
      krg[k] = __ldg(kv.key_range + at + channel(k));
    }
  }
  // Per-pair rotation constants: exp(i theta) and exp(i kStep theta), from double.
  double inv[4];
  float e1c[4], e1s[4], esc[4], ess[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    inv[k] = rope || kv.sink_tokens > 0 ? kv.rope_inv_freq[4 * lt + k] : 0.0;
    const float2 r1 = SinCosPrecise(inv[k]);
    const float2 rs = SinCosPrecise(inv[k] * kStep);
    e1c[k] = r1.x;
    e1s[k] = r1.y;
    esc[k] = rs.x;
    ess[k] = rs.y;
  }

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][8];
#pragma unroll
  for (int gi = 0; gi < kMaxGroup; ++gi) {
    m[gi] = -CUDART_INF_F;
    l[gi] = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[gi][k] = 0.0f;
  }

  // Softmax update of the slot with kU tokens: s holds the reduced scores (log2 domain) on entry
  // and the probabilities exp2(s - m) on exit (0 for invalid tokens).
  auto update = [&](float (&s)[kMaxGroup][kU], const float (&vf)[kU][8], const bool (&valid)[kU]) {
#pragma unroll
    for (int gi = 0; gi < kMaxGroup; ++gi) {
      if (gi >= group) break;
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int u = 0; u < kU; ++u) mx = valid[u] ? fmaxf(mx, s[gi][u]) : mx;
      const float m_new = fmaxf(m[gi], mx);
      if (m_new == -CUDART_INF_F) {
#pragma unroll
        for (int u = 0; u < kU; ++u) s[gi][u] = 0.0f;
        continue;
      }
      const float corr = exp2f(m[gi] - m_new);
      float ps = 0.0f;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        s[gi][u] = valid[u] ? exp2f(s[gi][u] - m_new) : 0.0f;
        ps += s[gi][u];
      }
      l[gi] = fmaf(l[gi], corr, ps);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float a = acc[gi][k] * corr;
#pragma unroll
        for (int u = 0; u < kU; ++u) a = fmaf(s[gi][u], vf[u][k], a);
        acc[gi][k] = a;
      }
      if (k_v > 0 && corr != 1.0f) {
#pragma unroll
        for (int k = 0; k < 8; ++k) slot_s[slot][gi][channel(k)] *= corr;
      }
      m[gi] = m_new;
    }
  };

  auto dot = [&](const float (&kf)[kU][8], float (&s)[kMaxGroup][kU]) {
#pragma unroll
    for (int gi = 0; gi < kMaxGroup; ++gi) {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        float a = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) a = fmaf(qr[gi][k], kf[u][k], a);
        s[gi][u] = a;
      }
    }
  };

  // ---- Sink tokens (fp16, pre-RoPE, outside blocks): split 0 only. ----
  if (split == 0 && n_sink > 0) {
    const int64_t L = static_cast<int64_t>(n_kv) * kHeadDim;
    const uint16_t* sink = kv.sink[b];
    const uint16_t* sk = sink + static_cast<int64_t>(p.layer) * n_sink_cap * L + hk * kHeadDim;
    const uint16_t* sv = sk + static_cast<int64_t>(geo.n_layers) * n_sink_cap * L;
    for (int base = 0; base < n_sink; base += kStep) {
      float kf[kU][8], vf[kU][8];
      bool valid[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int t = base + slot * kU + u;
        valid[u] = t < n_sink;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          kf[u][k] = 0.0f;
          vf[u][k] = 0.0f;
          if (valid[u]) {
            kf[u][k] = __half2float(__ushort_as_half(sk[t * L + channel(k)]));
            vf[u][k] = __half2float(__ushort_as_half(sv[t * L + channel(k)]));
          }
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float2 r = SinCosPrecise(static_cast<double>(first_pos + t) * inv[k]);
          const float c = r.x, s = r.y;
          const float a = kf[u][k], bb = kf[u][k + 4];
          kf[u][k] = a * c - bb * s;
          kf[u][k + 4] = bb * c + a * s;
        }
      }
      float s[kMaxGroup][kU];
      dot(kf, s);
#pragma unroll
      for (int gi = 0; gi < kMaxGroup; ++gi) {
#pragma unroll
        for (int u = 0; u < kU; ++u) s[gi][u] = SlotSum<kLPT>(s[gi][u]);
      }
      update(s, vf, valid);
    }
  }

  // ---- Block tokens [j_begin, j_end). ----
  const int64_t kv_row = kv.TableRow(b);
  for (int jb = j_begin; jb < j_end; jb += kKvBlockTokens) {
    const int n_in = min(kKvBlockTokens, j_end - jb);
    const int64_t blk = kv.block_table[kv_row + jb / kKvBlockTokens];
    const uint8_t* block = kv.pool + blk * kv.block_stride_bytes;
    const uint8_t* lbase = block + static_cast<int64_t>(p.layer) * geo.layer_bytes;
    const int64_t pos0 = first_pos + n_sink_cap + jb;
    const int64_t head_tok = static_cast<int64_t>(hk) * kKvBlockTokens;

    const uint32_t* kents = nullptr;
    if constexpr (kQuant) {
      if (geo.has_key_outliers) {
        __syncthreads();  // the previous block's readers of kents_s / tok_start_s are done
        const uint32_t* dir =
            reinterpret_cast<const uint32_t*>(lbase + geo.key_outlier_dir_offset) + 2 * hk;
        const int first = static_cast<int>(dir[0]), count = static_cast<int>(dir[1]);
        const uint32_t* src = reinterpret_cast<const uint32_t*>(block + geo.fixed_bytes) + first;
        if (count <= kKeyOutlierSmem) {
          for (int i = tid; i < count; i += kThreads) kents_s[i] = __ldg(src + i);
          kents = kents_s;
        } else {
          kents = src;
        }
        __syncthreads();
        for (int t = tid; t <= kKvBlockTokens; t += kThreads) {
          tok_start_s[t] = LowerBoundToken(kents, count, t);
        }
        __syncthreads();
      }
    }

    // Exact anchor of the slot's first token in this block.
    float ac[4], as[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 r = rope ? SinCosPrecise(static_cast<double>(pos0 + slot * kU) * inv[k])
                            : make_float2(1.0f, 0.0f);
      ac[k] = r.x;
      as[k] = r.y;
    }

    for (int it = 0; it * kStep < n_in; ++it) {
      const int t0 = it * kStep + slot * kU;
      RawToken<kQuant> raw[kU];
      bool valid[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int t = t0 + u;
        valid[u] = t < n_in;
        if (!valid[u]) {
          raw[u] = {};
          continue;
        }
        const uint8_t* kt = lbase + geo.key_codes_offset +
                            (head_tok + t) * geo.key_words_per_token * 4;
        const uint8_t* vt = lbase + geo.value_codes_offset +
                            (head_tok + t) * geo.value_words_per_token * 4;
        if constexpr (kQuant) {
          const uint32_t* kw = reinterpret_cast<const uint32_t*>(kt);
          const uint32_t* vw = reinterpret_cast<const uint32_t*>(vt);
          raw[u].k_lo = LoadCodeWindow<kBits>(kw, 4 * lt);
          raw[u].k_hi = LoadCodeWindow<kBits>(kw, kHalf + 4 * lt);
          raw[u].v_lo = LoadCodeWindow<kBits>(vw, 4 * lt);
          raw[u].v_hi = LoadCodeWindow<kBits>(vw, kHalf + 4 * lt);
          raw[u].v_scale =
              __ldg(reinterpret_cast<const uint32_t*>(lbase + geo.value_scales_offset) + t);
        } else {
          raw[u].k_lo = __ldg(reinterpret_cast<const uint2*>(kt) + lt);
          raw[u].k_hi = __ldg(reinterpret_cast<const uint2*>(kt + kHalf * 2) + lt);
          raw[u].v_lo = __ldg(reinterpret_cast<const uint2*>(vt) + lt);
          raw[u].v_hi = __ldg(reinterpret_cast<const uint2*>(vt + kHalf * 2) + lt);
        }
      }

      float kf[kU][8], vf[kU][8];
      float cc[4], ss[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        cc[k] = ac[k];
        ss[k] = as[k];
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if constexpr (kQuant) {
          constexpr uint32_t kMask = (1u << kBits) - 1u;
          constexpr int kStride = CodeStride(kBits);
          const float vzp = HalfBits(raw[u].v_scale), vr = HalfBits(raw[u].v_scale >> 16);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            kf[u][k] = fmaf(klut_s[(raw[u].k_lo >> (k * kStride)) & kMask], krg[k], kzp[k]);
            kf[u][k + 4] =
                fmaf(klut_s[(raw[u].k_hi >> (k * kStride)) & kMask], krg[k + 4], kzp[k + 4]);
            vf[u][k] = fmaf(vlut_s[(raw[u].v_lo >> (k * kStride)) & kMask], vr, vzp);
            vf[u][k + 4] = fmaf(vlut_s[(raw[u].v_hi >> (k * kStride)) & kMask], vr, vzp);
          }
        } else {
          const uint32_t kw[4] = {raw[u].k_lo.x, raw[u].k_lo.y, raw[u].k_hi.x, raw[u].k_hi.y};
          const uint32_t vw[4] = {raw[u].v_lo.x, raw[u].v_lo.y, raw[u].v_hi.x, raw[u].v_hi.y};
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            kf[u][2 * w] = HalfBits(kw[w]);
            kf[u][2 * w + 1] = HalfBits(kw[w] >> 16);
            vf[u][2 * w] = HalfBits(vw[w]);
            vf[u][2 * w + 1] = HalfBits(vw[w] >> 16);
          }
        }
        if (rope) {
          if (u > 0) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const float c = cc[k] * e1c[k] - ss[k] * e1s[k];
              ss[k] = ss[k] * e1c[k] + cc[k] * e1s[k];
              cc[k] = c;
            }
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float a = kf[u][k], bb = kf[u][k + 4];
            kf[u][k] = a * cc[k] - bb * ss[k];
            kf[u][k + 4] = bb * cc[k] + a * ss[k];
          }
        }
      }

      float s[kMaxGroup][kU];
      dot(kf, s);

      if constexpr (kQuant) {
        if (geo.has_key_outliers) {
          const uint32_t* kcodes = reinterpret_cast<const uint32_t*>(lbase + geo.key_codes_offset);
          const int64_t zp_at = (static_cast<int64_t>(p.layer) * n_kv + hk) * kHeadDim;
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            if (!valid[u]) continue;
            const int t = t0 + u;
            const int e_end = tok_start_s[t + 1];
            for (int e = tok_start_s[t] + lt; e < e_end; e += kLPT) {
              const uint32_t ent = kents[e];
              const int c = static_cast<int>((ent >> 8) & 0xffu);
              const uint32_t code =
                  LoadCode(kcodes + (head_tok + t) * geo.key_words_per_token, c, kBits);
              const float dense = fmaf(klut_s[code], __ldg(kv.key_range + zp_at + c),
                                       __ldg(kv.key_zero_point + zp_at + c));
              const float delta = HalfBits(ent >> 16) - dense;
              const int pi = c % kHalf;
              float cs = 1.0f, sn = 0.0f;
              if (rope) {
                const float2 r = SinCosPrecise(static_cast<double>(pos0 + t) * kv.rope_inv_freq[pi]);
                cs = r.x;
                sn = r.y;
              }
#pragma unroll
              for (int gi = 0; gi < kMaxGroup; ++gi) {
                float f;
                if (!rope) {
                  f = q_s[gi][c];
                } else if (c < kHalf) {
                  f = q_s[gi][c] * cs + q_s[gi][c + kHalf] * sn;
                } else {
                  f = q_s[gi][c] * cs - q_s[gi][c - kHalf] * sn;
                }
                s[gi][u] = fmaf(delta, f, s[gi][u]);
              }
            }
          }
        }
      }

#pragma unroll
      for (int gi = 0; gi < kMaxGroup; ++gi) {
#pragma unroll
        for (int u = 0; u < kU; ++u) s[gi][u] = SlotSum<kLPT>(s[gi][u]);
      }
      update(s, vf, valid);

      if constexpr (kQuant) {
        if (k_v > 0) {
          __syncwarp();
          const int ib = geo.value_outlier_index_bytes;
          const uint32_t* vcodes =
              reinterpret_cast<const uint32_t*>(lbase + geo.value_codes_offset);
#pragma unroll
          for (int u = 0; u < kU; ++u) {
            if (!valid[u]) continue;
            const int t = t0 + u;
            const uint8_t* idx = lbase + geo.value_outlier_index_offset +
                                 static_cast<int64_t>(t) * k_v * ib;
            const uint16_t* val = reinterpret_cast<const uint16_t*>(
                lbase + geo.value_outlier_value_offset + static_cast<int64_t>(t) * k_v * 2);
            const float vzp = HalfBits(raw[u].v_scale), vr = HalfBits(raw[u].v_scale >> 16);
            for (int o = lt; o < k_v; o += kLPT) {
              const int e = ib == 1 ? idx[o] : reinterpret_cast<const uint16_t*>(idx)[o];
              if (e / kHeadDim != hk) continue;
              const int c = e % kHeadDim;
              const uint32_t code =
                  LoadCode(vcodes + (head_tok + t) * geo.value_words_per_token, c, kBits);
              const float delta = HalfBits(val[o]) - fmaf(vlut_s[code], vr, vzp);
#pragma unroll
              for (int gi = 0; gi < kMaxGroup; ++gi) {
                if (gi < group) atomicAdd(&slot_s[slot][gi][c], s[gi][u] * delta);
              }
            }
          }
          __syncwarp();
        }
      }

      if (rope) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float c = ac[k] * esc[k] - as[k] * ess[k];
          as[k] = as[k] * esc[k] + ac[k] * ess[k];
          ac[k] = c;
        }
      }
    }
  }

  // ---- Combine the slots of the CTA and write the (normalized) partial. ----
  __syncwarp();
#pragma unroll
  for (int gi = 0; gi < kMaxGroup; ++gi) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      float* cell = &slot_s[slot][gi][channel(k)];
      *cell = acc[gi][k] + (k_v > 0 ? *cell : 0.0f);
    }
    if (lt == 0) {
      ml_s[slot][gi][0] = m[gi];
      ml_s[slot][gi][1] = l[gi];
    }
  }
  __syncthreads();
  const int n_splits = gridDim.y;
  for (int i = tid; i < group * kHeadDim; i += kThreads) {
    const int gi = i / kHeadDim, c = i % kHeadDim;
    float mx = -CUDART_INF_F;
#pragma unroll
    for (int sl = 0; sl < kSlots; ++sl) mx = fmaxf(mx, ml_s[sl][gi][0]);
    float den = 0.0f, num = 0.0f;
    if (mx != -CUDART_INF_F) {
#pragma unroll
      for (int sl = 0; sl < kSlots; ++sl) {
        const float w = exp2f(ml_s[sl][gi][0] - mx);
        den = fmaf(ml_s[sl][gi][1], w, den);
        num = fmaf(slot_s[sl][gi][c], w, num);
      }
    }
    const float oval = den > 0.0f ? num / den : 0.0f;
    const float lse = den > 0.0f ? (mx + log2f(den)) * kLn2 : -CUDART_INF_F;
    const int64_t row = static_cast<int64_t>(b) * p.n_heads + hk * group + gi;
    if (part_o != nullptr) {
      part_o[(row * n_splits + split) * kHeadDim + c] = oval;
      if (c == 0) part_lse[row * n_splits + split] = lse;
    } else {
      p.o[row * kHeadDim + c] = oval;
      if (c == 0) p.lse[row] = lse;
    }
  }
}

}  // namespace kvq::kernels::decode_attention_internal
