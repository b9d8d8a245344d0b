#include "kvstore/quantizer.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kvstore/byte_io.h"
#include "kvstore/lut_codec.h"

namespace kvq::kvstore {
namespace {

constexpr char kMagic[8] = {'K', 'V', 'Q', 'Q', 'U', 'A', 'N', 'T'};

absl::Status CheckSize(const std::vector<float>& v, size_t n, const char* what) {
  if (v.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("quantizer ", what, " has ", v.size(), " values, expected ", n));
  }
  for (float x : v) {
    if (!std::isfinite(x)) return absl::InvalidArgumentError(absl::StrCat("quantizer ", what, " is not finite"));
  }
  return absl::OkStatus();
}

}  // namespace

Quantizer::Quantizer(QuantizerData data) : data_(std::move(data)) {
  key_zero_point_.resize(data_.key_lower.size());
  key_range_.resize(data_.key_lower.size());
  for (size_t i = 0; i < data_.key_lower.size(); ++i) {
    key_zero_point_[i] = 0.5f * (data_.key_upper[i] + data_.key_lower[i]);
    key_range_[i] = std::fmax(0.5f * (data_.key_upper[i] - data_.key_lower[i]), kMinKeyRange);
  }
}

absl::StatusOr<Quantizer> Quantizer::Create(QuantizerData d) {
  KVQ_RETURN_IF_ERROR(d.shape.Validate());
  KVQ_RETURN_IF_ERROR(d.format.Validate());
  const size_t L = d.shape.n_layers;
  const size_t n_keys = L * d.shape.n_kv_heads * d.shape.head_dim;
  const size_t n_lut = d.format.quantized() ? L * d.format.num_centroids() : 0;
  const size_t n_norm = d.format.quantized() ? L : 0;
  KVQ_RETURN_IF_ERROR(CheckSize(d.key_lower, d.format.keys_per_channel() ? n_keys : 0, "key_lower"));
  KVQ_RETURN_IF_ERROR(CheckSize(d.key_upper, d.format.keys_per_channel() ? n_keys : 0, "key_upper"));
  KVQ_RETURN_IF_ERROR(CheckSize(d.key_lut, n_lut, "key_lut"));
  KVQ_RETURN_IF_ERROR(CheckSize(d.value_lut, n_lut, "value_lut"));
  KVQ_RETURN_IF_ERROR(CheckSize(d.key_qnorm_scale, n_norm, "key_qnorm_scale"));
  KVQ_RETURN_IF_ERROR(CheckSize(d.key_qnorm_offset, n_norm, "key_qnorm_offset"));
  KVQ_RETURN_IF_ERROR(CheckSize(d.value_qnorm_scale, n_norm, "value_qnorm_scale"));
  KVQ_RETURN_IF_ERROR(CheckSize(d.value_qnorm_offset, n_norm, "value_qnorm_offset"));
  for (size_t i = 0; i < d.key_lower.size(); ++i) {
    if (d.key_lower[i] > d.key_upper[i]) {
      return absl::InvalidArgumentError(absl::StrCat("key threshold lower > upper at element ", i));
    }
  }
  const int C = d.format.num_centroids();
  for (size_t l = 0; l < n_norm; ++l) {
    for (const std::vector<float>* lut : {&d.key_lut, &d.value_lut}) {
      for (int j = 0; j < C; ++j) {
        const float c = (*lut)[l * C + j];
        if (c < -1.0f || c > 1.0f || (j > 0 && !(c > (*lut)[l * C + j - 1]))) {
          return absl::InvalidArgumentError(absl::StrCat(
              "quantizer LUT of layer ", l, " must be strictly ascending within [-1, 1]"));
        }
      }
    }
    if (!(d.key_qnorm_scale[l] > 0.0f) || !(d.value_qnorm_scale[l] > 0.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("Q-Norm scale of layer ", l, " must be > 0"));
    }
  }
  return Quantizer(std::move(d));
}

absl::StatusOr<Quantizer> Quantizer::Uncalibrated(const KvShape& shape, const KvFormat& format,
                                                  std::string fingerprint) {
  if (format.keys_per_channel()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "format ", format.ToString(), " needs a calibrated quantizer (per-channel key scaling)"));
  }
  QuantizerData d;
  d.shape = shape;
  d.format = format;
  d.fingerprint = std::move(fingerprint);
  if (format.quantized()) {
    const std::vector<float> u = UniformLut(format.bits);
    for (int l = 0; l < shape.n_layers; ++l) {
      d.key_lut.insert(d.key_lut.end(), u.begin(), u.end());
      d.value_lut.insert(d.value_lut.end(), u.begin(), u.end());
    }
    d.key_qnorm_scale.assign(shape.n_layers, 1.0f);
    d.key_qnorm_offset.assign(shape.n_layers, 0.0f);
    d.value_qnorm_scale.assign(shape.n_layers, 1.0f);
    d.value_qnorm_offset.assign(shape.n_layers, 0.0f);
  }
  return Create(std::move(d));
}

const float* Quantizer::KeyZeroPoint(int layer) const {
  return key_zero_point_.data() +
         static_cast<size_t>(layer) * data_.shape.n_kv_heads * data_.shape.head_dim;
}
const float* Quantizer::KeyRange(int layer) const {
  return key_range_.data() + static_cast<size_t>(layer) * data_.shape.n_kv_heads * data_.shape.head_dim;
}

namespace {
std::vector<float> EffectiveLut(const std::vector<float>& lut, int C, int layer, bool qnorm,
                                float scale, float offset) {
  std::vector<float> out(lut.begin() + static_cast<size_t>(layer) * C,
                         lut.begin() + static_cast<size_t>(layer + 1) * C);
  if (qnorm) {
    for (float& c : out) c = std::fmaf(c, scale, offset);
  }
  return out;
}
}  // namespace

std::vector<float> Quantizer::EffectiveKeyLut(int layer, bool qnorm) const {
  return EffectiveLut(data_.key_lut, data_.format.num_centroids(), layer, qnorm,
                      data_.key_qnorm_scale[layer], data_.key_qnorm_offset[layer]);
}
std::vector<float> Quantizer::EffectiveValueLut(int layer, bool qnorm) const {
  return EffectiveLut(data_.value_lut, data_.format.num_centroids(), layer, qnorm,
                      data_.value_qnorm_scale[layer], data_.value_qnorm_offset[layer]);
}

absl::Status Quantizer::CheckCompatible(int n_layers, int n_kv_heads, int head_dim,
                                        std::string_view fingerprint) const {
  const KvShape& s = data_.shape;
  if (s.n_layers != n_layers) {
    return absl::FailedPreconditionError(
        absl::StrCat("quantizer is for ", s.n_layers, " layers, model has ", n_layers));
  }
  if (s.n_kv_heads != n_kv_heads) {
    return absl::FailedPreconditionError(
        absl::StrCat("quantizer is for ", s.n_kv_heads, " KV heads, model has ", n_kv_heads));
  }
  if (s.head_dim != head_dim) {
    return absl::FailedPreconditionError(
        absl::StrCat("quantizer is for head_dim ", s.head_dim, ", model has ", head_dim));
  }
  if (data_.fingerprint != fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat("quantizer is for model \"",
                                                      data_.fingerprint, "\", model is \"",
                                                      std::string(fingerprint), "\""));
  }
  return absl::OkStatus();
}

absl::Status Quantizer::CheckFormat(const KvFormat& format) const {
  if (!format.quantized()) return absl::OkStatus();
  if (!format.SameCalibration(data_.format)) {
    return absl::FailedPreconditionError(absl::StrCat("quantizer is calibrated for ",
                                                      data_.format.ToString(), ", not ",
                                                      format.ToString()));
  }
  return absl::OkStatus();
}

int64_t Quantizer::DeviceBytes() const {
  return static_cast<int64_t>(4 * (2 * data_.key_lower.size() + data_.key_lut.size() +
                                   data_.value_lut.size()));
}

std::string Quantizer::Serialize() const {
  internal::ByteWriter p;
  p.Put<uint32_t>(data_.shape.n_layers);
  p.Put<uint32_t>(data_.shape.n_kv_heads);
  p.Put<uint32_t>(data_.shape.head_dim);
  p.PutString(data_.fingerprint);
  p.PutString(data_.format.ToString());
  for (const std::vector<float>* v :
       {&data_.key_lower, &data_.key_upper, &data_.key_lut, &data_.value_lut,
        &data_.key_qnorm_scale, &data_.key_qnorm_offset, &data_.value_qnorm_scale,
        &data_.value_qnorm_offset}) {
    p.PutVector(*v);
  }
  internal::ByteWriter f;
  f.PutBytes(kMagic, sizeof(kMagic));
  f.Put<uint32_t>(kFileVersion);
  f.Put<uint32_t>(0);
  f.Put<uint64_t>(p.str().size());
  f.PutBytes(p.str().data(), p.str().size());
  f.Put<uint64_t>(internal::Fnv1a64(p.str()));
  return std::move(f.str());
}

absl::StatusOr<Quantizer> Quantizer::Deserialize(std::string_view bytes) {
  constexpr size_t kHeader = 8 + 4 + 4 + 8;
  if (bytes.size() < kHeader || std::memcmp(bytes.data(), kMagic, 8) != 0) {
    return absl::InvalidArgumentError("not a kvq quantizer file (bad magic)");
  }
  internal::ByteReader h(bytes.substr(8, kHeader - 8));
  const uint32_t version = h.Get<uint32_t>();
  h.Get<uint32_t>();
  const uint64_t payload_len = h.Get<uint64_t>();
  if (version != kFileVersion) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported quantizer file version ", version,
                                                   " (this build reads ", kFileVersion, ")"));
  }
  if (payload_len > bytes.size() || bytes.size() - kHeader < payload_len + 8) {
    return absl::InvalidArgumentError(absl::StrCat("quantizer file truncated: ", bytes.size(),
                                                   " bytes, header announces ",
                                                   payload_len + kHeader + 8));
  }
  if (bytes.size() != kHeader + payload_len + 8) {
    return absl::InvalidArgumentError("quantizer file has trailing bytes");
  }
  const std::string_view payload = bytes.substr(kHeader, payload_len);
  uint64_t stored;
  std::memcpy(&stored, bytes.data() + kHeader + payload_len, 8);
  if (stored != internal::Fnv1a64(payload)) {
    return absl::DataLossError("quantizer file checksum mismatch (file is corrupted)");
  }
  internal::ByteReader r(payload);
  QuantizerData d;
  d.shape.n_layers = static_cast<int>(r.Get<uint32_t>());
  d.shape.n_kv_heads = static_cast<int>(r.Get<uint32_t>());
  d.shape.head_dim = static_cast<int>(r.Get<uint32_t>());
  d.fingerprint = r.GetString(1 << 16);
  const std::string format_name = r.GetString(256);
  const uint64_t max_count = payload.size() / 4;
  for (std::vector<float>* v : {&d.key_lower, &d.key_upper, &d.key_lut, &d.value_lut,
                                &d.key_qnorm_scale, &d.key_qnorm_offset, &d.value_qnorm_scale,
                                &d.value_qnorm_offset}) {
    *v = r.GetVector<float>(max_count);
  }
  if (r.failed() || r.remaining() != 0) {
    return absl::DataLossError("quantizer file payload is malformed");
  }
  auto format = KvFormat::Parse(format_name);
  if (!format.ok()) {
    return absl::DataLossError(absl::StrCat("quantizer file: ", format.status().message()));
  }
  d.format = *format;
  auto q = Create(std::move(d));
  if (!q.ok()) return absl::DataLossError(absl::StrCat("quantizer file: ", q.status().message()));
  return q;
}

absl::Status Quantizer::Save(const std::string& path) const {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::UnavailableError(absl::StrCat("cannot write ", path));
  const std::string bytes = Serialize();
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) return absl::UnavailableError(absl::StrCat("write failed: ", path));
  return absl::OkStatus();
}

absl::StatusOr<Quantizer> Quantizer::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open quantizer file ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  auto q = Deserialize(ss.str());
  if (!q.ok()) {
    return absl::Status(q.status().code(), absl::StrCat(path, ": ", q.status().message()));
  }
  return q;
}

}  // namespace kvq::kvstore
