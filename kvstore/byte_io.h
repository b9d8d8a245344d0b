// Little-endian byte writer/reader and FNV-1a 64 used by kvstore's file formats (quantizer files,
// serialized caches). Internal to kvstore.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace kvq::kvstore::internal {

inline uint64_t Fnv1a64(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

class ByteWriter {
 public:
  void PutBytes(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  template <typename T>
  void Put(T v) {  // host is little-endian (x86-64, aarch64)
    PutBytes(&v, sizeof(T));
  }
  void PutString(std::string_view s) {
    Put<uint32_t>(static_cast<uint32_t>(s.size()));
    PutBytes(s.data(), s.size());
  }
  template <typename T>
  void PutVector(const std::vector<T>& v) {
    Put<uint64_t>(v.size());
    PutBytes(v.data(), v.size() * sizeof(T));
  }
  std::string& str() { return out_; }

 private:
  std::string out_;
};

// Reads sequentially; any read past the end sets failed() and returns zeros.
class ByteReader {
 public:
  explicit ByteReader(std::string_view in) : in_(in) {}
  bool GetBytes(void* p, size_t n) {
    if (failed_ || in_.size() - pos_ < n) {
      failed_ = true;
      std::memset(p, 0, n);
      return false;
    }
    std::memcpy(p, in_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  template <typename T>
  T Get() {
    T v{};
    GetBytes(&v, sizeof(T));
    return v;
  }
  std::string GetString(size_t max_len) {
    const uint32_t n = Get<uint32_t>();
    if (n > max_len || n > remaining()) {
      failed_ = true;
      return {};
    }
    std::string s(in_.substr(pos_, n));
    pos_ += n;
    return s;
  }
  template <typename T>
  std::vector<T> GetVector(uint64_t max_count) {
    const uint64_t n = Get<uint64_t>();
    if (failed_ || n > max_count || n * sizeof(T) > remaining()) {
      failed_ = true;
      return {};
    }
    std::vector<T> v(n);
    GetBytes(v.data(), n * sizeof(T));
    return v;
  }
  size_t remaining() const { return in_.size() - pos_; }
  bool failed() const { return failed_; }

 private:
  std::string_view in_;
  size_t pos_ = 0;
  bool failed_ = false;
};

}  // namespace kvq::kvstore::internal
