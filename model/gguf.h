// GGUF (v2/v3) reader: header, typed metadata, tensor table, alignment, and dequantization of
// tensors to fp32 at load. Errors (truncated or corrupt file, unknown tensor type, missing or
// mistyped key) come back as absl::Status with the key, tensor or offset named.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvq::model {

// ggml tensor types, numbered as in the GGUF specification.
enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ8_1 = 9,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kQ8_K = 15, kBF16 = 30,
};
const char* GgmlTypeName(GgmlType t);

class GgufFile {
 public:
  struct TensorInfo {
    std::string name;
    GgmlType type;
    std::vector<int64_t> dims;  // ggml order: dims[0] is the fastest-varying (row length)
    uint64_t offset = 0;        // absolute byte offset in the file
    uint64_t nbytes = 0;
    int64_t num_elements() const;
  };

  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);
  virtual ~GgufFile() = default;

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::string& path() const { return path_; }

  bool Has(std::string_view key) const;
  absl::StatusOr<std::string> GetString(std::string_view key) const;
  absl::StatusOr<int64_t> GetInt(std::string_view key) const;   // any integer type
  absl::StatusOr<double> GetFloat(std::string_view key) const;  // f32/f64 (integers accepted)
  absl::StatusOr<bool> GetBool(std::string_view key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(std::string_view key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(std::string_view key) const;
  absl::StatusOr<std::vector<float>> GetFloatArray(std::string_view key) const;
  std::vector<std::string> Keys() const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* FindTensor(std::string_view name) const;
  // Dequantizes a tensor to fp32, in ggml element order.
  absl::StatusOr<std::vector<float>> ReadTensorF32(std::string_view name) const;

 protected:
  GgufFile() = default;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::string path_;
  std::vector<TensorInfo> tensors_;
};

}  // namespace kvq::model
