#include "model/forward.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "model/sampling.h"

namespace kvq::model {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows up to this many go through cblas_sgemv, one call per row: OpenBLAS's sgemm packs B (the
// whole weight matrix) on every call, and for a few rows the packing costs more than the product
// (54% of a CPU decode step sat in sgemm_incopy; perf, SmolLM2, 2026-12-01; 1536 x 576, one
// thread, this 2-core machine: sgemm 341 / 296 / 359 / 411 us at 1 / 2 / 3 / 4 rows, sgemv per
// row 73 / 150 / 226 / 418 us).
constexpr int kGemvMaxRows = 3;

// C[rows][n] = alpha * A[rows][k] . B[n][k]^T + beta * C (row-major with leading dimensions).
void GemmNT(int rows, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb, float beta,
            float* c, int ldc) {
  if (rows <= kGemvMaxRows) {
    for (int r = 0; r < rows; ++r) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, alpha, b, ldb, a + static_cast<int64_t>(r) * lda, 1, beta,
                  c + static_cast<int64_t>(r) * ldc, 1);
    }
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// C[rows][n] = A[rows][k] . B[k][n] (row-major with leading dimensions).
void GemmNN(int rows, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  if (rows <= kGemvMaxRows) {
    for (int r = 0; r < rows; ++r) {
      cblas_sgemv(CblasRowMajor, CblasTrans, k, n, 1.0f, b, ldb, a + static_cast<int64_t>(r) * lda, 1, 0.0f,
                  c + static_cast<int64_t>(r) * ldc, 1);
    }
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc);
}

// Y[rows, out] = X[rows, in] · W[out, in]^T (+ bias).
void Linear(const float* x, int rows, int in, const std::vector<float>& w, int out,
            const std::vector<float>& bias, float* y) {
  GemmNT(rows, out, in, 1.0f, x, in, w.data(), in, 0.0f, y, out);
  if (!bias.empty()) {
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < out; ++c) y[static_cast<int64_t>(r) * out + c] += bias[c];
    }
  }
}

void RmsNorm(const float* x, int rows, int dim, const std::vector<float>& w, float eps, float* y) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + static_cast<int64_t>(r) * dim;
    float* yr = y + static_cast<int64_t>(r) * dim;
    float ss = 0.0f;
    for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int i = 0; i < dim; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

// Rotates rows of [n, heads, hd] at positions pos0 + i.
void RotateRows(float* x, int n, int heads, int hd, int64_t pos0, const std::vector<double>& inv) {
  for (int i = 0; i < n; ++i) {
    kernels::ApplyRopeReference(x + static_cast<int64_t>(i) * heads * hd, heads, hd, pos0 + i, inv);
  }
}

}  // namespace

int DefaultCpuThreads() {
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  return std::clamp(hw / 2, 1, 8);
}

void SetCpuThreads(int n) { openblas_set_num_threads(n > 0 ? n : DefaultCpuThreads()); }

kernels::RopeParams RopeParamsFor(const ModelConfig& c) {
  kernels::RopeParams p;
  p.head_dim = c.head_dim;
  p.theta = c.rope_theta;
  p.llama3_scaling = c.rope_scaling.enabled;
  p.factor = c.rope_scaling.factor;
  p.low_freq_factor = c.rope_scaling.low_freq_factor;
  p.high_freq_factor = c.rope_scaling.high_freq_factor;
  p.original_max_position = c.rope_scaling.original_max_position;
  return p;
}

void MergeAttentionPartial(float* o_a, float* lse_a, const float* o_b, const float* lse_b,
                           int rows, int head_dim) {
  for (int r = 0; r < rows; ++r) {
    const float la = lse_a[r], lb = lse_b[r];
    if (lb == kNegInf) continue;
    if (la == kNegInf) {
      std::copy(o_b + static_cast<int64_t>(r) * head_dim, o_b + static_cast<int64_t>(r + 1) * head_dim,
                o_a + static_cast<int64_t>(r) * head_dim);
      lse_a[r] = lb;
      continue;
    }
    const double m = std::max(la, lb);
    const double wa = std::exp(la - m), wb = std::exp(lb - m);
    const double lse = m + std::log(wa + wb);
    const double ca = std::exp(la - lse), cb = std::exp(lb - lse);
    float* oa = o_a + static_cast<int64_t>(r) * head_dim;
    const float* ob = o_b + static_cast<int64_t>(r) * head_dim;
    for (int d = 0; d < head_dim; ++d) oa[d] = static_cast<float>(ca * oa[d] + cb * ob[d]);
    lse_a[r] = static_cast<float>(lse);
  }
}

void AttendDense(const float* q, int n_q, int n_heads, const float* k_rot, const float* v,
                 int64_t n_keys, int n_kv_heads, int head_dim, const int64_t* key_end, float* o,
                 float* lse) {
  const int group = n_heads / n_kv_heads;
  const int q_stride = n_heads * head_dim;
  const int kv_stride = n_kv_heads * head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  // Queries in tiles: a causal pattern (key_end growing with the query) then only touches the
  // keys each tile needs, about half of the full rectangle.
  constexpr int kTile = 128;
  std::vector<float> scores;
  for (int i0 = 0; i0 < n_q; i0 += kTile) {
    const int nt = std::min(kTile, n_q - i0);
    int64_t max_end = 0;
    for (int i = i0; i < i0 + nt; ++i) max_end = std::max(max_end, std::min(key_end[i], n_keys));
    if (max_end == 0) {
      std::fill(o + static_cast<int64_t>(i0) * q_stride, o + static_cast<int64_t>(i0 + nt) * q_stride, 0.0f);
      std::fill(lse + static_cast<int64_t>(i0) * n_heads, lse + static_cast<int64_t>(i0 + nt) * n_heads, kNegInf);
      continue;
    }
    scores.resize(static_cast<size_t>(nt) * max_end);
    const float* qt = q + static_cast<int64_t>(i0) * q_stride;
    float* ot = o + static_cast<int64_t>(i0) * q_stride;
    for (int h = 0; h < n_heads; ++h) {
      const int g = h / group;
      // scores[i, t] = scale * q_i,h . k_t,g
      GemmNT(nt, static_cast<int>(max_end), head_dim, scale, qt + static_cast<int64_t>(h) * head_dim, q_stride,
             k_rot + static_cast<int64_t>(g) * head_dim, kv_stride, 0.0f, scores.data(), static_cast<int>(max_end));
      for (int i = 0; i < nt; ++i) {
        float* s = scores.data() + static_cast<int64_t>(i) * max_end;
        const int64_t end = std::min(key_end[i0 + i], max_end);
        float* lse_ih = lse + static_cast<int64_t>(i0 + i) * n_heads + h;
        if (end <= 0) {
          std::fill(s, s + max_end, 0.0f);
          *lse_ih = kNegInf;
          continue;
        }
        float m = kNegInf;
        for (int64_t t = 0; t < end; ++t) m = std::max(m, s[t]);
        double sum = 0.0;
        for (int64_t t = 0; t < end; ++t) {
          s[t] = std::exp(s[t] - m);
          sum += s[t];
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t t = 0; t < end; ++t) s[t] *= inv;
        std::fill(s + end, s + max_end, 0.0f);
        *lse_ih = m + static_cast<float>(std::log(sum));
      }
      // o_i,h = sum_t p[i, t] v_t,g
      GemmNN(nt, head_dim, static_cast<int>(max_end), scores.data(), static_cast<int>(max_end),
             v + static_cast<int64_t>(g) * head_dim, kv_stride, ot + static_cast<int64_t>(h) * head_dim, q_stride);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// DenseKvCache

DenseKvCache::DenseKvCache(const ModelConfig& c, bool fp32_storage, int64_t position_offset)
    : n_layers_(c.n_layers),
      n_heads_(c.n_heads),
      n_kv_heads_(c.n_kv_heads),
      head_dim_(c.head_dim),
      fp32_(fp32_storage),
      position_offset_(position_offset),
      inv_freq_(kernels::RopeInvFreq(RopeParamsFor(c))) {
  if (fp32_) {
    k32_.resize(n_layers_);
    v32_.resize(n_layers_);
  } else {
    k16_.resize(n_layers_);
    v16_.resize(n_layers_);
  }
}

absl::Status DenseKvCache::Append(int layer, const float* k, const float* v, int n) {
  if (layer < 0 || layer >= n_layers_) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  const int64_t elems = static_cast<int64_t>(n) * n_kv_heads_ * head_dim_;
  if (fp32_) {
    k32_[layer].insert(k32_[layer].end(), k, k + elems);
    v32_[layer].insert(v32_[layer].end(), v, v + elems);
  } else {
    auto& kd = k16_[layer];
    auto& vd = v16_[layer];
    const size_t base = kd.size();
    kd.resize(base + elems);
    vd.resize(base + elems);
    for (int64_t i = 0; i < elems; ++i) {
      kd[base + i] = FloatToHalfBits(k[i]);
      vd[base + i] = FloatToHalfBits(v[i]);
    }
  }
  if (layer == n_layers_ - 1) staged_ += n;
  return absl::OkStatus();
}

void DenseKvCache::Commit(int n) {
  KVQ_CHECK(n <= staged_);
  length_ += n;
  staged_ -= n;
}

void DenseKvCache::DiscardStaged() {
  const int64_t keep = length_ * n_kv_heads_ * head_dim_;
  for (int l = 0; l < n_layers_; ++l) {
    if (fp32_) {
      k32_[l].resize(std::min<size_t>(k32_[l].size(), keep));
      v32_[l].resize(std::min<size_t>(v32_[l].size(), keep));
    } else {
      k16_[l].resize(std::min<size_t>(k16_[l].size(), keep));
      v16_[l].resize(std::min<size_t>(v16_[l].size(), keep));
    }
  }
  staged_ = 0;
}

void DenseKvCache::Read(int layer, int64_t begin, int64_t end, std::vector<float>* k,
                        std::vector<float>* v) const {
  const int64_t row = static_cast<int64_t>(n_kv_heads_) * head_dim_;
  const int64_t n = (end - begin) * row;
  k->resize(n);
  v->resize(n);
  if (fp32_) {
    std::copy(k32_[layer].begin() + begin * row, k32_[layer].begin() + end * row, k->begin());
    std::copy(v32_[layer].begin() + begin * row, v32_[layer].begin() + end * row, v->begin());
  } else {
    for (int64_t i = 0; i < n; ++i) {
      (*k)[i] = HalfBitsToFloat(k16_[layer][begin * row + i]);
      (*v)[i] = HalfBitsToFloat(v16_[layer][begin * row + i]);
    }
  }
}

absl::Status KvCache::FillSynthetic(int n_layers, int kv_dim, int64_t tokens, uint64_t seed, float key_sigma) {
  if (length() != 0) return absl::FailedPreconditionError("a synthetic fill needs an empty cache");
  if (tokens < 0) return absl::InvalidArgumentError(absl::StrCat("cannot fill ", tokens, " tokens"));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  constexpr int64_t kChunk = 256;
  std::vector<float> k, v;
  for (int64_t at = 0; at < tokens; at += kChunk) {
    const int n = static_cast<int>(std::min(kChunk, tokens - at));
    for (int l = 0; l < n_layers; ++l) {
      k.resize(static_cast<size_t>(n) * kv_dim);
      v.resize(k.size());
      for (float& x : k) x = key_sigma * nd(rng);
      for (float& x : v) x = nd(rng);
      if (absl::Status s = Append(l, k.data(), v.data(), n); !s.ok()) {
        DiscardStaged();
        return s;
      }
    }
    Commit(n);
  }
  return absl::OkStatus();
}

void DenseKvCache::Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
                          float* lse) const {
  const int64_t row = static_cast<int64_t>(n_kv_heads_) * head_dim_;
  const int64_t stored = static_cast<int64_t>(fp32_ ? k32_[layer].size() : k16_[layer].size()) / row;
  int64_t max_end = 0;
  for (int i = 0; i < n_q; ++i) max_end = std::max(max_end, std::min(key_end[i], stored));
  std::vector<float> k, v;
  Read(layer, 0, max_end, &k, &v);
  for (int64_t t = 0; t < max_end; ++t) {
    kernels::ApplyRopeReference(k.data() + t * row, n_kv_heads_, head_dim_, position_offset_ + t,
                                inv_freq_);
  }
  AttendDense(q, n_q, n_heads_, k.data(), v.data(), max_end, n_kv_heads_, head_dim_, key_end, o,
              lse);
}

int64_t DenseKvCache::bytes() const {
  int64_t b = 0;
  for (int l = 0; l < n_layers_; ++l) {
    b += fp32_ ? static_cast<int64_t>(k32_[l].size() + v32_[l].size()) * 4
               : static_cast<int64_t>(k16_[l].size() + v16_[l].size()) * 2;
  }
  return b;
}

std::unique_ptr<KvCache> DenseKvCache::Clone() const {
  return std::make_unique<DenseKvCache>(*this);
}

namespace {
constexpr char kDenseMagic[8] = {'K', 'V', 'Q', 'D', 'E', 'N', 'S', '1'};
}  // namespace

absl::StatusOr<std::string> DenseKvCache::Serialize() const {
  // magic, fp32 flag, layers, kv heads, head dim, offset, length; then per layer K then V.
  std::string out(kDenseMagic, 8);
  auto put = [&](int64_t v) { out.append(reinterpret_cast<const char*>(&v), 8); };
  put(fp32_ ? 1 : 0);
  put(n_layers_);
  put(n_kv_heads_);
  put(head_dim_);
  put(position_offset_);
  put(length_);
  const int64_t elems = length_ * n_kv_heads_ * head_dim_;
  for (int l = 0; l < n_layers_; ++l) {
    if (fp32_) {
      out.append(reinterpret_cast<const char*>(k32_[l].data()), elems * 4);
      out.append(reinterpret_cast<const char*>(v32_[l].data()), elems * 4);
    } else {
      out.append(reinterpret_cast<const char*>(k16_[l].data()), elems * 2);
      out.append(reinterpret_cast<const char*>(v16_[l].data()), elems * 2);
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<DenseKvCache>> DenseKvCache::Deserialize(const ModelConfig& config,
                                                                       const std::string& bytes) {
  if (bytes.size() < 56 || bytes.compare(0, 8, std::string(kDenseMagic, 8)) != 0) {
    return absl::DataLossError("not a dense KV cache image (bad magic or too short)");
  }
  int64_t h[6];
  std::memcpy(h, bytes.data() + 8, sizeof(h));
  if (h[1] != config.n_layers || h[2] != config.n_kv_heads || h[3] != config.head_dim) {
    return absl::FailedPreconditionError(absl::StrCat(
        "KV cache image is for ", h[1], " layers x ", h[2], " KV heads x ", h[3],
        ", the model has ", config.n_layers, " x ", config.n_kv_heads, " x ", config.head_dim));
  }
  const bool fp32 = h[0] != 0;
  const int64_t length = h[5];
  const int64_t elems = length * config.n_kv_heads * config.head_dim;
  const int64_t need = 56 + 2 * config.n_layers * elems * (fp32 ? 4 : 2);
  if (length < 0 || static_cast<int64_t>(bytes.size()) != need) {
    return absl::DataLossError(absl::StrCat("KV cache image has ", bytes.size(), " bytes, expected ", need));
  }
  auto c = std::make_unique<DenseKvCache>(config, fp32, h[4]);
  const char* p = bytes.data() + 56;
  for (int l = 0; l < config.n_layers; ++l) {
    if (fp32) {
      c->k32_[l].resize(elems);
      c->v32_[l].resize(elems);
      std::memcpy(c->k32_[l].data(), p, elems * 4); p += elems * 4;
      std::memcpy(c->v32_[l].data(), p, elems * 4); p += elems * 4;
    } else {
      c->k16_[l].resize(elems);
      c->v16_[l].resize(elems);
      std::memcpy(c->k16_[l].data(), p, elems * 2); p += elems * 2;
      std::memcpy(c->v16_[l].data(), p, elems * 2); p += elems * 2;
    }
  }
  c->length_ = length;
  return c;
}

// ---------------------------------------------------------------------------------------------
// PrefixKvCache

PrefixKvCache::PrefixKvCache(std::shared_ptr<const KvCache> prefix, int64_t prefix_length,
                             std::unique_ptr<KvCache> tail, int n_heads, int head_dim)
    : prefix_(std::move(prefix)),
      prefix_length_(prefix_length),
      tail_(std::move(tail)),
      n_heads_(n_heads),
      head_dim_(head_dim) {}

void PrefixKvCache::Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
                           float* lse) const {
  std::vector<int64_t> pe(n_q), te(n_q);
  bool any_tail = false;
  for (int i = 0; i < n_q; ++i) {
    pe[i] = std::min(key_end[i], prefix_length_);
    te[i] = std::max<int64_t>(0, key_end[i] - prefix_length_);
    any_tail |= te[i] > 0;
  }
  prefix_->Attend(layer, q, n_q, pe.data(), o, lse);
  if (!any_tail) return;
  std::vector<float> o2(static_cast<size_t>(n_q) * n_heads_ * head_dim_), l2(static_cast<size_t>(n_q) * n_heads_);
  tail_->Attend(layer, q, n_q, te.data(), o2.data(), l2.data());
  MergeAttentionPartial(o, lse, o2.data(), l2.data(), n_q * n_heads_, head_dim_);
}

std::unique_ptr<KvCache> PrefixKvCache::Clone() const {
  return std::make_unique<PrefixKvCache>(prefix_, prefix_length_, tail_->Clone(), n_heads_,
                                         head_dim_);
}

// ---------------------------------------------------------------------------------------------
// Forward

Forward::Forward(const LlamaWeights& weights)
    : w_(weights), inv_freq_(kernels::RopeInvFreq(RopeParamsFor(weights.config))) {}

absl::Status Forward::Run(absl::Span<ForwardItem> items, const ForwardOptions& options,
                          std::vector<float>* logits) const {
  const ModelConfig& c = w_.config;
  const int hidden = c.hidden, hd = c.head_dim, nh = c.n_heads, nkv = c.n_kv_heads;
  const int qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate;
  int total = 0;
  for (const ForwardItem& it : items) {
    if (it.cache == nullptr || it.tokens.empty()) {
      return absl::InvalidArgumentError("every forward item needs a cache and at least one token");
    }
    for (int32_t t : it.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
      }
    }
    total += static_cast<int>(it.tokens.size());
  }
  const int64_t T = total;
  std::vector<float> x(T * hidden), h(T * hidden), q(T * qd), k(T * kvd), v(T * kvd), o(T * qd);
  std::vector<float> lse(T * nh), o_past, lse_past, gate(T * inter), up(T * inter);
  {
    int64_t r = 0;
    for (const ForwardItem& it : items) {
      for (int32_t t : it.tokens) {
        std::copy(w_.tok_embd.begin() + static_cast<int64_t>(t) * hidden,
                  w_.tok_embd.begin() + static_cast<int64_t>(t + 1) * hidden,
                  x.begin() + r * hidden);
        ++r;
      }
    }
  }
  auto fail = [&](absl::Status s) {
    for (ForwardItem& it : items) it.cache->DiscardStaged();
    return s;
  };
  std::vector<int64_t> key_end;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w_.layers[l];
    RmsNorm(x.data(), T, hidden, L.attn_norm, c.rms_norm_eps, h.data());
    Linear(h.data(), T, hidden, L.wq, qd, L.bq, q.data());
    Linear(h.data(), T, hidden, L.wk, kvd, L.bk, k.data());
    Linear(h.data(), T, hidden, L.wv, kvd, L.bv, v.data());
    int64_t r0 = 0;
    for (ForwardItem& it : items) {
      const int n = static_cast<int>(it.tokens.size());
      const int64_t pos0 = it.cache->length();
      float* qi = q.data() + r0 * qd;
      const float* ki = k.data() + r0 * kvd;
      const float* vi = v.data() + r0 * kvd;
      float* oi = o.data() + r0 * qd;
      float* lsei = lse.data() + r0 * nh;
      RotateRows(qi, n, nh, hd, pos0, inv_freq_);
      key_end.resize(n);
      if (options.chunk_through_cache) {
        absl::Status s = it.cache->Append(l, ki, vi, n);
        if (!s.ok()) return fail(s);
        for (int j = 0; j < n; ++j) key_end[j] = pos0 + j + 1;
        it.cache->Attend(l, qi, n, key_end.data(), oi, lsei);
      } else {
        // Causal attention inside the chunk at full precision...
        std::vector<float> krot(ki, ki + static_cast<int64_t>(n) * kvd);
        RotateRows(krot.data(), n, nkv, hd, pos0, inv_freq_);
        for (int j = 0; j < n; ++j) key_end[j] = j + 1;
        AttendDense(qi, n, nh, krot.data(), vi, n, nkv, hd, key_end.data(), oi, lsei);
        // ...merged with the stored past.
        if (pos0 > 0) {
          o_past.resize(static_cast<size_t>(n) * qd);
          lse_past.resize(static_cast<size_t>(n) * nh);
          std::fill(key_end.begin(), key_end.end(), pos0);
          it.cache->Attend(l, qi, n, key_end.data(), o_past.data(), lse_past.data());
          MergeAttentionPartial(oi, lsei, o_past.data(), lse_past.data(), n * nh, hd);
        }
        absl::Status s = it.cache->Append(l, ki, vi, n);
        if (!s.ok()) return fail(s);
      }
      r0 += n;
    }
    // x += o · Wo^T
    GemmNT(T, hidden, qd, 1.0f, o.data(), qd, L.wo.data(), qd, 1.0f, x.data(), hidden);
    RmsNorm(x.data(), T, hidden, L.ffn_norm, c.rms_norm_eps, h.data());
    Linear(h.data(), T, hidden, L.w_gate, inter, {}, gate.data());
    Linear(h.data(), T, hidden, L.w_up, inter, {}, up.data());
    for (int64_t i = 0; i < T * inter; ++i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
    GemmNT(T, hidden, inter, 1.0f, gate.data(), inter, L.w_down.data(), inter, 1.0f, x.data(), hidden);
  }
  // Rows that need logits.
  std::vector<int64_t> rows;
  {
    int64_t r0 = 0;
    for (const ForwardItem& it : items) {
      const int n = static_cast<int>(it.tokens.size());
      if (it.all_logits) {
        for (int j = 0; j < n; ++j) rows.push_back(r0 + j);
      } else {
        rows.push_back(r0 + n - 1);
      }
      r0 += n;
    }
  }
  const int64_t R = static_cast<int64_t>(rows.size());
  std::vector<float> sel(R * hidden);
  for (int64_t i = 0; i < R; ++i) {
    std::copy(x.begin() + rows[i] * hidden, x.begin() + (rows[i] + 1) * hidden,
              sel.begin() + i * hidden);
  }
  RmsNorm(sel.data(), R, hidden, w_.output_norm, c.rms_norm_eps, sel.data());
  logits->resize(R * c.vocab_size);
  Linear(sel.data(), R, hidden, w_.lm_head(), c.vocab_size, {}, logits->data());
  for (ForwardItem& it : items) it.cache->Commit(static_cast<int>(it.tokens.size()));
  for (size_t i = 0, r = 0; i < items.size(); ++i) {
    ForwardItem& it = items[i];
    const size_t n = it.all_logits ? it.tokens.size() : 1;
    const float* row = logits->data() + r * c.vocab_size;
    std::vector<float> penalized;  // the row is returned as it was; the pick sees the penalty
    if (it.wants_token() && it.sample.repetition_penalty != 1.0f && !it.sample.penalized.empty()) {
      penalized.assign(row, row + c.vocab_size);
      ApplyRepetitionPenalty(penalized.data(), c.vocab_size, it.sample.penalized, it.sample.repetition_penalty);
      row = penalized.data();
    }
    if (it.wants_token() && it.output == ForwardItem::Output::kSample && it.sample.temperature > 0.0f) {
      const ForwardItem::Sample& sp = it.sample;
      it.token = SampleByDeviceRule(row, c.vocab_size, sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed, sp.step);
    } else if (it.wants_token()) {
      it.token = Argmax(row, c.vocab_size);
    }
    r += n;
  }
  return absl::OkStatus();
}

}  // namespace kvq::model
