#include "model/loader_gguf_writer.h"

#include <algorithm>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace kvq::model {

void GgufWriter::AddRaw(const std::string& key, uint32_t type, std::string encoded) {
  kv_ += String(key) + Pod(type) + encoded;
  ++n_kv_;
}

void GgufWriter::AddStringArray(const std::string& key, const std::vector<std::string>& v) {
  std::string payload;
  for (const std::string& s : v) payload += String(s);
  AddRaw(key, kArray, Array(kString, v.size(), payload));
}

void GgufWriter::AddTensor(const std::string& name, uint32_t type, std::vector<uint64_t> dims,
                           std::string data, std::optional<uint64_t> offset) {
  tensors_.push_back({name, type, std::move(dims), std::move(data), offset});
}

void GgufWriter::AddF32Tensor(const std::string& name, std::vector<uint64_t> dims,
                              const std::vector<float>& values) {
  std::string data(values.size() * sizeof(float), '\0');
  std::memcpy(data.data(), values.data(), data.size());
  AddTensor(name, /*F32*/ 0, std::move(dims), std::move(data));
}

std::string GgufWriter::Serialize() const {
  auto align = [this](uint64_t x) { return (x + alignment_ - 1) / alignment_ * alignment_; };
  std::string out = "GGUF" + Pod(version_) + Pod<uint64_t>(tensors_.size()) + Pod(n_kv_) + kv_;
  std::vector<uint64_t> offsets;
  uint64_t next = 0;
  for (const Tensor& t : tensors_) {
    const uint64_t off = t.offset.value_or(align(next));
    offsets.push_back(off);
    next = std::max(next, off + t.data.size());
    out += String(t.name) + Pod<uint32_t>(t.dims.size());
    for (uint64_t d : t.dims) out += Pod(d);
    out += Pod(t.type) + Pod(off);
  }
  const uint64_t data_start = align(out.size());
  std::string data(next, '\0');
  for (size_t i = 0; i < tensors_.size(); ++i) {
    std::memcpy(data.data() + offsets[i], tensors_[i].data.data(), tensors_[i].data.size());
  }
  out.resize(data_start, '\0');
  return out + data;
}

absl::Status GgufWriter::WriteFile(const std::string& path) const {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  const std::string bytes = Serialize();
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

}  // namespace kvq::model
