// PrefillAttention for head dim 128 on Hopper warpgroup MMA (kernels/prefill_attention_sm90a.h).
//
// CTA = 2 warpgroups (256 threads) x 64 M rows each = 128 M rows (query row, head of the group) of
// one kv head and one key split. Q (scaled by softmax scale * log2 e, fp16) sits in shared memory
// for the whole CTA; K and V tiles of 128 keys stream through a 3-stage ring filled with cp.async
// by all threads, one tile ahead. Every shared operand is in the 128-byte-swizzled layout wgmma
// reads: each tile is two 64-channel halves of [rows][128 bytes], 16-byte chunk c of row t at
// c ^ (t & 7), halves and stages 1024-byte aligned.
//   S = Q K^T   wgmma.m64n128k16, A = Q and B = K from shared memory (both K-major), 8 k-steps;
//   softmax     on the fp32 accumulators in registers (the m64nN accumulator layout is the
//               mma.m16n8 C layout per warp and 8 columns), masked per row limit, log2 domain;
//   O += P V    wgmma.m64n128k16 with A = P from registers (fp16; the A fragment of the 16 keys
//               2j, 2j + 1 is the C fragment of those two 8-key column blocks) and B = V from
//               shared memory, N-major (transposed: the 64 channels of a half are contiguous).
// Descriptors (PTX ISA, "Matrix Descriptor Format"): K-major 128B swizzle: SBO = 1024 (the next 8
// rows), LBO unused, a k-step of 16 channels = +32 bytes of the start address inside the swizzle
// row; N-major 128B swizzle: LBO = the next 64 channels (the other half), SBO = 1024 (the next 8
// keys), 16 keys = +2048 bytes.
// cp.async writes through the generic proxy and wgmma reads through the async proxy: every thread
// fences (fence.proxy.async.shared::cta) its completed copies before the barrier that publishes a
// tile.
// Overlap (FlashAttention-3's intra-warpgroup pipelining): iteration j issues S_j = Q K_j^T and
// O += P_{j-1} V_{j-1} back to back, runs tile j's softmax while the second product is in flight,
// then waits for it, rescales O and packs P_j. Tile j - 1's V must then survive iteration j while
// tile j + 1 is loading: hence 3 stages (32 KB Q + 3 x 64 KB = 224 KB of shared memory).
#include "kernels/prefill_attention_sm90a.h"

#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"

// The kernel body exists only in the sm_90a image (wgmma is an arch-specific feature); the
// launcher refuses devices without it (PrefillWgmmaAvailable).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KVQ_PREFILL_WGMMA_BODY 1
#endif

namespace kvq::kernels::internal {
namespace {

constexpr int kHd = 128;
constexpr int kBM = kPrefillWgmmaRows;
constexpr int kBN = kPrefillWgmmaKeys;
constexpr int kThreads = 256;
constexpr int kStages = 3;
constexpr uint32_t kRowBytes = 128;                 // one swizzle row: 64 fp16 channels
constexpr uint32_t kQHalf = kBM * kRowBytes;        // 16 KB
constexpr uint32_t kKvHalf = kBN * kRowBytes;       // 16 KB
constexpr uint32_t kStageBytes = 4 * kKvHalf;       // K halves 0, 1, V halves 0, 1: 64 KB
constexpr size_t kSmemBytes = 2 * kQHalf + kStages * kStageBytes + 1024;  // + alignment slack
static_assert(kSmemBytes <= 232448, "over the 227 KB of shared memory a Hopper CTA can have");

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#if defined(KVQ_PREFILL_WGMMA_BODY)

__device__ __forceinline__ uint32_t SmemAddr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ uint32_t PackF2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void CpAsyncWaitAll() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void FenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// 128B-swizzle shared memory descriptor.
__device__ __forceinline__ uint64_t Desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void WgFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kN>
__device__ __forceinline__ void WgWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kN) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma waits.
__device__ __forceinline__ void FenceRegs(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void FenceRegs(uint32_t (&a)[8][4]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
  }
}

#define KVQ_WG_D64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),\
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),\
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),\
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),\
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),\
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),\
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),\
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d (+)= A B, A (64 x 16) and B (16 x 128) from shared memory, both K-major.
__device__ __forceinline__ void WgmmaSS(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : KVQ_WG_D64
      : "l"(da), "l"(db), "r"(accumulate));
}
// d += A B, A (64 x 16, fp16) from registers, B (16 x 128) from shared memory, N-major.
__device__ __forceinline__ void WgmmaRS(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
      : KVQ_WG_D64
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
#undef KVQ_WG_D64

#endif  // KVQ_PREFILL_WGMMA_BODY

template <bool kOverlap>
__global__ void __launch_bounds__(kThreads, 1)
    PrefillWgmmaKernel(const PrefillAttentionParams p, const int keys_per_split) {
#if defined(KVQ_PREFILL_WGMMA_BODY)
  extern __shared__ __align__(16) uint8_t pw_smem[];
  const uint32_t raw = SmemAddr(pw_smem);
  const uint32_t sbase = (raw + 1023u) & ~1023u;
  uint8_t* const sptr = pw_smem + (sbase - raw);
  const uint32_t qbase = sbase;                // [2 halves][kBM rows][128 B]
  const uint32_t tbase = sbase + 2 * kQHalf;   // [kStages][K half 0, K half 1, V half 0, V half 1][kBN][128 B]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, q4 = lane & 3;
  const int group = p.n_heads / p.n_kv_heads;
  const int hk = blockIdx.y, split = blockIdx.z;
  const int64_t M = static_cast<int64_t>(p.rows) * group;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;

  auto limit_of = [&](int64_t m) -> int {
    if (m >= M) return 0;
    const int64_t r = m / group;
    const int64_t l = p.limit_base + (p.causal ? r : 0);
    return static_cast<int>(min(max(l, int64_t{0}), static_cast<int64_t>(p.n_keys)));
  };
  // This thread's two accumulator rows: row g and g + 8 of its warp's 16.
  int64_t mrow[2];
  int lim[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    mrow[h] = m0 + 64 * wg + 16 * wq + 8 * h + g;
    lim[h] = limit_of(mrow[h]);
  }
  const int kb = split * keys_per_split;
  const int ke = min(kb + keys_per_split, p.n_keys);
  const int cta_max = p.causal ? limit_of(min(m0 + kBM, M) - 1) : limit_of(m0);
  const int cta_min = limit_of(m0);
  const int kend = min(ke, cta_max);
  const int n_tiles = kend > kb ? (kend - kb + kBN - 1) / kBN : 0;

  // ---- Q: fp16, scaled into the log2 domain, swizzled halves. ----
  const float qs = (p.scale > 0.0f ? p.scale : rsqrtf(static_cast<float>(kHd))) * kLog2e;
  for (int u = tid; u < kBM * 16; u += kThreads) {
    const int r = u >> 4, ch = u & 15;
    const int64_t m = m0 + r;
    uint4 w = make_uint4(0, 0, 0, 0);
    if (m < M) {
      const float* src = p.q + ((m / group) * p.n_heads + hk * group + m % group) * kHd + ch * 8;
      const float4 x0 = *reinterpret_cast<const float4*>(src);
      const float4 x1 = *reinterpret_cast<const float4*>(src + 4);
      w = make_uint4(PackF2(x0.x * qs, x0.y * qs), PackF2(x0.z * qs, x0.w * qs), PackF2(x1.x * qs, x1.y * qs),
                     PackF2(x1.z * qs, x1.w * qs));
    }
    *reinterpret_cast<uint4*>(sptr + (ch >> 3) * kQHalf + r * kRowBytes + (((ch & 7) ^ (r & 7)) << 4)) = w;
  }
  FenceProxyAsync();  // (published by the first tile's barrier)

  const uint16_t* kg = p.k + hk * p.kv_head_stride;
  const uint16_t* vg = p.v + hk * p.kv_head_stride;
  auto load_tile = [&](int T) {
    const int key0 = kb + T * kBN;
    const uint32_t dst = tbase + static_cast<uint32_t>(T % kStages) * kStageBytes;
    for (int idx = tid; idx < kBN * 16; idx += kThreads) {
      const int t = idx >> 4, ch = idx & 15;
      const int key = key0 + t;
      const bool ok = key < kend;
      const int64_t off = static_cast<int64_t>(ok ? key : 0) * p.kv_token_stride + ch * 8;
      const uint32_t so = (ch >> 3) * kKvHalf + t * kRowBytes + (((ch & 7) ^ (t & 7)) << 4);
      CpAsync16(dst + so, kg + off, ok);
      CpAsync16(dst + 2 * kKvHalf + so, vg + off, ok);
    }
    CpAsyncCommit();
  };

  float o[64], s[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = s[i] = 0.0f;
  uint32_t pa[8][4];
  float rm[2] = {-CUDART_INF_F, -CUDART_INF_F}, rl[2] = {0.0f, 0.0f};

  // S = Q K^T of tile T (issued, not waited).
  auto issue_s = [&](int T) {
    const uint32_t kaddr = tbase + static_cast<uint32_t>(T % kStages) * kStageBytes;
#pragma unroll
    for (int kk = 0; kk < kHd / 16; ++kk) {
      const uint64_t da = Desc(qbase + (kk >> 2) * kQHalf + wg * 64 * kRowBytes + (kk & 3) * 32, 16, 1024);
      const uint64_t db = Desc(kaddr + (kk >> 2) * kKvHalf + (kk & 3) * 32, 16, 1024);
      WgmmaSS(s, da, db, kk > 0);
    }
    WgCommit();
  };
  // O += P V of tile T (issued, not waited).
  auto issue_pv = [&](int T) {
    const uint32_t vaddr = tbase + static_cast<uint32_t>(T % kStages) * kStageBytes + 2 * kKvHalf;
#pragma unroll
    for (int j = 0; j < kBN / 16; ++j) WgmmaRS(o, pa[j], Desc(vaddr + j * 16 * kRowBytes, kKvHalf, 1024));
    WgCommit();
  };
  // Mask and online softmax of tile T's scores (in s): rm, rl updated; returns the factor each of
  // the two rows' O must be scaled by (1 where the maximum did not move).
  auto softmax = [&](int T, float (&corr)[2]) {
    const int key0 = kb + T * kBN;
    if (key0 + kBN > cta_min) {
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
        const int key = key0 + 8 * j + 2 * q4;
        if (key >= lim[0]) s[4 * j] = -CUDART_INF_F;
        if (key + 1 >= lim[0]) s[4 * j + 1] = -CUDART_INF_F;
        if (key >= lim[1]) s[4 * j + 2] = -CUDART_INF_F;
        if (key + 1 >= lim[1]) s[4 * j + 3] = -CUDART_INF_F;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = rm[h];
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float u = mx == -CUDART_INF_F ? 0.0f : mx;
      corr[h] = Exp2(rm[h] - u);
      rm[h] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
        s[4 * j + 2 * h] = Exp2(s[4 * j + 2 * h] - u);
        s[4 * j + 2 * h + 1] = Exp2(s[4 * j + 2 * h + 1] - u);
        sum += s[4 * j + 2 * h] + s[4 * j + 2 * h + 1];
      }
      rl[h] = fmaf(rl[h], corr[h], sum);
    }
  };
  auto rescale = [&](const float (&corr)[2]) {
    if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
      for (int j = 0; j < kHd / 8; ++j) {
        o[4 * j] *= corr[0];
        o[4 * j + 1] *= corr[0];
        o[4 * j + 2] *= corr[1];
        o[4 * j + 3] *= corr[1];
      }
    }
  };
  auto pack_p = [&] {
#pragma unroll
    for (int j = 0; j < kBN / 16; ++j) {
      pa[j][0] = PackF2(s[8 * j], s[8 * j + 1]);
      pa[j][1] = PackF2(s[8 * j + 2], s[8 * j + 3]);
      pa[j][2] = PackF2(s[8 * j + 4], s[8 * j + 5]);
      pa[j][3] = PackF2(s[8 * j + 6], s[8 * j + 7]);
    }
  };
  // Tile T's data is in shared memory and visible to wgmma; tile T + 1 starts loading.
  auto arrive = [&](int T) {
    CpAsyncWaitAll();
    FenceProxyAsync();
    __syncthreads();
    if (T + 1 < n_tiles) load_tile(T + 1);
  };

  if (n_tiles > 0) load_tile(0);
  if constexpr (kOverlap) {
    if (n_tiles > 0) {
      float corr[2];
      arrive(0);
      WgFence();
      issue_s(0);
      WgWait<0>();
      FenceRegs(s);
      softmax(0, corr);
      pack_p();
      for (int T = 1; T < n_tiles; ++T) {
        arrive(T);
        WgFence();
        issue_s(T);
        issue_pv(T - 1);
        WgWait<1>();  // S_T done; P_{T-1} V_{T-1} may still run
        FenceRegs(s);
        softmax(T, corr);
        WgWait<0>();
        FenceRegs(o);
        FenceRegs(pa);
        rescale(corr);
        pack_p();
      }
      WgFence();
      issue_pv(n_tiles - 1);
      WgWait<0>();
      FenceRegs(o);
    }
  } else {
    for (int T = 0; T < n_tiles; ++T) {
      float corr[2];
      arrive(T);
      WgFence();
      issue_s(T);
      WgWait<0>();
      FenceRegs(s);
      softmax(T, corr);
      rescale(corr);
      pack_p();
      WgFence();
      issue_pv(T);
      WgWait<0>();
      FenceRegs(o);
    }
  }

  // ---- Epilogue: row sums over the 4 lanes of a row, normalized o and lse. ----
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = rl[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t m = mrow[h];
    if (m >= M) continue;
    const int64_t out_row = (m / group) * p.n_heads + hk * group + m % group;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* orow = p.o + split * p.o_split_stride + out_row * kHd;
#pragma unroll
    for (int j = 0; j < kHd / 8; ++j) {
      *reinterpret_cast<float2*>(orow + 8 * j + 2 * q4) = make_float2(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
    }
    if (q4 == 0) p.lse[split * p.lse_split_stride + out_row] = l > 0.0f ? (rm[h] + log2f(l)) * kLn2 : -CUDART_INF_F;
  }
#else
  __trap();  // no sm_90a image: the launcher never gets here (PrefillWgmmaAvailable)
#endif
}

template <bool kOverlap>
absl::Status Launch(const PrefillAttentionParams& p, int64_t keys_per_split, cudaStream_t stream) {
  KVQ_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(PrefillWgmmaKernel<kOverlap>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(kSmemBytes)));
  const int64_t M = static_cast<int64_t>(p.rows) * (p.n_heads / p.n_kv_heads);
  const dim3 grid(static_cast<unsigned>((M + kBM - 1) / kBM), static_cast<unsigned>(p.n_kv_heads),
                  static_cast<unsigned>(p.splits));
  PrefillWgmmaKernel<kOverlap><<<grid, kThreads, kSmemBytes, stream>>>(p, static_cast<int>(keys_per_split));
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace

bool PrefillWgmmaAvailable(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, PrefillWgmmaKernel<true>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // This file is compiled for sm_90a only: the kernel has an image exactly where it can run.
  return true;
}

absl::Status LaunchPrefillAttentionWgmma(const PrefillAttentionParams& p, int64_t keys_per_split, bool overlap,
                                         cudaStream_t stream) {
  if (p.head_dim != kHd) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchPrefillAttentionWgmma: head_dim ", p.head_dim, " (only 128)"));
  }
  if (keys_per_split <= 0 || keys_per_split % kBN != 0 || keys_per_split > 2147483647 - kBN) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchPrefillAttentionWgmma: keys per split ", keys_per_split,
                                                   " (need a positive multiple of ", kBN, ")"));
  }
  return overlap ? Launch<true>(p, keys_per_split, stream) : Launch<false>(p, keys_per_split, stream);
}

}  // namespace kvq::kernels::internal
