#include "sharding/gpu/gpu_backend.h"

#include <cstdlib>
#include <vector>

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

absl::Status SelectDeviceForLocalRank() {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    return absl::FailedPreconditionError("--device=cuda: no CUDA device is visible");
  }
  const char* lr = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  if (lr == nullptr) return absl::OkStatus();
  const int dev = std::atoi(lr) % n_dev;
  if (cudaSetDevice(dev) != cudaSuccess) return absl::InternalError(absl::StrCat("cudaSetDevice(", dev, ") failed"));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<KvCacheFactory>> MakeGpuWorkerKvFactory(const model::ModelConfig& c,
                                                                       const std::string& kv_format,
                                                                       const std::string& quantizer_path,
                                                                       const std::string& fingerprint,
                                                                       const GpuKvOptions& pool_options) {
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    return absl::FailedPreconditionError("GPU worker: no CUDA device is visible");
  }
  // One stream per worker process for every pool it makes (pools live until the process ends).
  static cudaStream_t stream = [] {
    cudaStream_t st = nullptr;
    return cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) == cudaSuccess ? st : nullptr;
  }();
  if (stream == nullptr) return absl::InternalError("GPU worker: cudaStreamCreate failed");
  kvstore::KvFormat format;
  std::shared_ptr<const kvstore::Quantizer> quant;
  KVQ_RETURN_IF_ERROR(ResolveKvFormat(c, kv_format, quantizer_path, fingerprint, &format, &quant));
  KVQ_ASSIGN_OR_RETURN(std::shared_ptr<GpuKvPool> pool,
                       GpuKvPool::Create({c.n_layers, c.n_kv_heads, c.head_dim}, format, quant,
                                         model::RopeParamsFor(c), pool_options, stream));
  return MakeGpuKvCacheFactory(std::move(pool), c.n_heads);
}

absl::Status GpuBackend::WarmUp() const {
  if (forward == nullptr || factory == nullptr) return absl::FailedPreconditionError("GPU warm-up: no pass or pool");
  KVQ_ASSIGN_OR_RETURN(std::unique_ptr<model::KvCache> cache, factory->Make(0));
  const int32_t prompt[2] = {1, 2};
  model::ForwardItem it;
  it.cache = cache.get();
  it.tokens = absl::MakeConstSpan(prompt, 2);
  it.output = model::ForwardItem::Output::kGreedy;
  std::vector<float> logits;
  KVQ_RETURN_IF_ERROR(forward->Run(absl::MakeSpan(&it, 1), {}, &logits));
  const int32_t next = it.token;
  it.tokens = absl::MakeConstSpan(&next, 1);
  KVQ_RETURN_IF_ERROR(forward->Run(absl::MakeSpan(&it, 1), {}, &logits));
  it.output = model::ForwardItem::Output::kSample;
  it.sample.temperature = 0.7f;
  it.sample.top_p = 0.9f;
  it.sample.repetition_penalty = 1.2f;
  it.sample.penalized = absl::MakeConstSpan(prompt, 2);
  KVQ_RETURN_IF_ERROR(forward->Run(absl::MakeSpan(&it, 1), {}, &logits));
  forward->ReleaseIdleResources();
  return absl::OkStatus();
}

GpuBackend::~GpuBackend() {
  factory.reset();
  pool.reset();
  forward.reset();
  if (stream != nullptr) cudaStreamDestroy(stream);
}

}  // namespace kvq::sharding
