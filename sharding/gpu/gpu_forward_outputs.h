// What a GpuForward step returns per item (model::ForwardItem::Output): the rows of logits that go
// to the host, and the tokens picked on the device (kernels/sampling.h). Part of GpuForward's
// implementation (gpu_forward.cc drives it); not for other users.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "model/forward.h"
#include "sharding/gpu/gpu_forward_impl.h"

namespace kvq::sharding::gpu_forward_internal {

class StepOutputs {
 public:
  // The step's logit rows are in item order: every row of an all_logits item, else its last.
  // Penalised ids outside [0, vocab) are ignored and repeated ones count once
  // (model::ApplyRepetitionPenalty's rule).
  StepOutputs(absl::Span<const model::ForwardItem> items, int vocab);
  int rows() const { return rows_; }
  // How the tokens are picked: 0 none; 1 every row's greedy token (kernels::LaunchArgmaxRows); 2
  // every row through kernels::LaunchSampling (rows that do not sample at temperature 0, i.e.
  // greedy); plus 4 when some row has a repetition penalty (kernels::LaunchRepetitionPenalty before
  // the pick) and 8 when such a row also goes to the host (the penalty undone after the pick).
  // Part of a captured graph's key.
  int pick() const { return pick_ | (penalize_ ? 4 : 0) | (restore_ ? 8 : 0); }
  // Sizes the device buffers and queues the copy of the sampling and penalty parameters (before
  // the step's kernels; this object must live until the stream is synchronized).
  absl::Status Upload(Grow& tokens, Grow& params, Grow& penalty, cudaStream_t s) const;
  // Queues the token choice over the step's logits [rows][vocab] (inside a captured graph; the
  // penalty is applied to the rows in place and, for rows that go to the host, undone after).
  absl::Status Enqueue(float* logits, int vocab, const Grow& tokens, const Grow& params, const Grow& penalty,
                       cudaStream_t s) const;
  // Queues the copies to the host: the wanted rows into *logits (resized to rows x vocab; the
  // other rows are left unspecified) and the picked tokens.
  absl::Status CopyBack(const float* logits_dev, int vocab, const Grow& tokens, std::vector<float>* logits,
                        cudaStream_t s);
  // After the stream's synchronize: each item's token.
  void Deliver(absl::Span<model::ForwardItem> items) const;

 private:
  struct Params {  // packed per row: seeds, steps, temperatures, top-p, min-p, top-k
    uint64_t* seed;
    uint64_t* step;
    float* temperature;
    float* top_p;
    float* min_p;
    int32_t* top_k;
  };
  static Params Carve(void* base, int rows);
  void PlanPenalties(absl::Span<const model::ForwardItem> items, int vocab);
  absl::Status Pick(const float* logits, int vocab, const Grow& tokens, const Grow& params, cudaStream_t s) const;
  static size_t ParamBytes(int rows) { return static_cast<size_t>(rows) * 32; }
  // The penalty buffer: offsets [rows + 1] (int32), penalties [rows] (float), then the entries
  // (int2: id, saved logit) from a fixed offset for a given row count (a graph holds it).
  static size_t PenaltyHeaderBytes(int rows) { return (static_cast<size_t>(2 * rows + 1) * 4 + 7) / 8 * 8; }

  std::vector<std::pair<int, int>> copy_runs_;  // logit rows to the host, [first, end)
  std::vector<int> token_row_;                  // per item: the row of its token, or -1
  std::vector<uint8_t> params_;                 // host copy of the packed parameters (pick 2)
  std::vector<uint8_t> penalty_;                // host copy of the penalty buffer (penalize_)
  std::vector<int32_t> tokens_;                 // picked tokens, per row
  int rows_ = 0, pick_ = 0;
  bool penalize_ = false, restore_ = false;
};

}  // namespace kvq::sharding::gpu_forward_internal
