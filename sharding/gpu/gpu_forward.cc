// GpuForward::Run, one step: the plan (Impl::PlanStep, gpu_forward_plan.cc), the step buffers and
// the host-to-device copies, the device work (Impl::EnqueueStep, gpu_forward_enqueue.cc) launched
// directly or as a captured decode graph, the copies back, then commit (or discard on failure).
#include "sharding/gpu/gpu_forward.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "sharding/gpu/decode_graphs.h"
#include "kernels/cublas_api.h"
#include "kernels/cuda_check.h"
#include "kernels/dense_ops.h"
#include "kernels/engine_ops.h"
#include "sharding/gpu/gpu_forward_impl.h"
#include "sharding/gpu/gpu_forward_outputs.h"
#include "sharding/gpu/gpu_forward_plan.h"
#include "sharding/gpu/gpu_kv_cache.h"

namespace kvq::sharding {

std::atomic<uint64_t> gpu_forward_internal::g_buffer_reallocs{0};

namespace {

using gpu_forward_internal::g_buffer_reallocs;
using gpu_forward_internal::Grow;
using gpu_forward_internal::StepPlan;
using kernels::DType;

}  // namespace

absl::Status GpuForward::Run(absl::Span<model::ForwardItem> items, const model::ForwardOptions& options,
                             std::vector<float>* logits) const {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  const model::ModelConfig& c = config_;
  const int hidden = c.hidden, hd = c.head_dim, nh = c.n_heads;
  const int qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate, vocab = c.vocab_size;
  cudaStream_t s = m.stream;

  // ---- What the step does (and room in every GPU cache for its new tokens), before anything
  // is written.
  StepPlan p;
  KVQ_RETURN_IF_ERROR(m.PlanStep(c, dtype_, items, options, &p));
  using It = gpu_forward_internal::StepItem;
  const int T = p.T;
  const int R = static_cast<int>(p.gather.size());
  GpuKvPool* const pool = p.pool;
  // What goes back to the host: the wanted rows of logits, the tokens picked on the device.
  gpu_forward_internal::StepOutputs outputs(items, c.vocab_size);
  if (outputs.rows() != R) return absl::InternalError("GPU forward: logit rows and step outputs disagree");

  // ---- Buffers.
  const int act = kernels::DTypeBytes(dtype_);
  const size_t Ts = static_cast<size_t>(T);
  KVQ_RETURN_IF_ERROR(m.x.Ensure(Ts * hidden * 4, s));
  KVQ_RETURN_IF_ERROR(m.h.Ensure(Ts * hidden * act, s));
  KVQ_RETURN_IF_ERROR(m.q.Ensure(Ts * (qd + 2 * kvd) * 4, s));
  KVQ_RETURN_IF_ERROR(m.krot.Ensure(Ts * kvd * 4, s));
  if (p.stacked_qkv) KVQ_RETURN_IF_ERROR(m.qkv.Ensure(Ts * (qd + 2 * kvd) * 4, s));
  KVQ_RETURN_IF_ERROR(m.o.Ensure(Ts * qd * 4, s));
  KVQ_RETURN_IF_ERROR(m.o_act.Ensure(Ts * qd * act, s));
  KVQ_RETURN_IF_ERROR(m.gu.Ensure(Ts * 2 * inter * act, s));
  KVQ_RETURN_IF_ERROR(m.mid.Ensure(Ts * inter * act, s));
  KVQ_RETURN_IF_ERROR(m.parts_o.Ensure(3 * Ts * qd * 4, s));
  KVQ_RETURN_IF_ERROR(m.parts_lse.Ensure(3 * Ts * nh * 4, s));
  KVQ_RETURN_IF_ERROR(m.positions.Ensure(Ts * 8, s));
  KVQ_RETURN_IF_ERROR(m.row_begin.Ensure(Ts * 4, s));
  KVQ_RETURN_IF_ERROR(m.tokens.Ensure(Ts * 4, s));
  KVQ_RETURN_IF_ERROR(m.gather_idx.Ensure(static_cast<size_t>(R) * 4, s));
  KVQ_RETURN_IF_ERROR(m.sel.Ensure(static_cast<size_t>(R) * hidden * 4, s));
  KVQ_RETURN_IF_ERROR(m.sel_act.Ensure(static_cast<size_t>(R) * hidden * act, s));
  KVQ_RETURN_IF_ERROR(m.logits.Ensure(static_cast<size_t>(R) * vocab * 4, s));
  KVQ_RETURN_IF_ERROR(m.ws.Ensure(std::max<size_t>(p.ws_bytes, 16), s));
  if (p.xkv_bytes > 0) {
    KVQ_RETURN_IF_ERROR(m.xk.Ensure(p.xkv_bytes, s));
    KVQ_RETURN_IF_ERROR(m.xv.Ensure(p.xkv_bytes, s));
  }
  if (p.pf_parts_bytes > 0) {
    KVQ_RETURN_IF_ERROR(m.pf_o.Ensure(p.pf_parts_bytes, s));
    KVQ_RETURN_IF_ERROR(m.pf_lse.Ensure(p.pf_parts_bytes / hd, s));
  }
  if (p.chunk_fa) {
    KVQ_RETURN_IF_ERROR(m.k16.Ensure(Ts * kvd * 2, s));
    KVQ_RETURN_IF_ERROR(m.v16.Ensure(Ts * kvd * 2, s));
  }
  KVQ_RETURN_IF_ERROR(m.tables.Ensure(std::max<size_t>(p.tables.size(), 1) * 4, s));
  KVQ_RETURN_IF_ERROR(m.lens.Ensure(std::max<size_t>(p.lens.size(), 1) * 4, s));
  KVQ_RETURN_IF_ERROR(m.firsts.Ensure(std::max<size_t>(p.firsts.size(), 1) * 8, s));
  KVQ_RETURN_IF_ERROR(m.sinks.Ensure(std::max<size_t>(p.sinks.size(), 1) * sizeof(void*), s));
  auto h2d = [&](Grow& g, const void* src, size_t n) -> absl::Status {
    if (n == 0) return absl::OkStatus();
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(g.p, src, n, cudaMemcpyHostToDevice, s));
    return absl::OkStatus();
  };
  // The pool's own work on its stream (new blocks zeroed, lists packed, clones) comes first.
  if (pool != nullptr) KVQ_RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(s, pool->work_event(), 0));
  // Pageable copies: the host vectors live until the step's final synchronize.
  KVQ_RETURN_IF_ERROR(h2d(m.tokens, p.tokens.data(), Ts * 4));
  KVQ_RETURN_IF_ERROR(h2d(m.positions, p.positions.data(), Ts * 8));
  KVQ_RETURN_IF_ERROR(h2d(m.row_begin, p.row_begin.data(), Ts * 4));
  KVQ_RETURN_IF_ERROR(h2d(m.gather_idx, p.gather.data(), static_cast<size_t>(R) * 4));
  KVQ_RETURN_IF_ERROR(outputs.Upload(m.greedy, m.samp, m.penalty, s));
  KVQ_RETURN_IF_ERROR(h2d(m.tables, p.tables.data(), p.tables.size() * 4));
  KVQ_RETURN_IF_ERROR(h2d(m.lens, p.lens.data(), p.lens.size() * 4));
  KVQ_RETURN_IF_ERROR(h2d(m.firsts, p.firsts.data(), p.firsts.size() * 8));
  KVQ_RETURN_IF_ERROR(h2d(m.sinks, p.sinks.data(), p.sinks.size() * sizeof(void*)));

  for (const It& e : p.items) {
    if (e.host == nullptr) e.w->MarkStaged(e.n);
  }
  auto fail = [&](absl::Status st) {
    cudaStreamSynchronize(s);
    for (const It& e : p.items) {
      if (e.host != nullptr) {
        e.host->DiscardStaged();
      } else {
        e.w->DiscardStaged();
      }
    }
    return st;
  };
  // The step's device work (kernels and cuBLAS only: capturable into a graph).
  auto enqueue = [&]() -> absl::Status { return m.EnqueueStep(c, dtype_, p, outputs); };
  {
    const absl::Status st =
        p.graph ? m.graphs.Launch(
                      {T, p.attn[0].max_blocks, p.attn[0].splits, pool->id(), g_buffer_reallocs.load(), outputs.pick()},
                      s, enqueue)
                : enqueue();
    if (!st.ok()) return fail(st);
  }
#define KVQ_STEP(expr)                   \
  do {                                   \
    absl::Status st_ = (expr);           \
    if (!st_.ok()) return fail(st_);     \
  } while (0)
  KVQ_STEP(outputs.CopyBack(m.logits.as<float>(), vocab, m.greedy, logits, s));
  int overflowed = 0;  // the append kernels' flag, read with the logits (no extra synchronize)
  if (pool != nullptr) {
    KVQ_STEP(cudaMemcpyAsync(&overflowed, pool->overflow_flag(), sizeof(int), cudaMemcpyDeviceToHost, s) ==
                     cudaSuccess
                 ? absl::OkStatus()
                 : absl::InternalError("copy of the overflow flag"));
  }
  {
    const cudaError_t e = cudaStreamSynchronize(s);
    if (e != cudaSuccess) {
      return fail(absl::InternalError(absl::StrCat("GPU step failed: ", cudaGetErrorString(e))));
    }
  }
#undef KVQ_STEP
  outputs.Deliver(items);
  for (const It& e : p.items) {
    if (e.host != nullptr) {
      e.host->Commit(e.n);
    } else {
      e.w->Commit(e.n);
    }
  }
  if (overflowed != 0) {
    const int64_t overflows = pool->CountOverflow();
    std::fprintf(stderr,
                 "[kvq] warning: a block's key-outlier area was used up (%lld steps so far); the extra "
                 "outliers were clamped. Raise --key_outlier_reserve.\n",
                 static_cast<long long>(overflows));
  }
  return absl::OkStatus();
}

}  // namespace kvq::sharding
