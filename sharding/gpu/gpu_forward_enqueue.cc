// GpuForward's step on the device: every kernel and cuBLAS call of one planned step (gpu_forward_plan.h)
// on the step's stream, from the embedding to the token choice; nothing else (no host copies or
// synchronization: Run captures a plain decode step into a CUDA graph from here).
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "kernels/decode_attention.h"
#include "kernels/decode_gemv.h"
#include "kernels/dense_ops.h"
#include "kernels/engine_ops.h"
#include "kernels/gemm.h"
#include "kernels/kv_append.h"
#include "kernels/merge_attention.h"
#include "kernels/prefill_attention.h"
#include "sharding/gpu/gpu_forward_impl.h"
#include "sharding/gpu/gpu_forward_outputs.h"
#include "sharding/gpu/gpu_forward_plan.h"

namespace kvq::sharding {

using gpu_forward_internal::DevLayer;
using gpu_forward_internal::Launch;
using gpu_forward_internal::StepPlan;
using kernels::DType;

absl::Status GpuForward::Impl::EnqueueStep(const model::ModelConfig& c, DType dtype, const StepPlan& p,
                                           const gpu_forward_internal::StepOutputs& outputs) {
  using It = gpu_forward_internal::StepItem;
  Impl& m = *this;
  cudaStream_t s = stream;
  const int hidden = c.hidden, hd = c.head_dim, nh = c.n_heads, nkv = c.n_kv_heads;
  const int qd = c.q_dim(), kvd = c.kv_dim(), inter = c.intermediate, vocab = c.vocab_size;
  const int act = kernels::DTypeBytes(dtype);
  const int T = p.T, nd = p.nd;
  const size_t Ts = static_cast<size_t>(T);
  const int R = static_cast<int>(p.gather.size());
  const bool eval = p.eval, fold = p.fold, gemv = p.gemv, stacked_qkv = p.stacked_qkv;
  const bool chunk_fa = p.chunk_fa, gather_all = p.gather_all;
  const int first_prefill_row = p.first_prefill_row;
  const std::vector<It>& its = p.items;
  const std::vector<Launch>& attn = p.attn;
  const std::vector<Launch>& app = p.app;
  GpuKvPool* const pool = p.pool;
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
    g.ab_dtype = dtype;
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
    KVQ_RETURN_IF_ERROR(
        kernels::LaunchToHalfRows(n, kvd, m.krot.as<float>() + at, kvd, m.k16.as<uint16_t>() + at, kvd, s));
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
  if (!fold) {  // partial slots a step may leave empty (no prefix, no chunk) read as -inf
    KVQ_RETURN_IF_ERROR(kernels::LaunchFillF32(3 * Ts * nh, -INFINITY, parts_lse, s));
    KVQ_RETURN_IF_ERROR(kernels::LaunchFillF32(3 * Ts * qd, 0.0f, parts_o, s));
  }

  float* x = m.x.as<float>();
  {
    kernels::EmbeddingParams ep;
    ep.rows = T;
    ep.dim = hidden;
    ep.vocab = vocab;
    ep.table_dtype = dtype;
    ep.out_dtype = DType::kF32;
    ep.table = m.embed;
    ep.ids = m.tokens.as<int32_t>();
    ep.out = x;
    KVQ_RETURN_IF_ERROR(kernels::LaunchEmbedding(ep, s));
  }
  float* o = m.o.as<float>();
  void* o_act = dtype == DType::kF32 ? static_cast<void*>(o) : m.o_act.p;
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
    g.w_dtype = dtype;
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
      KVQ_RETURN_IF_ERROR(dgemv(kernels::GemvInput::kRmsNorm, x, hidden, L.attn_norm, L.wq, qd + 2 * kvd, hidden,
                                DType::kF32, 0.0f, {sq, sk, {qd + 2 * kvd, v, kvd}}));
    } else {
      KVQ_RETURN_IF_ERROR(kernels::LaunchRmsNormF32(T, hidden, c.rms_norm_eps, x, L.attn_norm, m.h.p, dtype, s));
      if (T == 1) {
        // One token: [q | k | v] is one output row of the stacked weights (DevLayer), so one GEMM
        // (three cuBLAS calls of ~4.5 us each at M = 1 on an H200 were 14% of a SmolLM2 step).
        KVQ_RETURN_IF_ERROR(gemm(1, qd + 2 * kvd, hidden, m.h.p, L.wq, q, DType::kF32, 0.0f));
      } else if (stacked_qkv) {
        KVQ_RETURN_IF_ERROR(gemm(T, qd + 2 * kvd, hidden, m.h.p, L.wq, m.qkv.as<float>(), DType::kF32, 0.0f));
      } else {
        KVQ_RETURN_IF_ERROR(gemm(T, qd, hidden, m.h.p, L.wq, q, DType::kF32, 0.0f));
        KVQ_RETURN_IF_ERROR(gemm(T, kvd, hidden, m.h.p, L.wk, k, DType::kF32, 0.0f));
        KVQ_RETURN_IF_ERROR(gemm(T, kvd, hidden, m.h.p, L.wv, v, DType::kF32, 0.0f));
      }
    }
    // Where the projection left q, k and v, and the distance between rows.
    const int64_t qkv_stride = stacked_qkv ? qd + 2 * kvd : 0;
    float* const q_in = stacked_qkv ? m.qkv.as<float>() : q;
    float* const k_in = stacked_qkv ? q_in + qd : k;
    float* const v_in = stacked_qkv ? q_in + qd + kvd : v;
    const int64_t q_stride = stacked_qkv ? qkv_stride : qd, kv_stride = stacked_qkv ? qkv_stride : kvd;
    if (L.bq != nullptr) {
      KVQ_RETURN_IF_ERROR(kernels::LaunchAddBias(T, qd, q_stride, q_in, L.bq, s));
      KVQ_RETURN_IF_ERROR(kernels::LaunchAddBias(T, kvd, kv_stride, k_in, L.bk, s));
      KVQ_RETURN_IF_ERROR(kernels::LaunchAddBias(T, kvd, kv_stride, v_in, L.bv, s));
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
      KVQ_RETURN_IF_CUDA_ERROR(cudaEventRecord(m.fork_ev, s));
      for (cudaStream_t t : m.side) KVQ_RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(t, m.fork_ev, 0));
    }
    if (!gemv_rope) KVQ_RETURN_IF_ERROR(kernels::LaunchRopeQuery(rq, s));
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
    if (eval) KVQ_RETURN_IF_ERROR(append_all());
    if (side_append) {
      KVQ_RETURN_IF_ERROR(append_all());
      for (int i = 0; i < 2; ++i) {
        KVQ_RETURN_IF_CUDA_ERROR(cudaEventRecord(m.join_ev[i], m.side[i]));
        KVQ_RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(s, m.join_ev[i], 0));
      }
    }
    for (const Launch& a : attn) {
      if (a.max_len == 0 && !fold) continue;  // folded: the launch also merges the row's own token
      if (a.fa) {
        KVQ_RETURN_IF_ERROR(prefill_past(a, l));
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
        if (dtype != DType::kF32) {
          dp.o_cast = o_act;
          dp.o_cast_dtype = dtype;
        }
      }
      KVQ_RETURN_IF_ERROR(kernels::LaunchDecodeAttention(dp, s));
    }
    for (const It& e : its) {
      if (e.host == nullptr) continue;
      if (eval) {
        KVQ_RETURN_IF_ERROR(m.HostAttention(c, e.host, l, e.row0, e.n, e.committed, T, q, k, v));
      } else {
        if (e.host->device_memory()) {
          KVQ_RETURN_IF_ERROR(m.DevicePastAttention(c, e.host, l, e.row0, e.n, e.committed, T, q, parts_o, parts_lse));
        } else {
          KVQ_RETURN_IF_ERROR(m.HostPastAttention(c, e.host, l, e.row0, e.n, e.committed, T, q, parts_o, parts_lse));
        }
      }
    }
    if (fold) {
      if (!side_append) KVQ_RETURN_IF_ERROR(append_all());
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
      KVQ_RETURN_IF_ERROR(kernels::LaunchChunkAttention(cp, s));
      if (chunk_fa) KVQ_RETURN_IF_ERROR(prefill_chunks(l));
      KVQ_RETURN_IF_ERROR(append_all());
      for (const It& e : its) {
        if (e.host == nullptr) continue;
        if (e.host->device_memory()) {
          KVQ_RETURN_IF_ERROR(m.DeviceAppend(c, e.host, l, e.row0, e.n, k, v));
        } else {
          KVQ_RETURN_IF_ERROR(m.HostAppend(c, e.host, l, e.row0, e.n, k, v));
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
    if (dtype != DType::kF32) {  // the output projection's input, converted by the merge
      mp.o_cast = o_act;
      mp.o_cast_dtype = dtype;
    }
    if (!fold) KVQ_RETURN_IF_ERROR(kernels::LaunchMergeAttention(mp, s));  // folded: the decode launch wrote o
    if (gemv) {  // o projection + residual; FFN RMSNorm + gate/up; SwiGLU + down + residual
      KVQ_RETURN_IF_ERROR(dgemv(kernels::GemvInput::kPlain, o_act, qd, nullptr, L.wo, hidden, qd, DType::kF32, 1.0f,
                                {{hidden, x, hidden}}));
      KVQ_RETURN_IF_ERROR(dgemv(kernels::GemvInput::kRmsNorm, x, hidden, L.ffn_norm, L.w_gu, 2 * inter, hidden, dtype,
                                0.0f, {{2 * inter, m.gu.p, 2 * inter}}));
      KVQ_RETURN_IF_ERROR(dgemv(kernels::GemvInput::kSwiGlu, m.gu.p, 2 * inter, nullptr, L.w_down, hidden, inter,
                                DType::kF32, 1.0f, {{hidden, x, hidden}}));
    } else {
      KVQ_RETURN_IF_ERROR(gemm(T, hidden, qd, o_act, L.wo, x, DType::kF32, 1.0f));
      KVQ_RETURN_IF_ERROR(kernels::LaunchRmsNormF32(T, hidden, c.rms_norm_eps, x, L.ffn_norm, m.h.p, dtype, s));
      KVQ_RETURN_IF_ERROR(gemm(T, 2 * inter, hidden, m.h.p, L.w_gu, m.gu.p, dtype, 0.0f));
      kernels::SwiGluParams sp;
      sp.rows = T;
      sp.dim = inter;
      sp.dtype = dtype;
      sp.gate = m.gu.p;
      sp.up = static_cast<const uint8_t*>(m.gu.p) + static_cast<size_t>(inter) * act;
      sp.in_row_stride = 2 * inter;
      sp.out = m.mid.p;
      KVQ_RETURN_IF_ERROR(kernels::LaunchSwiGlu(sp, s));
      KVQ_RETURN_IF_ERROR(gemm(T, hidden, inter, m.mid.p, L.w_down, x, DType::kF32, 1.0f));
    }
  }
  if (gemv && gather_all) {  // every row's logits: the final RMSNorm inside the vocabulary GEMV
    KVQ_RETURN_IF_ERROR(dgemv(kernels::GemvInput::kRmsNorm, x, hidden, m.out_norm, m.lm_head, vocab, hidden, DType::kF32,
                              0.0f, {{vocab, m.logits.p, vocab}}));
  } else {
    KVQ_RETURN_IF_ERROR(kernels::LaunchGatherRows(R, hidden, x, m.gather_idx.as<int32_t>(), m.sel.as<float>(), s));
    KVQ_RETURN_IF_ERROR(
        kernels::LaunchRmsNormF32(R, hidden, c.rms_norm_eps, m.sel.as<float>(), m.out_norm, m.sel_act.p, dtype, s));
    KVQ_RETURN_IF_ERROR(gemm(R, vocab, hidden, m.sel_act.p, m.lm_head, m.logits.p, DType::kF32, 0.0f));
  }
  KVQ_RETURN_IF_ERROR(outputs.Enqueue(m.logits.as<float>(), vocab, m.greedy, m.samp, m.penalty, s));
  return absl::OkStatus();
}

}  // namespace kvq::sharding
