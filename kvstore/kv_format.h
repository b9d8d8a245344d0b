// KV cache formats (the KVQuant method and its baselines/ablations) and the model shape they apply
// to. A format is a small descriptor with a canonical name:
//
//   fp16                 dense baseline
//   int{2,3,4}           uniform, per-token scaling for K (post-RoPE) and V (FlexGen/KIVI-style
//                        baseline rows of the paper; keys are quantized after RoPE as a plain
//                        cache would store them)
//   int{2,3,4}-pc-pre    uniform, keys per channel (static, calibrated) pre-RoPE; values per token
//   int{2,3,4}-pc-post   uniform, keys per channel post-RoPE (ablation row); values per token
//   nuq{2,3,4}           non-uniform LUT (2^B signposts per layer, separately for K and V), keys
//                        per channel pre-RoPE, values per token
//
// followed by optional dash-separated modifiers:
//   P%          dense-and-sparse outliers, fraction P/100 (0 < P <= 10); per-channel and nuq only
//   sinkN       the first N tokens of the sequence stay fp16 (N <= 64)
//   nosink      same as sink0
//   qnorm       apply Q-Norm (per-layer affine correction of the LUT centroids)
//   noqnorm     do not
//
// Defaults: sink1 for nuq formats and sink0 for int formats (the int rows reproduce the paper's
// baselines, which have no sink); qnorm on for nuq2 only (the paper uses it at 2 bits). ToString()
// emits the canonical name, which writes a modifier only where it differs from the default, so
// Parse(f.ToString()) == f for every valid f. Examples: "nuq3-1%", "nuq2-1%-noqnorm",
// "nuq4-0.1%-sink5", "int3-pc-pre-nosink" (== "int3-pc-pre").
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvq::kvstore {

// Shape of the KV cache of one model (per sequence: n_layers x tokens x n_kv_heads x head_dim).
struct KvShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;

  // head_dim must be a multiple of 32 (whole 32-code groups per token) and at most 256 (channel
  // indices are stored in 8 bits); n_kv_heads * head_dim must fit in 16 bits.
  absl::Status Validate() const;
  int64_t ElementsPerTokenPerLayer() const {
    return static_cast<int64_t>(n_kv_heads) * head_dim;
  }
  bool operator==(const KvShape&) const = default;
};

enum class KvFormatKind : uint8_t {
  kFp16 = 0,
  kIntPerToken = 1,
  kIntPerChannelPreRope = 2,
  kIntPerChannelPostRope = 3,
  kNuq = 4,
};

struct KvFormat {
  KvFormatKind kind = KvFormatKind::kFp16;
  int bits = 16;                  // 16 for fp16, else 2, 3 or 4
  double outlier_fraction = 0.0;  // 0 disables dense-and-sparse
  int sink_tokens = 0;            // first tokens kept in fp16
  bool qnorm = false;

  static constexpr int kMaxSinkTokens = 64;
  static constexpr double kMaxOutlierFraction = 0.10;

  // A quantized format with default modifiers (sink, qnorm) for its kind and bits.
  static KvFormat Make(KvFormatKind kind, int bits, double outlier_fraction = 0.0);
  static absl::StatusOr<KvFormat> Parse(std::string_view name);
  std::string ToString() const;
  absl::Status Validate() const;

  bool quantized() const { return kind != KvFormatKind::kFp16; }
  bool uses_lut_from_quantizer() const { return kind == KvFormatKind::kNuq; }
  // Keys scaled per channel with static (calibrated) zero-point/range from the quantizer.
  bool keys_per_channel() const {
    return kind == KvFormatKind::kIntPerChannelPreRope ||
           kind == KvFormatKind::kIntPerChannelPostRope || kind == KvFormatKind::kNuq;
  }
  // Keys are quantized after RoPE (so no RoPE is applied on the fly when attending).
  bool keys_post_rope() const {
    return kind == KvFormatKind::kIntPerToken || kind == KvFormatKind::kIntPerChannelPostRope;
  }
  int num_centroids() const { return quantized() ? (1 << bits) : 0; }
  // The fields that calibration depends on (kind, bits, outlier fraction) are equal.
  bool SameCalibration(const KvFormat& o) const {
    return kind == o.kind && bits == o.bits && outlier_fraction == o.outlier_fraction;
  }
  bool operator==(const KvFormat&) const = default;
};

// Number of value outliers kept per token and layer: round(fraction * n_kv_heads * head_dim),
// halves away from zero. Fixed per format and shape, so value outliers have a fixed layout.
int ValueOutliersPerToken(const KvFormat& format, const KvShape& shape);

}  // namespace kvq::kvstore
