// Instances of the tensor-core decode-attention kernels: fp16 (decode_attention_mma.cuh) and LUT
// codecs (decode_attention_lut_mma.cuh), limited by KVQ_CUDA_HEAD_DIMS / KVQ_CUDA_BITS like the
// other tables.
#include "kernels/decode_attention_instances.h"
#include "kernels/decode_attention_lut_mma.cuh"
#include "kernels/decode_attention_mma.cuh"

namespace kvq::kernels::decode_attention_internal {

#define KVQ_DA_MMA_FP16(HD)                                                  \
  {DecodeAttentionDesc{HD, KvCodec::kFp16, 8},                               \
   &decode_attention_mma::DecodeAttentionMmaKernel<HD, KvCodec::kFp16>,      \
   &decode_attention_mma::MmaCfg<HD, KvCodec::kFp16>::SmemBytes}
#define KVQ_DA_MMA_LUT(HD, B)                                                    \
  {DecodeAttentionDesc{HD, KvCodec::kLut##B, 8},                                 \
   &decode_attention_lut_mma::DecodeAttentionLutMmaKernel<HD, KvCodec::kLut##B>, \
   &decode_attention_lut_mma::LutMmaCfg<HD, B>::SmemBytes}

const std::vector<DecodeAttentionMmaEntry>& MmaDecodeAttentionEntries() {
  static const std::vector<DecodeAttentionMmaEntry> kEntries = {
#ifdef KVQ_CUDA_HD_64
      KVQ_DA_MMA_FP16(64),
#ifdef KVQ_CUDA_BITS_2
      KVQ_DA_MMA_LUT(64, 2),
#endif
#ifdef KVQ_CUDA_BITS_3
      KVQ_DA_MMA_LUT(64, 3),
#endif
#ifdef KVQ_CUDA_BITS_4
      KVQ_DA_MMA_LUT(64, 4),
#endif
#endif
#ifdef KVQ_CUDA_HD_128
      KVQ_DA_MMA_FP16(128),
#ifdef KVQ_CUDA_BITS_2
      KVQ_DA_MMA_LUT(128, 2),
#endif
#ifdef KVQ_CUDA_BITS_3
      KVQ_DA_MMA_LUT(128, 3),
#endif
#ifdef KVQ_CUDA_BITS_4
      KVQ_DA_MMA_LUT(128, 4),
#endif
#endif
  };
  return kEntries;
}

}  // namespace kvq::kernels::decode_attention_internal
