// Instances of the tensor-core decode-attention kernel (decode_attention_mma.cuh): fp16 and LUT
// codecs, limited by KVQ_CUDA_HEAD_DIMS / KVQ_CUDA_BITS like the other tables.
#include "kernels/decode_attention_instances.h"
#include "kernels/decode_attention_mma.cuh"

namespace kvq::kernels::decode_attention_internal {

#define KVQ_DA_MMA(HD, CODEC)                                                              \
  {DecodeAttentionDesc{HD, KvCodec::CODEC, 8},                                             \
   &decode_attention_mma::DecodeAttentionMmaKernel<HD, KvCodec::CODEC>,                   \
   &decode_attention_mma::MmaCfg<HD, KvCodec::CODEC>::SmemBytes}

const std::vector<DecodeAttentionMmaEntry>& MmaDecodeAttentionEntries() {
  static const std::vector<DecodeAttentionMmaEntry> kEntries = {
#ifdef KVQ_CUDA_HD_64
      KVQ_DA_MMA(64, kFp16),
#ifdef KVQ_CUDA_BITS_2
      KVQ_DA_MMA(64, kLut2),
#endif
#ifdef KVQ_CUDA_BITS_3
      KVQ_DA_MMA(64, kLut3),
#endif
#ifdef KVQ_CUDA_BITS_4
      KVQ_DA_MMA(64, kLut4),
#endif
#endif
#ifdef KVQ_CUDA_HD_128
      KVQ_DA_MMA(128, kFp16),
#ifdef KVQ_CUDA_BITS_2
      KVQ_DA_MMA(128, kLut2),
#endif
#ifdef KVQ_CUDA_BITS_3
      KVQ_DA_MMA(128, kLut3),
#endif
#ifdef KVQ_CUDA_BITS_4
      KVQ_DA_MMA(128, kLut4),
#endif
#endif
  };
  return kEntries;
}

}  // namespace kvq::kernels::decode_attention_internal
