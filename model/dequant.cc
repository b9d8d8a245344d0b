#include "model/dequant.h"

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/half.h"

namespace kvq::model {
namespace {

constexpr int kQK = 32;  // elements per block of the 32-element formats

inline float Half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return HalfBitsToFloat(h);
}

inline uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Indexed by the ggml type number; sizes as in ggml.c's type_traits. Types with an empty name are
// retired (4, 5) or not known to this reader.
struct TypeEntry {
  uint32_t id;
  GgmlTypeInfo info;
};
constexpr TypeEntry kTypes[] = {
    {0, {"F32", 1, 4, true}},      {1, {"F16", 1, 2, true}},
    {2, {"Q4_0", 32, 18, true}},   {3, {"Q4_1", 32, 20, true}},
    {6, {"Q5_0", 32, 22, true}},   {7, {"Q5_1", 32, 24, true}},
    {8, {"Q8_0", 32, 34, true}},   {9, {"Q8_1", 32, 36, false}},
    {10, {"Q2_K", 256, 84, false}}, {11, {"Q3_K", 256, 110, false}},
    {12, {"Q4_K", 256, 144, false}}, {13, {"Q5_K", 256, 176, false}},
    {14, {"Q6_K", 256, 210, false}}, {15, {"Q8_K", 256, 292, false}},
    {24, {"I8", 1, 1, false}},     {25, {"I16", 1, 2, false}},
    {26, {"I32", 1, 4, false}},    {27, {"I64", 1, 8, false}},
    {28, {"F64", 1, 8, false}},    {30, {"BF16", 1, 2, true}},
};

}  // namespace

const GgmlTypeInfo* FindGgmlTypeInfo(uint32_t type) {
  for (const TypeEntry& e : kTypes) {
    if (e.id == type) return &e.info;
  }
  return nullptr;
}

const char* GgmlTypeName(GgmlType t) {
  const GgmlTypeInfo* info = FindGgmlTypeInfo(static_cast<uint32_t>(t));
  return info == nullptr ? "unknown" : info->name;
}

absl::StatusOr<uint64_t> GgmlTypeBytes(GgmlType type, int64_t n, absl::string_view what) {
  const GgmlTypeInfo* info = FindGgmlTypeInfo(static_cast<uint32_t>(type));
  if (info == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": unknown ggml tensor type ", static_cast<uint32_t>(type)));
  }
  if (n < 0 || n % info->block_elems != 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", n, " elements of type ", info->name,
                                                   " are not a whole number of ",
                                                   info->block_elems, "-element blocks"));
  }
  const uint64_t blocks = static_cast<uint64_t>(n / info->block_elems);
  if (blocks > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(info->block_bytes)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": byte size overflows"));
  }
  return blocks * static_cast<uint64_t>(info->block_bytes);
}

void DequantizeF32(const uint8_t* src, int64_t n, float* dst) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

void DequantizeF16(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Half(src + 2 * i);
}

void DequantizeBF16(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t b;
    std::memcpy(&b, src + 2 * i, 2);
    const uint32_t bits = static_cast<uint32_t>(b) << 16;
    std::memcpy(dst + i, &bits, 4);
  }
}

void DequantizeQ4_0(const uint8_t* src, int64_t n, float* dst) {
  const int64_t nb = n / kQK;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = src + b * 18;
    const float d = Half(blk);
    const uint8_t* qs = blk + 2;
    float* y = dst + b * kQK;
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
      y[j + kQK / 2] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  }
}

void DequantizeQ4_1(const uint8_t* src, int64_t n, float* dst) {
  const int64_t nb = n / kQK;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = src + b * 20;
    const float d = Half(blk);
    const float m = Half(blk + 2);
    const uint8_t* qs = blk + 4;
    float* y = dst + b * kQK;
    for (int j = 0; j < kQK / 2; ++j) {
      y[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
      y[j + kQK / 2] = static_cast<float>(qs[j] >> 4) * d + m;
    }
  }
}

void DequantizeQ5_0(const uint8_t* src, int64_t n, float* dst) {
  const int64_t nb = n / kQK;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = src + b * 22;
    const float d = Half(blk);
    const uint32_t qh = LoadU32(blk + 2);
    const uint8_t* qs = blk + 6;
    float* y = dst + b * kQK;
    for (int j = 0; j < kQK / 2; ++j) {
      const int hi0 = static_cast<int>((qh >> j) & 1u) << 4;
      const int hi1 = static_cast<int>((qh >> (j + 16)) & 1u) << 4;
      y[j] = static_cast<float>(((qs[j] & 0x0f) | hi0) - 16) * d;
      y[j + kQK / 2] = static_cast<float>(((qs[j] >> 4) | hi1) - 16) * d;
    }
  }
}

void DequantizeQ5_1(const uint8_t* src, int64_t n, float* dst) {
  const int64_t nb = n / kQK;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = src + b * 24;
    const float d = Half(blk);
    const float m = Half(blk + 2);
    const uint32_t qh = LoadU32(blk + 4);
    const uint8_t* qs = blk + 8;
    float* y = dst + b * kQK;
    for (int j = 0; j < kQK / 2; ++j) {
      const int hi0 = static_cast<int>((qh >> j) & 1u) << 4;
      const int hi1 = static_cast<int>((qh >> (j + 16)) & 1u) << 4;
      y[j] = static_cast<float>((qs[j] & 0x0f) | hi0) * d + m;
      y[j + kQK / 2] = static_cast<float>((qs[j] >> 4) | hi1) * d + m;
    }
  }
}

void DequantizeQ8_0(const uint8_t* src, int64_t n, float* dst) {
  const int64_t nb = n / kQK;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = src + b * 34;
    const float d = Half(blk);
    const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
    float* y = dst + b * kQK;
    for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(qs[j]) * d;
  }
}

absl::Status Dequantize(GgmlType type, const uint8_t* src, uint64_t src_bytes, int64_t n,
                        float* dst, absl::string_view what) {
  auto bytes = GgmlTypeBytes(type, n, what);
  if (!bytes.ok()) return bytes.status();
  if (*bytes != src_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", n, " elements of type ",
                                                   GgmlTypeName(type), " need ", *bytes,
                                                   " bytes, got ", src_bytes));
  }
  switch (type) {
    case GgmlType::kF32: DequantizeF32(src, n, dst); break;
    case GgmlType::kF16: DequantizeF16(src, n, dst); break;
    case GgmlType::kBF16: DequantizeBF16(src, n, dst); break;
    case GgmlType::kQ4_0: DequantizeQ4_0(src, n, dst); break;
    case GgmlType::kQ4_1: DequantizeQ4_1(src, n, dst); break;
    case GgmlType::kQ5_0: DequantizeQ5_0(src, n, dst); break;
    case GgmlType::kQ5_1: DequantizeQ5_1(src, n, dst); break;
    case GgmlType::kQ8_0: DequantizeQ8_0(src, n, dst); break;
    default:
      return absl::UnimplementedError(absl::StrCat(
          what, ": dequantization of ggml type ", GgmlTypeName(type), " (",
          static_cast<uint32_t>(type), ") is not implemented; supported: F32, F16, BF16, Q4_0, "
          "Q4_1, Q5_0, Q5_1, Q8_0"));
  }
  return absl::OkStatus();
}

}  // namespace kvq::model
