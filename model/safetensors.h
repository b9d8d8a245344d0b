// Safetensors reader: one file (u64 little-endian header length N, N bytes of JSON
// {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data
// with offsets relative to its start) and Hugging Face checkpoints that are either one
// model.safetensors or shards listed by model.safetensors.index.json ("weight_map").
// Tensors are read to fp32 from F32, F16 or BF16.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvq::model {

class MappedFile;

class SafetensorsFile {
 public:
  struct TensorInfo {
    std::string name;
    std::string dtype;           // as written: "F32", "F16", "BF16", "I64", ...
    std::vector<int64_t> shape;  // row-major, outermost first
    uint64_t offset = 0;         // absolute byte offset in the file
    uint64_t nbytes = 0;
    int64_t num_elements() const;
  };

  // Validates the header: JSON shape, known dtypes, offsets inside the data section and
  // consistent with shape x dtype size.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(std::string_view name) const;
  // Converts to fp32 (F32, F16, BF16); other dtypes are Unimplemented.
  absl::StatusOr<std::vector<float>> ReadTensorF32(std::string_view name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  std::unique_ptr<MappedFile> file_;
  std::map<std::string, TensorInfo> tensors_;
};

// All tensors of a Hugging Face model directory, across shards.
class SafetensorsCheckpoint {
 public:
  // dir/model.safetensors.index.json if present, else dir/model.safetensors.
  static absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> Open(const std::string& dir);

  bool Has(std::string_view name) const;
  // nullptr if absent.
  const SafetensorsFile::TensorInfo* Find(std::string_view name) const;
  absl::StatusOr<std::vector<float>> ReadTensorF32(std::string_view name) const;
  std::vector<std::string> TensorNames() const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, const SafetensorsFile*, std::less<>> index_;
};

}  // namespace kvq::model
