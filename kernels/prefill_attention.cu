// PrefillAttention with the mma.sync kernel, the choice of kernel, and the prefill-over-the-past driver
// (kernels/prefill_attention.h; ExpandKv is kernels/expand_kv.cu, the Hopper kernels
// kernels/prefill_attention_sm90a.cu).
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

using decode_attention_mma::Exp2;
using decode_attention_mma::Ldsm4;
using decode_attention_mma::Ldsm4T;
using decode_attention_mma::Mma;
using decode_attention_mma::PackF2;
using decode_attention_mma::SmemAddr;
using internal::Aligned16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

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
    out[r * out_stride + c] = __half_as_ushort(__float2half_rn(in[r * in_stride + c]));
  }
}

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
