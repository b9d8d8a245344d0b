// PrefillAttention for head dims 64 and 128 on Hopper warpgroup MMA (kernels/prefill_attention_sm90a.h).
//
// CTA = 2 consumer warpgroups x 64 M rows = 128 M rows (query row, head of the group) of one kv
// head and one key split. Q (scaled by softmax scale * log2 e, fp16) sits in shared memory for the
// whole CTA; K and V tiles of 128 keys stream through a 3-stage ring. Every shared operand is in the
// 128-byte-swizzled layout wgmma reads: each tile is head dim / 64 64-channel halves of [rows][128 bytes],
// 16-byte chunk c of row t at c ^ (t & 7), halves and stages 1024-byte aligned.
//   S = Q K^T   wgmma.m64n128k16, A = Q and B = K from shared memory (both K-major), head dim / 16
//               k-steps;
//   softmax     on the fp32 accumulators in registers (the m64nN accumulator layout is the
//               mma.m16n8 C layout per warp and 8 columns), masked per row limit, log2 domain;
//   O += P V    wgmma.m64n{head dim}k16 with A = P from registers (fp16; the A fragment of the 16 keys
//               2j, 2j + 1 is the C fragment of those two 8-key column blocks) and B = V from
//               shared memory, N-major (transposed: the 64 channels of a half are contiguous).
// Descriptors (PTX ISA, "Matrix Descriptor Format"): K-major 128B swizzle: SBO = 1024 (the next 8
// rows), LBO unused, a k-step of 16 channels = +32 bytes of the start address inside the swizzle
// row; N-major 128B swizzle: LBO = the next 64 channels (the other half), SBO = 1024 (the next 8
// keys), 16 keys = +2048 bytes.
//
// Two schedules (WgmmaSchedule):
//   ping-pong (the default): a producer warp streams tiles with TMA (a 3-D tensor map per K and V:
//     channel, kv head, key; boxes of 64 channels x 128 keys, swizzled by the copy engine; keys
//     past the end read as zeros) and full/empty mbarriers per stage, so no CTA barrier is left in
//     the loop; the two consumer warpgroups take turns issuing S = Q K^T (named barriers 1 and 2),
//     so one warpgroup's softmax runs while the other's products do (FlashAttention-3's schedule).
//     288 threads, 1 CTA per SM.
//   serial (fallback where TMA maps cannot be made): all 256 threads fill the ring with cp.async
//     one tile ahead; per tile a CTA barrier, then S, softmax, P V in sequence. cp.async writes
//     through the generic proxy and wgmma reads through the async proxy, so every thread fences
//     (fence.proxy.async.shared::cta) its completed copies before the barrier.
// H200, 2026-12-01 (RESULTS.md): 4096 rows over 32K-131K keys of the Llama-3-8B shape, ping-pong
// 612-628 TFLOP/s, serial 416-462, mma.sync 322-326, cuDNN SDPA 585-669; head dim 64 (SmolLM2)
// 249-294. FlashAttention-3's intra-warpgroup overlap measured slower on both schedules (on the
// ping-pong one also with a producer warpgroup and setmaxnreg: 485 against 617); not kept.
#include "kernels/prefill_attention_sm90a.h"

#include <cuda.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda_check.h"

// The kernel body exists only in the sm_90a image (wgmma is an arch-specific feature); the
// launcher refuses devices without it (PrefillWgmmaAvailable).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KVQ_PREFILL_WGMMA_BODY 1
#endif

namespace kvq::kernels::internal {
namespace {

constexpr int kBM = kPrefillWgmmaRows;
constexpr int kBN = kPrefillWgmmaKeys;
constexpr int kThreads = 256;
constexpr int kWsThreads = kThreads + 32;  // + the producer warp
constexpr int kStages = 3;
constexpr uint32_t kRowBytes = 128;                 // one swizzle row: 64 fp16 channels
constexpr uint32_t kQHalf = kBM * kRowBytes;        // 16 KB: 64 channels of the CTA's Q rows
constexpr uint32_t kKvHalf = kBN * kRowBytes;       // 16 KB: 64 channels of a K or V tile

// Shared memory of head dim kHd (64 or 128): Q, then kStages x (K halves, V halves), then the
// mbarriers of the warp-specialized schedule.
template <int kHd>
struct Geo {
  static_assert(kHd == 64 || kHd == 128, "head dim 64 or 128");
  static constexpr int kHalves = kHd / 64;
  static constexpr uint32_t kQBytes = kHalves * kQHalf;
  static constexpr uint32_t kVOff = kHalves * kKvHalf;            // V's halves within a stage
  static constexpr uint32_t kStageBytes = 2 * kHalves * kKvHalf;  // 64 KB at head dim 128
  static constexpr size_t kSmemBytes = kQBytes + kStages * kStageBytes + 1024;  // + alignment slack
  static constexpr size_t kWsSmemBytes = kSmemBytes + 2 * kStages * 8;          // + full/empty mbarriers
  static_assert(kWsSmemBytes <= 232448, "over the 227 KB of shared memory a Hopper CTA can have");
};

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
template <int kN>
__device__ __forceinline__ void FenceRegs(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
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
// d += A B, A (64 x 16, fp16) from registers, B (16 x 64) from shared memory, N-major (head dim 64).
#define KVQ_WG_D32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),\
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),\
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),\
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
__device__ __forceinline__ void WgmmaRS(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32, %33, %34, %35}, %36, 1, 1, 1, 1;\n"
      : KVQ_WG_D32
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
#undef KVQ_WG_D32
#undef KVQ_WG_D64

// ---- mbarriers, TMA and named barriers (the warp-specialized kernel) ----
__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void FenceMbarInit() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (done == 0);
}
// One box of a 3-D tensor map (channel c0, kv head c1, key c2) into shared memory; completion is
// counted in bytes on `bar`.
__device__ __forceinline__ void TmaLoad3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void NamedSync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void NamedArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- The parts every schedule shares ----

// What one CTA computes: M rows [m0, m0 + kBM) of kv head hk over the keys of split `split`.
struct CtaWork {
  int64_t M, m0;
  int group, hk, split, kb, kend, cta_min, n_tiles;
};
__device__ __forceinline__ int LimitOf(const PrefillAttentionParams& p, int64_t M, int group, int64_t m) {
  if (m >= M) return 0;
  const int64_t l = p.limit_base + (p.causal ? m / group : 0);
  return static_cast<int>(min(max(l, int64_t{0}), static_cast<int64_t>(p.n_keys)));
}
__device__ __forceinline__ CtaWork MakeWork(const PrefillAttentionParams& p, int keys_per_split) {
  CtaWork w;
  w.group = p.n_heads / p.n_kv_heads;
  w.hk = blockIdx.y;
  w.split = blockIdx.z;
  w.M = static_cast<int64_t>(p.rows) * w.group;
  // Causal: the last row blocks see the most keys; the grid runs them first, so the short ones
  // fill the tail of the last wave instead of the long ones stretching it.
  const unsigned bx = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  w.m0 = static_cast<int64_t>(bx) * kBM;
  w.kb = w.split * keys_per_split;
  const int ke = min(w.kb + keys_per_split, p.n_keys);
  const int cta_max = p.causal ? LimitOf(p, w.M, w.group, min(w.m0 + kBM, w.M) - 1) : LimitOf(p, w.M, w.group, w.m0);
  w.cta_min = LimitOf(p, w.M, w.group, w.m0);  // limits grow with the row
  w.kend = min(ke, cta_max);
  w.n_tiles = w.kend > w.kb ? (w.kend - w.kb + kBN - 1) / kBN : 0;
  return w;
}
// Q rows [m0, m0 + kBM): fp16, scaled into the log2 domain, in swizzled halves at sq (threads
// [0, n) of the CTA take part).
template <int kHd>
__device__ __forceinline__ void FillQ(const PrefillAttentionParams& p, const CtaWork& w, uint8_t* sq, int t, int n) {
  constexpr int kChunks = kHd / 8;  // 16-byte chunks per row
  const float qs = (p.scale > 0.0f ? p.scale : rsqrtf(static_cast<float>(kHd))) * kLog2e;
  for (int u = t; u < kBM * kChunks; u += n) {
    const int r = u / kChunks, ch = u % kChunks;
    const int64_t m = w.m0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (m < w.M) {
      const float* src = p.q + ((m / w.group) * p.n_heads + w.hk * w.group + m % w.group) * kHd + ch * 8;
      const float4 x0 = *reinterpret_cast<const float4*>(src);
      const float4 x1 = *reinterpret_cast<const float4*>(src + 4);
      v = make_uint4(PackF2(x0.x * qs, x0.y * qs), PackF2(x0.z * qs, x0.w * qs), PackF2(x1.x * qs, x1.y * qs),
                     PackF2(x1.z * qs, x1.w * qs));
    }
    *reinterpret_cast<uint4*>(sq + (ch >> 3) * kQHalf + r * kRowBytes + (((ch & 7) ^ (r & 7)) << 4)) = v;
  }
}
// A thread's two accumulator rows (g and g + 8 of its warp's 16) and their softmax state.
struct Rows {
  int64_t m[2];
  int lim[2];
  float rm[2], rl[2];
};
__device__ __forceinline__ Rows MakeRows(const PrefillAttentionParams& p, const CtaWork& w, int wg, int wq, int g) {
  Rows r;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    r.m[h] = w.m0 + 64 * wg + 16 * wq + 8 * h + g;
    r.lim[h] = LimitOf(p, w.M, w.group, r.m[h]);
    r.rm[h] = -CUDART_INF_F;
    r.rl[h] = 0.0f;
  }
  return r;
}
// S = Q K^T (issued and committed, not waited): qaddr = this warpgroup's 64 rows of Q half 0,
// kaddr = the K tile's half 0.
template <int kHd>
__device__ __forceinline__ void IssueS(float (&s)[64], uint32_t qaddr, uint32_t kaddr) {
#pragma unroll
  for (int kk = 0; kk < kHd / 16; ++kk) {
    const uint64_t da = Desc(qaddr + (kk >> 2) * kQHalf + (kk & 3) * 32, 16, 1024);
    const uint64_t db = Desc(kaddr + (kk >> 2) * kKvHalf + (kk & 3) * 32, 16, 1024);
    WgmmaSS(s, da, db, kk > 0);
  }
  WgCommit();
}
// O += P V (issued and committed, not waited): vaddr = the V tile's half 0 (the next half is
// kKvHalf on: the descriptor's leading byte offset; unused at head dim 64).
template <int kHd>
__device__ __forceinline__ void IssuePV(float (&o)[kHd / 2], const uint32_t (&pa)[8][4], uint32_t vaddr) {
#pragma unroll
  for (int j = 0; j < kBN / 16; ++j) WgmmaRS(o, pa[j], Desc(vaddr + j * 16 * kRowBytes, kKvHalf, 1024));
  WgCommit();
}
// Mask (keys at or past a row's limit; only tiles that reach past the CTA's first limit need it)
// and online softmax of one tile's scores in s; corr = the factor each row's O must be scaled by.
__device__ __forceinline__ void Softmax(float (&s)[64], Rows& r, int key0, bool mask, int q4, float (&corr)[2]) {
  if (mask) {
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      const int key = key0 + 8 * j + 2 * q4;
      if (key >= r.lim[0]) s[4 * j] = -CUDART_INF_F;
      if (key + 1 >= r.lim[0]) s[4 * j + 1] = -CUDART_INF_F;
      if (key >= r.lim[1]) s[4 * j + 2] = -CUDART_INF_F;
      if (key + 1 >= r.lim[1]) s[4 * j + 3] = -CUDART_INF_F;
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = r.rm[h];
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float u = mx == -CUDART_INF_F ? 0.0f : mx;
    corr[h] = Exp2(r.rm[h] - u);
    r.rm[h] = mx;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      s[4 * j + 2 * h] = Exp2(s[4 * j + 2 * h] - u);
      s[4 * j + 2 * h + 1] = Exp2(s[4 * j + 2 * h + 1] - u);
      sum += s[4 * j + 2 * h] + s[4 * j + 2 * h + 1];
    }
    r.rl[h] = fmaf(r.rl[h], corr[h], sum);
  }
}
template <int kHd>
__device__ __forceinline__ void Rescale(float (&o)[kHd / 2], const float (&corr)[2]) {
  if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
    for (int j = 0; j < kHd / 8; ++j) {
      o[4 * j] *= corr[0];
      o[4 * j + 1] *= corr[0];
      o[4 * j + 2] *= corr[1];
      o[4 * j + 3] *= corr[1];
    }
  }
}
// P (fp16) as the A fragments of the 8 16-key k-steps of O += P V.
__device__ __forceinline__ void PackP(const float (&s)[64], uint32_t (&pa)[8][4]) {
#pragma unroll
  for (int j = 0; j < kBN / 16; ++j) {
    pa[j][0] = PackF2(s[8 * j], s[8 * j + 1]);
    pa[j][1] = PackF2(s[8 * j + 2], s[8 * j + 3]);
    pa[j][2] = PackF2(s[8 * j + 4], s[8 * j + 5]);
    pa[j][3] = PackF2(s[8 * j + 6], s[8 * j + 7]);
  }
}
// Row sums over the 4 lanes of a row, normalized o and lse.
template <int kHd>
__device__ __forceinline__ void Epilogue(const PrefillAttentionParams& p, const CtaWork& w, const Rows& r,
                                         const float (&o)[kHd / 2], int q4) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = r.rl[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t m = r.m[h];
    if (m >= w.M) continue;
    const int64_t out_row = (m / w.group) * p.n_heads + w.hk * w.group + m % w.group;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* orow = p.o + w.split * p.o_split_stride + out_row * kHd;
#pragma unroll
    for (int j = 0; j < kHd / 8; ++j) {
      *reinterpret_cast<float2*>(orow + 8 * j + 2 * q4) = make_float2(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
    }
    if (q4 == 0) p.lse[w.split * p.lse_split_stride + out_row] = l > 0.0f ? (r.rm[h] + log2f(l)) * kLn2 : -CUDART_INF_F;
  }
}

// One consumer warpgroup's accumulators: scores S of the current tile, output O, P as A fragments.
template <int kHd>
struct Acc {
  float o[kHd / 2] = {};
  float s[64] = {};
  uint32_t pa[8][4];
};
// The rest of tile T once its S = Q K^T is issued: wait for it, mask and softmax, rescale O, pack
// P, O += P V from the tile's V (vaddr), wait.
template <int kHd>
__device__ __forceinline__ void FinishTile(Acc<kHd>& a, Rows& r, const CtaWork& w, int T, int q4, uint32_t vaddr) {
  WgWait<0>();
  FenceRegs(a.s);
  float corr[2];
  const int key0 = w.kb + T * kBN;
  Softmax(a.s, r, key0, key0 + kBN > w.cta_min, q4, corr);
  Rescale<kHd>(a.o, corr);
  PackP(a.s, a.pa);
  WgFence();
  IssuePV<kHd>(a.o, a.pa, vaddr);
  WgWait<0>();
  FenceRegs(a.o);
}
#endif  // KVQ_PREFILL_WGMMA_BODY

// The grid of both schedules: (row blocks, kv heads, key splits).
inline dim3 WgmmaGrid(const PrefillAttentionParams& p) {
  const int64_t M = static_cast<int64_t>(p.rows) * (p.n_heads / p.n_kv_heads);
  return dim3(static_cast<unsigned>((M + kBM - 1) / kBM), static_cast<unsigned>(p.n_kv_heads),
              static_cast<unsigned>(p.splits));
}

// Serial schedule: all 256 threads load the ring with cp.async one tile ahead; per tile one CTA
// barrier, then S = Q K^T, softmax, O += P V in sequence.
template <int kHd>
__global__ void __launch_bounds__(kThreads, 1)
    PrefillWgmmaSerialKernel(const PrefillAttentionParams p, const int keys_per_split) {
#if defined(KVQ_PREFILL_WGMMA_BODY)
  using G = Geo<kHd>;
  extern __shared__ __align__(16) uint8_t pw_smem[];
  const uint32_t raw = SmemAddr(pw_smem);
  const uint32_t sbase = (raw + 1023u) & ~1023u;
  const uint32_t tbase = sbase + G::kQBytes;  // [kStages][K halves, V halves][kBN][128 B]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, q4 = lane & 3;
  const CtaWork w = MakeWork(p, keys_per_split);
  Rows r = MakeRows(p, w, wg, warp & 3, lane >> 2);
  FillQ<kHd>(p, w, pw_smem + (sbase - raw), tid, kThreads);
  FenceProxyAsync();  // (published by the first tile's barrier)
  const uint32_t qaddr = sbase + wg * 64 * kRowBytes;

  const uint16_t* kg = p.k + w.hk * p.kv_head_stride;
  const uint16_t* vg = p.v + w.hk * p.kv_head_stride;
  auto load_tile = [&](int T) {
    const int key0 = w.kb + T * kBN;
    const uint32_t dst = tbase + static_cast<uint32_t>(T % kStages) * G::kStageBytes;
    constexpr int kChunks = kHd / 8;
    for (int idx = tid; idx < kBN * kChunks; idx += kThreads) {
      const int t = idx / kChunks, ch = idx % kChunks;
      const int key = key0 + t;
      const bool ok = key < w.kend;
      const int64_t off = static_cast<int64_t>(ok ? key : 0) * p.kv_token_stride + ch * 8;
      const uint32_t so = (ch >> 3) * kKvHalf + t * kRowBytes + (((ch & 7) ^ (t & 7)) << 4);
      CpAsync16(dst + so, kg + off, ok);
      CpAsync16(dst + G::kVOff + so, vg + off, ok);
    }
    CpAsyncCommit();
  };
  auto kaddr = [&](int T) { return tbase + static_cast<uint32_t>(T % kStages) * G::kStageBytes; };
  // Tile T's data is in shared memory and visible to wgmma; tile T + 1 starts loading.
  auto arrive = [&](int T) {
    CpAsyncWaitAll();
    FenceProxyAsync();
    __syncthreads();
    if (T + 1 < w.n_tiles) load_tile(T + 1);
  };

  Acc<kHd> a;
  if (w.n_tiles > 0) load_tile(0);
  for (int T = 0; T < w.n_tiles; ++T) {
    arrive(T);
    WgFence();
    IssueS<kHd>(a.s, qaddr, kaddr(T));
    FinishTile(a, r, w, T, q4, kaddr(T) + G::kVOff);
  }
  Epilogue<kHd>(p, w, r, a.o, q4);
#else
  __trap();  // no sm_90a image: the launcher never gets here (PrefillWgmmaAvailable)
#endif
}

// Warp-specialized schedule: a producer warp streams K/V tiles with TMA into the 3-stage ring
// (full/empty mbarriers per stage: the producer refills a stage once all 256 consumer threads have
// released it), and the two consumer warpgroups take turns on the tensor cores ("ping-pong",
// FlashAttention-3): warpgroup w issues its S = Q K^T only after the other one issued its own
// (named barriers 1 and 2), so one warpgroup's softmax runs while the other's products do.
template <int kHd>
__global__ void __launch_bounds__(kWsThreads, 1)
    PrefillWgmmaWsKernel(const PrefillAttentionParams p, const int keys_per_split, const __grid_constant__ CUtensorMap tk,
                         const __grid_constant__ CUtensorMap tv) {
#if defined(KVQ_PREFILL_WGMMA_BODY)
  using G = Geo<kHd>;
  extern __shared__ __align__(16) uint8_t pw_smem[];
  const uint32_t raw = SmemAddr(pw_smem);
  const uint32_t sbase = (raw + 1023u) & ~1023u;
  const uint32_t tbase = sbase + G::kQBytes;
  const uint32_t bars = tbase + kStages * G::kStageBytes;  // full[kStages], empty[kStages]
  auto full = [&](int st) { return bars + 8u * st; };
  auto empty = [&](int st) { return bars + 8u * (kStages + st); };
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const CtaWork w = MakeWork(p, keys_per_split);
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      MbarInit(full(st), 1);
      MbarInit(empty(st), 2 * 128);
    }
    FenceMbarInit();
  }
  FillQ<kHd>(p, w, pw_smem + (sbase - raw), tid, kWsThreads);
  FenceProxyAsync();
  __syncthreads();  // the last CTA-wide barrier: the producer warp leaves below

  if (warp == 8) {  // producer
    if (lane == 0) {
      for (int T = 0; T < w.n_tiles; ++T) {
        const int st = T % kStages;
        if (T >= kStages) MbarWait(empty(st), ((T / kStages) - 1) & 1);
        MbarArriveExpectTx(full(st), G::kStageBytes);
        const uint32_t dst = tbase + static_cast<uint32_t>(st) * G::kStageBytes;
        const int key0 = w.kb + T * kBN;
#pragma unroll
        for (int h = 0; h < G::kHalves; ++h) {
          TmaLoad3d(dst + h * kKvHalf, &tk, 64 * h, w.hk, key0, full(st));
          TmaLoad3d(dst + G::kVOff + h * kKvHalf, &tv, 64 * h, w.hk, key0, full(st));
        }
      }
    }
    return;
  }

  const int wg = warp >> 2, q4 = lane & 3;
  Rows r = MakeRows(p, w, wg, warp & 3, lane >> 2);
  const uint32_t qaddr = sbase + wg * 64 * kRowBytes;
  Acc<kHd> a;
  // Turn barriers: warpgroup 0 waits on 1, warpgroup 1 on 2; warpgroup 1 lets 0 start, and skips
  // its last hand-over so that every arrival is matched.
  if (wg == 1 && w.n_tiles > 0) NamedArrive(1, 256);
  for (int T = 0; T < w.n_tiles; ++T) {
    const int st = T % kStages;
    const uint32_t ka = tbase + static_cast<uint32_t>(st) * G::kStageBytes;
    MbarWait(full(st), (T / kStages) & 1);
    NamedSync(1 + wg, 256);
    WgFence();
    IssueS<kHd>(a.s, qaddr, ka);
    if (wg == 0 || T + 1 < w.n_tiles) NamedArrive(2 - wg, 256);
    FinishTile(a, r, w, T, q4, ka + G::kVOff);
    MbarArrive(empty(st));
  }
  Epilogue<kHd>(p, w, r, a.o, q4);
#else
  __trap();
#endif
}

template <int kHd>
absl::Status LaunchSerial(const PrefillAttentionParams& p, int64_t keys_per_split, cudaStream_t stream) {
  constexpr size_t kSmemBytes = Geo<kHd>::kSmemBytes;
  KVQ_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(PrefillWgmmaSerialKernel<kHd>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(kSmemBytes)));
  PrefillWgmmaSerialKernel<kHd><<<WgmmaGrid(p), kThreads, kSmemBytes, stream>>>(p, static_cast<int>(keys_per_split));
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}


// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiledFn EncodeTiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiledFn>(nullptr);
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// K or V as a 3-D tensor (channel, kv head, key) read in boxes of 64 channels x 1 head x kBN keys
// (head dim 128: two boxes per tile row),
// 128-byte swizzled (the layout wgmma reads); keys past n_keys read as zeros.
absl::Status MakeKvMap(const PrefillAttentionParams& p, const uint16_t* base, CUtensorMap* map) {
  const EncodeTiledFn encode = EncodeTiled();
  if (encode == nullptr) return absl::FailedPreconditionError("cuTensorMapEncodeTiled is not available from the driver");
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(p.n_kv_heads),
                              static_cast<cuuint64_t>(p.n_keys)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(p.kv_head_stride) * 2,
                                 static_cast<cuuint64_t>(p.kv_token_stride) * 2};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(kBN)};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3, const_cast<uint16_t*>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return absl::InvalidArgumentError(absl::StrCat("cuTensorMapEncodeTiled failed (", static_cast<int>(r),
                                                   ") for K/V strides ", p.kv_token_stride, " / ", p.kv_head_stride));
  }
  return absl::OkStatus();
}

template <int kHd>
absl::Status LaunchWs(const PrefillAttentionParams& p, int64_t keys_per_split, const CUtensorMap& tk,
                      const CUtensorMap& tv, cudaStream_t stream) {
  constexpr size_t kWsSmemBytes = Geo<kHd>::kWsSmemBytes;
  KVQ_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(PrefillWgmmaWsKernel<kHd>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(kWsSmemBytes)));
  PrefillWgmmaWsKernel<kHd><<<WgmmaGrid(p), kWsThreads, kWsSmemBytes, stream>>>(p, static_cast<int>(keys_per_split), tk, tv);
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
  if (cudaFuncGetAttributes(&attr, PrefillWgmmaWsKernel<128>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  // This file is compiled for sm_90a only: the kernel has an image exactly where it can run.
  return true;
}

absl::Status LaunchPrefillAttentionWgmma(const PrefillAttentionParams& p, int64_t keys_per_split,
                                         WgmmaSchedule schedule, cudaStream_t stream) {
  if (p.head_dim != 64 && p.head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchPrefillAttentionWgmma: head_dim ", p.head_dim, " (64 or 128)"));
  }
  if (keys_per_split <= 0 || keys_per_split % kBN != 0 || keys_per_split > 2147483647 - kBN) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchPrefillAttentionWgmma: keys per split ", keys_per_split,
                                                   " (need a positive multiple of ", kBN, ")"));
  }
  if (schedule == WgmmaSchedule::kPingPong) {
    // TMA needs tensor maps of K and V; where the driver or the layout does not allow them (a zero
    // head stride, say), the cp.async schedule runs instead.
    CUtensorMap tk{}, tv{};
    if (p.n_keys == 0 || (MakeKvMap(p, p.k, &tk).ok() && MakeKvMap(p, p.v, &tv).ok())) {
      return p.head_dim == 64 ? LaunchWs<64>(p, keys_per_split, tk, tv, stream)
                              : LaunchWs<128>(p, keys_per_split, tk, tv, stream);
    }
  }
  return p.head_dim == 64 ? LaunchSerial<64>(p, keys_per_split, stream) : LaunchSerial<128>(p, keys_per_split, stream);
}

}  // namespace kvq::kernels::internal
