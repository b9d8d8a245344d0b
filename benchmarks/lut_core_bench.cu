// Roofline probe for the LUT decode-attention kernel (kernels/decode_attention_lut_mma.cuh): what
// its dense per-tile work costs at long context, layer by layer, on the kernel's own occupancy
// (256-thread CTAs, 128 registers, the same shared memory per CTA: 16 warps per SM). Not a kernel
// kvq serves with: every tile is full, codes are random, there are no outliers, sinks, block
// table, cos/sin group refills or bounds — so the gap between its last mode and the real kernel
// (kernels_bench, same shape) is what that bookkeeping costs, and the gaps between its modes are
// what each stage of the dense core costs. Modes, each adding one stage to the one before:
//   copy     each lane loads its token's key and value code words one tile ahead (the kernel's
//            access pattern) and folds them into a checksum: the memory floor of this pattern;
//   decode   + the pair-table LUT lookups of keys and values (one shared load per two codes)
//            summed in half2 (no staging);
//   stage    + the kernel's dense tile: keys and values through the XOR-swizzled fp16 staging
//            tile, ldmatrix, the cos/sin multiplies, 24 score mma and 16 P·V mma (P constant);
//   softmax  + the online softmax (max over the group, exp2, running sums, rescale, P hi/lo);
//   decode-rep   decode, with each table replicated per lane (entry i of lane l at word 32 i + l:
//            no bank conflicts; 8 KB per table, in the unused per-warp areas);
//   decode-prmt  decode, with the LUT in registers (byte tables, PRMT) instead of shared memory,
//            the 3-bit codes read as a bit-sliced layout (Word8) that makes PRMT selectors in 3-4
//            integer instructions per 8 codes;
//   frag     softmax, with keys and values decoded by decode-prmt straight into the mma A fragments
//            (no staging, no ldmatrix for either: the layout a fragment-ordered block format would
//            give); cos/sin, q and P operands as in the kernel;
//   frag-norope  frag without the RoPE terms (8 score mma on the LUT values and q, no cos/sin
//            multiplies, no cos/sin, Q2 or zero-point operand loads): what the rotation costs;
//   frag-regops  frag with the cos/sin, Q2 and zero-point operands taken from registers instead of
//            the 8 16-byte shared loads per tile (same multiplies and mma): what those loads cost;
//   stage-prmt  softmax with the staging tile filled by decode-prmt's register LUT instead of the
//            shared pair table: what the kernel does at 3 bits since the bit-sliced layout
//            (kernels/code_layout.h); the modes before it read the LSB-first stream of before;
//   stage-out  stage-prmt with outliers as the LUT decode kernel handles them: each tile's key and
//            value outlier entries (20 each per head and tile: nuq3-1% of Llama-3-8B, 1% of the
//            keys and k_v = 10 values per token over 8 heads) patched into the staging tile;
//   frag-out frag with the same outliers as sparse corrections, the design a fragment-ordered
//            format needs (no staging tile to patch): a key outlier adds dl (cos Q1 + sin Q2) to
//            its token's scores (shared-memory integer atomics on fixed-point sums, added before
//            the softmax), a value outlier adds P dl to a per-warp output delta (rescaled with the
//            accumulators, added at the end), dl being the outlier's LUT-domain value minus the
//            clamped extreme's. So frag-out against stage-out is what the format change would gain
//            with outliers, the number to have before building it (stage-out/frag-out read ~10%
//            more bytes than the floor counts: the entries). In every outlier mode each lane's
//            entries are loaded one tile ahead, like the codes;
//   regk-out stage-out with only the keys in fragment order: a channel permutation within each
//            token puts the 32 channels a lane's A fragments need in one 3-bit group of 32 codes, so
//            each lane loads that group (3 words) of tokens g and g + 8 and decodes them by PRMT
//            straight into registers; key outliers as frag-out's score corrections, values staged
//            and patched as today. The smaller format change (keys only, tokens stay contiguous);
//   frag8-norope  frag-norope with keys and values decoded by PRMT to e4m3 bytes (one PRMT per
//            4 codes, the byte table being the LUT itself) and multiplied on the fp8 tensor-core
//            path (mma m16n8k32 e4m3): q and P in two e4m3 parts each (hi, lo), 32 tokens per step
//            (k = 32 for P.V), P through shared memory as bytes. Not a kernel kvq could serve as
//            written (LUT entries on the e4m3 grid, two-part q and P: ~7 significant bits, RoPE
//            left out since fp8 has no elementwise multiply); it asks whether decoding to one byte
//            per code makes the dense core cheaper. On sm_90 it does not: mma.sync has no native
//            e4m3 path there (ptxas emits F2FP.F16.E4M3.UNPACK_B conversions, fp16 HMMA.16816 and
//            the FADDs that join them), so the PRMTs saved are spent again (H200, 2026-12-03:
//            380.5 / 383.5 us against frag-norope's 383.2 / 384.6, 421 against 433 instructions
//            per warp-tile). Native fp8 on Hopper is wgmma only, whose operands span a warpgroup;
//   regk     softmax, with the keys decoded straight into the mma A fragments (no key staging, no
//            ldmatrix): each lane loads the 3 code words of its 32 channels of tokens g and g+8 (the
//            layout a channel permutation shared by fragments, q and cos/sin would give) and looks
//            up its pairs; values still staged (they need the transpose).
// Shape: Llama-3-8B (8 KV heads x 128, 4 query heads per KV head), nuq3 (12 code words per token
// and head for keys, as many for values).
//
//   lut_core_bench [--tokens=1048576] [--iters=20] [--modes=copy,decode,decode-rep,decode-prmt,stage,softmax,regk,frag,frag-norope,frag-regops,stage-prmt,stage-out,frag-out,regk-out,frag8-norope,wg8-norope]
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "benchmarks/bench_cuda_check.h"
#include "kernels/decode_attention_lut_mma.cuh"

namespace {

namespace dm = kvq::kernels::decode_attention_mma;
namespace lm = kvq::kernels::decode_attention_lut_mma;


constexpr int kHd = 128, kBits = 3, kHeads = 8;
constexpr int kW = kHd / 2 * kBits / 32;  // words per half row (6)
constexpr int kRowWords = 2 * kW;
constexpr int kPairs = 64;
constexpr int kChunks = kHd / 16, kHC = kChunks / 2;
constexpr int kCsStride = kHC * 8 + 4;
using Cfg = lm::LutMmaCfg<kHd, kBits>;  // the real kernel's shared memory, for its occupancy

enum Mode { kCopy = 0, kDecode = 1, kStage = 2, kSoftmax = 3, kRegK = 4, kDecodeRep = 5, kDecodePrmt = 6, kFrag = 7, kFragNoRope = 8, kFragRegOps = 9, kStagePrmt = 10, kStageOut = 11, kFragOut = 12, kRegKOut = 13, kFrag8 = 14 };
__host__ __device__ constexpr bool IsFrag(int m) { return m == kFrag || m == kFragNoRope || m == kFragRegOps || m == kFragOut; }
__host__ __device__ constexpr bool IsStagePrmt(int m) { return m == kStagePrmt || m == kStageOut || m == kRegKOut; }
// Keys loaded as the words of tokens g and g + 8 (a channel permutation within each token), and
// keys decoded into registers without staging.
__host__ __device__ constexpr bool KeyRows(int m) { return m == kRegK || m == kRegKOut; }
__host__ __device__ constexpr bool KeyInRegs(int m) { return KeyRows(m) || IsFrag(m); }
__host__ __device__ constexpr bool HasOut(int m) { return m == kStageOut || m == kFragOut || m == kRegKOut; }
const char* const kModeNames[] = {"copy", "decode", "stage", "softmax", "regk", "decode-rep", "decode-prmt", "frag", "frag-norope", "frag-regops", "stage-prmt", "stage-out", "frag-out", "regk-out", "frag8-norope"};
constexpr int kOut = 20;  // key (and value) outlier entries per head and tile (stage-out, frag-out)
// Score and output deltas are summed as fixed-point integers: shared-memory integer atomics are
// single instructions (ATOMS.ADD in the SASS) and order-independent, so the sums are deterministic
// as a kernel kvq serves with must be (float atomics would make them depend on arrival order).
// This many fractional bits.
constexpr float kFix = 65536.0f, kUnfix = 1.0f / 65536.0f;
// Per warp, in the CTA area's room the modes do not use (the kernel's cos/sin table holds
// kGroupTiles tiles, the modes one; the RoPE group anchors are unused): score deltas [16 tokens][8
// heads] (fixed point), then the (Q1, Q2) pairs of the 4 query heads per channel [kHd] uint4. The
// outlier modes' {zero point, 1 / range} [kHd] float2 sit in the warp area's last kZrBytes, which
// the modes leave free; so every mode runs at the kernel's own shared memory and occupancy.
constexpr int kExtraBytes = 16 * 8 * 4 + kHd * 16;
constexpr int kExtraAt = 2 * kPairs * 4 + 32 * kCsStride * 4;
static_assert(kExtraAt + kHeads * kExtraBytes <= Cfg::kCtaBytes, "the outlier scratch must fit the CTA area");

struct Args {
  const uint32_t* k;       // [head][token][kRowWords]
  const uint32_t* v;
  const uint32_t* vscale;  // [token] half2 (zero point, range)
  int tokens_per_split;
  float* out;              // [splits][heads][32] checksums
  const uint32_t* kout;    // [head][tile][kOut] token | channel << 8 | fp16 << 16, by token
  const uint32_t* vout;    // the same for values (channel within the head)
};

// Selectors of codes [8 i, 8 i + 8) of a lane's 64 codes from its 6 words read as the 3-bit
// bit-sliced layout of kernels/code_layout.h (3-4 integer instructions per 8 codes).
template <int kW>
__device__ __forceinline__ uint32_t Word8(const uint32_t (&w)[kW], int i) {
  return kvq::kernels::SlicedNibbles8(w[3 * (i / 4)], w[3 * (i / 4) + 1], w[3 * (i / 4) + 2], 3, i % 4);
}
// The pair-table modes read the codes as the LSB-first 3-bit stream that kvq stored before
// 2026-12-02 (what those modes measured then): codes [8 g8, 8 g8 + 8), 3 bits apart.
template <int kW>
__device__ __forceinline__ uint32_t StreamCodes8(const uint32_t (&w)[kW], int g8) {
  const int bit = g8 * 24, wi = bit >> 5, sh = bit & 31;
  return sh + 24 > 32 ? __funnelshift_r(w[wi], w[wi + 1], sh) : w[wi] >> sh;
}
using lm::Decode4;
using lm::Prmt;

// D += A B on the fp8 tensor-core path: A 16 x 32 e4m3 (row), B 32 x 8 e4m3 (col), fp32 sums.
__device__ __forceinline__ void Mma8(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t E4m3(float x) {
  return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ float E4m3Value(uint32_t b) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(b), __NV_E4M3)));
}

// One online-softmax step of a warp's group: the running maxima m0, m1 raised to this step's
// (mx0, mx1) reduced over the group's lanes, the factors the old sums take (corr0, corr1), and the
// accumulators rescaled by them when any lane's factor is not 1; returns whether they were.
// (mx0, mx1) reduced over the 8 lanes of a warp that share q4 (an mma C fragment's column pair).
__device__ __forceinline__ void ColumnMax(float& mx0, float& mx1) {
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
}
__device__ __forceinline__ bool RaiseMax(float mx0, float mx1, float& m0, float& m1, float& corr0,
                                         float& corr1, float (&acc)[kChunks][4]) {
  ColumnMax(mx0, mx1);
  const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
  corr0 = exp2f(m0 - mn0);
  corr1 = exp2f(m1 - mn1);
  m0 = mn0;
  m1 = mn1;
  const bool rescale = __any_sync(0xffffffffu, corr0 != 1.0f || corr1 != 1.0f);
  if (rescale) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      acc[i][0] *= corr0;
      acc[i][1] *= corr1;
      acc[i][2] *= corr0;
      acc[i][3] *= corr1;
    }
  }
  return rescale;
}

template <int kMode>
__global__ void __launch_bounds__(256, 2) CoreKernel(const Args a) {
  extern __shared__ __align__(16) uint8_t smem[];
  uint32_t* kpair_s = reinterpret_cast<uint32_t*>(smem);
  uint32_t* vpair_s = kpair_s + kPairs;
  uint32_t* cs_s = vpair_s + kPairs;  // one tile's cos/sin operands [32 lanes][kCsStride]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  uint8_t* wsm = smem + Cfg::kCtaBytes + warp * Cfg::kWarpBytes;
  uint8_t* stage = wsm;
  uint8_t* pbuf = wsm + Cfg::kStageBytes;
  const uint4* q2b_s = reinterpret_cast<const uint4*>(wsm + Cfg::kStageBytes + Cfg::kPBytes);
  uint8_t* xsm = smem + kExtraAt + warp * kExtraBytes;
  int* sdelta = reinterpret_cast<int*>(xsm);                          // [16][8] fixed point
  uint4* qtab = reinterpret_cast<uint4*>(xsm + 16 * 8 * 4);           // [kHd] (Q1, Q2) x 4 heads
  float2* zr_o = reinterpret_cast<float2*>(wsm + Cfg::kWarpBytes - Cfg::kZrBytes);  // [kHd]
  int* odelta = reinterpret_cast<int*>(stage);                        // frag-out: [kHd][4] (no staging)
  for (int i = tid; i < kPairs; i += blockDim.x) {
    const float la = -1.0f + 2.0f * (i % 8) / 7.0f, lb = -1.0f + 2.0f * (i / 8) / 7.0f;
    kpair_s[i] = dm::PackF2(la, lb);
    vpair_s[i] = dm::PackF2(0.9f * la, 0.9f * lb);
  }
  for (int i = tid; i < 32 * kCsStride; i += blockDim.x) cs_s[i] = dm::PackF2(0.8f, 0.6f);
  for (int i = tid; i < Cfg::kWarpBytes * kHeads / 4; i += blockDim.x) {
    reinterpret_cast<uint32_t*>(smem + Cfg::kCtaBytes)[i] = dm::PackF2(0.01f, -0.02f);
  }
  uint32_t* krep_s = reinterpret_cast<uint32_t*>(smem + Cfg::kCtaBytes);  // decode-rep only
  uint32_t* vrep_s = krep_s + kPairs * 32;
  if constexpr (kMode == kDecodeRep) {
    __syncthreads();  // the pair tables are written, the warp areas' fill is done
    for (int i = tid; i < kPairs * 32; i += blockDim.x) {
      krep_s[i] = kpair_s[i / 32];
      vrep_s[i] = vpair_s[i / 32];
    }
  }
  // decode-prmt: the 8 fp16 LUT values as byte tables (low bytes, high bytes), two words each.
  uint32_t tk[4], tv[4];
  {
    uint16_t hk[8], hv[8];
    for (int i = 0; i < 8; ++i) {
      hk[i] = __half_as_ushort(__float2half_rn(-1.0f + 2.0f * i / 7.0f));
      hv[i] = __half_as_ushort(__float2half_rn(0.9f * (-1.0f + 2.0f * i / 7.0f)));
    }
    for (int w = 0; w < 2; ++w) {
      tk[w] = tk[2 + w] = tv[w] = tv[2 + w] = 0;
      for (int b = 0; b < 4; ++b) {
        tk[w] |= static_cast<uint32_t>(hk[4 * w + b] & 0xff) << (8 * b);
        tk[2 + w] |= static_cast<uint32_t>(hk[4 * w + b] >> 8) << (8 * b);
        tv[w] |= static_cast<uint32_t>(hv[4 * w + b] & 0xff) << (8 * b);
        tv[2 + w] |= static_cast<uint32_t>(hv[4 * w + b] >> 8) << (8 * b);
      }
    }
  }
  uint32_t q1[kChunks][2];
#pragma unroll
  for (int i = 0; i < kChunks; ++i) {
    q1[i][0] = dm::PackF2(0.01f * (lane + i), -0.01f * i);
    q1[i][1] = dm::PackF2(0.02f * i, 0.01f * lane);
  }
  // frag8-norope: the LUTs as e4m3 byte tables (PRMT picks four entries per instruction), and q
  // as the B fragments of the 4 k-steps in two e4m3 parts (hi, lo = the rest), one uint4 (hi b0,
  // hi b1, lo b0, lo b1) per k-step and lane in the warp's scratch (registers are full).
  uint32_t tk8[2] = {0u, 0u}, tv8[2] = {0u, 0u};
  uint4* q8_s = reinterpret_cast<uint4*>(xsm);  // [4 k-steps][32 lanes]
  if constexpr (kMode == kFrag8) {
    static_assert(4 * 32 * 16 <= kExtraBytes, "q8 must fit the warp's scratch");
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float lv = -1.0f + 2.0f * i / 7.0f;
      tk8[i / 4] |= E4m3(lv) << (8 * (i % 4));
      tv8[i / 4] |= E4m3(0.9f * lv) << (8 * (i % 4));
    }
    for (int ks = 0; ks < 4; ++ks) {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      for (int r = 0; r < 2; ++r) {
        for (int e = 0; e < 4; ++e) {
          const float x = 0.01f * (lane + ks + e) - 0.02f * r;
          const uint32_t hb = E4m3(x);
          w[r] |= hb << (8 * e);
          w[2 + r] |= E4m3(x - E4m3Value(hb)) << (8 * e);
        }
      }
      q8_s[ks * 32 + lane] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  __syncthreads();
  if constexpr (HasOut(kMode)) {
    for (int i = lane; i < 16 * 8; i += 32) sdelta[i] = 0;
    for (int i = lane; i < kHd; i += 32) {
      zr_o[i] = make_float2(0.01f * (i % 7), 1.0f / (1.0f + 0.01f * (i % 5)));
      qtab[i] = make_uint4(dm::PackF2(0.01f * (i % 3), -0.02f), dm::PackF2(0.03f, 0.01f * (i % 5)),
                           dm::PackF2(-0.01f, 0.02f * (i % 7)), dm::PackF2(0.01f * (i % 11), 0.04f));
    }
    if constexpr (kMode == kFragOut) {
      for (int i = lane; i < kHd * 4; i += 32) odelta[i] = 0;
    }
    __syncwarp();
  }

  const int hk = warp, split = blockIdx.y;
  const int lt = lane & 15, lh = lane >> 4, g = lane >> 2, q4 = lane & 3;
  const int j0 = split * a.tokens_per_split;
  const int n_tiles = a.tokens_per_split / dm::kTile;
  const int srow = dm::StageOff<kHd>(lt, lh * (kHd / 16));
  auto row = [&](const uint32_t* base, int T) {
    return base + (static_cast<int64_t>(hk) * (gridDim.y * a.tokens_per_split) + j0 + T * dm::kTile + lt) * kRowWords + lh * kW;
  };
  // regk: words [3 q4, 3 q4 + 3) of tokens g and g + 8.
  auto frag_row = [&](int T, int tok) {
    return a.k + (static_cast<int64_t>(hk) * (gridDim.y * a.tokens_per_split) + j0 + T * dm::kTile + tok) * kRowWords + 3 * q4;
  };
  uint32_t ck[kW], cv[kW], vs;
  uint32_t kf[2][3];
  if constexpr (KeyRows(kMode)) {
    dm::LoadWords(frag_row(0, g), kf[0]);
    dm::LoadWords(frag_row(0, g + 8), kf[1]);
  } else {
    dm::LoadWords(row(a.k, 0), ck);
  }
  dm::LoadWords(row(a.v, 0), cv);
  vs = __ldg(a.vscale + j0 + lt);
  uint32_t c8k[2][kW], c8v[2][kW], vs8[2];  // frag8-norope: the codes of a 32-token step
  if constexpr (kMode == kFrag8) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      dm::LoadWords(row(a.k, h), c8k[h]);
      dm::LoadWords(row(a.v, h), c8v[h]);
      vs8[h] = __ldg(a.vscale + j0 + h * dm::kTile + lt);
    }
  }
  // Outlier entries one tile ahead, as the codes (lanes >= kOut hold 0).
  auto out_at = [&](int T) { return ((static_cast<int64_t>(hk) * gridDim.y + split) * n_tiles + T) * kOut; };
  uint32_t kent = 0, vent = 0;
  if constexpr (HasOut(kMode)) {
    if (lane < kOut) {
      kent = __ldg(a.kout + out_at(0) + lane);
      vent = __ldg(a.vout + out_at(0) + lane);
    }
  }
  uint32_t x_acc = 0;
  __half2 h_acc[4];  // four chains: one would put 64 dependent adds on each tile
#pragma unroll
  for (int e = 0; e < 4; ++e) h_acc[e] = __float2half2_rn(0.0f);
  float acc[kChunks][4] = {};
  float m0 = -1e30f, m1 = -1e30f, l0 = 0.0f, l1 = 0.0f;

  for (int T = 0; T < n_tiles; ++T) {
    const int Tn = T + 1 < n_tiles ? T + 1 : T;
    if constexpr (kMode == kCopy) {
#pragma unroll
      for (int i = 0; i < kW; ++i) x_acc ^= ck[i] ^ cv[i];
      x_acc += vs;
      dm::LoadWords(row(a.k, Tn), ck);
      dm::LoadWords(row(a.v, Tn), cv);
      vs = __ldg(a.vscale + j0 + Tn * dm::kTile + lt);
      continue;
    } else if constexpr (kMode == kDecodePrmt) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // 64 key codes and 64 value codes
        const uint32_t sk = Word8(ck, i), sv = Word8(cv, i);
        const uint32_t sel[4] = {sk, sk >> 16, sv, sv >> 16};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const uint32_t* t = q < 2 ? tk : tv;
          const uint32_t lo = Prmt(t[0], t[1], sel[q]), hi = Prmt(t[2], t[3], sel[q]);
          h_acc[q] = __hadd2(h_acc[q], dm::BitsH2(Prmt(lo, hi, 0x5140u)));
          h_acc[(q + 1) & 3] = __hadd2(h_acc[(q + 1) & 3], dm::BitsH2(Prmt(lo, hi, 0x7362u)));
        }
      }
      x_acc += vs;
      dm::LoadWords(row(a.k, Tn), ck);
      dm::LoadWords(row(a.v, Tn), cv);
      vs = __ldg(a.vscale + j0 + Tn * dm::kTile + lt);
      continue;
    } else if constexpr (kMode == kFrag8) {
      // ---- scores of tiles T and T + 1: keys -> e4m3 A fragments, 4 k-steps x (q hi, q lo) ----
      float s[2][4] = {};
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        const uint4 qq = q8_s[ks * 32 + lane];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t w0 = Word8(c8k[h], 2 * ks), w1 = Word8(c8k[h], 2 * ks + 1);
          const uint32_t af[4] = {Prmt(tk8[0], tk8[1], w0), Prmt(tk8[0], tk8[1], w0 >> 16),
                                  Prmt(tk8[0], tk8[1], w1), Prmt(tk8[0], tk8[1], w1 >> 16)};
          Mma8(s[h], af, qq.x, qq.y);
          Mma8(s[h], af, qq.z, qq.w);
        }
      }
      const int Tn2 = T + 3 < n_tiles ? T + 2 : T;  // n_tiles is even (main)
#pragma unroll
      for (int h = 0; h < 2; ++h) dm::LoadWords(row(a.k, Tn2 + h), c8k[h]);
      // ---- online softmax over the 32 tokens ----
      float corr0, corr1;
      RaiseMax(fmaxf(fmaxf(s[0][0], s[0][2]), fmaxf(s[1][0], s[1][2])),
               fmaxf(fmaxf(s[0][1], s[0][3]), fmaxf(s[1][1], s[1][3])), m0, m1, corr0, corr1, acc);
      const float mn0 = m0, mn1 = m1;
      l0 *= corr0;
      l1 *= corr1;
      // P (times the token's value range) as e4m3 bytes [part][head][token] in the P buffer.
      uint8_t* pb8 = pbuf;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float p0 = exp2f(s[h][0] - mn0), p1 = exp2f(s[h][1] - mn1);
        const float p2 = exp2f(s[h][2] - mn0), p3 = exp2f(s[h][3] - mn1);
        l0 += p0 + p2;
        l1 += p1 + p3;
        const float rg = lm::HalfHi(__shfl_sync(0xffffffffu, vs8[h], g));
        const float rg8 = lm::HalfHi(__shfl_sync(0xffffffffu, vs8[h], g + 8));
        const float pv[4] = {p0 * rg, p1 * rg, p2 * rg8, p3 * rg8};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int at = (2 * q4 + (e & 1)) * 32 + 16 * h + g + 8 * (e >> 1);
          const uint32_t hb = E4m3(pv[e]);
          pb8[at] = static_cast<uint8_t>(hb);
          pb8[256 + at] = static_cast<uint8_t>(E4m3(pv[e] - E4m3Value(hb)));
        }
      }
      __syncwarp();
      const uint32_t bh0 = *reinterpret_cast<const uint32_t*>(pb8 + g * 32 + 4 * q4);
      const uint32_t bh1 = *reinterpret_cast<const uint32_t*>(pb8 + g * 32 + 16 + 4 * q4);
      const uint32_t bl0 = *reinterpret_cast<const uint32_t*>(pb8 + 256 + g * 32 + 4 * q4);
      const uint32_t bl1 = *reinterpret_cast<const uint32_t*>(pb8 + 256 + g * 32 + 16 + 4 * q4);
      __syncwarp();
      // ---- O^T += V^T . P: values -> e4m3 A fragments, k = the 32 tokens ----
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        const uint32_t w0 = Word8(c8v[i / 4], 2 * (i % 4)), w1 = Word8(c8v[i / 4], 2 * (i % 4) + 1);
        const uint32_t x[4] = {Prmt(tv8[0], tv8[1], w0), Prmt(tv8[0], tv8[1], w0 >> 16),
                               Prmt(tv8[0], tv8[1], w1), Prmt(tv8[0], tv8[1], w1 >> 16)};
        Mma8(acc[i], x, bh0, bh1);
        Mma8(acc[i], x, bl0, bl1);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        dm::LoadWords(row(a.v, Tn2 + h), c8v[h]);
        vs8[h] = __ldg(a.vscale + j0 + (Tn2 + h) * dm::kTile + lt);
      }
      ++T;  // two tiles a step
      continue;
    } else if constexpr (kMode == kDecode || kMode == kDecodeRep) {
      const uint32_t* kt = kMode == kDecodeRep ? krep_s + lane : kpair_s;
      const uint32_t* vt = kMode == kDecodeRep ? vrep_s + lane : vpair_s;
      constexpr int kStride = kMode == kDecodeRep ? 32 : 1;
#pragma unroll
      for (int g8 = 0; g8 < kHd / 16; ++g8) {
        const uint32_t xk = StreamCodes8(ck, g8), xv = StreamCodes8(cv, g8);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          h_acc[e] = __hadd2(h_acc[e], dm::BitsH2(kt[((xk >> (2 * e * kBits)) & (kPairs - 1)) * kStride]));
          h_acc[e] = __hadd2(h_acc[e], dm::BitsH2(vt[((xv >> (2 * e * kBits)) & (kPairs - 1)) * kStride]));
        }
      }
      x_acc += vs;
      dm::LoadWords(row(a.k, Tn), ck);
      dm::LoadWords(row(a.v, Tn), cv);
      vs = __ldg(a.vscale + j0 + Tn * dm::kTile + lt);
      continue;
    } else {
      // ---- keys -> staging (as the kernel's section 1) ----
      __syncwarp();
      uint32_t k8[2][4];  // regk: 24-bit groups of 8 codes (4 pairs) of tokens g, g + 8
      if constexpr (kMode == kRegK) {
#pragma unroll
        for (int t = 0; t < 2; ++t) {
#pragma unroll
          for (int i = 0; i < 4; ++i) k8[t][i] = StreamCodes8(kf[t], i);
        }
        dm::LoadWords(frag_row(Tn, g), kf[0]);
        dm::LoadWords(frag_row(Tn, g + 8), kf[1]);
      }
#pragma unroll
      for (int g8 = 0; g8 < (KeyInRegs(kMode) ? 0 : kHd / 16); ++g8) {
        uint32_t w[4];
        if constexpr (IsStagePrmt(kMode)) {
          const uint32_t sel = Word8(ck, g8);
          Decode4(tk, sel, w[0], w[1]);
          Decode4(tk, sel >> 16, w[2], w[3]);
        } else {
          const uint32_t x = StreamCodes8(ck, g8);
#pragma unroll
          for (int e = 0; e < 4; ++e) w[e] = kpair_s[(x >> (2 * e * kBits)) & (kPairs - 1)];
        }
        *reinterpret_cast<uint4*>(stage + (srow ^ (g8 << 4))) = make_uint4(w[0], w[1], w[2], w[3]);
      }
      if constexpr (!KeyInRegs(kMode)) dm::LoadWords(row(a.k, Tn), ck);
      if constexpr (kMode == kStageOut) {  // the kernel's key-outlier patch
        __syncwarp();
        if (lane < kOut) {
          const uint32_t ent = kent;
          const int t = static_cast<int>(ent & 0xffu), c = static_cast<int>((ent >> 8) & 0xffu);
          const float2 zr = zr_o[c];
          *reinterpret_cast<uint16_t*>(stage + dm::StageOff<kHd>(t, c >> 3) + (c & 7) * 2) =
              lm::ClampedHalf((lm::HalfLo(ent >> 16) - zr.x) * zr.y);
        }
      }
      __syncwarp();
      // ---- scores (section 2) ----
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      {
        const int r = (lane & 7) + ((lane >> 3) & 1) * 8, csel = lane >> 4;
        const uint32_t sbase = dm::SmemAddr(stage);
        const uint32_t* cs = cs_s + lane * kCsStride;
#pragma unroll
        for (int jj = 0; jj < kHC; ++jj) {
          uint32_t lo[4], hi[4];
          if constexpr (IsFrag(kMode)) {
            Decode4(tk, Word8(ck, 2 * jj), lo[0], lo[1]);
            Decode4(tk, Word8(ck, 2 * jj) >> 16, lo[2], lo[3]);
            Decode4(tk, Word8(ck, 2 * jj + 1), hi[0], hi[1]);
            Decode4(tk, Word8(ck, 2 * jj + 1) >> 16, hi[2], hi[3]);
          } else if constexpr (kMode == kRegKOut) {
            // Slots 8 jj + e of a lane's group: e < 4 the lo chunk's channels 2 q4, 2 q4 + 1,
            // 2 q4 + 8, 2 q4 + 9 (registers 0 and 2 of its token), e >= 4 the hi chunk's.
            const uint32_t w0 = Word8(kf[0], jj), w1 = Word8(kf[1], jj);
            Decode4(tk, w0, lo[0], lo[2]);
            Decode4(tk, w1, lo[1], lo[3]);
            Decode4(tk, w0 >> 16, hi[0], hi[2]);
            Decode4(tk, w1 >> 16, hi[1], hi[3]);
          } else if constexpr (kMode == kRegK) {
            // Pair p of a token: lo pairs 2 jj, 2 jj + 1; hi pairs 8 + 2 jj, 9 + 2 jj.
            auto pr = [&](int t, int p) { return kpair_s[(k8[t][p / 4] >> (6 * (p % 4))) & (kPairs - 1)]; };
            lo[0] = pr(0, 2 * jj); lo[1] = pr(1, 2 * jj); lo[2] = pr(0, 2 * jj + 1); lo[3] = pr(1, 2 * jj + 1);
            hi[0] = pr(0, 8 + 2 * jj); hi[1] = pr(1, 8 + 2 * jj); hi[2] = pr(0, 9 + 2 * jj); hi[3] = pr(1, 9 + 2 * jj);
          } else {
            dm::Ldsm4(sbase + dm::StageOff<kHd>(r, 2 * jj + csel), lo);
            dm::Ldsm4(sbase + dm::StageOff<kHd>(r, 2 * (jj + kHC) + csel), hi);
          }
          if constexpr (kMode == kFragNoRope) {
            dm::Mma(s, lo, q1[jj][0], q1[jj][1]);
            dm::Mma(sb, hi, q1[jj + kHC][0], q1[jj + kHC][1]);
            continue;
          }
          const uint4 c4 = kMode == kFragRegOps ? make_uint4(q1[jj][0], q1[jj][1], q1[jj + kHC][0], q1[jj + kHC][1])
                                                : *reinterpret_cast<const uint4*>(cs + jj * 8);
          const uint4 s4 = kMode == kFragRegOps ? make_uint4(q1[jj][1], q1[jj][0], q1[jj + kHC][1], q1[jj + kHC][0])
                                                : *reinterpret_cast<const uint4*>(cs + jj * 8 + 4);
          const uint32_t cw[4] = {c4.x, c4.y, c4.z, c4.w};
          const uint32_t sw[4] = {s4.x, s4.y, s4.z, s4.w};
          const uint4 q2v = kMode == kFragRegOps ? s4 : q2b_s[jj * 32 + lane];
          const uint4 z4 = kMode == kFragRegOps ? c4 : q2b_s[(kHC + jj) * 32 + lane];
          uint32_t x[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) x[i] = lm::HMul2(lo[i], cw[i]);
          dm::Mma(s, x, q1[jj][0], q1[jj][1]);
#pragma unroll
          for (int i = 0; i < 4; ++i) x[i] = lm::HMul2(lo[i], sw[i]);
          dm::Mma(sb, x, q2v.x, q2v.y);
#pragma unroll
          for (int i = 0; i < 4; ++i) x[i] = lm::HMul2(hi[i], cw[i]);
          dm::Mma(s, x, q1[jj + kHC][0], q1[jj + kHC][1]);
#pragma unroll
          for (int i = 0; i < 4; ++i) x[i] = lm::HMul2(hi[i], sw[i]);
          dm::Mma(sb, x, q2v.z, q2v.w);
          dm::Mma(s, cw, z4.x, z4.y);
          dm::Mma(sb, sw, z4.z, z4.w);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) s[i] += sb[i];
      }
      if constexpr (kMode == kFragOut || kMode == kRegKOut) {  // key outliers as score corrections
        if (lane < kOut) {
          const uint32_t ent = kent;
          const int t = static_cast<int>(ent & 0xffu), c = static_cast<int>((ent >> 8) & 0xffu);
          const float2 zr = zr_o[c];
          const float x = (lm::HalfLo(ent >> 16) - zr.x) * zr.y;
          const float dl = x - (x > 0.0f ? 1.0f : -1.0f);  // minus the clamped extreme's LUT value
          // cos/sin of (t, c) where the kernel's table keeps them for the lane that owns (t, c).
          const int lp = (t & 7) * 4 + ((c & 7) >> 1), jj = (c & (kHd / 2 - 1)) >> 4;
          const uint32_t* csl = cs_s + lp * kCsStride + jj * 8 + (t >> 3) + 2 * ((c >> 3) & 1);
          const float cf = (c & 1) ? lm::HalfHi(csl[0]) : lm::HalfLo(csl[0]);
          const float sf = (c & 1) ? lm::HalfHi(csl[4]) : lm::HalfLo(csl[4]);
          const uint4 qq = qtab[c];
          const uint32_t qw[4] = {qq.x, qq.y, qq.z, qq.w};
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            atomicAdd(sdelta + t * 8 + h, __float2int_rn(kFix * dl * (cf * lm::HalfLo(qw[h]) + sf * lm::HalfHi(qw[h]))));
          }
        }
        __syncwarp();
        int* d0 = sdelta + g * 8 + 2 * q4;
        int* d1 = sdelta + (g + 8) * 8 + 2 * q4;
        s[0] += kUnfix * static_cast<float>(d0[0]);
        s[1] += kUnfix * static_cast<float>(d0[1]);
        s[2] += kUnfix * static_cast<float>(d1[0]);
        s[3] += kUnfix * static_cast<float>(d1[1]);
        d0[0] = d0[1] = d1[0] = d1[1] = 0;
      }
      if constexpr (HasOut(kMode)) {
        if (lane < kOut) kent = __ldg(a.kout + out_at(Tn) + lane);
      }
      if constexpr (IsFrag(kMode)) dm::LoadWords(row(a.k, Tn), ck);
      if constexpr (kMode == kRegKOut) {
        dm::LoadWords(frag_row(Tn, g), kf[0]);
        dm::LoadWords(frag_row(Tn, g + 8), kf[1]);
      }
      __syncwarp();
      // ---- values -> staging (section 3) ----
#pragma unroll
      for (int g8 = 0; g8 < (IsFrag(kMode) ? 0 : kHd / 16); ++g8) {
        uint32_t w[4];
        if constexpr (IsStagePrmt(kMode)) {
          const uint32_t sel = Word8(cv, g8);
          Decode4(tv, sel, w[0], w[1]);
          Decode4(tv, sel >> 16, w[2], w[3]);
        } else {
          const uint32_t x = StreamCodes8(cv, g8);
#pragma unroll
          for (int e = 0; e < 4; ++e) w[e] = vpair_s[(x >> (2 * e * kBits)) & (kPairs - 1)];
        }
        *reinterpret_cast<uint4*>(stage + (srow ^ (g8 << 4))) = make_uint4(w[0], w[1], w[2], w[3]);
      }
      const uint32_t vscale = vs;
      if constexpr (kMode == kStageOut || kMode == kRegKOut) {  // the kernel's value-outlier patch
        __syncwarp();
        const uint32_t ent = vent;
        const uint32_t vst = __shfl_sync(0xffffffffu, vscale, static_cast<int>(ent & 0xffu));
        if (lane < kOut) {
          const int t = static_cast<int>(ent & 0xffu), c = static_cast<int>((ent >> 8) & 0xffu);
          *reinterpret_cast<uint16_t*>(stage + dm::StageOff<kHd>(t, c >> 3) + (c & 7) * 2) =
              lm::ClampedHalf((lm::HalfLo(ent >> 16) - lm::HalfLo(vst)) / lm::HalfHi(vst));
        }
      }
      if constexpr (!IsFrag(kMode)) dm::LoadWords(row(a.v, Tn), cv);
      vs = __ldg(a.vscale + j0 + Tn * dm::kTile + lt);
      if constexpr (kMode >= kSoftmax) {
        // ---- online softmax (section 4) ----
        float corr0, corr1;
        const bool rescaled = RaiseMax(fmaxf(s[0], s[2]), fmaxf(s[1], s[3]), m0, m1, corr0, corr1, acc);
        const float mn0 = m0, mn1 = m1;
        const float p0 = exp2f(s[0] - mn0), p1 = exp2f(s[1] - mn1);
        const float p2 = exp2f(s[2] - mn0), p3 = exp2f(s[3] - mn1);
        const uint32_t vs_g = __shfl_sync(0xffffffffu, vscale, g);
        const uint32_t vs_g8 = __shfl_sync(0xffffffffu, vscale, g + 8);
        const float rg = lm::HalfHi(vs_g), rg8 = lm::HalfHi(vs_g8);
        l0 = fmaf(l0, corr0, p0 + p2);
        l1 = fmaf(l1, corr1, p1 + p3);
        if (rescaled) {
          if constexpr (kMode == kFragOut) {  // the output delta is rescaled as the accumulators
            if (q4 < 2) {
#pragma unroll
              for (int i = 0; i < kChunks; ++i) {
                int* d0 = odelta + (16 * i + g) * 4 + 2 * q4;
                int* d1 = odelta + (16 * i + g + 8) * 4 + 2 * q4;
                d0[0] = __float2int_rn(static_cast<float>(d0[0]) * corr0);
                d0[1] = __float2int_rn(static_cast<float>(d0[1]) * corr1);
                d1[0] = __float2int_rn(static_cast<float>(d1[0]) * corr0);
                d1[1] = __float2int_rn(static_cast<float>(d1[1]) * corr1);
              }
            }
          }
        }
        const float a0 = p0 * rg, a1 = p1 * rg, a2 = p2 * rg8, a3 = p3 * rg8;
        const uint32_t h01 = dm::PackF2(a0, a1), h23 = dm::PackF2(a2, a3);
        *reinterpret_cast<uint32_t*>(pbuf + g * 16 + q4 * 4) = h01;
        *reinterpret_cast<uint32_t*>(pbuf + (g + 8) * 16 + q4 * 4) = h23;
        *reinterpret_cast<uint32_t*>(pbuf + dm::kTile * 16 + g * 16 + q4 * 4) =
            dm::PackF2(a0 - lm::HalfLo(h01), a1 - lm::HalfHi(h01));
        *reinterpret_cast<uint32_t*>(pbuf + dm::kTile * 16 + (g + 8) * 16 + q4 * 4) =
            dm::PackF2(a2 - lm::HalfLo(h23), a3 - lm::HalfHi(h23));
      } else {
        x_acc += __float_as_uint(s[0] + s[1] + s[2] + s[3]) + vscale;
      }
      __syncwarp();
      if constexpr (kMode == kFragOut) {  // value outliers: P dl into the output delta
        const uint32_t ent = vent;
        const int t = static_cast<int>(ent & 0xffu);
        const uint32_t vst = __shfl_sync(0xffffffffu, vscale, t);
        if (lane < kOut) {
          const int c = static_cast<int>((ent >> 8) & 0xffu);
          const float x = (lm::HalfLo(ent >> 16) - lm::HalfLo(vst)) / lm::HalfHi(vst);
          const float dl = x - (x > 0.0f ? 1.0f : -1.0f);
          const uint2 ph = *reinterpret_cast<const uint2*>(pbuf + t * 16);
          const uint2 pl = *reinterpret_cast<const uint2*>(pbuf + dm::kTile * 16 + t * 16);
          const float pv[4] = {lm::HalfLo(ph.x) + lm::HalfLo(pl.x), lm::HalfHi(ph.x) + lm::HalfHi(pl.x),
                               lm::HalfLo(ph.y) + lm::HalfLo(pl.y), lm::HalfHi(ph.y) + lm::HalfHi(pl.y)};
#pragma unroll
          for (int h = 0; h < 4; ++h) atomicAdd(odelta + c * 4 + h, __float2int_rn(kFix * pv[h] * dl));
        }
      }
      if constexpr (HasOut(kMode)) {
        if (lane < kOut) vent = __ldg(a.vout + out_at(Tn) + lane);
      }
      // ---- O^T += V^T . P (section 5) ----
      {
        uint32_t pb[2], pl[2];
        dm::Ldsm2T(dm::SmemAddr(pbuf) + (lane & 15) * 16, pb);
        dm::Ldsm2T(dm::SmemAddr(pbuf) + dm::kTile * 16 + (lane & 15) * 16, pl);
        const int mi = lane >> 3, r = lane & 7;
        const int rr = r + 8 * (mi >> 1), csel = mi & 1;
        const uint32_t sbase = dm::SmemAddr(stage);
#pragma unroll
        for (int i = 0; i < kChunks; ++i) {
          uint32_t x[4];
          if constexpr (IsFrag(kMode)) {
            Decode4(tv, Word8(cv, i), x[0], x[1]);
            Decode4(tv, Word8(cv, i) >> 16, x[2], x[3]);
          } else {
            dm::Ldsm4T(sbase + dm::StageOff<kHd>(rr, 2 * i + csel), x);
          }
          dm::Mma(acc[i], x, pb[0], pb[1]);
          dm::Mma(acc[i], x, pl[0], pl[1]);
        }
      }
      if constexpr (IsFrag(kMode)) dm::LoadWords(row(a.v, Tn), cv);
    }
  }
  if constexpr (kMode == kFragOut) {  // the output delta joins the accumulators
    __syncwarp();
    if (q4 < 2) {
#pragma unroll
      for (int i = 0; i < kChunks; ++i) {
        acc[i][0] += kUnfix * static_cast<float>(odelta[(16 * i + g) * 4 + 2 * q4]);
        acc[i][1] += kUnfix * static_cast<float>(odelta[(16 * i + g) * 4 + 2 * q4 + 1]);
        acc[i][2] += kUnfix * static_cast<float>(odelta[(16 * i + g + 8) * 4 + 2 * q4]);
        acc[i][3] += kUnfix * static_cast<float>(odelta[(16 * i + g + 8) * 4 + 2 * q4 + 1]);
      }
    }
  }
  float sum = static_cast<float>(x_acc & 0xffff) + l0 + l1 + m0 + m1;
#pragma unroll
  for (int e = 0; e < 4; ++e) sum += __low2float(h_acc[e]) + __high2float(h_acc[e]);
#pragma unroll
  for (int i = 0; i < kChunks; ++i) sum += acc[i][0] + acc[i][1] + acc[i][2] + acc[i][3];
  a.out[(static_cast<int64_t>(split) * kHeads + hk) * 32 + lane] = sum;
}

// wg8-norope: frag8-norope on Hopper's native fp8 path, wgmma (sm_90a). Its operands span a
// warpgroup, so the work is split as such a kernel would have to: each warpgroup takes 4 of the
// CTA's 8 KV heads in turn, 64 tokens a step; warp w of the group holds tokens [16 w, 16 w + 16)
// of the step as the A rows of S = K q (keys decoded by PRMT to e4m3 in registers, q hi/lo from
// shared memory), the running maxima are shared across the 4 warps (a named barrier), P (hi, lo)
// goes to shared memory as the B operand of O^T += V^T P, whose A rows are each warp's 16 + 16 of
// the 128 channels over the step's 64 tokens (values decoded in registers too). Same loads, codes,
// grid and shared memory (occupancy) as the other modes. H200, 2026-12-03: 375.5 / 374.8 us
// against frag-norope's 383.1 / 385.0 (374 against 433 instructions per warp-tile, issued on 60%
// of cycles against 65%: the wgmma waits and two group barriers per step).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KVQ_LCB_WGMMA 1
#endif
// No-swizzle K-major shared-memory descriptor: core matrices of 8 rows x 16 bytes, `lbo` bytes
// apart along K, `sbo` bytes apart along M/N.
__device__ __forceinline__ uint64_t DescNoSwizzle(const void* p, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = dm::SmemAddr(p);
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32);
}
// d += A B: A 64 x 32 e4m3 from registers (this warp's 16 rows), B 32 x 8 e4m3 in shared memory.
__device__ __forceinline__ void Wgmma8(float (&d)[4], const uint32_t (&a)[4], uint64_t db) {
#ifdef KVQ_LCB_WGMMA
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, 1, 1, 1;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
#endif
}
__device__ __forceinline__ void WgFence() {
#ifdef KVQ_LCB_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgCommitWait() {
#ifdef KVQ_LCB_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void GroupBarrier(int id) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory");
}

__global__ void __launch_bounds__(256, 2) Wg8Kernel(const Args a) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2, wl = warp & 3;
  const int lt = lane & 15, lh = lane >> 4, g = lane >> 2, q4 = lane & 3;
  // q hi, lo: [part][8 K cores of 16 channels][8 heads][16 bytes]; per warpgroup: the maxima
  // [4 warps][8 heads] and P [part][4 K cores of 16 tokens][8 heads][16 bytes].
  constexpr int kCore = 8 * 16;                            // one core matrix, bytes
  constexpr int kQPart = kHd / 16 * kCore, kPPart = 4 * kCore;
  constexpr int kRedBytes = 4 * 8 * 4, kGroupBytes = kRedBytes + 2 * kPPart;
  uint8_t* q_s = smem;
  float* red_s = reinterpret_cast<float*>(smem + 2 * kQPart + wg * kGroupBytes);
  uint8_t* p_s = smem + 2 * kQPart + wg * kGroupBytes + kRedBytes;
  for (int i = tid; i < 2 * kQPart; i += blockDim.x) {
    const float x = 0.01f * ((i >> 4) & 7) - 0.002f * (i & 15) + 0.001f * (i >> 7);
    const uint32_t hb = E4m3(x);
    q_s[i] = static_cast<uint8_t>(i < kQPart ? hb : E4m3(x - E4m3Value(hb)));
  }
  uint32_t tk8[2] = {0u, 0u}, tv8[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float lv = -1.0f + 2.0f * i / 7.0f;
    tk8[i / 4] |= E4m3(lv) << (8 * (i % 4));
    tv8[i / 4] |= E4m3(0.9f * lv) << (8 * (i % 4));
  }
  FenceProxyAsync();
  __syncthreads();
  const int split = blockIdx.y, j0 = split * a.tokens_per_split;
  // Steps of 4 tiles; the last one of a split holds 2 when the split has 4 n + 2 (main: pairs).
  const int n_tiles = a.tokens_per_split / dm::kTile, n_steps = (n_tiles + 3) / 4;
  auto row = [&](const uint32_t* base, int hk, int tile) {
    tile = min(tile, n_tiles - 1);  // a short last step's missing tiles: their P is 0
    return base + (static_cast<int64_t>(hk) * (gridDim.y * a.tokens_per_split) + j0 + tile * dm::kTile + lt) * kRowWords + lh * kW;
  };
  float total = 0.0f;
  for (int hh = 0; hh < 4; ++hh) {
    const int hk = 4 * wg + hh;
    uint32_t ck[kW], cv[kW], vs;
    dm::LoadWords(row(a.k, hk, wl), ck);
    dm::LoadWords(row(a.v, hk, wl), cv);
    vs = __ldg(a.vscale + j0 + wl * dm::kTile + lt);
    float acc[2][4] = {};
    float m0 = -1e30f, m1 = -1e30f, l0 = 0.0f, l1 = 0.0f;
    for (int st = 0; st < n_steps; ++st) {
      const int sn = st + 1 < n_steps ? st + 1 : st;
      const bool full = 4 * st + 4 <= n_tiles, live = 4 * st + wl < n_tiles;
      // ---- S = K q: 4 k-steps of 32 channels x (q hi, q lo) ----
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      uint32_t af[4][4];
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        const uint32_t w0 = Word8(ck, 2 * ks), w1 = Word8(ck, 2 * ks + 1);
        af[ks][0] = Prmt(tk8[0], tk8[1], w0);
        af[ks][1] = Prmt(tk8[0], tk8[1], w0 >> 16);
        af[ks][2] = Prmt(tk8[0], tk8[1], w1);
        af[ks][3] = Prmt(tk8[0], tk8[1], w1 >> 16);
      }
      WgFence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        Wgmma8(s, af[ks], DescNoSwizzle(q_s + 2 * ks * kCore, kCore, kQPart));
        Wgmma8(s, af[ks], DescNoSwizzle(q_s + kQPart + 2 * ks * kCore, kCore, kQPart));
      }
      WgCommitWait();
      if (!live) s[0] = s[1] = s[2] = s[3] = -1e30f;
      dm::LoadWords(row(a.k, hk, 4 * sn + wl), ck);
      // ---- online softmax, maxima shared by the warpgroup ----
      float mx0 = fmaxf(s[0], s[2]), mx1 = fmaxf(s[1], s[3]);
      ColumnMax(mx0, mx1);
      if (g == 0) {
        red_s[wl * 8 + 2 * q4] = mx0;
        red_s[wl * 8 + 2 * q4 + 1] = mx1;
      }
      GroupBarrier(1 + wg);
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        mx0 = fmaxf(mx0, red_s[w * 8 + 2 * q4]);
        mx1 = fmaxf(mx1, red_s[w * 8 + 2 * q4 + 1]);
      }
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      const float corr0 = exp2f(m0 - mn0), corr1 = exp2f(m1 - mn1);
      m0 = mn0;
      m1 = mn1;
      const float p0 = exp2f(s[0] - mn0), p1 = exp2f(s[1] - mn1);
      const float p2 = exp2f(s[2] - mn0), p3 = exp2f(s[3] - mn1);
      l0 = fmaf(l0, corr0, p0 + p2);
      l1 = fmaf(l1, corr1, p1 + p3);
      // O^T's columns are the heads: (2 q4, 2 q4 + 1) in every lane.
#pragma unroll
      for (int mb = 0; mb < 2; ++mb) {
        acc[mb][0] *= corr0;
        acc[mb][1] *= corr1;
        acc[mb][2] *= corr0;
        acc[mb][3] *= corr1;
      }
      const float rg = lm::HalfHi(__shfl_sync(0xffffffffu, vs, g));
      const float rg8 = lm::HalfHi(__shfl_sync(0xffffffffu, vs, g + 8));
      vs = __ldg(a.vscale + j0 + min(4 * sn + wl, n_tiles - 1) * dm::kTile + lt);
      const float pv[4] = {p0 * rg, p1 * rg, p2 * rg8, p3 * rg8};
      // P byte of token t (16 wl + g (+8)) and head n: core t / 16 = wl, row n, byte t % 16.
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int at = wl * kCore + (2 * q4 + (e & 1)) * 16 + g + 8 * (e >> 1);
        const uint32_t hb = E4m3(pv[e]);
        p_s[at] = static_cast<uint8_t>(hb);
        p_s[kPPart + at] = static_cast<uint8_t>(E4m3(pv[e] - E4m3Value(hb)));
      }
      FenceProxyAsync();
      GroupBarrier(1 + wg);  // P complete; the maxima read
      // ---- O^T += V^T P: 2 blocks of 64 channels x 2 k-steps of 32 tokens x (P hi, P lo) ----
      uint32_t vf[2][2][4];
#pragma unroll
      for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          const uint32_t w0 = Word8(cv, 4 * mb + 2 * kk), w1 = Word8(cv, 4 * mb + 2 * kk + 1);
          vf[mb][kk][0] = Prmt(tv8[0], tv8[1], w0);
          vf[mb][kk][1] = Prmt(tv8[0], tv8[1], w0 >> 16);
          vf[mb][kk][2] = Prmt(tv8[0], tv8[1], w1);
          vf[mb][kk][3] = Prmt(tv8[0], tv8[1], w1 >> 16);
        }
      }
      WgFence();
#pragma unroll
      for (int mb = 0; mb < 2; ++mb) {
#pragma unroll
        for (int kk = 0; kk < (full ? 2 : 1); ++kk) {
          Wgmma8(acc[mb], vf[mb][kk], DescNoSwizzle(p_s + 2 * kk * kCore, kCore, kQPart));
          Wgmma8(acc[mb], vf[mb][kk], DescNoSwizzle(p_s + kPPart + 2 * kk * kCore, kCore, kQPart));
        }
      }
      WgCommitWait();
      dm::LoadWords(row(a.v, hk, 4 * sn + wl), cv);
    }
    total += l0 + l1 + m0 + m1;
#pragma unroll
    for (int mb = 0; mb < 2; ++mb) total += acc[mb][0] + acc[mb][1] + acc[mb][2] + acc[mb][3];
  }
  a.out[(static_cast<int64_t>(split) * kHeads + warp) * 32 + lane] = total;
}

template <typename Kernel>
float TimeKernel(Kernel kernel, const char* name, const Args& a, int splits, int iters) {
  const size_t smem = Cfg::SmemBytes(kHeads);
  CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, smem));
  const dim3 grid(1, splits);
  kernel<<<grid, 256, smem>>>(a);
  CK(cudaGetLastError());
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> ts;
  for (int i = 0; i < iters; ++i) {
    CK(cudaEventRecord(e0));
    kernel<<<grid, 256, smem>>>(a);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    ts.push_back(ms * 1000.0f);
  }
  std::sort(ts.begin(), ts.end());
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  std::printf("  (%s: %d CTAs per SM by occupancy)\n", name, per_sm);
  return ts[ts.size() / 2];
}

template <int kMode>
float TimeMode(const Args& a, int splits, int iters) {
  return TimeKernel(CoreKernel<kMode>, kModeNames[kMode], a, splits, iters);
}

bool Has(const std::string& list, const char* name) {
  return ("," + list + ",").find(std::string(",") + name + ",") != std::string::npos;
}

}  // namespace

int main(int argc, char** argv) {
  int tokens = 1 << 20, iters = 20;
  std::string modes = "copy,decode,decode-rep,decode-prmt,stage,softmax,regk,frag,frag-norope,frag-regops,stage-prmt,stage-out,frag-out,regk-out,frag8-norope,wg8-norope";
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s.rfind("--tokens=", 0) == 0) tokens = std::atoi(s.c_str() + 9);
    else if (s.rfind("--iters=", 0) == 0) iters = std::atoi(s.c_str() + 8);
    else if (s.rfind("--modes=", 0) == 0) modes = s.substr(8);
    else {
      std::fprintf(stderr, "unknown flag %s\nusage: lut_core_bench [--tokens=N] [--iters=N] [--modes=copy,decode,decode-rep,decode-prmt,stage,softmax,regk,frag,frag-norope,frag-regops,stage-prmt,stage-out,frag-out,regk-out,frag8-norope,wg8-norope]\n", argv[i]);
      return 2;
    }
  }
  int dev_count = 0;
  if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
    std::fprintf(stderr, "lut_core_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  // Splits: whole waves of two CTAs per SM, 4 waves, each split a whole number of tiles.
  const int splits = 8 * prop.multiProcessorCount;
  // Whole pairs of tiles per split (frag8-norope steps two tiles at a time; wg8-norope four,
  // the last step of a split perhaps two).
  const int tps = tokens / splits / (2 * dm::kTile) * (2 * dm::kTile);
  if (tps < 2 * dm::kTile) {
    std::fprintf(stderr, "lut_core_bench: --tokens must be >= %d\n", splits * 2 * dm::kTile);
    return 2;
  }
  const int64_t used_tokens = static_cast<int64_t>(tps) * splits;
  const size_t code_bytes = static_cast<size_t>(used_tokens) * kHeads * kRowWords * 4;
  uint32_t *k = nullptr, *v = nullptr, *vscale = nullptr;
  float* out = nullptr;
  CK(cudaMalloc(&k, code_bytes));
  CK(cudaMalloc(&v, code_bytes));
  CK(cudaMalloc(&vscale, used_tokens * 4));
  CK(cudaMalloc(&out, static_cast<size_t>(splits) * kHeads * 32 * 4));
  {
    std::vector<uint32_t> h(code_bytes / 4);
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (auto& w : h) {
      x ^= x << 13; x ^= x >> 7; x ^= x << 17;
      w = static_cast<uint32_t>(x);
    }
    CK(cudaMemcpy(k, h.data(), code_bytes, cudaMemcpyHostToDevice));
    for (auto& w : h) w = ~w * 2654435761u;
    CK(cudaMemcpy(v, h.data(), code_bytes, cudaMemcpyHostToDevice));
    std::vector<uint32_t> sc(used_tokens, (0x3c00u << 16) | 0x0000u);  // range 1, zero point 0
    CK(cudaMemcpy(vscale, sc.data(), used_tokens * 4, cudaMemcpyHostToDevice));
  }
  // Copy bandwidth (read + write) for the floor.
  float copy_gbs = 0;
  {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaMemcpy(v, k, code_bytes, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e0));
    for (int i = 0; i < 5; ++i) CK(cudaMemcpy(v, k, code_bytes, cudaMemcpyDeviceToDevice));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    copy_gbs = 2.0f * code_bytes * 5 / (ms * 1e-3f) / 1e9f;
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
  }
  const double bytes = 2.0 * code_bytes + used_tokens * 4.0;
  const double floor_us = bytes / (copy_gbs * 1e9) * 1e6;
  std::printf("lut_core_bench: %s, %d SMs; Llama-3-8B shape nuq3, %lld tokens x %d KV heads, %d splits; "
              "%.1f MB of codes and scales, copy %.0f GB/s, floor %.1f us\n",
              prop.name, prop.multiProcessorCount, static_cast<long long>(used_tokens), kHeads, splits,
              bytes / 1e6, copy_gbs, floor_us);
  // Outlier entries (stage-out, frag-out): kOut per head and tile, tokens ascending, channels
  // spread, values beyond the clamp range (|x| = 2).
  uint32_t *kout = nullptr, *vout = nullptr;
  const int64_t n_ent = static_cast<int64_t>(kHeads) * (used_tokens / dm::kTile) * kOut;
  CK(cudaMalloc(&kout, n_ent * 4));
  CK(cudaMalloc(&vout, n_ent * 4));
  {
    std::vector<uint32_t> ke(n_ent), ve(n_ent);
    uint64_t x = 0x2545f4914f6cdd1dull;
    for (int64_t i = 0; i < n_ent; ++i) {
      x ^= x << 13; x ^= x >> 7; x ^= x << 17;
      const uint32_t t = static_cast<uint32_t>((i % kOut) * dm::kTile / kOut);
      const uint32_t half = (x & 1) ? 0x4000u : 0xc000u;  // +-2
      ke[i] = t | static_cast<uint32_t>((x >> 8) % kHd) << 8 | half << 16;
      ve[i] = t | static_cast<uint32_t>((x >> 24) % kHd) << 8 | (half ^ 0x8000u) << 16;
    }
    CK(cudaMemcpy(kout, ke.data(), n_ent * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(vout, ve.data(), n_ent * 4, cudaMemcpyHostToDevice));
  }
  const Args a{k, v, vscale, tps, out, kout, vout};
  std::printf("| mode | us | GB/s | of floor |\n|---|---|---|---|\n");
  auto row = [&](const char* name, float us) {
    std::printf("| %s | %.1f | %.0f | %.1f%% |\n", name, us, bytes / (us * 1e-6) / 1e9, 100.0 * floor_us / us);
  };
  if (Has(modes, "copy")) row("copy", TimeMode<kCopy>(a, splits, iters));
  if (Has(modes, "decode")) row("decode", TimeMode<kDecode>(a, splits, iters));
  if (Has(modes, "stage")) row("stage", TimeMode<kStage>(a, splits, iters));
  if (Has(modes, "softmax")) row("softmax", TimeMode<kSoftmax>(a, splits, iters));
  if (Has(modes, "regk")) row("regk", TimeMode<kRegK>(a, splits, iters));
  if (Has(modes, "decode-rep")) row("decode-rep", TimeMode<kDecodeRep>(a, splits, iters));
  if (Has(modes, "decode-prmt")) row("decode-prmt", TimeMode<kDecodePrmt>(a, splits, iters));
  if (Has(modes, "frag")) row("frag", TimeMode<kFrag>(a, splits, iters));
  if (Has(modes, "frag-norope")) row("frag-norope", TimeMode<kFragNoRope>(a, splits, iters));
  if (Has(modes, "frag-regops")) row("frag-regops", TimeMode<kFragRegOps>(a, splits, iters));
  if (Has(modes, "stage-prmt")) row("stage-prmt", TimeMode<kStagePrmt>(a, splits, iters));
  if (Has(modes, "stage-out")) row("stage-out", TimeMode<kStageOut>(a, splits, iters));
  if (Has(modes, "frag-out")) row("frag-out", TimeMode<kFragOut>(a, splits, iters));
  if (Has(modes, "regk-out")) row("regk-out", TimeMode<kRegKOut>(a, splits, iters));
  if (Has(modes, "frag8-norope")) row("frag8-norope", TimeMode<kFrag8>(a, splits, iters));
  if (Has(modes, "wg8-norope")) {
    if (prop.major == 9) row("wg8-norope", TimeKernel(Wg8Kernel, "wg8-norope", a, splits, iters));
    else std::printf("| wg8-norope | skipped: wgmma needs compute capability 9.0 | | |\n");
  }
  CK(cudaFree(k));
  CK(cudaFree(v));
  CK(cudaFree(vscale));
  CK(cudaFree(out));
  CK(cudaFree(kout));
  CK(cudaFree(vout));
  return 0;
}
