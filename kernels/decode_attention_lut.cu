// LUT-code (nuqB / intB per-channel) instances of DecodeAttentionKernel (decode_attention.cuh).
#include "kernels/decode_attention.cuh"
#include "kernels/decode_attention_instances.h"

namespace kvq::kernels::decode_attention_internal {

#define KVQ_DA_ENTRY(HD, B, G) \
  {DecodeAttentionDesc{HD, KvCodec::kLut##B, G}, &DecodeAttentionKernel<HD, KvCodec::kLut##B, G>}
#define KVQ_DA_GROUPS(HD, B) KVQ_DA_ENTRY(HD, B, 1), KVQ_DA_ENTRY(HD, B, 4), KVQ_DA_ENTRY(HD, B, 8)

const std::vector<DecodeAttentionEntry>& LutDecodeAttentionEntries() {
  static const std::vector<DecodeAttentionEntry> kEntries = {
#if defined(KVQ_CUDA_HD_64) && defined(KVQ_CUDA_BITS_2)
      KVQ_DA_GROUPS(64, 2),
#endif
#if defined(KVQ_CUDA_HD_64) && defined(KVQ_CUDA_BITS_3)
      KVQ_DA_GROUPS(64, 3),
#endif
#if defined(KVQ_CUDA_HD_64) && defined(KVQ_CUDA_BITS_4)
      KVQ_DA_GROUPS(64, 4),
#endif
#if defined(KVQ_CUDA_HD_128) && defined(KVQ_CUDA_BITS_2)
      KVQ_DA_GROUPS(128, 2),
#endif
#if defined(KVQ_CUDA_HD_128) && defined(KVQ_CUDA_BITS_3)
      KVQ_DA_GROUPS(128, 3),
#endif
#if defined(KVQ_CUDA_HD_128) && defined(KVQ_CUDA_BITS_4)
      KVQ_DA_GROUPS(128, 4),
#endif
  };
  return kEntries;
}

}  // namespace kvq::kernels::decode_attention_internal
