#include "tools/kvq_backend.h"

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "model/fingerprint.h"
#if KVQ_HAVE_CUDA
#include <cuda_runtime.h>

#include "sharding/gpu/gpu_backend.h"
#endif

ABSL_FLAG(std::string, device, "cpu", "compute backend: cpu (reference) or cuda (the GPU engine)");
ABSL_FLAG(std::string, weights_dtype, "f32",
          "cuda: weights f32 (matches the CPU reference to rounding), f16 or bf16");
ABSL_FLAG(double, kv_capacity_gb, 8.0, "cuda: GiB of GPU memory for the KV block pool");
ABSL_FLAG(bool, kv_host, false,
          "cuda, evaluation only (eval-ppl, passkey): keep the KV cache in the CPU reference (any "
          "format, e.g. int per-token and post-RoPE ones the GPU pool lacks) and run everything "
          "else, attention included, on the GPU over its dequantized keys and values");

ABSL_DECLARE_FLAG(std::string, kv_format);
ABSL_DECLARE_FLAG(std::string, quantizer);

namespace kvq::tools {

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const model::LlamaWeights& w) {
  auto b = std::make_unique<Backend>();
  const std::string device = absl::GetFlag(FLAGS_device);
  const std::string fmt = absl::GetFlag(FLAGS_kv_format);
  const std::string qpath = absl::GetFlag(FLAGS_quantizer);
  if (device == "cpu") {
    KVQ_ASSIGN_OR_RETURN(b->factory, sharding::KvCacheFactory::Create(w.config, fmt, qpath, model::ModelFingerprint(w)));
    b->forward = std::make_unique<model::Forward>(w);
    b->description = "cpu";
    return b;
  }
  if (device != "cuda") return absl::InvalidArgumentError(absl::StrCat("--device=", device, ": use cpu or cuda"));
#if KVQ_HAVE_CUDA
  const std::string dts = absl::GetFlag(FLAGS_weights_dtype);
  KVQ_ASSIGN_OR_RETURN(const kernels::DType dt, sharding::ParseWeightsDtype(dts));
  sharding::GpuKvOptions po;
  po.capacity_bytes = static_cast<int64_t>(absl::GetFlag(FLAGS_kv_capacity_gb) * 1073741824.0);
  po.max_sink_slots = 64;
  const bool kv_host = absl::GetFlag(FLAGS_kv_host);
  std::shared_ptr<sharding::GpuBackend> gpu;
  KVQ_ASSIGN_OR_RETURN(gpu, sharding::GpuBackend::Create(w, kv_host ? "" : fmt, qpath, dt, po));
  b->forward = std::move(gpu->forward);
  if (kv_host) {
    KVQ_ASSIGN_OR_RETURN(b->factory, sharding::KvCacheFactory::Create(w.config, fmt, qpath, model::ModelFingerprint(w)));
    b->description = absl::StrCat("cuda (weights ", dts, ", KV in the CPU reference)");
  } else {
    b->factory = std::move(gpu->factory);
    cudaDeviceProp prop{};
    int dev = 0;
    cudaGetDevice(&dev);
    cudaGetDeviceProperties(&prop, dev);
    b->description = absl::StrCat("cuda (", prop.name, ", weights ", dts, ")");
  }
  b->device_state = gpu;
  return b;
#else
  return absl::FailedPreconditionError("--device=cuda: this build has no CUDA (configure with -DKVQ_ENABLE_CUDA=ON)");
#endif
}

}  // namespace kvq::tools
