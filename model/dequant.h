// Dequantization of ggml tensor data to fp32, one function per block format. Each function reads
// `n` elements (a multiple of the type's block size) from raw little-endian block bytes, as they
// lie in a GGUF file, and writes `n` floats in ggml element order.
//
// Block formats (32 elements per block unless noted; d and m are IEEE fp16):
//   F32/F16/BF16  one element per "block"
//   Q4_0  {d; qs[16]}          x = (q - 8) * d     q of element j<16: low nibble of qs[j],
//                                                  of element j+16: high nibble of qs[j]
//   Q4_1  {d; m; qs[16]}       x = q * d + m       same nibble order
//   Q5_0  {d; qh[4]; qs[16]}   x = (q - 16) * d    q = nibble | bit j (element j) or bit j+16
//                                                  (element j+16) of the u32 qh, as 0x10
//   Q5_1  {d; m; qh[4]; qs[16]} x = q * d + m
//   Q8_0  {d; int8 qs[32]}     x = q * d
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "model/gguf.h"

namespace kvq::model {

// Layout of a ggml type: `block_bytes` bytes hold `block_elems` elements.
struct GgmlTypeInfo {
  const char* name;
  int64_t block_elems;
  int64_t block_bytes;
  bool can_dequantize;  // has a Dequantize* function below
};

// nullptr when `type` is not a ggml type this reader knows the layout of.
const GgmlTypeInfo* FindGgmlTypeInfo(uint32_t type);

// Bytes taken by `n` elements of `type`; InvalidArgument when n is negative, not a whole number
// of blocks, or the byte count overflows; `what` names the tensor in the message.
absl::StatusOr<uint64_t> GgmlTypeBytes(GgmlType type, int64_t n, absl::string_view what);

void DequantizeF32(const uint8_t* src, int64_t n, float* dst);
void DequantizeF16(const uint8_t* src, int64_t n, float* dst);
void DequantizeBF16(const uint8_t* src, int64_t n, float* dst);
void DequantizeQ4_0(const uint8_t* src, int64_t n, float* dst);
void DequantizeQ4_1(const uint8_t* src, int64_t n, float* dst);
void DequantizeQ5_0(const uint8_t* src, int64_t n, float* dst);
void DequantizeQ5_1(const uint8_t* src, int64_t n, float* dst);
void DequantizeQ8_0(const uint8_t* src, int64_t n, float* dst);

// Dispatches on `type`. `src_bytes` must be exactly GgmlTypeBytes(type, n). Unimplemented for a
// known type without a dequantizer (e.g. K-quants); `what` names the tensor in errors.
absl::Status Dequantize(GgmlType type, const uint8_t* src, uint64_t src_bytes, int64_t n,
                        float* dst, absl::string_view what);

}  // namespace kvq::model
