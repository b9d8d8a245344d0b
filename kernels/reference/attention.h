// Reference decode attention and partial merge: plain C++, double accumulation. The oracle of
// kernels/decode_attention.cu (fp16 codec) and kernels/merge_attention.cu, and the CPU backend's
// attention over dense K/V.
#pragma once

#include <cstdint>
#include <vector>

namespace kvq::kernels {

// One sequence: q [n_heads][head_dim] (RoPE applied), keys [n_tokens][n_kv_heads][head_dim]
// pre-RoPE (rotated here at position first_position + t with inv_freq) unless keys_rotated,
// values of the same shape. GQA: head h reads kv head h / (n_heads / n_kv_heads).
// o [n_heads][head_dim] normalized, lse [n_heads] natural log (-inf and o = 0 when n_tokens = 0).
struct DecodeAttentionRefInput {
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int64_t n_tokens = 0;
  int64_t first_position = 0;
  bool keys_rotated = false;
  double scale = 0.0;  // <= 0: 1/sqrt(head_dim)
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const std::vector<double>* inv_freq = nullptr;  // RopeInvFreq(); needed unless keys_rotated
};
void DecodeAttentionReference(const DecodeAttentionRefInput& in, float* o, float* lse);

// rows x n_parts partials: o_parts[(row * n_parts + r) * head_dim + d], lse_parts[row * n_parts
// + r] -> o [rows][head_dim], lse [rows] (kernels/merge_attention.h rule, in double).
void MergeAttentionReference(int rows, int n_parts, int head_dim, const float* o_parts,
                             const float* lse_parts, float* o, float* lse);

}  // namespace kvq::kernels
