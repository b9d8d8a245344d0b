// Offline calibration of a Quantizer from collected activations (the driver that runs the model
// and collects keys/values/Fisher weights lives elsewhere; these are the fitting functions):
//   1. key thresholds per (layer, kv head, channel): the (1-t) and t percentiles over calibration
//      tokens, t = 1 - outlier_fraction/2 (linear interpolation between order statistics, as
//      torch.quantile); min/max without outliers;
//   2. normalization: keys x_n = (x - zp_c)/range_c, values per token with the online rule of
//      lut_codec.h (fixed count of outliers); outliers are excluded from the LUT fit (they are
//      stored exactly);
//   3. per layer, for K and V separately: 1-D k-means of the normalized dense elements, weighted
//      by per-element sensitivity (Fisher information = squared gradients; unweighted when absent):
//      argmin_Q sum_i w_i (x_i - Q(x_i))^2. Deterministic: initial centroids at the weighted
//      quantiles (j + 1/2)/K, Lloyd iterations with ties to the lower centroid, stop at
//      max_iterations or when no centroid moves more than tolerance. Uniform int formats use
//      evenly spaced centroids instead;
//   4. Q-Norm per layer, K and V: normscale = sigma_orig / sigma_quant, normoffset = mu_orig -
//      mu_quant * normscale, over the normalized dense data and its quantized version (unweighted).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/reference/rope.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantizer.h"

namespace kvq::kvstore {

// Percentile q in [0, 1] of an ascending array (linear interpolation, torch.quantile's default).
double SortedPercentile(const std::vector<float>& sorted, double q);

// Per-channel thresholds over keys [n_tokens][n_kv][head_dim] of one layer. lower/upper receive
// [n_kv][head_dim].
absl::Status ComputeKeyThresholds(const float* keys, int64_t n_tokens, int n_kv, int head_dim,
                                  double outlier_fraction, std::vector<float>* lower,
                                  std::vector<float>* upper);

struct KMeansOptions {
  int max_iterations = 100;
  double tolerance = 1e-7;
};

// Weighted 1-D k-means: n_centroids strictly ascending centroids in [-1, 1]. weights may be empty
// (unweighted) or have x.size() non-negative entries. x must be non-empty.
absl::StatusOr<std::vector<float>> FitLut1D(const std::vector<float>& x,
                                            const std::vector<float>& weights, int n_centroids,
                                            const KMeansOptions& options = {});

// sum_i w_i (x_i - Q(x_i))^2 with Q the nearest-centroid quantizer of lut_codec.h (w = 1 if empty).
double WeightedQuantizationError(const std::vector<float>& x, const std::vector<float>& weights,
                                 const std::vector<float>& lut);

struct QNormParams {
  float scale = 1.0f;
  float offset = 0.0f;
};
QNormParams FitQNorm(const std::vector<float>& x, const std::vector<float>& lut);

// Calibration activations of one layer. Pointers stay owned by the caller.
struct LayerCalibrationData {
  int64_t n_tokens = 0;
  const float* keys = nullptr;           // [n_tokens][n_kv][head_dim], pre-RoPE
  const float* values = nullptr;         // [n_tokens][n_kv][head_dim]
  const float* key_weights = nullptr;    // same shape (squared gradients) or null
  const float* value_weights = nullptr;  // same shape or null
  const int64_t* positions = nullptr;    // [n_tokens] RoPE positions (post-RoPE formats); null: i
};

struct CalibrationOptions {
  KMeansOptions kmeans;
  kernels::RopeParams rope;  // used by int-pc-post only (head_dim 0: the shape's)
};

// A quantizer for `format` (kind, bits, outlier fraction, sink, qnorm are recorded) fitted on
// `layers` (one entry per model layer).
absl::StatusOr<Quantizer> Calibrate(const KvShape& shape, const KvFormat& format,
                                    const std::string& fingerprint,
                                    absl::Span<const LayerCalibrationData> layers,
                                    const CalibrationOptions& options = {});

}  // namespace kvq::kvstore
