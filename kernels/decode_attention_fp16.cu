// fp16 instances of DecodeAttentionKernel (see decode_attention.cuh).
#include "kernels/decode_attention.cuh"
#include "kernels/decode_attention_instances.h"

namespace kvq::kernels::decode_attention_internal {

#define KVQ_DA_ENTRY(HD, G) \
  {DecodeAttentionDesc{HD, KvCodec::kFp16, G}, &DecodeAttentionKernel<HD, KvCodec::kFp16, G>}

const std::vector<DecodeAttentionEntry>& Fp16DecodeAttentionEntries() {
  static const std::vector<DecodeAttentionEntry> kEntries = {
#ifdef KVQ_CUDA_HD_64
      KVQ_DA_ENTRY(64, 1), KVQ_DA_ENTRY(64, 4), KVQ_DA_ENTRY(64, 8),
#endif
#ifdef KVQ_CUDA_HD_128
      KVQ_DA_ENTRY(128, 1), KVQ_DA_ENTRY(128, 4), KVQ_DA_ENTRY(128, 8),
#endif
  };
  return kEntries;
}

}  // namespace kvq::kernels::decode_attention_internal
