// GpuForward's step planning: the items' caches and rows, the launches and the host arrays of one
// step (gpu_forward_plan.h), before anything is enqueued.
#include "sharding/gpu/gpu_forward_plan.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/decode_attention.h"
#include "kernels/decode_gemv.h"
#include "kernels/prefill_attention.h"
#include "kvstore/block_layout.h"
#include "sharding/gpu/gpu_forward_impl.h"

namespace kvq::sharding {

using gpu_forward_internal::DevLayer;
using gpu_forward_internal::Launch;
using gpu_forward_internal::StepPlan;
using kernels::DType;

absl::Status GpuForward::Impl::PlanStep(const model::ModelConfig& c, DType dtype,
                                        absl::Span<model::ForwardItem> items, const model::ForwardOptions& options,
                                        StepPlan* plan) const {
  using It = gpu_forward_internal::StepItem;
  StepPlan& p = *plan;
  p = StepPlan();
  const int hidden = c.hidden, hd = c.head_dim, nh = c.n_heads, nkv = c.n_kv_heads;
  const int vocab = c.vocab_size;
  const bool eval = p.eval = options.chunk_through_cache;

  // ---- Resolve caches and order rows: prefixed decode, plain decode, prefill chunks.
  std::vector<It>& its = p.items;
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
  int& T = p.T;
  int& nd = p.nd;
  int& nd1 = p.nd1;
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
  const bool graph = p.graph = use_graphs && plain_decode;
  // The same steps (graph or not) may fold each row's own new token into the decode merge
  // (set_fold_decode_self): then the decode launch writes o (and o_act) itself.
  const bool fold = p.fold = fold_decode_self && plain_decode;
  // Steps of a few rows may run the linear layers through kernels::LaunchDecodeGemv with the
  // RMSNorms and the SwiGLU as its input stage (set_decode_gemv; f16/bf16 weights).
  p.gemv = [&] {
    if (!decode_gemv || T < 1 || T > kernels::kDecodeGemvMaxRows || dtype == DType::kF32) return false;
    if (hidden % 8 != 0 || c.intermediate % 8 != 0 || c.q_dim() % 8 != 0) return false;
    for (const DevLayer& L : layers) {
      for (const void* w : {L.wq, L.wo, L.w_gu, L.w_down}) {
        if (reinterpret_cast<uintptr_t>(w) % 16 != 0) return false;
      }
    }
    return reinterpret_cast<uintptr_t>(lm_head) % 16 == 0;
  }();
  // A folded step of several rows computes q, k and v with one GEMM over the stacked weights
  // (DevLayer) into rows [q | k | v] of m.qkv: the RoPE reads q and k from there with a row
  // stride and writes them packed, the appends and the own-token value read k and v in place
  // (one cuBLAS call instead of three; a single row needs no stride: its output row is q, k, v).
  p.stacked_qkv = stacked_qkv && fold && !p.gemv && T > 1;
  // ---- Room for every new token before anything is written.
  for (It& e : its) {
    if (e.host == nullptr) KVQ_RETURN_IF_ERROR(e.w->Reserve(e.n));
  }

  // ---- Host-side step description.
  std::vector<int32_t>& tokens = p.tokens;
  std::vector<int32_t>& row_begin = p.row_begin;
  std::vector<int32_t>& tables = p.tables;
  std::vector<int32_t>& lens = p.lens;
  std::vector<int64_t>& positions = p.positions;
  std::vector<int64_t>& firsts = p.firsts;
  std::vector<void*>& sinks = p.sinks;
  tokens.assign(T, 0);
  row_begin.assign(T, 0);
  positions.assign(T, 0);
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
  std::vector<Launch>& attn = p.attn;
  std::vector<Launch>& app = p.app;
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
      Launch pre;
      pre.row0 = 0;
      pre.rows = nd1;
      pre.part = 0;
      int mb = 1;
      for (int i = 0; i < nd1; ++i) mb = std::max<int>(mb, static_cast<int>(its[i].pre->blocks().size()));
      pre.max_blocks = mb;
      pre.table_off = static_cast<int64_t>(tables.size());
      for (int i = 0; i < nd1; ++i) add_table(its[i].pre->blocks(), mb);
      pre.lens_off = static_cast<int64_t>(lens.size());
      for (int i = 0; i < nd1; ++i) {
        lens.push_back(static_cast<int32_t>(its[i].pre_len));
        pre.max_len = std::max<int>(pre.max_len, lens.back());
      }
      pre.firsts_off = static_cast<int64_t>(firsts.size());
      for (int i = 0; i < nd1; ++i) firsts.push_back(its[i].pre->first_position());
      pre.sinks_off = static_cast<int64_t>(sinks.size());
      for (int i = 0; i < nd1; ++i) sinks.push_back(const_cast<uint16_t*>(its[i].pre->sink()));
      attn.push_back(pre);
    }
  }
  // Prefill chunks: rows share their cache's table row (stride 0). With the prefill kernels, one
  // launch description per chunk and past: its one sequence row (lens = the tokens to expand).
  const bool fa = p.fa = use_prefill_kernel;
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
      Launch pre;
      pre.row0 = e.row0;
      pre.rows = e.n;
      pre.part = 0;
      pre.max_blocks = std::max<int>(1, static_cast<int>(e.pre->blocks().size()));
      pre.stride = 0;
      pre.table_off = add_table(e.pre->blocks(), pre.max_blocks);
      pre.max_len = static_cast<int>(e.pre_len);
      add_seq(pre, e.pre, e.pre_len, e.n);
      if (fa) {
        pre.fa = true;
        pre.fa_keys = e.pre_len;
        pre.fa_limit_base = e.pre_len;
      } else {
        for (int j = 0; j < e.n; ++j) lens.push_back(static_cast<int32_t>(e.pre_len));
      }
      attn.push_back(pre);
    }
  }
  GpuKvPool*& pool = p.pool;
  for (const It& e : its) {
    if (e.w != nullptr) pool = &e.w->pool();
  }
  if (graph) {  // splits (and the kernel's tokens per split) for the table's whole capacity
    attn[0].max_len = attn[0].max_blocks * kvstore::kBlockTokens + pool->format().sink_tokens;
  }
  size_t& ws_bytes = p.ws_bytes;
  size_t& xkv_bytes = p.xkv_bytes;
  size_t& pf_parts_bytes = p.pf_parts_bytes;
  for (Launch& a : attn) {
    if (a.max_len == 0) continue;
    if (a.fa) {
      a.fa_plan = kernels::PlanPrefillPast(a.rows, nh, nkv, hd, a.fa_keys, sm_count,
                                           kernels::kPrefillExpandBudgetBytes, kernels::kPrefillPartialBudgetBytes);
      xkv_bytes = std::max(xkv_bytes, a.fa_plan.expand_bytes);
      pf_parts_bytes = std::max(pf_parts_bytes, a.fa_plan.partial_bytes);
      continue;
    }
    a.splits = kernels::ChooseDecodeSplits(a.rows, nkv, a.max_len, pool->view().codec, sm_count, hd);
    ws_bytes = std::max(ws_bytes, kernels::DecodeAttentionWorkspaceBytes(a.rows, nh, hd, a.splits));
  }
  // The chunk's own part through the prefill kernel needs its k/v in fp16.
  const int first_prefill_row = p.first_prefill_row = nd < static_cast<int>(its.size()) ? its[nd].row0 : T;
  // (Not in the f32 exactness mode: there the chunk's own part stays at fp32, like the CPU's.)
  // (Host caches in serving mode sit after the prefill rows and take the scalar chunk kernel with
  // the decode rows: then every row does.)
  bool any_host = false;
  for (const It& e : its) any_host |= e.host != nullptr;
  p.chunk_fa = fa && !eval && !any_host && first_prefill_row < T && dtype != DType::kF32;
  // Logit rows in item order.
  std::vector<int32_t>& gather = p.gather;
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
  p.gather_all = R == T;
  for (int i = 0; i < R && p.gather_all; ++i) p.gather_all = gather[i] == i;
  return absl::OkStatus();

}

}  // namespace kvq::sharding
