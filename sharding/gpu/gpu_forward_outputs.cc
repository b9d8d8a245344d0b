#include "sharding/gpu/gpu_forward_outputs.h"

#include <algorithm>

#include "kernels/cuda_check.h"
#include "kernels/sampling.h"

namespace kvq::sharding::gpu_forward_internal {

using Output = model::ForwardItem::Output;

StepOutputs::StepOutputs(absl::Span<const model::ForwardItem> items, int vocab) {
  token_row_.assign(items.size(), -1);
  for (size_t i = 0; i < items.size(); ++i) {
    const model::ForwardItem& it = items[i];
    const int n = it.all_logits ? static_cast<int>(it.tokens.size()) : 1;
    if (it.wants_token()) {
      token_row_[i] = rows_;
      pick_ = std::max(pick_, it.output == Output::kSample && it.sample.temperature > 0.0f ? 2 : 1);
    }
    if (it.wants_logits()) {
      if (!copy_runs_.empty() && copy_runs_.back().second == rows_) {
        copy_runs_.back().second = rows_ + n;
      } else {
        copy_runs_.push_back({rows_, rows_ + n});
      }
    }
    rows_ += n;
  }
  PlanPenalties(items, vocab);
  if (pick_ != 2) return;
  params_.assign(ParamBytes(rows_), 0);  // rows without a draw: temperature 0, the greedy token
  const Params p = Carve(params_.data(), rows_);
  for (size_t i = 0; i < items.size(); ++i) {
    if (token_row_[i] < 0 || items[i].output != Output::kSample) continue;
    const model::ForwardItem::Sample& sp = items[i].sample;
    const int r = token_row_[i];
    p.seed[r] = sp.seed;
    p.step[r] = sp.step;
    p.temperature[r] = sp.temperature;
    p.top_p[r] = sp.top_p;
    p.min_p[r] = sp.min_p;
    p.top_k[r] = sp.top_k;
  }
}

// Repetition penalties: every row's distinct ids in [0, vocab) after a fixed-size header (the
// kernel writes each listed logit once per row: a repeated id would be penalised twice).
void StepOutputs::PlanPenalties(absl::Span<const model::ForwardItem> items, int vocab) {
  bool any = false;  // most steps: nothing to plan
  for (size_t i = 0; i < items.size() && !any; ++i) {
    any = token_row_[i] >= 0 && items[i].sample.repetition_penalty != 1.0f && !items[i].sample.penalized.empty();
  }
  if (!any) return;
  std::vector<std::vector<int32_t>> row_ids(rows_);
  std::vector<float> row_pen(rows_, 1.0f);
  std::vector<uint8_t> seen(vocab, 0);  // cleared after each row (only the ids it set)
  size_t entries = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const model::ForwardItem::Sample& sp = items[i].sample;
    if (token_row_[i] < 0 || sp.repetition_penalty == 1.0f) continue;
    std::vector<int32_t>& ids = row_ids[token_row_[i]];
    for (int32_t id : sp.penalized) {
      if (id >= 0 && id < vocab && !seen[id]) {
        seen[id] = 1;
        ids.push_back(id);
      }
    }
    for (int32_t id : ids) seen[id] = 0;
    if (ids.empty()) continue;
    row_pen[token_row_[i]] = sp.repetition_penalty;
    penalize_ = true;
    restore_ = restore_ || items[i].wants_logits();
    entries += ids.size();
  }
  if (!penalize_) return;
  const size_t header = PenaltyHeaderBytes(rows_);
  penalty_.assign(header + entries * 8, 0);
  auto* offsets = reinterpret_cast<int32_t*>(penalty_.data());
  auto* pen = reinterpret_cast<float*>(offsets + rows_ + 1);
  auto* ent = reinterpret_cast<int32_t*>(penalty_.data() + header);  // pairs (id, saved logit)
  int32_t at = 0;
  for (int r = 0; r < rows_; ++r) {
    offsets[r] = at;
    pen[r] = row_pen[r];
    for (int32_t id : row_ids[r]) ent[2 * at++] = id;
  }
  offsets[rows_] = at;
}

StepOutputs::Params StepOutputs::Carve(void* base, int rows) {
  Params p;
  p.seed = static_cast<uint64_t*>(base);
  p.step = p.seed + rows;
  p.temperature = reinterpret_cast<float*>(p.step + rows);
  p.top_p = p.temperature + rows;
  p.min_p = p.top_p + rows;
  p.top_k = reinterpret_cast<int32_t*>(p.min_p + rows);
  return p;
}

absl::Status StepOutputs::Upload(Grow& tokens, Grow& params, Grow& penalty, cudaStream_t s) const {
  if (pick_ == 0) return absl::OkStatus();
  KVQ_RETURN_IF_ERROR(tokens.Ensure(static_cast<size_t>(rows_) * 4, s));
  if (penalize_) {
    KVQ_RETURN_IF_ERROR(penalty.Ensure(penalty_.size(), s));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(penalty.p, penalty_.data(), penalty_.size(), cudaMemcpyHostToDevice, s));
  }
  if (pick_ == 2) {
    KVQ_RETURN_IF_ERROR(params.Ensure(params_.size(), s));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(params.p, params_.data(), params_.size(), cudaMemcpyHostToDevice, s));
  }
  return absl::OkStatus();
}

absl::Status StepOutputs::Enqueue(float* logits, int vocab, const Grow& tokens, const Grow& params,
                                  const Grow& penalty, cudaStream_t s) const {
  if (pick_ == 0) return absl::OkStatus();
  if (!penalize_) return Pick(logits, vocab, tokens, params, s);
  const auto* offsets = penalty.as<int32_t>();
  const auto* pen = reinterpret_cast<const float*>(offsets + rows_ + 1);
  auto* entries = reinterpret_cast<int2*>(static_cast<uint8_t*>(penalty.p) + PenaltyHeaderBytes(rows_));
  KVQ_RETURN_IF_ERROR(kernels::LaunchRepetitionPenalty(rows_, logits, vocab, offsets, pen, entries, false, s));
  KVQ_RETURN_IF_ERROR(Pick(logits, vocab, tokens, params, s));
  if (restore_) {  // the rows that go to the host go as they were
    KVQ_RETURN_IF_ERROR(kernels::LaunchRepetitionPenalty(rows_, logits, vocab, offsets, pen, entries, true, s));
  }
  return absl::OkStatus();
}

absl::Status StepOutputs::Pick(const float* logits, int vocab, const Grow& tokens, const Grow& params,
                               cudaStream_t s) const {
  if (pick_ == 1) return kernels::LaunchArgmaxRows(rows_, vocab, logits, vocab, tokens.as<int32_t>(), s);
  const Params dp = Carve(params.p, rows_);
  kernels::SamplingParams sp;
  sp.batch = rows_;
  sp.vocab = vocab;
  sp.logits = logits;
  sp.seed = dp.seed;
  sp.step = dp.step;
  sp.temperature = dp.temperature;
  sp.top_p = dp.top_p;
  sp.min_p = dp.min_p;
  sp.top_k = dp.top_k;
  sp.tokens = tokens.as<int32_t>();
  return kernels::LaunchSampling(sp, s);
}

absl::Status StepOutputs::CopyBack(const float* logits_dev, int vocab, const Grow& tokens, std::vector<float>* logits,
                                   cudaStream_t s) {
  logits->resize(static_cast<size_t>(rows_) * vocab);
  for (const auto& [r0, r1] : copy_runs_) {
    const size_t off = static_cast<size_t>(r0) * vocab;
    if (cudaMemcpyAsync(logits->data() + off, logits_dev + off, static_cast<size_t>(r1 - r0) * vocab * 4,
                        cudaMemcpyDeviceToHost, s) != cudaSuccess) {
      return absl::InternalError("copy of logits");
    }
  }
  tokens_.resize(pick_ > 0 ? rows_ : 0);
  if (pick_ > 0 &&
      cudaMemcpyAsync(tokens_.data(), tokens.p, static_cast<size_t>(rows_) * 4, cudaMemcpyDeviceToHost, s) !=
          cudaSuccess) {
    return absl::InternalError("copy of the picked tokens");
  }
  return absl::OkStatus();
}

void StepOutputs::Deliver(absl::Span<model::ForwardItem> items) const {
  for (size_t i = 0; i < items.size(); ++i) {
    if (token_row_[i] >= 0) items[i].token = tokens_[token_row_[i]];
  }
}

}  // namespace kvq::sharding::gpu_forward_internal
