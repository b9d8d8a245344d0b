// GGUF layout (little-endian; v2 and v3 differ only in that v3 may be big-endian, which we reject):
//   u32 magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//   kv_count x { string key | u32 value_type | value }       string = u64 length + bytes
//   tensor_count x { string name | u32 n_dims | u64 dims[n_dims] | u32 ggml_type | u64 offset }
//   padding to general.alignment (default 32) | tensor data (offsets relative to here, aligned)
#include "model/gguf.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "model/dequant.h"
#include "model/loader_mapped_file.h"

namespace kvq::model {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t kMaxDims = 4;             // GGML_MAX_DIMS
constexpr int kMaxArrayNesting = 8;          // guards the recursion against crafted files
constexpr uint64_t kMaxNameLength = 1 << 16;

enum ValueType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

const char* ValueTypeName(uint32_t t) {
  static constexpr const char* kNames[] = {"uint8",  "int8",   "uint16", "int16", "uint32",
                                           "int32",  "float32", "bool",  "string", "array",
                                           "uint64", "int64",  "float64"};
  return t <= kF64 ? kNames[t] : "unknown";
}

bool IsInteger(uint32_t t) {
  return t == kU8 || t == kI8 || t == kU16 || t == kI16 || t == kU32 || t == kI32 || t == kU64 ||
         t == kI64;
}
bool IsFloat(uint32_t t) { return t == kF32 || t == kF64; }

// Smallest encoding of one value of type t, used to reject absurd array lengths before
// allocating.
uint64_t MinEncodedSize(uint32_t t) {
  switch (t) {
    case kU8: case kI8: case kBool: return 1;
    case kU16: case kI16: return 2;
    case kU32: case kI32: case kF32: return 4;
    case kU64: case kI64: case kF64: case kString: return 8;
    case kArray: return 12;
    default: return 1;
  }
}

struct Value {
  uint32_t type = kU8;
  // Scalars. Integers are kept as int64; a uint64 above INT64_MAX sets `too_big`.
  int64_t i = 0;
  bool too_big = false;
  double f = 0.0;
  std::string s;
  // Arrays: elem_type and one of the vectors below, by element kind.
  uint32_t elem_type = kU8;
  uint64_t length = 0;
  std::vector<int64_t> ints;  // integer and bool elements
  std::vector<double> floats;
  std::vector<std::string> strings;
  std::vector<Value> nested;
};

class Cursor {
 public:
  Cursor(const MappedFile& file) : file_(file) {}
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return file_.size() - pos_; }

  absl::Status Bytes(uint64_t n, const uint8_t** out, absl::string_view what) {
    KVQ_ASSIGN_OR_RETURN(*out, file_.Slice(pos_, n, what));
    pos_ += n;
    return absl::OkStatus();
  }
  template <typename T>
  absl::Status Pod(T* out, absl::string_view what) {
    const uint8_t* p;
    KVQ_RETURN_IF_ERROR(Bytes(sizeof(T), &p, what));
    std::memcpy(out, p, sizeof(T));
    return absl::OkStatus();
  }
  absl::Status String(std::string* out, absl::string_view what) {
    uint64_t len;
    KVQ_RETURN_IF_ERROR(Pod(&len, what));
    if (len > remaining()) {
      return absl::OutOfRangeError(absl::StrCat(file_.path(), ": ", what, " claims ", len,
                                                " bytes at offset ", pos_, " but only ",
                                                remaining(), " remain; file truncated or corrupt"));
    }
    const uint8_t* p;
    KVQ_RETURN_IF_ERROR(Bytes(len, &p, what));
    out->assign(reinterpret_cast<const char*>(p), len);
    return absl::OkStatus();
  }

 private:
  const MappedFile& file_;
  uint64_t pos_ = 0;
};

absl::Status ReadScalar(Cursor& c, uint32_t type, Value* v, const std::string& what) {
  v->type = type;
  switch (type) {
    case kU8: { uint8_t x; KVQ_RETURN_IF_ERROR(c.Pod(&x, what)); v->i = x; break; }
    case kI8: { int8_t x; KVQ_RETURN_IF_ERROR(c.Pod(&x, what)); v->i = x; break; }
    case kU16: { uint16_t x; KVQ_RETURN_IF_ERROR(c.Pod(&x, what)); v->i = x; break; }
    case kI16: { int16_t x; KVQ_RETURN_IF_ERROR(c.Pod(&x, what)); v->i = x; break; }
    case kU32: { uint32_t x; KVQ_RETURN_IF_ERROR(c.Pod(&x, what)); v->i = x; break; }
    case kI32: { int32_t x; KVQ_RETURN_IF_ERROR(c.Pod(&x, what)); v->i = x; break; }
    case kI64: { int64_t x; KVQ_RETURN_IF_ERROR(c.Pod(&x, what)); v->i = x; break; }
    case kU64: {
      uint64_t x;
      KVQ_RETURN_IF_ERROR(c.Pod(&x, what));
      v->too_big = x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
      v->i = static_cast<int64_t>(x);
      break;
    }
    case kF32: { float x; KVQ_RETURN_IF_ERROR(c.Pod(&x, what)); v->f = x; break; }
    case kF64: { double x; KVQ_RETURN_IF_ERROR(c.Pod(&x, what)); v->f = x; break; }
    case kBool: {
      uint8_t x;
      KVQ_RETURN_IF_ERROR(c.Pod(&x, what));
      if (x > 1) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": bool value ", int{x}, " is not 0 or 1"));
      }
      v->i = x;
      break;
    }
    case kString: KVQ_RETURN_IF_ERROR(c.String(&v->s, what)); break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": unknown GGUF value type ", type));
  }
  return absl::OkStatus();
}

absl::Status ReadValue(Cursor& c, uint32_t type, Value* v, const std::string& what, int depth) {
  if (type != kArray) return ReadScalar(c, type, v, what);
  if (depth >= kMaxArrayNesting) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": arrays nested deeper than ",
                                                   kMaxArrayNesting));
  }
  v->type = kArray;
  KVQ_RETURN_IF_ERROR(c.Pod(&v->elem_type, what));
  KVQ_RETURN_IF_ERROR(c.Pod(&v->length, what));
  if (v->elem_type > kF64) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": array of unknown GGUF value type ", v->elem_type));
  }
  if (v->length > c.remaining() / MinEncodedSize(v->elem_type)) {
    return absl::OutOfRangeError(absl::StrCat(
        what, ": array of ", v->length, " ", ValueTypeName(v->elem_type), " cannot fit in the ",
        c.remaining(), " bytes left in the file; truncated or corrupt"));
  }
  const uint64_t n = v->length;
  if (IsInteger(v->elem_type) || v->elem_type == kBool) {
    v->ints.resize(n);
    Value e;
    for (uint64_t k = 0; k < n; ++k) {
      KVQ_RETURN_IF_ERROR(ReadScalar(c, v->elem_type, &e, what));
      if (e.too_big) v->too_big = true;
      v->ints[k] = e.i;
    }
  } else if (IsFloat(v->elem_type)) {
    v->floats.resize(n);
    Value e;
    for (uint64_t k = 0; k < n; ++k) {
      KVQ_RETURN_IF_ERROR(ReadScalar(c, v->elem_type, &e, what));
      v->floats[k] = e.f;
    }
  } else if (v->elem_type == kString) {
    v->strings.resize(n);
    for (uint64_t k = 0; k < n; ++k) KVQ_RETURN_IF_ERROR(c.String(&v->strings[k], what));
  } else {  // nested arrays
    v->nested.resize(n);
    for (uint64_t k = 0; k < n; ++k) {
      KVQ_RETURN_IF_ERROR(ReadValue(c, kArray, &v->nested[k], what, depth + 1));
    }
  }
  return absl::OkStatus();
}

class GgufFileImpl final : public GgufFile {
 public:
  absl::Status Parse(const std::string& path);

  const Value* Find(absl::string_view key) const {
    auto it = kv_.find(key);
    return it == kv_.end() ? nullptr : &it->second;
  }
  absl::StatusOr<const Value*> Get(absl::string_view key) const {
    const Value* v = Find(key);
    if (v == nullptr) {
      return absl::NotFoundError(absl::StrCat(path_, ": missing GGUF key '", key, "'"));
    }
    return v;
  }
  absl::Status TypeError(absl::string_view key, const Value& v, absl::string_view wanted) const {
    std::string actual = ValueTypeName(v.type);
    if (v.type == kArray) actual = absl::StrCat("array of ", ValueTypeName(v.elem_type));
    return absl::InvalidArgumentError(absl::StrCat(path_, ": GGUF key '", key, "' is ", actual,
                                                   ", expected ", wanted));
  }
  const uint8_t* TensorData(const TensorInfo& t) const { return file_->data() + t.offset; }

  std::vector<std::string> key_order_;

 private:
  std::unique_ptr<MappedFile> file_;
  absl::flat_hash_map<std::string, Value> kv_;
};

absl::Status GgufFileImpl::Parse(const std::string& path) {
  path_ = path;
  KVQ_ASSIGN_OR_RETURN(file_, MappedFile::Open(path));
  Cursor c(*file_);
  uint32_t magic;
  KVQ_RETURN_IF_ERROR(c.Pod(&magic, "GGUF magic"));
  if (magic != kGgufMagic) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": bad magic 0x", absl::Hex(magic, absl::kZeroPad8), ", not a GGUF file"));
  }
  KVQ_RETURN_IF_ERROR(c.Pod(&version_, "GGUF version"));
  if (version_ != 2 && version_ != 3) {
    if ((version_ & 0xffff) == 0 && version_ != 0) {
      return absl::UnimplementedError(absl::StrCat(path, ": big-endian GGUF is not supported"));
    }
    return absl::UnimplementedError(
        absl::StrCat(path, ": GGUF version ", version_, " is not supported (2 and 3 are)"));
  }
  uint64_t n_tensors, n_kv;
  KVQ_RETURN_IF_ERROR(c.Pod(&n_tensors, "GGUF tensor count"));
  KVQ_RETURN_IF_ERROR(c.Pod(&n_kv, "GGUF metadata count"));
  // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least
  // 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
  if (n_kv > c.remaining() / 13) {
    return absl::OutOfRangeError(absl::StrCat(path, ": metadata count ", n_kv,
                                              " is absurd for a file of ", file_->size(),
                                              " bytes; corrupt header"));
  }
  if (n_tensors > c.remaining() / 24) {
    return absl::OutOfRangeError(absl::StrCat(path, ": tensor count ", n_tensors,
                                              " is absurd for a file of ", file_->size(),
                                              " bytes; corrupt header"));
  }

  kv_.reserve(n_kv);
  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key;
    KVQ_RETURN_IF_ERROR(c.String(&key, absl::StrCat("key of metadata entry ", k)));
    uint32_t type;
    const std::string what = absl::StrCat("metadata '", key, "'");
    KVQ_RETURN_IF_ERROR(c.Pod(&type, what));
    Value v;
    KVQ_RETURN_IF_ERROR(ReadValue(c, type, &v, what, 0));
    if (kv_.contains(key)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": duplicate GGUF key '", key, "'"));
    }
    key_order_.push_back(key);
    kv_.emplace(std::move(key), std::move(v));
  }

  if (const Value* a = Find("general.alignment"); a != nullptr) {
    if (!IsInteger(a->type) || a->i <= 0 || a->too_big || (a->i & (a->i - 1)) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": general.alignment must be a positive power-of-two integer"));
    }
    alignment_ = static_cast<uint64_t>(a->i);
  }

  tensors_.resize(n_tensors);
  for (uint64_t k = 0; k < n_tensors; ++k) {
    TensorInfo& t = tensors_[k];
    KVQ_RETURN_IF_ERROR(c.String(&t.name, absl::StrCat("name of tensor ", k)));
    if (t.name.size() > kMaxNameLength) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", k, " name is too long"));
    }
    const std::string what = absl::StrCat("tensor '", t.name, "'");
    uint32_t n_dims;
    KVQ_RETURN_IF_ERROR(c.Pod(&n_dims, what));
    if (n_dims > kMaxDims) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", what, " has ", n_dims, " dims (at most ", kMaxDims, ")"));
    }
    t.dims.resize(n_dims);
    int64_t elems = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne;
      KVQ_RETURN_IF_ERROR(c.Pod(&ne, what));
      if (ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          (ne != 0 && elems > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(ne))) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": ", what, " dims overflow the element count (dim ", d, " = ",
                         ne, ")"));
      }
      t.dims[d] = static_cast<int64_t>(ne);
      elems *= static_cast<int64_t>(ne);
    }
    uint32_t type;
    KVQ_RETURN_IF_ERROR(c.Pod(&type, what));
    const GgmlTypeInfo* info = FindGgmlTypeInfo(type);
    if (info == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", what, " has unknown ggml type ", type));
    }
    t.type = static_cast<GgmlType>(type);
    if (n_dims > 0 && t.dims[0] % info->block_elems != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": ", what, " row length ", t.dims[0], " is not a multiple of the ", info->name,
          " block size ", info->block_elems));
    }
    KVQ_ASSIGN_OR_RETURN(t.nbytes, GgmlTypeBytes(t.type, elems, absl::StrCat(path, ": ", what)));
    KVQ_RETURN_IF_ERROR(c.Pod(&t.offset, what));
    if (t.offset % alignment_ != 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", what, " data offset ", t.offset,
                                                     " is not a multiple of the alignment ",
                                                     alignment_));
    }
  }

  const uint64_t data_start = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
  absl::flat_hash_map<absl::string_view, int> seen;
  for (size_t k = 0; k < tensors_.size(); ++k) {
    TensorInfo& t = tensors_[k];
    if (!seen.emplace(t.name, static_cast<int>(k)).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": duplicate tensor name '", t.name, "'"));
    }
    if (t.offset > std::numeric_limits<uint64_t>::max() - data_start) {
      return absl::OutOfRangeError(absl::StrCat(path, ": tensor '", t.name, "' offset overflows"));
    }
    t.offset += data_start;
    KVQ_RETURN_IF_ERROR(
        file_->Slice(t.offset, t.nbytes, absl::StrCat("data of tensor '", t.name, "'")).status());
  }
  return absl::OkStatus();
}

// absl::string_view is not std::string_view in this absl build.
absl::string_view A(std::string_view s) { return absl::string_view(s.data(), s.size()); }

const GgufFileImpl& Impl(const GgufFile* f) {
  // GgufFile's constructor is protected and Open() only makes GgufFileImpl.
  return *static_cast<const GgufFileImpl*>(f);
}

}  // namespace

int64_t GgufFile::TensorInfo::num_elements() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  auto f = std::make_unique<GgufFileImpl>();
  KVQ_RETURN_IF_ERROR(f->Parse(path));
  return std::unique_ptr<GgufFile>(std::move(f));
}

bool GgufFile::Has(std::string_view key) const { return Impl(this).Find(A(key)) != nullptr; }

std::vector<std::string> GgufFile::Keys() const { return Impl(this).key_order_; }

absl::StatusOr<std::string> GgufFile::GetString(std::string_view key) const {
  KVQ_ASSIGN_OR_RETURN(const Value* v, Impl(this).Get(A(key)));
  if (v->type != kString) return Impl(this).TypeError(A(key), *v, "string");
  return v->s;
}

absl::StatusOr<int64_t> GgufFile::GetInt(std::string_view key) const {
  KVQ_ASSIGN_OR_RETURN(const Value* v, Impl(this).Get(A(key)));
  if (!IsInteger(v->type)) return Impl(this).TypeError(A(key), *v, "an integer");
  if (v->too_big) {
    return absl::OutOfRangeError(
        absl::StrCat(path_, ": GGUF key '", A(key), "' does not fit in int64"));
  }
  return v->i;
}

absl::StatusOr<double> GgufFile::GetFloat(std::string_view key) const {
  KVQ_ASSIGN_OR_RETURN(const Value* v, Impl(this).Get(A(key)));
  if (IsFloat(v->type)) return v->f;
  if (IsInteger(v->type)) {
    return v->too_big ? static_cast<double>(static_cast<uint64_t>(v->i))
                      : static_cast<double>(v->i);
  }
  return Impl(this).TypeError(A(key), *v, "a number");
}

absl::StatusOr<bool> GgufFile::GetBool(std::string_view key) const {
  KVQ_ASSIGN_OR_RETURN(const Value* v, Impl(this).Get(A(key)));
  if (v->type != kBool) return Impl(this).TypeError(A(key), *v, "bool");
  return v->i != 0;
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key) const {
  KVQ_ASSIGN_OR_RETURN(const Value* v, Impl(this).Get(A(key)));
  if (v->type != kArray || v->elem_type != kString) {
    return Impl(this).TypeError(A(key), *v, "array of string");
  }
  return v->strings;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  KVQ_ASSIGN_OR_RETURN(const Value* v, Impl(this).Get(A(key)));
  if (v->type != kArray || !IsInteger(v->elem_type)) {
    return Impl(this).TypeError(A(key), *v, "array of integers");
  }
  if (v->too_big) {
    return absl::OutOfRangeError(
        absl::StrCat(path_, ": GGUF key '", A(key), "' has an element that does not fit in int64"));
  }
  return v->ints;
}

absl::StatusOr<std::vector<float>> GgufFile::GetFloatArray(std::string_view key) const {
  KVQ_ASSIGN_OR_RETURN(const Value* v, Impl(this).Get(A(key)));
  if (v->type != kArray || !(IsFloat(v->elem_type) || IsInteger(v->elem_type))) {
    return Impl(this).TypeError(A(key), *v, "array of numbers");
  }
  std::vector<float> out;
  if (IsFloat(v->elem_type)) {
    out.assign(v->floats.begin(), v->floats.end());
  } else {
    out.reserve(v->ints.size());
    for (int64_t x : v->ints) out.push_back(static_cast<float>(x));
  }
  return out;
}

const GgufFile::TensorInfo* GgufFile::FindTensor(std::string_view name) const {
  for (const TensorInfo& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

absl::StatusOr<std::vector<float>> GgufFile::ReadTensorF32(std::string_view name) const {
  const TensorInfo* t = FindTensor(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor named '", A(name), "'"));
  }
  const int64_t n = t->num_elements();
  const GgmlTypeInfo* info = FindGgmlTypeInfo(static_cast<uint32_t>(t->type));
  const std::string what = absl::StrCat(path_, ": tensor '", A(name), "'");
  if (!info->can_dequantize) {
    return Dequantize(t->type, nullptr, t->nbytes, n, nullptr, what);  // the Unimplemented error
  }
  std::vector<float> out(static_cast<size_t>(n));
  const uint8_t* src = Impl(this).TensorData(*t);
  // Chunks of whole blocks, dequantized in parallel; the result does not depend on the split.
  const int64_t chunk = info->block_elems * 8192;
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  const uint64_t chunk_bytes = static_cast<uint64_t>(chunk / info->block_elems * info->block_bytes);
  absl::Status status;
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t k = 0; k < n_chunks; ++k) {
    const int64_t begin = k * chunk;
    const int64_t len = std::min(chunk, n - begin);
    const uint64_t bytes = static_cast<uint64_t>(len / info->block_elems * info->block_bytes);
    absl::Status s = Dequantize(t->type, src + k * chunk_bytes, bytes, len, out.data() + begin, what);
    if (!s.ok()) {
#pragma omp critical
      status = s;
    }
  }
  KVQ_RETURN_IF_ERROR(status);
  return out;
}

}  // namespace kvq::model
