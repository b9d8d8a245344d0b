// A minimal GGUF v3 writer: metadata of any value type and tensors given as raw block bytes.
// It writes exactly what it is told (any type number, any offset), so tests can build both valid
// and deliberately broken files; tools can use it to save small models.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace kvq::model {

class GgufWriter {
 public:
  // GGUF metadata value types.
  enum ValueType : uint32_t {
    kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
    kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
  };

  // Encodings of values, to compose arrays (including arrays of arrays).
  template <typename T>
  static std::string Pod(T v) {
    std::string s(sizeof(T), '\0');
    std::memcpy(s.data(), &v, sizeof(T));
    return s;
  }
  static std::string String(const std::string& s) { return Pod<uint64_t>(s.size()) + s; }
  // `payload` is the concatenated encoding of `n` elements of `elem_type`.
  static std::string Array(uint32_t elem_type, uint64_t n, const std::string& payload) {
    return Pod<uint32_t>(elem_type) + Pod<uint64_t>(n) + payload;
  }

  // Adds a key with an already encoded value of `type`.
  void AddRaw(const std::string& key, uint32_t type, std::string encoded);
  void AddU32(const std::string& key, uint32_t v) { AddRaw(key, kU32, Pod(v)); }
  void AddI32(const std::string& key, int32_t v) { AddRaw(key, kI32, Pod(v)); }
  void AddU64(const std::string& key, uint64_t v) { AddRaw(key, kU64, Pod(v)); }
  void AddF32(const std::string& key, float v) { AddRaw(key, kF32, Pod(v)); }
  void AddBool(const std::string& key, bool v) { AddRaw(key, kBool, Pod<uint8_t>(v ? 1 : 0)); }
  void AddString(const std::string& key, const std::string& v) { AddRaw(key, kString, String(v)); }
  void AddStringArray(const std::string& key, const std::vector<std::string>& v);

  // `type` is the ggml type number; `data` the raw bytes. The data offset (relative to the data
  // section) is the next aligned position unless `offset` is given.
  void AddTensor(const std::string& name, uint32_t type, std::vector<uint64_t> dims,
                 std::string data, std::optional<uint64_t> offset = std::nullopt);
  void AddF32Tensor(const std::string& name, std::vector<uint64_t> dims,
                    const std::vector<float>& values);

  void set_version(uint32_t v) { version_ = v; }
  void set_alignment(uint64_t a) { alignment_ = a; }  // must match general.alignment if set

  std::string Serialize() const;
  absl::Status WriteFile(const std::string& path) const;

 private:
  struct Tensor {
    std::string name;
    uint32_t type;
    std::vector<uint64_t> dims;
    std::string data;
    std::optional<uint64_t> offset;
  };
  uint32_t version_ = 3;
  uint64_t alignment_ = 32;
  uint64_t n_kv_ = 0;
  std::string kv_;
  std::vector<Tensor> tensors_;
};

}  // namespace kvq::model
