// GpuForward's private state, shared by its sources: gpu_forward_create.cc (weights on the device:
// uploaded from a checkpoint or generated), gpu_forward.cc (the step), gpu_forward_plan.cc and
// gpu_forward_enqueue.cc (its two parts). Not for other users: include sharding/gpu/gpu_forward.h.
#pragma once

#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/half.h"
#include "common/status.h"
#include "kernels/cublas_api.h"
#include "kernels/cuda_check.h"
#include "kernels/dense_ops.h"
#include "kernels/engine_ops.h"
#include "kernels/reference/rope.h"
#include "model/forward.h"
#include "sharding/gpu/decode_graphs.h"
#include "sharding/gpu/gpu_forward.h"
#include "sharding/gpu/stream_device_ops.h"

namespace kvq::sharding {
namespace gpu_forward_internal {

struct StepPlan;     // gpu_forward_plan.h
class StepOutputs;   // gpu_forward_outputs.h

using kernels::DType;

inline uint16_t FloatToBf16Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// A device buffer that only grows (reallocated between steps, never during one).
// Reallocations of step buffers in this process: captured decode graphs hold their pointers and
// are keyed by this count.
extern std::atomic<uint64_t> g_buffer_reallocs;  // defined in gpu_forward.cc

struct Grow {
  void* p = nullptr;
  size_t bytes = 0;
  absl::Status Ensure(size_t n, cudaStream_t s) {
    if (n <= bytes) return absl::OkStatus();
    if (p != nullptr) {
      KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s));
      KVQ_RETURN_IF_CUDA_ERROR(cudaFree(p));
      p = nullptr;
    }
    const size_t want = std::max(n, bytes + bytes / 2);
    KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p, want));
    bytes = want;
    ++g_buffer_reallocs;
    return absl::OkStatus();
  }
  template <typename T> T* as() const { return static_cast<T*>(p); }
  ~Grow() {
    if (p != nullptr) cudaFree(p);
  }
};

struct DevLayer {
  float* attn_norm = nullptr;
  float* ffn_norm = nullptr;
  float* bq = nullptr;
  float* bk = nullptr;
  float* bv = nullptr;
  // wq, wk, wv are consecutive rows of one [q_dim + 2 * kv_dim][hidden] matrix (wk = wq + q_dim
  // rows, wv = wk + kv_dim rows): a single-token step projects q, k and v with one GEMM.
  void* wq = nullptr;
  void* wk = nullptr;
  void* wv = nullptr;
  void* wo = nullptr;
  void* w_gu = nullptr;  // [2 * intermediate][hidden]: gate rows then up rows
  void* w_down = nullptr;
};

}  // namespace gpu_forward_internal

struct GpuForward::Impl {
  using DType = kernels::DType;
  using DevLayer = gpu_forward_internal::DevLayer;
  using Grow = gpu_forward_internal::Grow;

  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  int sm_count = 0;
  std::vector<void*> allocations;
  std::vector<DevLayer> layers;
  void* embed = nullptr;     // [vocab][hidden], dtype
  void* lm_head = nullptr;   // == embed when tied
  float* out_norm = nullptr;
  double* inv_freq = nullptr;
  mutable std::mutex mu;
  // Step buffers.
  // q holds the step's q, k and v: [T][q_dim], then [T][kv_dim] twice. qkv: a batched decode
  // step's stacked projection, [T][q_dim + 2 kv_dim] (GpuForward::Run).
  mutable Grow x, h, q, krot, o, o_act, gu, mid, parts_o, parts_lse, positions, row_begin,
      tokens, gather_idx, sel, sel_act, logits, ws, tables, lens, firsts, sinks, host_k, host_v, host_pos,
      xk, xv, pf_o, pf_lse, k16, v16, qkv, greedy, samp, penalty;
  // What caches that work on device memory (a sharded cache's GPU shards) need from this pass
  // (made on first use, on the step's stream).
  mutable std::unique_ptr<StreamDeviceOps> device_ops;
  mutable DecodeGraphs graphs;  // plain decode steps (Run)
  bool use_graphs = true;
  bool use_prefill_kernel = true;
  bool fold_decode_self = true;   // GpuForward::set_fold_decode_self
  bool decode_gemv = false;       // GpuForward::set_decode_gemv
  bool parallel_append = true;    // GpuForward::set_parallel_append
  bool stacked_qkv = true;        // GpuForward::set_stacked_qkv
  // Side streams of folded decode steps: the key and the value appends run there, beside the
  // query/key RoPE on `stream` (fork after the q/k/v projection, join before the attention).
  cudaStream_t side[2] = {nullptr, nullptr};
  cudaEvent_t fork_ev = nullptr, join_ev[2] = {nullptr, nullptr};

  // One step in two parts (GpuForward::Run drives them, with the buffers and copies between):
  // PlanStep works out the step on the host (gpu_forward_plan.cc) and reserves room in every GPU
  // cache for the items' new tokens; EnqueueStep queues its kernels and cuBLAS calls on `stream`
  // (gpu_forward_enqueue.cc; nothing else, so that a plain decode step can be captured).
  absl::Status PlanStep(const model::ModelConfig& c, DType dtype, absl::Span<model::ForwardItem> items,
                        const model::ForwardOptions& options, gpu_forward_internal::StepPlan* plan) const;
  absl::Status EnqueueStep(const model::ModelConfig& c, DType dtype, const gpu_forward_internal::StepPlan& p,
                           const gpu_forward_internal::StepOutputs& outputs);

  // A switch that changes what a decode step enqueues: the captured graphs have the old shape.
  void SetStepSwitch(bool& field, bool on) {
    std::lock_guard<std::mutex> lock(mu);
    if (field != on) graphs.Drop();
    field = on;
  }

  ~Impl() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    graphs.Drop();
    for (cudaStream_t t : side) {
      if (t != nullptr) cudaStreamDestroy(t);
    }
    for (cudaEvent_t e : {fork_ev, join_ev[0], join_ev[1]}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    for (void* p : allocations) cudaFree(p);
    if (cublas != nullptr) kernels::cublas::Destroy(cublas);
  }

  // Rows [row0, row0 + n) of a [rows][dim] f32 device array into `out`, queued on the stream (the
  // caller synchronizes before reading).
  absl::Status RowsToHost(const float* dev, int row0, int n, int dim, std::vector<float>* out) const {
    out->resize(static_cast<size_t>(n) * dim);
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(out->data(), dev + static_cast<int64_t>(row0) * dim, out->size() * 4,
                                             cudaMemcpyDeviceToHost, stream));
    return absl::OkStatus();
  }
  // Serving through a host cache (e.g. a ShardedKvCache): the item's rotated queries go to
  // KvCache::Attend over its committed tokens (every rank holding some attends its shard; rank 0
  // merges), and the result lands in partial slot 1 like the GPU caches' past.
  absl::Status HostPastAttention(const model::ModelConfig& c, model::KvCache* cache, int layer, int row0, int n,
                                 int64_t committed, int T, const float* q, float* parts_o, float* parts_lse) const {
    const int qd = c.q_dim(), nh = c.n_heads;
    if (committed == 0) return absl::OkStatus();  // slot 1 stays empty (filled with -inf)
    std::vector<float> hq, ho(static_cast<size_t>(n) * qd), hl(static_cast<size_t>(n) * nh);
    KVQ_RETURN_IF_ERROR(RowsToHost(q, row0, n, qd, &hq));
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
    const std::vector<int64_t> key_end(static_cast<size_t>(n), committed);
    cache->Attend(layer, hq.data(), n, key_end.data(), ho.data(), hl.data());
    float* o_dst = parts_o + (static_cast<int64_t>(T) + row0) * qd;
    float* l_dst = parts_lse + static_cast<int64_t>(T) * nh + static_cast<int64_t>(row0) * nh;
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(o_dst, ho.data(), ho.size() * 4, cudaMemcpyHostToDevice, stream));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(l_dst, hl.data(), hl.size() * 4, cudaMemcpyHostToDevice, stream));
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));  // the host vectors end here
    return absl::OkStatus();
  }
  // The same through a cache that works on device memory (KvCache::AttendDevice): q, o and lse
  // stay on the GPU; only what other ranks need goes through the host.
  absl::Status DevicePastAttention(const model::ModelConfig& c, model::KvCache* cache, int layer, int row0, int n,
                                   int64_t committed, int T, const float* q, float* parts_o, float* parts_lse) const {
    const int qd = c.q_dim(), nh = c.n_heads;
    if (committed == 0) return absl::OkStatus();  // slot 1 stays empty (filled with -inf)
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));  // q is ready
    if (!device_ops) device_ops = std::make_unique<StreamDeviceOps>(stream);
    const std::vector<int64_t> key_end(static_cast<size_t>(n), committed);
    return cache->AttendDevice(layer, q + static_cast<int64_t>(row0) * qd, n, key_end.data(),
                               parts_o + (static_cast<int64_t>(T) + row0) * qd,
                               parts_lse + static_cast<int64_t>(T) * nh + static_cast<int64_t>(row0) * nh, *device_ops);
  }
  absl::Status DeviceAppend(const model::ModelConfig& c, model::KvCache* cache, int layer, int row0, int n,
                            const float* k, const float* v) const {
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));  // k, v are ready
    if (!device_ops) device_ops = std::make_unique<StreamDeviceOps>(stream);
    const int64_t at = static_cast<int64_t>(row0) * c.kv_dim();
    return cache->AppendDevice(layer, k + at, v + at, n, *device_ops);
  }
  // Serving through a host cache: the item's new keys (pre-RoPE) and values go to KvCache::Append
  // (a sharded cache sends them to the rank that owns their positions).
  absl::Status HostAppend(const model::ModelConfig& c, model::KvCache* cache, int layer, int row0, int n,
                          const float* k, const float* v) const {
    std::vector<float> hk, hv;
    KVQ_RETURN_IF_ERROR(RowsToHost(k, row0, n, c.kv_dim(), &hk));
    KVQ_RETURN_IF_ERROR(RowsToHost(v, row0, n, c.kv_dim(), &hv));
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
    return cache->Append(layer, hk.data(), hv.data(), n);
  }

  // Evaluation through a host cache: the item's new k/v go to the cache (its exact quantization),
  // its dequantized keys and values come back, and the item's queries attend them causally on
  // the GPU (into partial slot 1).
  absl::Status HostAttention(const model::ModelConfig& c, model::KvCache* cache, int layer, int row0, int n,
                             int64_t committed, int T, float* q, const float* k, const float* v) const {
    const int kvd = c.kv_dim(), qd = c.q_dim();
    std::vector<float> hk, hv;
    KVQ_RETURN_IF_ERROR(RowsToHost(k, row0, n, kvd, &hk));
    KVQ_RETURN_IF_ERROR(RowsToHost(v, row0, n, kvd, &hv));
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
    KVQ_RETURN_IF_ERROR(cache->Append(layer, hk.data(), hv.data(), n));
    const int64_t len = committed + n;
    std::vector<float> K, V;
    KVQ_RETURN_IF_ERROR(cache->ReadDequantized(layer, len, &K, &V));
    std::vector<int64_t> pos(static_cast<size_t>(len));
    for (int64_t t = 0; t < len; ++t) pos[t] = cache->first_position() + t;
    KVQ_RETURN_IF_ERROR(host_k.Ensure(K.size() * 4, stream));
    KVQ_RETURN_IF_ERROR(host_v.Ensure(V.size() * 4, stream));
    KVQ_RETURN_IF_ERROR(host_pos.Ensure(pos.size() * 8, stream));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host_k.p, K.data(), K.size() * 4, cudaMemcpyHostToDevice, stream));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host_v.p, V.data(), V.size() * 4, cudaMemcpyHostToDevice, stream));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(host_pos.p, pos.data(), pos.size() * 8, cudaMemcpyHostToDevice, stream));
    kernels::RopeQueryParams rk;
    rk.rows = static_cast<int>(len);
    rk.n_heads = c.n_kv_heads;
    rk.head_dim = c.head_dim;
    rk.q = host_k.as<float>();
    rk.positions = host_pos.as<int64_t>();
    rk.inv_freq = inv_freq;
    KVQ_RETURN_IF_ERROR(kernels::LaunchRopeQuery(rk, stream));
    kernels::ChunkAttentionParams cp;
    cp.rows = n;
    cp.n_heads = c.n_heads;
    cp.n_kv_heads = c.n_kv_heads;
    cp.head_dim = c.head_dim;
    cp.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    cp.q = q + static_cast<int64_t>(row0) * qd;
    cp.k = host_k.as<float>();
    cp.v = host_v.as<float>();
    cp.row_begin = nullptr;
    cp.key_offset = static_cast<int>(committed);
    cp.o = parts_o.as<float>() + (static_cast<int64_t>(T) + row0) * qd;
    cp.lse = parts_lse.as<float>() + (static_cast<int64_t>(T) + row0) * c.n_heads;
    KVQ_RETURN_IF_ERROR(kernels::LaunchChunkAttention(cp, stream));
    // The host vectors must outlive the async copies.
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }

  // cuBLAS on the stream (full fp32 without TF32 when the weights are f32: the exactness mode)
  // and the device's SM count.
  absl::Status Init(cudaStream_t s) {
    stream = s;
    KVQ_RETURN_IF_CUBLAS_ERROR(kernels::cublas::Create(&cublas));
    KVQ_RETURN_IF_CUBLAS_ERROR(kernels::cublas::SetStream(cublas, s));
    KVQ_RETURN_IF_CUBLAS_ERROR(kernels::cublas::SetMathMode(cublas, CUBLAS_PEDANTIC_MATH));
    int dev = 0;
    KVQ_RETURN_IF_CUDA_ERROR(cudaGetDevice(&dev));
    KVQ_RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev));
    for (cudaStream_t& t : side) KVQ_RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&t, cudaStreamNonBlocking));
    for (cudaEvent_t* e : {&fork_ev, &join_ev[0], &join_ev[1]}) {
      KVQ_RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
    }
    return absl::OkStatus();
  }

  absl::Status UploadRope(const model::ModelConfig& c) {
    const std::vector<double> inv = kernels::RopeInvFreq(model::RopeParamsFor(c));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&inv_freq, inv.size() * sizeof(double)));
    allocations.push_back(inv_freq);
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(inv_freq, inv.data(), inv.size() * sizeof(double), cudaMemcpyHostToDevice));
    return absl::OkStatus();
  }

  absl::StatusOr<void*> Upload(const std::vector<float>& w, DType dtype) {
    if (w.empty()) return nullptr;
    void* d = nullptr;
    const size_t n = w.size();
    if (dtype == DType::kF32) {
      KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&d, n * 4));
      allocations.push_back(d);
      KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(d, w.data(), n * 4, cudaMemcpyHostToDevice));
      return d;
    }
    std::vector<uint16_t> hbits(n);
    const bool f16 = dtype == DType::kF16;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) {
      hbits[i] = f16 ? FloatToHalfBits(w[i]) : gpu_forward_internal::FloatToBf16Bits(w[i]);
    }
    KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&d, n * 2));
    allocations.push_back(d);
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(d, hbits.data(), n * 2, cudaMemcpyHostToDevice));
    return d;
  }
};

}  // namespace kvq::sharding
