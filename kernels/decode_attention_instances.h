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
