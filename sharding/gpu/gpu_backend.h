// Everything one GPU needs to run the model over a paged KV pool: a stream, the forward pass,
// the block pool and the cache factory over it, built in one place for the engine
// (--device=cuda) and the kvq tool. Members are destroyed caches-first (factory, pool, forward
// pass) and the stream last.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/dtype.h"
#include "model/weights.h"
#include "sharding/gpu/gpu_forward.h"
#include "sharding/gpu/gpu_kv_cache.h"
#include "sharding/kv_cache_factory.h"

namespace kvq::sharding {

// "f16" | "bf16" | "f32"; InvalidArgument names the choices otherwise.
absl::StatusOr<kernels::DType> ParseWeightsDtype(const std::string& name);

struct GpuBackend {
  // FailedPrecondition when no CUDA device is visible. The pool takes pool_options (its
  // capacity_bytes, or a fraction of the memory left after the weights). An empty kv_format builds
  // the forward pass alone (the KV cache lives elsewhere, e.g. in the CPU reference quantizer).
  static absl::StatusOr<std::unique_ptr<GpuBackend>> Create(const model::LlamaWeights& weights,
                                                            const std::string& kv_format,
                                                            const std::string& quantizer_path,
                                                            kernels::DType weights_dtype,
                                                            const GpuKvOptions& pool_options);
  ~GpuBackend();

  // Before serving: a 2-token prompt and two decode steps (greedy, then sampled with a repetition
  // penalty) on a throwaway cache from `factory`. CUDA loads a kernel's module at its first launch
  // and cuBLAS sets itself up at its first calls; without this the first requests after start-up
  // waited ~0.27 s longer for their first token (kvqd, SmolLM2 nuq3-1%, H200, 2026-12-02). The
  // cache's blocks go back to the pool at the end; the captured decode graphs are released.
  absl::Status WarmUp() const;

  cudaStream_t stream = nullptr;
  std::unique_ptr<GpuForward> forward;
  std::shared_ptr<GpuKvPool> pool;
  std::unique_ptr<KvCacheFactory> factory;
};

// Under mpirun: the device of this rank, OMPI_COMM_WORLD_LOCAL_RANK modulo the visible devices
// (no-op without it). FailedPrecondition when no device is visible.
absl::Status SelectDeviceForLocalRank();

// An attention worker's KV factory (sharding/worker.h): a block pool of its own on the current
// device (pool_options: capacity_bytes, or a fraction of the free memory) and GpuKvCache shards over
// it. No weights and no forward pass. The pool's stream is the process's worker stream.
absl::StatusOr<std::unique_ptr<KvCacheFactory>> MakeGpuWorkerKvFactory(const model::ModelConfig& config,
                                                                       const std::string& kv_format,
                                                                       const std::string& quantizer_path,
                                                                       const std::string& fingerprint,
                                                                       const GpuKvOptions& pool_options);

}  // namespace kvq::sharding
