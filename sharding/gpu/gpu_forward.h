// The Llama-family forward pass on one GPU: weights in f16/bf16 (or f32, the exactness mode that
// matches the CPU reference to fp32 rounding), cuBLAS GEMMs, the dense-op kernels, and attention
// through the paged KV pool (GpuKvCache): decode attention with split-KV over the stored past,
// the chunk's own causal part, merged by (o, lse); prefill chunks through the tensor-core prefill
// kernels. The same meaning as the CPU
// model::Forward, item by item (ForwardOptions included), so the engine runs either.
//
// A step's rows are ordered decode tokens first (those continuing a session prefix first), then
// prefill chunks; every layer launches one append and one or two attention kernels for all decode
// rows, plus one of each per prefill chunk (its query rows share the chunk's block-table row).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "model/forward.h"
#include "model/weights.h"

namespace kvq::sharding {

class GpuForward : public model::ForwardPass {
 public:
  // Uploads the weights (converted to `dtype`) to the current device.
  static absl::StatusOr<std::unique_ptr<GpuForward>> Create(const model::LlamaWeights& weights,
                                                            kernels::DType dtype, cudaStream_t stream);
  // Seeded random weights generated on the device (normal, std 0.02; norms 1), for speed and
  // capacity runs of large shapes without a host copy: no checkpoint, not comparable to the CPU's
  // model::MakeSyntheticWeights values.
  static absl::StatusOr<std::unique_ptr<GpuForward>> CreateSynthetic(const model::ModelConfig& config,
                                                                     kernels::DType dtype, uint64_t seed,
                                                                     cudaStream_t stream);
  ~GpuForward() override;
  // An item's cache is a GpuKvCache, a model::PrefixKvCache over two of them, or any other
  // KvCache reached over the host: in evaluation mode through its dequantized keys and values, in
  // serving mode through KvCache::Attend (the past) and Append (e.g. a ShardedKvCache whose shards
  // live on other ranks' GPUs; --experimental_gpu_shards).
  absl::Status Run(absl::Span<model::ForwardItem> items, const model::ForwardOptions& options,
                   std::vector<float>* logits) const override;
  const model::ModelConfig& config() const override { return config_; }
  void ReleaseIdleResources() const override;  // drops the captured graphs
  int64_t weight_bytes() const { return weight_bytes_; }
  // Steps of plain decode rows run as captured CUDA graphs (one per batch size, block-table width
  // bucket and split count; on by default). Off: every kernel is launched one by one.
  void set_cuda_graphs(bool on);
  bool cuda_graphs() const;
  int64_t graph_launches() const;  // steps that ran as a graph so far
  // Prefill chunks attend the cached past (and themselves) with the tensor-core prefill kernels
  // (kernels/prefill_attention.h: the past expanded to fp16 in bounded segments, read once per 64
  // query rows; on by default). Off: the decode kernel once per query row and the scalar chunk
  // kernel (the first implementation; kept for A/B runs).
  void set_prefill_kernel(bool on);
  bool prefill_kernel() const;
  // Steps of single-token decode rows only (no session prefix, not evaluation) fold each row's
  // attention to its own new token (o = v, lse = scale * q . k) into the decode kernel's split
  // merge, which also writes the output projection's input: no chunk-attention kernel and no
  // 3-part merge per layer. On by default (H200, same process: SmolLM2 fp16 1K batch 1 1.597 ->
  // 1.465 ms/token, Llama-3-8B synthetic fp16 1K batch 1 5.681 -> 5.349; 2026-12-01);
  // KVQ_DECODE_FOLD_SELF=0 sets it off at creation; toggling drops the captured graphs.
  void set_fold_decode_self(bool on);
  bool fold_decode_self() const;
  // Steps of up to kernels::kDecodeGemvMaxRows rows with f16/bf16 weights run the linear layers
  // through kernels::LaunchDecodeGemv, whose input stage is the RMSNorm (q/k/v, gate/up) or the
  // SwiGLU (down): two RMSNorm kernels and the SwiGLU kernel leave each layer, and the q/k/v of a
  // batch is one launch. Off: measured slower than cuBLAS (H200: SmolLM2 fp16 1K batch 1 1.597 ->
  // 1.768 ms/token, batch 8 1.971 -> 5.151; Llama-3-8B synthetic batch 8 6.961 -> 42.09: every CTA
  // repeats the whole input stage, the SwiGLU of 8 x 14,336 inputs on 512 CTAs per layer);
  // KVQ_DECODE_GEMV=1 sets it on at creation; toggling drops the captured graphs.
  void set_decode_gemv(bool on);
  bool decode_gemv() const;
  // Programmatic dependent launch for kvq's own kernels (kernels/launch.cuh): each may start
  // while the kernel before it finishes. A process-wide setting (kernels::SetProgrammaticLaunch,
  // off by default, measured slower; KVQ_PDL=1 on at start-up); toggling it here also drops this
  // pass's captured graphs.
  void set_programmatic_launch(bool on);
  bool programmatic_launch() const;
  // Folded decode steps (set_fold_decode_self) run each layer's key and value appends on two side
  // streams beside the query/key RoPE (captured as parallel branches of the step's graph): they
  // only read the step's k and v, and the attention, which joins them, reads the committed
  // tokens alone. On by default; KVQ_DECODE_PARALLEL_APPEND=0 sets it off at creation (the
  // appends then follow the attention on the step's stream); toggling drops the captured graphs.
  void set_parallel_append(bool on);
  bool parallel_append() const;
  // Folded decode steps of several rows compute q, k and v with one GEMM over the stacked
  // weights into [q | k | v] rows; the RoPE, the appends and the merge read them there with a row
  // stride (three GEMMs otherwise). On by default; KVQ_DECODE_STACKED_QKV=0 sets it off at
  // creation; toggling drops the captured graphs.
  void set_stacked_qkv(bool on);
  bool stacked_qkv() const;
  kernels::DType dtype() const { return dtype_; }

 private:
  struct Impl;
  GpuForward() = default;
  // A pass with cuBLAS and the device set up and no weights yet (both Create functions start here).
  static absl::StatusOr<std::unique_ptr<GpuForward>> Empty(const model::ModelConfig& config, kernels::DType dtype,
                                                           cudaStream_t stream);
  model::ModelConfig config_;
  kernels::DType dtype_ = kernels::DType::kF16;
  int64_t weight_bytes_ = 0;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvq::sharding
