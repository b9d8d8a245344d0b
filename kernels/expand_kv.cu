// ExpandKv (kernels/prefill_attention.h): a sequence's paged quantized cache -> contiguous fp16 K
// (RoPE applied) and V, the input of PrefillAttention over a cached past.
//
// ExpandKvKernel. CTA = 32 local tokens x a group of kv heads (grid.y groups), looping over its
// heads (the tokens' cos/sin are formed once per CTA: the angle reduced to [-pi, pi] in double,
// then sincosf, and serve its heads). Per head, in units of 8 channels (16-byte loads and stores):
// dense keys decoded into a shared fp32 tile, __syncthreads, the key outliers of the (at most two)
// blocks the tile touches replace their elements, __syncthreads, RoPE in rotate-half pairs and one
// fp16 rounding on the way out. Values are written dense first; their outliers (indexed over all
// heads of the layer; each CTA applies those of its own heads) overwrite them once its heads are
// out, after a __syncthreads (a CTA's global writes are visible to it after the barrier).
#include "kernels/code_layout.h"
#include "kernels/prefill_attention.h"  // ExpandKvParams, LaunchExpandKv

#include <cuda_fp16.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"

namespace kvq::kernels {
namespace {

using internal::Aligned16;

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

// The 8 codes [8 g, 8 g + 8) of a token's `bits`-bit codes (kernels/code_layout.h), right-aligned,
// code e at bits [e * CodeStride(bits), + bits).
__device__ __forceinline__ uint32_t Codes8At(const uint32_t* words, int g, int bits) {
  if (SlicedCodes(bits)) {
    const uint32_t* grp = words + bits * (g >> 2);
    return SlicedNibbles8(__ldg(grp), __ldg(grp + 1), bits == 3 ? __ldg(grp + 2) : 0u, bits, g & 3);
  }
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
          const int stride = CodeStride(bits);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            kx[e] = fmaf(klut_s[(kc >> (e * stride)) & cmask], kr_s[c0 + e], kz_s[c0 + e]);
            vx[e] = fmaf(vlut_s[(vc >> (e * stride)) & cmask], vr, vz);
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

}  // namespace

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

}  // namespace kvq::kernels
