#include "model/safetensors.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "model/loader_mapped_file.h"
#include "nlohmann/json.hpp"

namespace kvq::model {
namespace {

// The reference implementation refuses headers over 100 MB; so do we, before parsing.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

int DtypeSize(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" ||
      dtype == "F8_E5M2") {
    return 1;
  }
  return 0;
}

// Parses JSON without exceptions; a discarded value means a syntax error.
absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, const std::string& what) {
  nlohmann::json j = nlohmann::json::parse(text.begin(), text.end(), nullptr,
                                           /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(what, ": invalid JSON"));
  return j;
}

bool ToU64(const nlohmann::json& j, uint64_t* out) {
  if (!j.is_number_unsigned() && !(j.is_number_integer() && j.get<int64_t>() >= 0)) return false;
  *out = j.get<uint64_t>();
  return true;
}

}  // namespace

int64_t SafetensorsFile::TensorInfo::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::~SafetensorsFile() = default;

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  KVQ_ASSIGN_OR_RETURN(f->file_, MappedFile::Open(path));
  const MappedFile& m = *f->file_;
  KVQ_ASSIGN_OR_RETURN(const uint8_t* p, m.Slice(0, 8, "safetensors header length"));
  uint64_t header_len;
  std::memcpy(&header_len, p, 8);
  if (header_len > kMaxHeaderBytes || header_len > m.size() - 8) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": safetensors header length ",
                                                   header_len, " is absurd for a file of ",
                                                   m.size(), " bytes"));
  }
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = m.size() - data_start;
  const std::string_view text(reinterpret_cast<const char*>(m.data() + 8), header_len);
  KVQ_ASSIGN_OR_RETURN(nlohmann::json header, ParseJson(text, path + " header"));
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  }
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const nlohmann::json& e = it.value();
    const std::string where = absl::StrCat(path, ": tensor '", it.key(), "'");
    if (!e.is_object() || !e.contains("dtype") || !e["dtype"].is_string() ||
        !e.contains("shape") || !e["shape"].is_array() || !e.contains("data_offsets") ||
        !e["data_offsets"].is_array() || e["data_offsets"].size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " needs dtype (string), shape (array), data_offsets ([begin, end])"));
    }
    TensorInfo t;
    t.name = it.key();
    t.dtype = e["dtype"].get<std::string>();
    const int esize = DtypeSize(t.dtype);
    if (esize == 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, " has unknown dtype '", t.dtype, "'"));
    }
    uint64_t elems = 1;
    for (const nlohmann::json& d : e["shape"]) {
      uint64_t v;
      if (!ToU64(d, &v) || v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (v != 0 && elems > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / v)) {
        return absl::InvalidArgumentError(absl::StrCat(where, " has an invalid shape"));
      }
      t.shape.push_back(static_cast<int64_t>(v));
      elems *= v;
    }
    uint64_t begin, end;
    if (!ToU64(e["data_offsets"][0], &begin) || !ToU64(e["data_offsets"][1], &end) ||
        begin > end || end > data_size) {
      return absl::OutOfRangeError(absl::StrCat(where, " data_offsets lie outside the ",
                                                data_size, "-byte data section (truncated?)"));
    }
    t.nbytes = end - begin;
    if (elems > std::numeric_limits<uint64_t>::max() / esize || elems * esize != t.nbytes) {
      return absl::InvalidArgumentError(absl::StrCat(where, " spans ", t.nbytes,
                                                     " bytes but its shape and dtype need ",
                                                     elems, " x ", esize));
    }
    t.offset = data_start + begin;
    f->tensors_.emplace(t.name, std::move(t));
  }
  return f;
}

const SafetensorsFile::TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  auto it = tensors_.find(std::string(name));
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadTensorF32(std::string_view name) const {
  const TensorInfo* t = Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor named '", std::string(name), "'"));
  }
  const int64_t n = t->num_elements();
  const uint8_t* src = file_->data() + t->offset;  // validated in Open
  std::vector<float> out(static_cast<size_t>(n));
  if (t->dtype == "F32") {
    std::memcpy(out.data(), src, static_cast<size_t>(n) * 4);
  } else if (t->dtype == "F16") {
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      out[i] = HalfBitsToFloat(h);
    }
  } else if (t->dtype == "BF16") {
    for (int64_t i = 0; i < n; ++i) {
      uint16_t b;
      std::memcpy(&b, src + 2 * i, 2);
      const uint32_t bits = static_cast<uint32_t>(b) << 16;
      std::memcpy(&out[i], &bits, 4);
    }
  } else {
    return absl::UnimplementedError(absl::StrCat(path_, ": tensor '", std::string(name), "' has dtype ",
                                                 t->dtype, "; only F32, F16, BF16 are supported"));
  }
  return out;
}

absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> SafetensorsCheckpoint::Open(
    const std::string& dir) {
  namespace fs = std::filesystem;
  auto ck = std::make_unique<SafetensorsCheckpoint>();
  ck->dir_ = dir;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  std::error_code ec;
  if (fs::exists(index_path, ec)) {
    std::ifstream in(index_path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    if (!in) return absl::PermissionDeniedError(absl::StrCat("cannot read ", index_path.string()));
    KVQ_ASSIGN_OR_RETURN(nlohmann::json index, ParseJson(ss.str(), index_path.string()));
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": no \"weight_map\" object"));
    }
    std::map<std::string, const SafetensorsFile*> by_file;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map['",
                                                       it.key(), "'] is not a file name"));
      }
      const std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos || file == "..") {
        return absl::InvalidArgumentError(absl::StrCat(
            index_path.string(), ": shard name '", file, "' must be a file in the directory"));
      }
      auto [pos, inserted] = by_file.try_emplace(file, nullptr);
      if (inserted) {
        KVQ_ASSIGN_OR_RETURN(auto shard, SafetensorsFile::Open((fs::path(dir) / file).string()));
        pos->second = shard.get();
        ck->shards_.push_back(std::move(shard));
      }
      if (pos->second->Find(it.key()) == nullptr) {
        return absl::NotFoundError(absl::StrCat(index_path.string(), " maps '", it.key(),
                                                "' to ", file, ", which does not contain it"));
      }
      ck->index_.emplace(it.key(), pos->second);
    }
  } else if (fs::exists(single_path, ec)) {
    KVQ_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single_path.string()));
    for (const auto& [name, info] : file->tensors()) ck->index_.emplace(name, file.get());
    ck->shards_.push_back(std::move(file));
  } else {
    return absl::NotFoundError(absl::StrCat(
        dir, ": neither model.safetensors nor model.safetensors.index.json is present"));
  }
  return ck;
}

bool SafetensorsCheckpoint::Has(std::string_view name) const {
  return index_.find(name) != index_.end();
}

const SafetensorsFile::TensorInfo* SafetensorsCheckpoint::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second->Find(name);
}

absl::StatusOr<std::vector<float>> SafetensorsCheckpoint::ReadTensorF32(
    std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": no tensor named '", std::string(name), "'"));
  }
  return it->second->ReadTensorF32(name);
}

std::vector<std::string> SafetensorsCheckpoint::TensorNames() const {
  std::vector<std::string> names;
  for (const auto& [name, file] : index_) names.push_back(name);
  return names;
}

}  // namespace kvq::model
