#include "sharding/gpu/gpu_forward.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "sharding/gpu/decode_graphs.h"
#include "kernels/cublas_api.h"
#include "kernels/cuda_check.h"
#include "kernels/decode_attention.h"
#include "kernels/decode_gemv.h"
#include "kernels/dense_ops.h"
#include "kernels/engine_ops.h"
#include "kernels/gemm.h"
#include "kernels/kv_append.h"
#include "kernels/merge_attention.h"
#include "kernels/prefill_attention.h"
#include "kernels/reference/rope.h"
#include "sharding/gpu/gpu_forward_impl.h"
#include "sharding/gpu/gpu_forward_outputs.h"
#include "sharding/gpu/gpu_kv_cache.h"

namespace kvq::sharding {

std::atomic<uint64_t> gpu_forward_internal::g_buffer_reallocs{0};

namespace {

using gpu_forward_internal::DevLayer;
using gpu_forward_internal::g_buffer_reallocs;
using gpu_forward_internal::Grow;
using kernels::DType;

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

}  // namespace

absl::Status GpuForward::Run(absl::Span<model::ForwardItem> items, const model::ForwardOptions& options,
                             std::vector<float>* logits) const {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  const model::ModelConfig& c = config_;
  const int hidden = c.hidden, hd = c.head_dim, nh = c.n_heads, nkv = c.n_kv_heads;
  const int qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate, vocab = c.vocab_size;
  const bool eval = options.chunk_through_cache;
  cudaStream_t s = m.stream;

  // ---- Resolve caches and order rows: prefixed decode, plain decode, prefill chunks.
  struct It {
    int index;  // in items
    int n;
    GpuKvCache* w;            // writable cache
    const GpuKvCache* pre;    // session prefix or null
    int64_t pre_len;
    int64_t committed;        // w->length()
    int row0;
    model::KvCache* host = nullptr;  // evaluation through a host cache (any KV format)
  };
  std::vector<It> its;
  its.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    const model::ForwardItem& it = items[i];
    if (it.cache == nullptr || it.tokens.empty()) {
      return absl::InvalidArgumentError("every forward item needs a cache and at least one token");
    }
    for (int32_t t : it.tokens) {
      if (t < 0 || t >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", t, " is outside the vocabulary [0, ", vocab, ")"));
      }
    }
    It e{static_cast<int>(i), static_cast<int>(it.tokens.size()), nullptr, nullptr, 0, 0, 0};
    if (auto* pc = dynamic_cast<model::PrefixKvCache*>(it.cache)) {
      e.w = dynamic_cast<GpuKvCache*>(&pc->tail());
      e.pre = dynamic_cast<const GpuKvCache*>(&pc->prefix());
      e.pre_len = pc->prefix_length();
      if (e.pre == nullptr) return absl::InvalidArgumentError("GPU forward: a session prefix that is not on the GPU");
    } else {
      e.w = dynamic_cast<GpuKvCache*>(it.cache);
    }
    if (e.w == nullptr) {
      // A host cache: evaluation through it, or (serving) a cache whose attention runs elsewhere,
      // e.g. a sequence spread over MPI ranks (ShardedKvCache): its past is attended through
      // KvCache::Attend and its new tokens appended through KvCache::Append, over the host.
      e.host = it.cache;
      e.committed = it.cache->length();
      its.push_back(e);
      continue;
    }
    if (e.w->poisoned()) return absl::InternalError("KV cache is unusable after a failed GPU step");
    e.committed = e.w->length();
    its.push_back(e);
  }
  auto rank = [](const It& e) { return e.host != nullptr ? 3 : e.n == 1 ? (e.pre != nullptr ? 0 : 1) : 2; };
  std::stable_sort(its.begin(), its.end(), [&](const It& a, const It& b) { return rank(a) < rank(b); });
  int T = 0, nd = 0, nd1 = 0;
  for (It& e : its) {
    e.row0 = T;
    T += e.n;
    if (e.n == 1 && e.host == nullptr) {
      ++nd;
      if (e.pre != nullptr) ++nd1;
    }
  }
  // A step of plain decode rows only (serving) runs as a CUDA graph: its launches depend only on
  // the rows, the block-table width (rounded up by at most 1/16, to a multiple of a power of two)
  // and the splits (chosen for that width's capacity); per-step values live in device buffers
  // copied before the launch.
  const bool plain_decode = !eval && nd == T && nd1 == 0 && T > 0;
  const bool graph = m.use_graphs && plain_decode;
  // The same steps (graph or not) may fold each row's own new token into the decode merge
  // (set_fold_decode_self): then the decode launch writes o (and o_act) itself.
  const bool fold = m.fold_decode_self && plain_decode;
  // Steps of a few rows may run the linear layers through kernels::LaunchDecodeGemv with the
  // RMSNorms and the SwiGLU as its input stage (set_decode_gemv; f16/bf16 weights).
  const bool gemv = [&] {
    if (!m.decode_gemv || T < 1 || T > kernels::kDecodeGemvMaxRows || dtype_ == DType::kF32) return false;
    if (hidden % 8 != 0 || c.intermediate % 8 != 0 || c.q_dim() % 8 != 0) return false;
    for (const DevLayer& L : m.layers) {
      for (const void* w : {L.wq, L.wo, L.w_gu, L.w_down}) {
        if (reinterpret_cast<uintptr_t>(w) % 16 != 0) return false;
      }
    }
    return reinterpret_cast<uintptr_t>(m.lm_head) % 16 == 0;
  }();
  // A folded step of several rows computes q, k and v with one GEMM over the stacked weights
  // (DevLayer) into rows [q | k | v] of m.qkv: the RoPE reads q and k from there with a row
  // stride and writes them packed, the appends and the own-token value read k and v in place
  // (one cuBLAS call instead of three; a single row needs no stride: its output row is q, k, v).
  const bool stacked_qkv = m.stacked_qkv && fold && !gemv && T > 1;
  // ---- Room for every new token before anything is written.
  for (It& e : its) {
    if (e.host == nullptr) KVQ_RETURN_IF_ERROR(e.w->Reserve(e.n));
  }

  // ---- Host-side step description.
  std::vector<int32_t> tokens(T), row_begin(T), tables, lens;
  std::vector<int64_t> positions(T), firsts;
  std::vector<void*> sinks;
  for (const It& e : its) {
    const model::ForwardItem& it = items[e.index];
    const int64_t pos0 = (e.host != nullptr ? e.host->first_position() : e.w->first_position()) + e.committed;
    for (int j = 0; j < e.n; ++j) {
      tokens[e.row0 + j] = it.tokens[j];
      positions[e.row0 + j] = pos0 + j;
      row_begin[e.row0 + j] = e.row0;
    }
  }
  auto add_table = [&](const std::vector<int32_t>& blocks, int width) {
    const int64_t off = static_cast<int64_t>(tables.size());
    tables.insert(tables.end(), blocks.begin(), blocks.end());
    tables.resize(off + width, 0);
    return off;
  };
  std::vector<Launch> attn, app;
  // Decode rows: one append and one attention over the writable caches; one over prefixes.
  if (nd > 0) {
    int maxb = 1;
    for (int i = 0; i < nd; ++i) maxb = std::max<int>(maxb, static_cast<int>(its[i].w->blocks().size()));
    if (graph) {  // at most 1/16 over: splits are chosen for this width's capacity
      const int g = static_cast<int>(std::bit_floor(static_cast<unsigned>(std::max(1, maxb / 16))));
      maxb = (maxb + g - 1) / g * g;
    }
    Launch a;
    a.row0 = 0;
    a.rows = nd;
    a.part = 1;
    a.max_blocks = maxb;
    a.table_off = static_cast<int64_t>(tables.size());
    for (int i = 0; i < nd; ++i) add_table(its[i].w->blocks(), maxb);
    a.lens_off = static_cast<int64_t>(lens.size());
    for (int i = 0; i < nd; ++i) {
      lens.push_back(static_cast<int32_t>(its[i].committed + (eval ? 1 : 0)));
      a.max_len = std::max<int>(a.max_len, lens.back());
    }
    Launch ap = a;
    ap.lens_off = static_cast<int64_t>(lens.size());
    for (int i = 0; i < nd; ++i) lens.push_back(static_cast<int32_t>(its[i].committed));
    a.firsts_off = ap.firsts_off = static_cast<int64_t>(firsts.size());
    for (int i = 0; i < nd; ++i) firsts.push_back(its[i].w->first_position());
    a.sinks_off = ap.sinks_off = static_cast<int64_t>(sinks.size());
    for (int i = 0; i < nd; ++i) sinks.push_back(its[i].w->mutable_sink());
    ap.n_new = 1;
    attn.push_back(a);
    app.push_back(ap);
    if (nd1 > 0) {
      Launch p;
      p.row0 = 0;
      p.rows = nd1;
      p.part = 0;
      int mb = 1;
      for (int i = 0; i < nd1; ++i) mb = std::max<int>(mb, static_cast<int>(its[i].pre->blocks().size()));
      p.max_blocks = mb;
      p.table_off = static_cast<int64_t>(tables.size());
      for (int i = 0; i < nd1; ++i) add_table(its[i].pre->blocks(), mb);
      p.lens_off = static_cast<int64_t>(lens.size());
      for (int i = 0; i < nd1; ++i) {
        lens.push_back(static_cast<int32_t>(its[i].pre_len));
        p.max_len = std::max<int>(p.max_len, lens.back());
      }
      p.firsts_off = static_cast<int64_t>(firsts.size());
      for (int i = 0; i < nd1; ++i) firsts.push_back(its[i].pre->first_position());
      p.sinks_off = static_cast<int64_t>(sinks.size());
      for (int i = 0; i < nd1; ++i) sinks.push_back(const_cast<uint16_t*>(its[i].pre->sink()));
      attn.push_back(p);
    }
  }
  // Prefill chunks: rows share their cache's table row (stride 0). With the prefill kernels, one
  // launch description per chunk and past: its one sequence row (lens = the tokens to expand).
  const bool fa = m.use_prefill_kernel;
  auto add_seq = [&](Launch& a, const GpuKvCache* cache, int64_t len, int n_rows) {
    a.lens_off = static_cast<int64_t>(lens.size());
    a.firsts_off = static_cast<int64_t>(firsts.size());
    a.sinks_off = static_cast<int64_t>(sinks.size());
    const int n_entries = fa ? 1 : n_rows;
    for (int j = 0; j < n_entries; ++j) {
      firsts.push_back(cache->first_position());
      sinks.push_back(const_cast<uint16_t*>(cache->sink()));
    }
    if (fa) lens.push_back(static_cast<int32_t>(len));
  };
  for (size_t i = nd; i < its.size(); ++i) {
    const It& e = its[i];
    if (e.host != nullptr) continue;
    Launch a;
    a.row0 = e.row0;
    a.rows = e.n;
    a.part = 1;
    a.max_blocks = std::max<int>(1, static_cast<int>(e.w->blocks().size()));
    a.stride = 0;
    a.table_off = add_table(e.w->blocks(), a.max_blocks);
    a.max_len = static_cast<int>(e.committed + (eval ? e.n : 0));
    add_seq(a, e.w, a.max_len, e.n);
    if (fa) {
      a.fa = true;
      a.fa_keys = a.max_len;
      a.fa_limit_base = e.committed + (eval ? 1 : 0);
      a.fa_causal = eval;
    } else {
      for (int j = 0; j < e.n; ++j) lens.push_back(static_cast<int32_t>(e.committed + (eval ? j + 1 : 0)));
    }
    // Sinks written by this chunk's append are read through the writable cache's own slot.
    for (int64_t j = a.sinks_off; j < static_cast<int64_t>(sinks.size()); ++j) sinks[j] = e.w->mutable_sink();
    Launch ap;
    ap.row0 = e.row0;
    ap.rows = 1;
    ap.n_new = e.n;
    ap.max_blocks = a.max_blocks;
    ap.table_off = a.table_off;
    ap.lens_off = static_cast<int64_t>(lens.size());
    lens.push_back(static_cast<int32_t>(e.committed));
    ap.firsts_off = a.firsts_off;
    ap.sinks_off = a.sinks_off;
    attn.push_back(a);
    app.push_back(ap);
    if (e.pre != nullptr) {
      Launch p;
      p.row0 = e.row0;
      p.rows = e.n;
      p.part = 0;
      p.max_blocks = std::max<int>(1, static_cast<int>(e.pre->blocks().size()));
      p.stride = 0;
      p.table_off = add_table(e.pre->blocks(), p.max_blocks);
      p.max_len = static_cast<int>(e.pre_len);
      add_seq(p, e.pre, e.pre_len, e.n);
      if (fa) {
        p.fa = true;
        p.fa_keys = e.pre_len;
        p.fa_limit_base = e.pre_len;
      } else {
        for (int j = 0; j < e.n; ++j) lens.push_back(static_cast<int32_t>(e.pre_len));
      }
      attn.push_back(p);
    }
  }
  GpuKvPool* pool = nullptr;
  for (const It& e : its) {
    if (e.w != nullptr) pool = &e.w->pool();
  }
  if (graph) {  // splits (and the kernel's tokens per split) for the table's whole capacity
    attn[0].max_len = attn[0].max_blocks * kvstore::kBlockTokens + pool->format().sink_tokens;
  }
  size_t ws_bytes = 0;
  size_t xkv_bytes = 0, pf_parts_bytes = 0;
  for (Launch& a : attn) {
    if (a.max_len == 0) continue;
    if (a.fa) {
      a.fa_plan = kernels::PlanPrefillPast(a.rows, nh, nkv, hd, a.fa_keys, m.sm_count,
                                           kernels::kPrefillExpandBudgetBytes, kernels::kPrefillPartialBudgetBytes);
      xkv_bytes = std::max(xkv_bytes, a.fa_plan.expand_bytes);
      pf_parts_bytes = std::max(pf_parts_bytes, a.fa_plan.partial_bytes);
      continue;
    }
    a.splits = kernels::ChooseDecodeSplits(a.rows, nkv, a.max_len, pool->format().sink_tokens, m.sm_count, hd);
    ws_bytes = std::max(ws_bytes, kernels::DecodeAttentionWorkspaceBytes(a.rows, nh, hd, a.splits));
  }
  // The chunk's own part through the prefill kernel needs its k/v in fp16.
  const int first_prefill_row = nd < static_cast<int>(its.size()) ? its[nd].row0 : T;
  // (Not in the f32 exactness mode: there the chunk's own part stays at fp32, like the CPU's.)
  // (Host caches in serving mode sit after the prefill rows and take the scalar chunk kernel with
  // the decode rows: then every row does.)
  bool any_host = false;
  for (const It& e : its) any_host |= e.host != nullptr;
  const bool chunk_fa = fa && !eval && !any_host && first_prefill_row < T && dtype_ != DType::kF32;
  // Logit rows in item order.
  std::vector<int32_t> gather;
  {
    std::vector<const It*> by_index(items.size());
    for (const It& e : its) by_index[e.index] = &e;
    for (const It* e : by_index) {
      if (items[e->index].all_logits) {
        for (int j = 0; j < e->n; ++j) gather.push_back(e->row0 + j);
      } else {
        gather.push_back(e->row0 + e->n - 1);
      }
    }
  }
  const int R = static_cast<int>(gather.size());
  // What goes back to the host: the wanted rows of logits, the tokens picked on the device.
  gpu_forward_internal::StepOutputs outputs(items, c.vocab_size);
  if (outputs.rows() != R) return absl::InternalError("GPU forward: logit rows and step outputs disagree");
  bool gather_all = R == T;  // the logit rows are the step's rows in order (decode steps)
  for (int i = 0; i < R && gather_all; ++i) gather_all = gather[i] == i;

  // ---- Buffers.
  const int act = kernels::DTypeBytes(dtype_);
  const size_t Ts = static_cast<size_t>(T);
  KVQ_RETURN_IF_ERROR(m.x.Ensure(Ts * hidden * 4, s));
  KVQ_RETURN_IF_ERROR(m.h.Ensure(Ts * hidden * act, s));
  KVQ_RETURN_IF_ERROR(m.q.Ensure(Ts * (qd + 2 * kvd) * 4, s));
  KVQ_RETURN_IF_ERROR(m.krot.Ensure(Ts * kvd * 4, s));
  if (stacked_qkv) KVQ_RETURN_IF_ERROR(m.qkv.Ensure(Ts * (qd + 2 * kvd) * 4, s));
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
  KVQ_RETURN_IF_ERROR(m.ws.Ensure(std::max<size_t>(ws_bytes, 16), s));
  if (xkv_bytes > 0) {
    KVQ_RETURN_IF_ERROR(m.xk.Ensure(xkv_bytes, s));
    KVQ_RETURN_IF_ERROR(m.xv.Ensure(xkv_bytes, s));
  }
  if (pf_parts_bytes > 0) {
    KVQ_RETURN_IF_ERROR(m.pf_o.Ensure(pf_parts_bytes, s));
    KVQ_RETURN_IF_ERROR(m.pf_lse.Ensure(pf_parts_bytes / hd, s));
  }
  if (chunk_fa) {
    KVQ_RETURN_IF_ERROR(m.k16.Ensure(Ts * kvd * 2, s));
    KVQ_RETURN_IF_ERROR(m.v16.Ensure(Ts * kvd * 2, s));
  }
  KVQ_RETURN_IF_ERROR(m.tables.Ensure(std::max<size_t>(tables.size(), 1) * 4, s));
  KVQ_RETURN_IF_ERROR(m.lens.Ensure(std::max<size_t>(lens.size(), 1) * 4, s));
  KVQ_RETURN_IF_ERROR(m.firsts.Ensure(std::max<size_t>(firsts.size(), 1) * 8, s));
  KVQ_RETURN_IF_ERROR(m.sinks.Ensure(std::max<size_t>(sinks.size(), 1) * sizeof(void*), s));
  auto h2d = [&](Grow& g, const void* src, size_t n) -> absl::Status {
    if (n == 0) return absl::OkStatus();
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(g.p, src, n, cudaMemcpyHostToDevice, s));
    return absl::OkStatus();
  };
  // The pool's own work on its stream (new blocks zeroed, lists packed, clones) comes first.
  if (pool != nullptr) KVQ_RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(s, pool->work_event(), 0));
  // Pageable copies: the host vectors live until the step's final synchronize.
  KVQ_RETURN_IF_ERROR(h2d(m.tokens, tokens.data(), Ts * 4));
  KVQ_RETURN_IF_ERROR(h2d(m.positions, positions.data(), Ts * 8));
  KVQ_RETURN_IF_ERROR(h2d(m.row_begin, row_begin.data(), Ts * 4));
  KVQ_RETURN_IF_ERROR(h2d(m.gather_idx, gather.data(), static_cast<size_t>(R) * 4));
  KVQ_RETURN_IF_ERROR(outputs.Upload(m.greedy, m.samp, m.penalty, s));
  KVQ_RETURN_IF_ERROR(h2d(m.tables, tables.data(), tables.size() * 4));
  KVQ_RETURN_IF_ERROR(h2d(m.lens, lens.data(), lens.size() * 4));
  KVQ_RETURN_IF_ERROR(h2d(m.firsts, firsts.data(), firsts.size() * 8));
  KVQ_RETURN_IF_ERROR(h2d(m.sinks, sinks.data(), sinks.size() * sizeof(void*)));
  float* parts_o = m.parts_o.as<float>();
  float* parts_lse = m.parts_lse.as<float>();

  auto view_for = [&](const Launch& a) {
    kernels::PagedKvCache v = pool->view();
    v.block_table = m.tables.as<int32_t>() + a.table_off;
    v.max_blocks_per_seq = a.max_blocks;
    v.block_table_stride = a.stride;
    v.seq_lens = m.lens.as<int32_t>() + a.lens_off;
    v.first_positions = m.firsts.as<int64_t>() + a.firsts_off;
    v.sink = reinterpret_cast<const uint16_t* const*>(m.sinks.as<void*>() + a.sinks_off);
    return v;
  };
  auto gemm = [&](int mm, int n, int k, const void* a, const void* b, void* out, DType out_t, float beta) {
    kernels::GemmParams g;
    g.m = mm;
    g.n = n;
    g.k = k;
    g.ab_dtype = dtype_;
    g.c_dtype = out_t;
    g.a = a;
    g.b = b;
    g.c = out;
    g.beta = beta;
    return kernels::Gemm(m.cublas, g, s);
  };
  // Prefill rows over a cached past (Launch::fa): kernels::LaunchPrefillPast with this step's
  // buffers (sized from the launches' plans above).
  // The step's q, k and v in one buffer (Impl::q): [T][q_dim], [T][kv_dim], [T][kv_dim].
  float* const q = m.q.as<float>();
  float* const k = q + Ts * qd;
  float* const v = k + Ts * kvd;
  auto prefill_past = [&](const Launch& a, int l) -> absl::Status {
    kernels::PrefillPastParams pp;
    pp.kv = view_for(a);
    pp.layer = l;
    pp.n_keys = a.fa_keys;
    pp.rows = a.rows;
    pp.n_heads = nh;
    pp.q = q + static_cast<int64_t>(a.row0) * qd;
    pp.limit_base = a.fa_limit_base;
    pp.causal = a.fa_causal;
    pp.o = parts_o + (static_cast<int64_t>(a.part) * T + a.row0) * qd;
    pp.lse = parts_lse + (static_cast<int64_t>(a.part) * T + a.row0) * nh;
    pp.plan = a.fa_plan;
    pp.xk = m.xk.as<uint16_t>();
    pp.xv = m.xv.as<uint16_t>();
    pp.part_o = m.pf_o.as<float>();
    pp.part_lse = m.pf_lse.as<float>();
    return kernels::LaunchPrefillPast(pp, s);
  };
  // Each prefill chunk attends itself causally through the same kernel, from fp16 copies of its
  // rotated keys and values (partial slot 2; decode rows keep the scalar chunk kernel).
  auto prefill_chunks = [&](int l) -> absl::Status {
    (void)l;
    const int n = T - first_prefill_row;
    const int64_t at = static_cast<int64_t>(first_prefill_row) * kvd;
    KVQ_RETURN_IF_ERROR(kernels::LaunchToHalfRows(n, kvd, m.krot.as<float>() + at, kvd, m.k16.as<uint16_t>() + at, kvd, s));
    KVQ_RETURN_IF_ERROR(kernels::LaunchToHalfRows(n, kvd, v + at, kvd, m.v16.as<uint16_t>() + at, kvd, s));
    for (size_t i = nd; i < its.size(); ++i) {
      const It& e = its[i];
      if (e.host != nullptr) continue;
      kernels::PrefillAttentionParams pp;
      pp.rows = e.n;
      pp.n_heads = nh;
      pp.n_kv_heads = nkv;
      pp.head_dim = hd;
      pp.q = q + static_cast<int64_t>(e.row0) * qd;
      pp.k = m.k16.as<uint16_t>() + static_cast<int64_t>(e.row0) * kvd;
      pp.v = m.v16.as<uint16_t>() + static_cast<int64_t>(e.row0) * kvd;
      pp.kv_token_stride = kvd;
      pp.kv_head_stride = hd;
      pp.n_keys = e.n;
      pp.limit_base = 1;
      pp.causal = true;
      pp.splits = 1;
      pp.o = parts_o + (static_cast<int64_t>(2) * T + e.row0) * qd;
      pp.lse = parts_lse + static_cast<int64_t>(2) * T * nh + static_cast<int64_t>(e.row0) * nh;
      KVQ_RETURN_IF_ERROR(kernels::LaunchPrefillAttention(pp, s));
    }
    return absl::OkStatus();
  };
  for (const It& e : its) {
    if (e.host == nullptr) e.w->MarkStaged(e.n);
  }
  auto fail = [&](absl::Status st) {
    cudaStreamSynchronize(s);
    for (const It& e : its) {
      if (e.host != nullptr) {
        e.host->DiscardStaged();
      } else {
        e.w->DiscardStaged();
      }
    }
    return st;
  };
  // The step's device work (kernels and cuBLAS only: capturable into a graph).
  auto enqueue = [&]() -> absl::Status {
#define KVQ_STEP(expr)                   \
  do {                                   \
    absl::Status st_ = (expr);           \
    if (!st_.ok()) return st_;           \
  } while (0)
#define KVQ_STEP_CUDA(expr) KVQ_RETURN_IF_CUDA_ERROR(expr)
  if (!fold) {  // partial slots a step may leave empty (no prefix, no chunk) read as -inf
    KVQ_STEP(kernels::LaunchFillF32(3 * Ts * nh, -INFINITY, parts_lse, s));
    KVQ_STEP(kernels::LaunchFillF32(3 * Ts * qd, 0.0f, parts_o, s));
  }

  float* x = m.x.as<float>();
  {
    kernels::EmbeddingParams ep;
    ep.rows = T;
    ep.dim = hidden;
    ep.vocab = vocab;
    ep.table_dtype = dtype_;
    ep.out_dtype = DType::kF32;
    ep.table = m.embed;
    ep.ids = m.tokens.as<int32_t>();
    ep.out = x;
    KVQ_STEP(kernels::LaunchEmbedding(ep, s));
  }
  float* o = m.o.as<float>();
  void* o_act = dtype_ == DType::kF32 ? static_cast<void*>(o) : m.o_act.p;
  // A decode GEMV with its input stage (LaunchDecodeGemv): y = in(a) . W^T into up to three
  // output segments.
  auto dgemv = [&](kernels::GemvInput in, const void* a, int64_t lda, const float* norm, const void* w, int n_out,
                   int k_in, DType out_t, float beta, std::initializer_list<kernels::GemvSegment> segs) {
    kernels::DecodeGemvParams g;
    g.rope_positions = m.positions.as<int64_t>();
    g.rope_inv_freq = m.inv_freq;
    g.rope_head_dim = hd;
    g.m = T;
    g.n = n_out;
    g.k = k_in;
    g.w_dtype = dtype_;
    g.w = w;
    g.input = in;
    g.a = a;
    g.lda = lda;
    g.norm_weight = norm;
    g.eps = c.rms_norm_eps;
    g.c_dtype = out_t;
    g.beta = beta;
    g.n_segs = static_cast<int>(segs.size());
    int i = 0;
    for (const kernels::GemvSegment& sg : segs) g.seg[i++] = sg;
    return kernels::LaunchDecodeGemv(g, s);
  };
  for (int l = 0; l < c.n_layers; ++l) {
    const DevLayer& L = m.layers[l];
    // Queries rotated in place and a rotated copy of the keys for the step's own attention (the
    // cache appends k pre-RoPE; evaluation attends through the cache and needs no copy).
    float* krot = m.krot.as<float>();
    // Without biases the q/k/v GEMV rotates them itself (a bias comes before RoPE).
    const bool gemv_rope = gemv && L.bq == nullptr;
    if (gemv) {  // attention RMSNorm + q/k/v in one kernel, into the step's q, k, v rows
      kernels::GemvSegment sq{qd, q, qd}, sk{qd + kvd, k, kvd};
      if (gemv_rope) {
        sq = {qd, nullptr, 0, q, qd};
        sk = {qd + kvd, k, kvd, eval ? nullptr : krot, kvd};
      }
      KVQ_STEP(dgemv(kernels::GemvInput::kRmsNorm, x, hidden, L.attn_norm, L.wq, qd + 2 * kvd, hidden, DType::kF32,
                     0.0f, {sq, sk, {qd + 2 * kvd, v, kvd}}));
    } else {
      KVQ_STEP(kernels::LaunchRmsNormF32(T, hidden, c.rms_norm_eps, x, L.attn_norm, m.h.p, dtype_, s));
      if (T == 1) {
        // One token: [q | k | v] is one output row of the stacked weights (DevLayer), so one GEMM
        // (three cuBLAS calls of ~4.5 us each at M = 1 on an H200 were 14% of a SmolLM2 step).
        KVQ_STEP(gemm(1, qd + 2 * kvd, hidden, m.h.p, L.wq, q, DType::kF32, 0.0f));
      } else if (stacked_qkv) {
        KVQ_STEP(gemm(T, qd + 2 * kvd, hidden, m.h.p, L.wq, m.qkv.as<float>(), DType::kF32, 0.0f));
      } else {
        KVQ_STEP(gemm(T, qd, hidden, m.h.p, L.wq, q, DType::kF32, 0.0f));
        KVQ_STEP(gemm(T, kvd, hidden, m.h.p, L.wk, k, DType::kF32, 0.0f));
        KVQ_STEP(gemm(T, kvd, hidden, m.h.p, L.wv, v, DType::kF32, 0.0f));
      }
    }
    // Where the projection left q, k and v, and the distance between rows.
    const int64_t qkv_stride = stacked_qkv ? qd + 2 * kvd : 0;
    float* const q_in = stacked_qkv ? m.qkv.as<float>() : q;
    float* const k_in = stacked_qkv ? q_in + qd : k;
    float* const v_in = stacked_qkv ? q_in + qd + kvd : v;
    const int64_t q_stride = stacked_qkv ? qkv_stride : qd, kv_stride = stacked_qkv ? qkv_stride : kvd;
    if (L.bq != nullptr) {
      KVQ_STEP(kernels::LaunchAddBias(T, qd, q_stride, q_in, L.bq, s));
      KVQ_STEP(kernels::LaunchAddBias(T, kvd, kv_stride, k_in, L.bk, s));
      KVQ_STEP(kernels::LaunchAddBias(T, kvd, kv_stride, v_in, L.bv, s));
    }
    kernels::RopeQueryParams rq;
    rq.rows = T;
    rq.n_heads = nh;
    rq.head_dim = hd;
    rq.q = q_in;
    rq.positions = m.positions.as<int64_t>();
    rq.inv_freq = m.inv_freq;
    if (stacked_qkv) {  // rotated rows packed into q and krot
      rq.in_row_stride = qkv_stride;
      rq.out = q;
    }
    if (!eval) {
      rq.k = k_in;
      rq.k_heads = nkv;
      rq.k_out = krot;
    }
    // Folded decode steps may append beside the RoPE (set_parallel_append): fork here, join
    // before the attention.
    const bool side_append = fold && m.parallel_append;
    if (side_append) {
      KVQ_STEP_CUDA(cudaEventRecord(m.fork_ev, s));
      for (cudaStream_t t : m.side) KVQ_STEP_CUDA(cudaStreamWaitEvent(t, m.fork_ev, 0));
    }
    if (!gemv_rope) KVQ_STEP(kernels::LaunchRopeQuery(rq, s));
    auto append_all = [&]() -> absl::Status {
      for (const Launch& a : app) {
        kernels::KvAppendParams ap;
        ap.kv = view_for(a);
        ap.pool = const_cast<uint8_t*>(ap.kv.pool);
        ap.sink = reinterpret_cast<uint16_t* const*>(m.sinks.as<void*>() + a.sinks_off);
        ap.layer = l;
        ap.batch = a.rows;
        ap.n_new = a.n_new;
        ap.k = k_in + static_cast<int64_t>(a.row0) * kv_stride;
        ap.v = v_in + static_cast<int64_t>(a.row0) * kv_stride;
        ap.kv_row_stride = kv_stride;
        ap.overflow = pool->overflow_flag();
        KVQ_RETURN_IF_ERROR(side_append ? kernels::LaunchKvAppend(ap, m.side[0], m.side[1])
                                        : kernels::LaunchKvAppend(ap, s));
      }
      return absl::OkStatus();
    };
    if (eval) KVQ_STEP(append_all());
    if (side_append) {
      KVQ_STEP(append_all());
      for (int i = 0; i < 2; ++i) {
        KVQ_STEP_CUDA(cudaEventRecord(m.join_ev[i], m.side[i]));
        KVQ_STEP_CUDA(cudaStreamWaitEvent(s, m.join_ev[i], 0));
      }
    }
    for (const Launch& a : attn) {
      if (a.max_len == 0 && !fold) continue;  // folded: the launch also merges the row's own token
      if (a.fa) {
        KVQ_STEP(prefill_past(a, l));
        continue;
      }
      kernels::DecodeAttentionParams dp;
      dp.kv = view_for(a);
      dp.layer = l;
      dp.batch = a.rows;
      dp.n_heads = nh;
      dp.q = q + static_cast<int64_t>(a.row0) * qd;
      dp.o = parts_o + (static_cast<int64_t>(a.part) * T + a.row0) * qd;
      dp.lse = parts_lse + (static_cast<int64_t>(a.part) * T + a.row0) * nh;
      dp.max_seq_len = a.max_len;
      dp.num_splits = a.splits;
      dp.workspace = m.ws.p;
      dp.workspace_bytes = m.ws.bytes;
      if (fold) {  // the only launch: every row, its own token merged in, o final
        dp.o = o;
        dp.lse = parts_lse;
        dp.self.q = q;
        dp.self.k = krot;
        dp.self.v = v_in;
        dp.self.k_seq_stride = kvd;
        dp.self.v_seq_stride = kv_stride;
        dp.self.n_heads = nh;
        dp.self.n_kv_heads = nkv;
        if (dtype_ != DType::kF32) {
          dp.o_cast = o_act;
          dp.o_cast_dtype = dtype_;
        }
      }
      KVQ_STEP(kernels::LaunchDecodeAttention(dp, s));
    }
    for (const It& e : its) {
      if (e.host == nullptr) continue;
      if (eval) {
        KVQ_STEP(m.HostAttention(c, e.host, l, e.row0, e.n, e.committed, T, q, k, v));
      } else {
        if (e.host->device_memory()) {
          KVQ_STEP(m.DevicePastAttention(c, e.host, l, e.row0, e.n, e.committed, T, q, parts_o, parts_lse));
        } else {
          KVQ_STEP(m.HostPastAttention(c, e.host, l, e.row0, e.n, e.committed, T, q, parts_o, parts_lse));
        }
      }
    }
    if (fold) {
      if (!side_append) KVQ_STEP(append_all());
    } else if (!eval) {
      kernels::ChunkAttentionParams cp;
      cp.rows = chunk_fa ? first_prefill_row : T;
      cp.n_heads = nh;
      cp.n_kv_heads = nkv;
      cp.head_dim = hd;
      cp.scale = 1.0f / std::sqrt(static_cast<float>(hd));
      cp.q = q;
      cp.k = krot;
      cp.v = v;
      cp.row_begin = m.row_begin.as<int32_t>();
      cp.o = parts_o + static_cast<int64_t>(2) * T * qd;
      cp.lse = parts_lse + static_cast<int64_t>(2) * T * nh;
      KVQ_STEP(kernels::LaunchChunkAttention(cp, s));
      if (chunk_fa) KVQ_STEP(prefill_chunks(l));
      KVQ_STEP(append_all());
      for (const It& e : its) {
        if (e.host == nullptr) continue;
        if (e.host->device_memory()) {
          KVQ_STEP(m.DeviceAppend(c, e.host, l, e.row0, e.n, k, v));
        } else {
          KVQ_STEP(m.HostAppend(c, e.host, l, e.row0, e.n, k, v));
        }
      }
    }
    kernels::MergeAttentionParams mp;
    mp.rows = T * nh;
    mp.n_parts = 3;
    mp.head_dim = hd;
    mp.o_parts = parts_o;
    mp.o_row_stride = hd;
    mp.o_part_stride = static_cast<int64_t>(T) * qd;
    mp.lse_parts = parts_lse;
    mp.lse_row_stride = 1;
    mp.lse_part_stride = static_cast<int64_t>(T) * nh;
    mp.o = o;
    // The merged lse is not needed: krot (T * kvd >= T * nh floats, free here) takes it.
    mp.lse = m.krot.as<float>();
    if (dtype_ != DType::kF32) {  // the output projection's input, converted by the merge
      mp.o_cast = o_act;
      mp.o_cast_dtype = dtype_;
    }
    if (!fold) KVQ_STEP(kernels::LaunchMergeAttention(mp, s));  // folded: the decode launch wrote o
    if (gemv) {  // o projection + residual; FFN RMSNorm + gate/up; SwiGLU + down + residual
      KVQ_STEP(dgemv(kernels::GemvInput::kPlain, o_act, qd, nullptr, L.wo, hidden, qd, DType::kF32, 1.0f,
                     {{hidden, x, hidden}}));
      KVQ_STEP(dgemv(kernels::GemvInput::kRmsNorm, x, hidden, L.ffn_norm, L.w_gu, 2 * inter, hidden, dtype_, 0.0f,
                     {{2 * inter, m.gu.p, 2 * inter}}));
      KVQ_STEP(dgemv(kernels::GemvInput::kSwiGlu, m.gu.p, 2 * inter, nullptr, L.w_down, hidden, inter, DType::kF32,
                     1.0f, {{hidden, x, hidden}}));
    } else {
      KVQ_STEP(gemm(T, hidden, qd, o_act, L.wo, x, DType::kF32, 1.0f));
      KVQ_STEP(kernels::LaunchRmsNormF32(T, hidden, c.rms_norm_eps, x, L.ffn_norm, m.h.p, dtype_, s));
      KVQ_STEP(gemm(T, 2 * inter, hidden, m.h.p, L.w_gu, m.gu.p, dtype_, 0.0f));
      kernels::SwiGluParams sp;
      sp.rows = T;
      sp.dim = inter;
      sp.dtype = dtype_;
      sp.gate = m.gu.p;
      sp.up = static_cast<const uint8_t*>(m.gu.p) + static_cast<size_t>(inter) * act;
      sp.in_row_stride = 2 * inter;
      sp.out = m.mid.p;
      KVQ_STEP(kernels::LaunchSwiGlu(sp, s));
      KVQ_STEP(gemm(T, hidden, inter, m.mid.p, L.w_down, x, DType::kF32, 1.0f));
    }
  }
  if (gemv && gather_all) {  // every row's logits: the final RMSNorm inside the vocabulary GEMV
    KVQ_STEP(dgemv(kernels::GemvInput::kRmsNorm, x, hidden, m.out_norm, m.lm_head, vocab, hidden, DType::kF32, 0.0f,
                   {{vocab, m.logits.p, vocab}}));
  } else {
    KVQ_STEP(kernels::LaunchGatherRows(R, hidden, x, m.gather_idx.as<int32_t>(), m.sel.as<float>(), s));
    KVQ_STEP(kernels::LaunchRmsNormF32(R, hidden, c.rms_norm_eps, m.sel.as<float>(), m.out_norm, m.sel_act.p, dtype_, s));
    KVQ_STEP(gemm(R, vocab, hidden, m.sel_act.p, m.lm_head, m.logits.p, DType::kF32, 0.0f));
  }
  KVQ_STEP(outputs.Enqueue(m.logits.as<float>(), vocab, m.greedy, m.samp, m.penalty, s));
    return absl::OkStatus();
  };
  {
    const absl::Status st =
        graph ? m.graphs.Launch(
                    {T, attn[0].max_blocks, attn[0].splits, pool->id(), g_buffer_reallocs.load(), outputs.pick()}, s,
                    enqueue)
              : enqueue();
    if (!st.ok()) return fail(st);
  }
#undef KVQ_STEP
#undef KVQ_STEP_CUDA
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
  for (const It& e : its) {
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
