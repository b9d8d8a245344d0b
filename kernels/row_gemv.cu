// See row_gemv.h.
#include "kernels/row_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"
#include "kernels/launch.cuh"

namespace kvq::kernels {
namespace {

using internal::FromFloat;
using internal::Pair2;
using internal::ToFloat2;
using internal::ToFloat8;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16-byte weight loads in flight per lane. 4 rather than 8 or 16: Llama-3-8B fp16 1K batch 1
// 4.54 / 4.52 against 4.62 / 4.61 (8) and 4.65 / 4.61 (16) ms per token (H200, same call,
// 2026-12-02 18:58 UTC); fewer registers, more warps per SM.
constexpr int kUnroll = 4;

// Defaults, each overridable at start-up from the environment: KVQ_ROW_GEMV=0 (cuBLAS for every
// GEMM), KVQ_ROW_GEMV_ROWS=N (0..4), KVQ_ROW_GEMV_EARLY=0 (a plain launch).
int EnvInt(const char* name, int fallback) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return fallback;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  return *end == '\0' ? static_cast<int>(v) : fallback;
}
std::atomic<bool> g_row_gemv{EnvInt("KVQ_ROW_GEMV", 1) != 0};
std::atomic<bool> g_row_gemv_early{EnvInt("KVQ_ROW_GEMV_EARLY", 1) != 0};
std::atomic<int> g_row_gemv_rows{std::clamp(EnvInt("KVQ_ROW_GEMV_ROWS", 2), 0, kRowGemvMaxRows)};

// A weight piece, read once: not kept in L1 (the rows of A are, for every warp of the SM).
__device__ __forceinline__ uint4 LoadStream(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// acc += dot(w, a) over eight elements, in element order.
template <typename T>
__device__ __forceinline__ float Dot8(const uint4& w, const uint4& a, float acc) {
  const Pair2<T>* ww = reinterpret_cast<const Pair2<T>*>(&w);
  const Pair2<T>* aa = reinterpret_cast<const Pair2<T>*>(&a);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = ToFloat2(ww[i]), y = ToFloat2(aa[i]);
    acc = fmaf(x.x, y.x, acc);
    acc = fmaf(x.y, y.y, acc);
  }
  return acc;
}

// acc[m] += dot(w, a_m) over eight elements, in element order, for every row m of A. Several rows:
// the weight piece converted once for all of them (the same products and sums as Dot8 per row).
// One row: Dot8, the code the single-row timings in row_gemv.h were measured with.
template <typename T, int kM>
__device__ __forceinline__ void Dot8Rows(const uint4& w, const uint4* const (&a)[kM], int at, float (&acc)[kM]) {
  if constexpr (kM == 1) {
    acc[0] = Dot8<T>(w, __ldg(a[0] + at), acc[0]);
    return;
  }
  float wf[8];
  ToFloat8<T>(w, wf);
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    float af[8];
    ToFloat8<T>(__ldg(a[m] + at), af);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[m] = fmaf(wf[i], af[i], acc[m]);
  }
}

// One warp per weight row n (output column n of every row of A). Lane l sums the 8-element
// pieces l, l + 32, l + 64, ... of the row in that order, then the lanes are added by xor
// shuffles: a fixed order for a given k.
template <typename T, int kM>
__global__ void __launch_bounds__(kThreads) RowGemvKernel(const RowGemvParams p) {
  const int n = blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= p.n) {
    GridDependencyWait();  // see kernels/launch.cuh (no memory access on this path either way)
    return;
  }
  const int64_t lda = p.lda > 0 ? p.lda : p.k, ldw = p.ldw > 0 ? p.ldw : p.k;
  const int pieces = p.k / 8;
  const uint4* w = reinterpret_cast<const uint4*>(static_cast<const T*>(p.w) + n * ldw);
  const uint4* a[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    a[m] = reinterpret_cast<const uint4*>(static_cast<const T*>(p.a) + (m < p.m ? m : 0) * lda);
  }
  float acc[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = 0.0f;

  // The first round of weight pieces is loaded before GridDependencyWait: the weights are written
  // by no kernel, so with the early start (RowGemvEarlyStart) these loads overlap the kernel
  // before this one instead of following it. Everything else (A, C) is read after the wait.
  uint4 wv[kUnroll];
  if (pieces >= 32 * kUnroll) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) wv[u] = LoadStream(w + 32 * u + lane);
  }
  GridDependencyWait();
  int base = 0;
  for (; base + 32 * kUnroll <= pieces; base += 32 * kUnroll) {
    if (base > 0) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) wv[u] = LoadStream(w + base + 32 * u + lane);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) Dot8Rows<T, kM>(wv[u], a, base + 32 * u + lane, acc);
  }
  for (int i = base + lane; i < pieces; i += 32) Dot8Rows<T, kM>(LoadStream(w + i), a, i, acc);
#pragma unroll
  for (int m = 0; m < kM; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  }
  if (lane != 0) return;
  const int64_t ldc = p.ldc > 0 ? p.ldc : p.n;
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    if (m >= p.m) break;
    if (p.c_dtype == DType::kF32) {
      float* c = static_cast<float*>(p.c) + m * ldc + n;
      *c = p.beta != 0.0f ? *c + acc[m] : acc[m];
    } else {
      T* c = static_cast<T*>(p.c) + m * ldc + n;
      *c = FromFloat<T>(p.beta != 0.0f ? internal::ToFloat(*c) + acc[m] : acc[m]);
    }
  }
}

// With the early start: the programmatic-dependent-launch attribute whatever ProgrammaticLaunch()
// says (kernels/launch.cuh), so the CTAs are scheduled as soon as the kernel before has triggered
// (kvq's kernels trigger right after their own wait) and fetch their first weights meanwhile.
template <typename T, int kM>
cudaError_t LaunchRows(const RowGemvParams& p, cudaStream_t stream) {
  return internal::LaunchWith(g_row_gemv_early.load(), RowGemvKernel<T, kM>, dim3((p.n + kWarps - 1) / kWarps),
                              dim3(kThreads), 0, stream, p);
}

template <typename T>
cudaError_t Launch(const RowGemvParams& p, cudaStream_t stream) {
  if (p.m == 1) return LaunchRows<T, 1>(p, stream);
  if (p.m == 2) return LaunchRows<T, 2>(p, stream);
  return LaunchRows<T, 4>(p, stream);
}

const char* Refusal(const RowGemvParams& p) {
  const int64_t lda = p.lda > 0 ? p.lda : p.k, ldw = p.ldw > 0 ? p.ldw : p.k,
                ldc = p.ldc > 0 ? p.ldc : p.n;
  if (p.m < 1 || p.m > kRowGemvMaxRows) return "m must be 1..4";
  if (p.n < 1 || p.k < 1) return "n and k must be positive";
  if (p.ab_dtype != DType::kF16 && p.ab_dtype != DType::kBF16) return "A and W must be f16 or bf16";
  if (p.c_dtype != DType::kF32 && p.c_dtype != p.ab_dtype) return "C must be f32 or the operand dtype";
  if (p.k % 8 != 0 || lda % 8 != 0 || ldw % 8 != 0 || lda < p.k || ldw < p.k || ldc < p.n) {
    return "k, lda and ldw must be multiples of 8 with lda, ldw >= k and ldc >= n";
  }
  if (p.a == nullptr || p.w == nullptr || p.c == nullptr) return "null operand";
  if (reinterpret_cast<uintptr_t>(p.a) % 16 != 0 || reinterpret_cast<uintptr_t>(p.w) % 16 != 0) {
    return "A and W must be 16-byte aligned";
  }
  if (p.beta != 0.0f && p.beta != 1.0f) return "beta must be 0 or 1";
  return nullptr;
}

}  // namespace

bool RowGemvApplies(const RowGemvParams& p) { return Refusal(p) == nullptr; }

absl::Status LaunchRowGemv(const RowGemvParams& p, cudaStream_t stream) {
  if (const char* why = Refusal(p)) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchRowGemv: ", why, " (m ", p.m, ", n ", p.n, ", k ", p.k,
                                                   ", lda ", p.lda, ", ldw ", p.ldw, ")"));
  }
  KVQ_RETURN_IF_CUDA_ERROR(p.ab_dtype == DType::kF16 ? Launch<__half>(p, stream) : Launch<__nv_bfloat16>(p, stream));
  return absl::OkStatus();
}

void SetRowGemv(bool on) { g_row_gemv.store(on); }
void SetRowGemvRows(int max_rows) { g_row_gemv_rows.store(std::clamp(max_rows, 0, kRowGemvMaxRows)); }
int RowGemvRows() { return g_row_gemv_rows.load(); }
void SetRowGemvEarlyStart(bool on) { g_row_gemv_early.store(on); }
bool RowGemvEarlyStart() { return g_row_gemv_early.load(); }
bool RowGemv() { return g_row_gemv.load(); }

}  // namespace kvq::kernels
