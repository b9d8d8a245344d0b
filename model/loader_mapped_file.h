// A read-only memory map of a whole file, shared by the GGUF and safetensors readers. Every read
// goes through Slice(), which bounds-checks against the file size, so a corrupt offset becomes an
// error instead of a fault.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvq::model {

class MappedFile {
 public:
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

  // [offset, offset + length) of the file; OutOfRange naming `what` if it does not fit.
  absl::StatusOr<const uint8_t*> Slice(uint64_t offset, uint64_t length,
                                       absl::string_view what) const;

 private:
  MappedFile() = default;
  std::string path_;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  void* map_ = nullptr;  // nullptr for an empty file
};

}  // namespace kvq::model
