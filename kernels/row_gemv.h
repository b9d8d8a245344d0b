// Linear layers of decode steps with 1-4 rows, at the memory bandwidth: C[m][n] = sum_k A[m][k]
// W[n][k] (+ C[m][n] when beta = 1), W a weight [N][K] (PyTorch Linear layout) in f16 or bf16, A in
// the same dtype, fp32 accumulation, C in f32 or the weight dtype.
//
// Why: a decode step at batch 1 reads every weight once and does two FLOPs per weight; cuBLAS picks
// tiles of 64-256 output columns for one row, so the q/k/v and output projections of Llama-3-8B ran
// on 96 CTAs (of 132 SMs) at 56-59% of the read bandwidth, and its split-K variants added a reduce
// kernel per GEMM (ncu in engine_bench, H200, 2026-12-02). Here one warp owns one weight row and
// streams it with 16-byte loads, four in flight per lane, the rows of A read through L1 (they are
// the same for every warp); the warp's lanes sum in fp32 and reduce by shuffles in a fixed order
// (the same bits for the same shape, whatever the launch).
//
// Measured (H200, 2026-12-02, ncu in engine_bench, Llama-3-8B shape, f16, one row, µs against
// cuBLAS in the same process): q/k/v 15.4 against 17.8, output projection + down projection 42.7
// against 52.1 (two GEMMs and two split-K reduces), gate/up 58.5 against 59.4 (87% of the read
// bandwidth), LM head 240.0 against 240.2; a decode step at 1K tokens, batch 1: 4.54 against 4.94
// ms per token (SmolLM2 0.95 against 1.14). Two rows (batch 2; the weight piece converted once for
// both): Llama-3-8B fp16 1K 4.95 / 4.93 against 5.08 / 5.08 ms per token, SmolLM2 0.98 against
// 1.14; four rows: 6.80 against 5.22 on Llama-3-8B (each row of A read and converted per weight
// piece: issue-bound), so kernels::Gemm sends it up to two rows (H200, 2026-12-02 19:16 UTC).
//
// kernels::Gemm sends the calls of up to RowGemvRows() rows this takes (RowGemvApplies) here while
// RowGemv() is on (the default); SetRowGemv(false) sends them to cuBLAS again (A/B: engine_bench
// --ab=rowgemv).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace kvq::kernels {

inline constexpr int kRowGemvMaxRows = 4;

struct RowGemvParams {
  int m = 0, n = 0, k = 0;
  DType ab_dtype = DType::kF16;  // f16 or bf16 (A and W)
  DType c_dtype = DType::kF32;   // f32 or ab_dtype
  const void* a = nullptr;       // [m][lda]
  int64_t lda = 0;               // elements; 0 means k
  const void* w = nullptr;       // [n][ldw]
  int64_t ldw = 0;               // elements; 0 means k
  void* c = nullptr;             // [m][ldc]
  int64_t ldc = 0;               // elements; 0 means n
  float beta = 0.0f;             // 0 or 1
};

// Whether LaunchRowGemv takes p: 1..kRowGemvMaxRows rows, n and k > 0, f16/bf16 operands, k, lda
// and ldw multiples of 8 elements with A and W 16-byte aligned (16-byte loads), C f32 or the
// operand dtype, beta 0 or 1.
bool RowGemvApplies(const RowGemvParams& p);

// InvalidArgument (saying which condition failed) when !RowGemvApplies(p).
absl::Status LaunchRowGemv(const RowGemvParams& p, cudaStream_t stream);

// The switches below start from the environment (KVQ_ROW_GEMV=0: off; KVQ_ROW_GEMV_ROWS=N;
// KVQ_ROW_GEMV_EARLY=0: no early start), else from the defaults (on, 2 rows, on).
void SetRowGemv(bool on);
bool RowGemv();

// kernels::Gemm sends calls of up to RowGemvRows() rows here (default 2; 0..kRowGemvMaxRows;
// engine_bench --row_gemv_rows).
void SetRowGemvRows(int max_rows);
int RowGemvRows();

// Early start: the row GEMV is launched as a programmatic dependent of the kernel before it
// (kernels/launch.cuh) and loads its first weight pieces before waiting for that kernel, so W must
// not be written by the kernel just before the launch in the stream (weights never are: they are
// written at load, long before a step; kernels before that one have completed by then, since kvq
// launches them without the attribute unless ProgrammaticLaunch() is on, and then they wait). On by default: decode steps at batch 1, ms per token on / off, same process
// (H200, 2026-12-02 19:05 UTC, two runs): Llama-3-8B fp16 1K 4.559 / 4.599 and 4.590 / 4.640, nuq3-1%
// 769 5.069 / 5.111 and 5.092 / 5.160, SmolLM2 fp16 1K 0.928 / 0.985 and 0.913 / 0.963. Captured CUDA
// graphs keep the setting they were captured with.
void SetRowGemvEarlyStart(bool on);
bool RowGemvEarlyStart();

}  // namespace kvq::kernels
