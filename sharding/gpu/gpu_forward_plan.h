// What one GpuForward step does, worked out on the host before anything is enqueued: the items'
// caches and rows, the attention and append launches, the host arrays the step uploads and the
// workspace sizes (GpuForward::Impl::PlanStep, gpu_forward_plan.cc), then enqueued by
// GpuForward::Impl::EnqueueStep (gpu_forward_enqueue.cc). Part of GpuForward's implementation; not
// for other users.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/prefill_attention.h"
#include "model/forward.h"
#include "sharding/gpu/gpu_kv_cache.h"

namespace kvq::sharding::gpu_forward_internal {

// One attention (or append) launch over a set of consecutive rows.
struct Launch {
  int row0 = 0, rows = 0;
  int part = 0;              // partial slot (attention)
  int64_t table_off = 0;     // into the step's int32 table array
  int max_blocks = 1;
  int64_t stride = -1;       // block_table_stride
  int64_t lens_off = 0;      // into the step's int32 lens array
  int64_t firsts_off = 0;    // into the step's int64 firsts array
  int64_t sinks_off = 0;     // into the step's pointer array
  int max_len = 0;
  int n_new = 0;             // append
  int splits = 1;
  // Prefill rows through the tensor-core kernels: local tokens [0, fa_keys) of the table's one
  // sequence expanded in segments; row r sees keys [0, fa_limit_base + (fa_causal ? r : 0)).
  bool fa = false;
  int64_t fa_keys = 0;
  int64_t fa_limit_base = 0;
  bool fa_causal = false;
  kernels::PrefillPastPlan fa_plan;
};

// A forward item resolved to its caches and its rows of the step.
struct StepItem {
  int index;  // in items
  int n;
  GpuKvCache* w;            // writable cache
  const GpuKvCache* pre;    // session prefix or null
  int64_t pre_len;
  int64_t committed;        // w->length()
  int row0;
  model::KvCache* host = nullptr;  // evaluation through a host cache (any KV format)
};

struct StepPlan {
  // Rows in this order: decode rows with a session prefix, plain decode rows, prefill chunks,
  // then host caches.
  std::vector<StepItem> items;
  int T = 0;          // rows
  int nd = 0;         // decode rows (one token, GPU cache)
  int nd1 = 0;        // of them with a session prefix
  bool eval = false;  // ForwardOptions::chunk_through_cache
  bool graph = false, fold = false, gemv = false, stacked_qkv = false;
  bool fa = false;        // prefill rows through the tensor-core prefill kernels
  bool chunk_fa = false;  // the chunks' own part too
  int first_prefill_row = 0;
  // Host arrays uploaded before the step's kernels.
  std::vector<int32_t> tokens, row_begin, tables, lens;
  std::vector<int64_t> positions, firsts;
  std::vector<void*> sinks;
  std::vector<Launch> attn, app;
  // Logit rows in item order; gather_all: they are the step's rows in order (decode steps).
  std::vector<int32_t> gather;
  bool gather_all = false;
  GpuKvPool* pool = nullptr;  // of the GPU caches (null: host caches only)
  size_t ws_bytes = 0, xkv_bytes = 0, pf_parts_bytes = 0;
};

}  // namespace kvq::sharding::gpu_forward_internal
