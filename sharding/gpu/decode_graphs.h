// Captured CUDA graphs of decode steps (GpuForward): one per key, launched instead of the step's
// kernels one by one. The key names everything a step's launches depend on; values that change
// every step live in device buffers the forward pass fills before the launch.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <tuple>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"

namespace kvq::sharding {

struct DecodeGraphKey {
  int rows, table_width, splits;
  uint64_t pool;     // GpuKvPool::id(): a new pool may reuse a freed one's address
  uint64_t buffers;  // reallocations of the step buffers so far (a graph holds their pointers)
  int pick;          // StepOutputs::pick(): 0 none, 1 greedy (argmax), 2 sampled; 4, 8 penalty flags
  bool operator<(const DecodeGraphKey& o) const {
    return std::tie(rows, table_width, splits, pool, buffers, pick) <
           std::tie(o.rows, o.table_width, o.splits, o.pool, o.buffers, o.pick);
  }
};

class DecodeGraphs {
 public:
  ~DecodeGraphs() { Drop(); }
  // Launches the graph for `key` on `stream`, capturing `enqueue` (which must only enqueue work on
  // that stream) into it first when there is none. At most kMax graphs are kept.
  absl::Status Launch(const DecodeGraphKey& key, cudaStream_t stream, absl::FunctionRef<absl::Status()> enqueue);
  void Drop();
  int64_t launches() const { return launches_.load(); }

 private:
  static constexpr size_t kMax = 64;
  std::map<DecodeGraphKey, cudaGraphExec_t> graphs_;
  std::atomic<int64_t> launches_{0};
};

}  // namespace kvq::sharding
