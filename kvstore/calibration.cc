#include "kvstore/calibration.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kvstore/lut_codec.h"

namespace kvq::kvstore {

double SortedPercentile(const std::vector<float>& sorted, double q) {
  const double pos = q * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  const double frac = pos - static_cast<double>(lo);
  return sorted[lo] + frac * (static_cast<double>(sorted[hi]) - sorted[lo]);
}

absl::Status ComputeKeyThresholds(const float* keys, int64_t n_tokens, int n_kv, int head_dim,
                                  double outlier_fraction, std::vector<float>* lower,
                                  std::vector<float>* upper) {
  if (n_tokens <= 0) return absl::InvalidArgumentError("key thresholds need calibration tokens");
  if (!(outlier_fraction >= 0.0 && outlier_fraction < 1.0)) {
    return absl::InvalidArgumentError("outlier fraction must be in [0, 1)");
  }
  const int64_t C = static_cast<int64_t>(n_kv) * head_dim;
  const double t = 1.0 - outlier_fraction / 2.0;
  lower->resize(C);
  upper->resize(C);
  std::vector<float> col(n_tokens);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < n_tokens; ++i) col[i] = keys[i * C + c];
    std::sort(col.begin(), col.end());
    (*lower)[c] = static_cast<float>(SortedPercentile(col, 1.0 - t));
    (*upper)[c] = static_cast<float>(SortedPercentile(col, t));
  }
  return absl::OkStatus();
}

namespace {

// Forces strictly ascending centroids within [-1, 1].
void MakeStrictlyAscending(std::vector<float>* lut) {
  std::vector<float>& c = *lut;
  for (float& x : c) x = std::clamp(x, -1.0f, 1.0f);
  std::sort(c.begin(), c.end());
  for (size_t j = 1; j < c.size(); ++j) {
    if (!(c[j] > c[j - 1])) c[j] = std::nextafter(c[j - 1], 2.0f);
  }
  if (c.back() > 1.0f) {
    c.back() = 1.0f;
    for (size_t j = c.size() - 1; j-- > 0;) {
      if (!(c[j] < c[j + 1])) c[j] = std::nextafter(c[j + 1], -2.0f);
    }
  }
}

}  // namespace

absl::StatusOr<std::vector<float>> FitLut1D(const std::vector<float>& x,
                                            const std::vector<float>& weights, int n_centroids,
                                            const KMeansOptions& options) {
  if (x.empty()) return absl::InvalidArgumentError("k-means needs data");
  if (n_centroids < 2) return absl::InvalidArgumentError("k-means needs >= 2 centroids");
  if (!weights.empty() && weights.size() != x.size()) {
    return absl::InvalidArgumentError(absl::StrCat("k-means: ", weights.size(), " weights for ",
                                                   x.size(), " values"));
  }
  const size_t n = x.size();
  std::vector<std::pair<float, float>> xw(n);
  double total_w = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const float w = weights.empty() ? 1.0f : weights[i];
    if (!(w >= 0.0f) || !std::isfinite(x[i])) {
      return absl::InvalidArgumentError("k-means: weights must be >= 0 and data finite");
    }
    xw[i] = {std::clamp(x[i], -1.0f, 1.0f), w};
    total_w += w;
  }
  const bool unweighted = !(total_w > 0.0);
  if (unweighted) {
    for (auto& p : xw) p.second = 1.0f;
    total_w = static_cast<double>(n);
  }
  std::sort(xw.begin(), xw.end());
  // Prefix sums of w and w*x (double) make each Lloyd step O(K log n).
  std::vector<double> sw(n + 1, 0.0), swx(n + 1, 0.0);
  for (size_t i = 0; i < n; ++i) {
    sw[i + 1] = sw[i] + xw[i].second;
    swx[i + 1] = swx[i] + static_cast<double>(xw[i].second) * xw[i].first;
  }
  const int K = n_centroids;
  std::vector<double> c(K);
  for (int j = 0; j < K; ++j) {  // weighted quantile (j + 1/2) / K
    const double target = (j + 0.5) / K * total_w;
    const size_t at = std::lower_bound(sw.begin() + 1, sw.end(), target) - (sw.begin() + 1);
    c[j] = xw[std::min(at, n - 1)].first;
  }
  for (int it = 0; it < options.max_iterations; ++it) {
    std::sort(c.begin(), c.end());
    double max_shift = 0.0;
    size_t begin = 0;
    std::vector<double> next = c;
    for (int j = 0; j < K; ++j) {
      size_t end = n;
      if (j + 1 < K) {  // elements with x <= midpoint go to centroid j (ties to the lower one)
        const float mid = 0.5f * (static_cast<float>(c[j]) + static_cast<float>(c[j + 1]));
        end = std::upper_bound(xw.begin() + begin, xw.end(), mid,
                               [](float m, const std::pair<float, float>& p) { return m < p.first; }) -
              xw.begin();
      }
      const double w = sw[end] - sw[begin];
      if (w > 0.0) next[j] = (swx[end] - swx[begin]) / w;
      max_shift = std::max(max_shift, std::fabs(next[j] - c[j]));
      begin = end;
    }
    c = std::move(next);
    if (max_shift <= options.tolerance) break;
  }
  std::vector<float> lut(K);
  for (int j = 0; j < K; ++j) lut[j] = static_cast<float>(c[j]);
  MakeStrictlyAscending(&lut);
  return lut;
}

double WeightedQuantizationError(const std::vector<float>& x, const std::vector<float>& weights,
                                 const std::vector<float>& lut) {
  const std::vector<float> mids = LutMidpoints(lut);
  double err = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float q = lut[EncodeNearest(x[i], mids.data(), static_cast<int>(mids.size()))];
    const double d = static_cast<double>(x[i]) - q;
    err += (weights.empty() ? 1.0 : weights[i]) * d * d;
  }
  return err;
}

QNormParams FitQNorm(const std::vector<float>& x, const std::vector<float>& lut) {
  QNormParams p;
  if (x.empty()) return p;
  const std::vector<float> mids = LutMidpoints(lut);
  double so = 0, so2 = 0, sq = 0, sq2 = 0;
  for (float v : x) {
    const double q = lut[EncodeNearest(v, mids.data(), static_cast<int>(mids.size()))];
    so += v;
    so2 += static_cast<double>(v) * v;
    sq += q;
    sq2 += q * q;
  }
  const double n = static_cast<double>(x.size());
  const double mu_o = so / n, mu_q = sq / n;
  const double sd_o = std::sqrt(std::max(0.0, so2 / n - mu_o * mu_o));
  const double sd_q = std::sqrt(std::max(0.0, sq2 / n - mu_q * mu_q));
  if (!(sd_q > 0.0) || !(sd_o > 0.0)) return p;
  p.scale = static_cast<float>(sd_o / sd_q);
  p.offset = static_cast<float>(mu_o - mu_q * sd_o / sd_q);
  return p;
}

absl::StatusOr<Quantizer> Calibrate(const KvShape& shape, const KvFormat& format,
                                    const std::string& fingerprint,
                                    absl::Span<const LayerCalibrationData> layers,
                                    const CalibrationOptions& options) {
  KVQ_RETURN_IF_ERROR(shape.Validate());
  KVQ_RETURN_IF_ERROR(format.Validate());
  if (!format.quantized()) return Quantizer::Uncalibrated(shape, format, fingerprint);
  if (static_cast<int>(layers.size()) != shape.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("calibration data has ", layers.size(),
                                                   " layers, shape has ", shape.n_layers));
  }
  QuantizerData d;
  d.shape = shape;
  d.format = format;
  d.fingerprint = fingerprint;
  const int H = shape.n_kv_heads, D = shape.head_dim;
  const int64_t L = shape.ElementsPerTokenPerLayer();
  const int K = format.num_centroids();
  const int k_v = ValueOutliersPerToken(format, shape);
  kernels::RopeParams rope = options.rope;
  if (rope.head_dim == 0) rope.head_dim = D;
  const std::vector<double> inv_freq = kernels::RopeInvFreq(rope);
  const std::vector<float> uniform = UniformLut(format.bits);
  for (int l = 0; l < shape.n_layers; ++l) {
    const LayerCalibrationData& in = layers[l];
    if (in.n_tokens <= 0 || in.keys == nullptr || in.values == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("calibration layer ", l, " has no data"));
    }
    const int64_t n = in.n_tokens;
    std::vector<float> keys(in.keys, in.keys + n * L);
    if (format.kind == KvFormatKind::kIntPerChannelPostRope) {
      for (int64_t i = 0; i < n; ++i) {
        kernels::ApplyRopeReference(keys.data() + i * L, H, D, in.positions ? in.positions[i] : i,
                                    inv_freq);
      }
    }
    // Normalized dense key and value elements (and their weights) of this layer.
    std::vector<float> kx, kw, vx, vw;
    if (format.keys_per_channel()) {
      std::vector<float> lo, up;
      KVQ_RETURN_IF_ERROR(ComputeKeyThresholds(keys.data(), n, H, D, format.outlier_fraction, &lo, &up));
      for (int64_t c = 0; c < L; ++c) {
        const float zp = 0.5f * (up[c] + lo[c]);
        const float r = std::fmax(0.5f * (up[c] - lo[c]), Quantizer::kMinKeyRange);
        for (int64_t i = 0; i < n; ++i) {
          const float xn = Normalize(keys[i * L + c], zp, r);
          if (format.outlier_fraction > 0.0 && std::fabs(xn) > 1.0f) continue;
          kx.push_back(std::clamp(xn, -1.0f, 1.0f));
          if (in.key_weights) kw.push_back(in.key_weights[i * L + c]);
        }
      }
      d.key_lower.insert(d.key_lower.end(), lo.begin(), lo.end());
      d.key_upper.insert(d.key_upper.end(), up.begin(), up.end());
    } else {
      std::vector<int> outl, order;
      for (int64_t i = 0; i < n; ++i) {
        const TokenScaling s = ComputeTokenScaling(keys.data() + i * L, L, 0, &outl, &order);
        for (int64_t e = 0; e < L; ++e) {
          kx.push_back(std::clamp(Normalize(keys[i * L + e], s.zero_point(), s.range()), -1.0f, 1.0f));
          if (in.key_weights) kw.push_back(in.key_weights[i * L + e]);
        }
      }
    }
    {
      std::vector<int> outl, order;
      for (int64_t i = 0; i < n; ++i) {
        const float* v = in.values + i * L;
        const TokenScaling s = ComputeTokenScaling(v, static_cast<int>(L), k_v, &outl, &order);
        size_t next_out = 0;
        for (int64_t e = 0; e < L; ++e) {
          if (next_out < outl.size() && outl[next_out] == e) {
            ++next_out;
            continue;
          }
          vx.push_back(std::clamp(Normalize(v[e], s.zero_point(), s.range()), -1.0f, 1.0f));
          if (in.value_weights) vw.push_back(in.value_weights[i * L + e]);
        }
      }
    }
    std::vector<float> klut = uniform, vlut = uniform;
    if (format.kind == KvFormatKind::kNuq) {
      KVQ_ASSIGN_OR_RETURN(klut, FitLut1D(kx, kw, K, options.kmeans));
      KVQ_ASSIGN_OR_RETURN(vlut, FitLut1D(vx, vw, K, options.kmeans));
    }
    const QNormParams kq = FitQNorm(kx, klut), vq = FitQNorm(vx, vlut);
    d.key_lut.insert(d.key_lut.end(), klut.begin(), klut.end());
    d.value_lut.insert(d.value_lut.end(), vlut.begin(), vlut.end());
    d.key_qnorm_scale.push_back(kq.scale);
    d.key_qnorm_offset.push_back(kq.offset);
    d.value_qnorm_scale.push_back(vq.scale);
    d.value_qnorm_offset.push_back(vq.offset);
  }
  return Quantizer::Create(std::move(d));
}

}  // namespace kvq::kvstore
