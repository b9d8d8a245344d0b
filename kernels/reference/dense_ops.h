// References of kernels/dense_ops.h, kernels/gemm.h and kernels/sampling.h: plain C++ on float
// arrays (inputs already converted from f16/bf16), double accumulation.
#pragma once

#include <cstdint>
#include <vector>

namespace kvq::kernels {

void RmsNormReference(const float* x, const float* weight, int rows, int dim, float eps, float* y);
void SwiGluReference(const float* gate, const float* up, int64_t n, float* out);
void EmbeddingReference(const float* table, int vocab, int dim, const int32_t* ids, int rows,
                        float* out);
// C[m][n] = A[m][k] . B[n][k]^T.
void GemmReference(const float* a, const float* b, int m, int n, int k, float* c);

struct SamplingRefConfig {
  float temperature = 1.0f;
  int top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  uint64_t seed = 0;
  uint64_t step = 0;
};
// The rule of kernels/sampling.h, in double, with the same Philox uniform.
int32_t SampleReference(const float* logits, int vocab, const SamplingRefConfig& c);
// Its draw, given e_i and the threshold: the first id (in id order) whose running sum of the kept
// e_i (e_i >= tau) exceeds u * (their total), u = SamplingUniform(seed, step); the last kept id
// when rounding runs past the end (0 when none is kept).
int32_t SampleDrawReference(const std::vector<double>& e, double tau, uint64_t seed, uint64_t step);

}  // namespace kvq::kernels
