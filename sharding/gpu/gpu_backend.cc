#include "sharding/gpu/gpu_backend.h"

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "model/fingerprint.h"

namespace kvq::sharding {

absl::StatusOr<kernels::DType> ParseWeightsDtype(const std::string& name) {
  if (name == "f16" || name.empty()) return kernels::DType::kF16;
  if (name == "bf16") return kernels::DType::kBF16;
  if (name == "f32") return kernels::DType::kF32;
  return absl::InvalidArgumentError(absl::StrCat("unknown weights dtype '", name, "' (f16, bf16, f32)"));
}

absl::StatusOr<std::unique_ptr<GpuBackend>> GpuBackend::Create(const model::LlamaWeights& w,
                                                               const std::string& kv_format,
                                                               const std::string& quantizer_path,
                                                               kernels::DType weights_dtype,
                                                               const GpuKvOptions& pool_options) {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    return absl::FailedPreconditionError("--device=cuda: no CUDA device is visible");
  }
  auto b = std::make_unique<GpuBackend>();
  if (cudaStreamCreateWithFlags(&b->stream, cudaStreamNonBlocking) != cudaSuccess) {
    return absl::InternalError("cudaStreamCreate failed");
  }
  kvstore::KvFormat format;
  std::shared_ptr<const kvstore::Quantizer> quant;
  if (!kv_format.empty()) {
    KVQ_RETURN_IF_ERROR(ResolveKvFormat(w.config, kv_format, quantizer_path, model::ModelFingerprint(w), &format, &quant));
  }
  KVQ_ASSIGN_OR_RETURN(b->forward, GpuForward::Create(w, weights_dtype, b->stream));
  if (kv_format.empty()) return b;
  const model::ModelConfig& c = w.config;
  KVQ_ASSIGN_OR_RETURN(b->pool, GpuKvPool::Create({c.n_layers, c.n_kv_heads, c.head_dim}, format, quant,
                                                  model::RopeParamsFor(c), pool_options, b->stream));
  b->factory = MakeGpuKvCacheFactory(b->pool, c.n_heads);
  return b;
}

GpuBackend::~GpuBackend() {
  factory.reset();
  pool.reset();
  forward.reset();
  if (stream != nullptr) cudaStreamDestroy(stream);
}

}  // namespace kvq::sharding
