// Internal: the instantiated decode-attention kernels, one table per translation unit (so the
// fp16 and LUT instances compile in parallel). Limited by KVQ_CUDA_HEAD_DIMS / KVQ_CUDA_BITS
// through the KVQ_CUDA_HD_<n> / KVQ_CUDA_BITS_<n> definitions (all when none is defined).
#pragma once

#include <vector>

#include "kernels/decode_attention.h"

namespace kvq::kernels::decode_attention_internal {

using DecodeAttentionKernelFn = void (*)(DecodeAttentionParams, int, float*, float*);

struct DecodeAttentionEntry {
  DecodeAttentionDesc desc;
  DecodeAttentionKernelFn fn;
};

const std::vector<DecodeAttentionEntry>& Fp16DecodeAttentionEntries();
const std::vector<DecodeAttentionEntry>& LutDecodeAttentionEntries();

// Tensor-core kernels (decode_attention_mma.cuh): one instance per (head_dim, codec) serves every
// GQA group <= 8 (desc.max_group == 8); dynamic shared memory depends on the warps per CTA.
struct DecodeAttentionMmaEntry {
  DecodeAttentionDesc desc;
  DecodeAttentionKernelFn fn;
  size_t (*smem_bytes)(int warps);
};
const std::vector<DecodeAttentionMmaEntry>& MmaDecodeAttentionEntries();

}  // namespace kvq::kernels::decode_attention_internal

#if !defined(KVQ_CUDA_HD_64) && !defined(KVQ_CUDA_HD_128)
#define KVQ_CUDA_HD_64 1
#define KVQ_CUDA_HD_128 1
#endif
#if !defined(KVQ_CUDA_BITS_2) && !defined(KVQ_CUDA_BITS_3) && !defined(KVQ_CUDA_BITS_4)
#define KVQ_CUDA_BITS_2 1
#define KVQ_CUDA_BITS_3 1
#define KVQ_CUDA_BITS_4 1
#endif
