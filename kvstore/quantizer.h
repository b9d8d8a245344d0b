// The quantizer of one model for one KV format: the offline-calibrated parameters of KVQuant.
//   - per (layer, kv head, channel): key thresholds lower/upper at the calibrated sparsity, hence
//     zero-point = (upper + lower) / 2 and range = (upper - lower) / 2 (per-channel formats only);
//   - per layer: key and value LUTs of 2^B ascending centroids in [-1, 1] (evenly spaced for int
//     formats, k-means signposts for nuq);
//   - per layer: Q-Norm scale/offset for keys and values (applied to the centroids when the
//     format has qnorm);
//   - the format it was calibrated for (bits, outlier fraction, sink length, qnorm) and the model
//     identity (n_layers, n_kv_heads, head_dim, fingerprint).
// File: "KVQQUANT" magic, u32 version, u32 reserved, u64 payload length, payload, u64 FNV-1a 64
// of the payload; all little-endian. Load() validates all of it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/kv_format.h"

namespace kvq::kvstore {

struct QuantizerData {
  KvShape shape;
  std::string fingerprint;  // model identity, e.g. "<arch>:<hash of config and weights>"
  KvFormat format;
  std::vector<float> key_lower;  // [n_layers][n_kv_heads][head_dim]; per-channel formats only
  std::vector<float> key_upper;  // same
  std::vector<float> key_lut;    // [n_layers][2^B] ascending, without Q-Norm
  std::vector<float> value_lut;  // [n_layers][2^B]
  std::vector<float> key_qnorm_scale, key_qnorm_offset;      // [n_layers]
  std::vector<float> value_qnorm_scale, value_qnorm_offset;  // [n_layers]
};

class Quantizer {
 public:
  static constexpr uint32_t kFileVersion = 1;
  static constexpr float kMinKeyRange = 1e-8f;

  // Validates sizes, ordering and finiteness.
  static absl::StatusOr<Quantizer> Create(QuantizerData data);
  // A quantizer needing no calibration data: uniform LUTs, Q-Norm identity; per-channel key
  // thresholds must still be calibrated, so only for fp16 and int per-token formats.
  static absl::StatusOr<Quantizer> Uncalibrated(const KvShape& shape, const KvFormat& format,
                                                std::string fingerprint);

  const QuantizerData& data() const { return data_; }
  const KvShape& shape() const { return data_.shape; }
  const KvFormat& format() const { return data_.format; }
  const std::string& fingerprint() const { return data_.fingerprint; }

  // fp32 [n_kv_heads][head_dim] of one layer (per-channel formats).
  const float* KeyZeroPoint(int layer) const;
  const float* KeyRange(int layer) const;
  // The centroids a cache of `format` encodes and decodes with: the LUT, with Q-Norm
  // (c * scale + offset) applied when format.qnorm. Strictly ascending.
  std::vector<float> EffectiveKeyLut(int layer, bool qnorm) const;
  std::vector<float> EffectiveValueLut(int layer, bool qnorm) const;

  // OK iff this quantizer was made for that model; otherwise names the mismatch, e.g.
  // "quantizer is for 32 layers, model has 30".
  absl::Status CheckCompatible(int n_layers, int n_kv_heads, int head_dim,
                               std::string_view fingerprint) const;
  // OK iff a cache of `format` can use this quantizer (same kind, bits and outlier fraction;
  // sink length and qnorm may differ).
  absl::Status CheckFormat(const KvFormat& format) const;

  // Bytes of the tensors a device holds for this quantizer (fp32 key zero-point/range and LUTs):
  // a per-model constant, amortized separately from per-token bytes.
  int64_t DeviceBytes() const;

  std::string Serialize() const;
  static absl::StatusOr<Quantizer> Deserialize(std::string_view bytes);
  absl::Status Save(const std::string& path) const;
  static absl::StatusOr<Quantizer> Load(const std::string& path);

 private:
  explicit Quantizer(QuantizerData data);
  QuantizerData data_;
  std::vector<float> key_zero_point_, key_range_;  // derived from thresholds
};

}  // namespace kvq::kvstore
