// GpuForward's construction and settings: cuBLAS and the stream set up, the weights uploaded
// (converted to the GEMM dtype) from a checkpoint or generated on the device; the step switches.
// The step itself is gpu_forward.cc (Run), gpu_forward_plan.cc and gpu_forward_enqueue.cc.
#include <cstdlib>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/launch.h"
#include "sharding/gpu/gpu_forward.h"
#include "sharding/gpu/gpu_forward_impl.h"

namespace kvq::sharding {

using gpu_forward_internal::DevLayer;
using kernels::DType;

absl::StatusOr<std::unique_ptr<GpuForward>> GpuForward::Create(const model::LlamaWeights& w,
                                                               DType dtype, cudaStream_t stream) {
  const model::ModelConfig& c = w.config;
  KVQ_ASSIGN_OR_RETURN(std::unique_ptr<GpuForward> f, Empty(c, dtype, stream));
  Impl& m = *f->impl_;
  size_t free0 = 0, total = 0;
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free0, &total));
  auto up = [&](const std::vector<float>& v, DType t) { return m.Upload(v, t); };
  KVQ_ASSIGN_OR_RETURN(m.embed, up(w.tok_embd, dtype));
  if (w.output.empty()) {
    m.lm_head = m.embed;
  } else {
    KVQ_ASSIGN_OR_RETURN(m.lm_head, up(w.output, dtype));
  }
  KVQ_ASSIGN_OR_RETURN(void* on, up(w.output_norm, DType::kF32));
  m.out_norm = static_cast<float*>(on);
  for (const model::LayerWeights& L : w.layers) {
    DevLayer d;
    KVQ_ASSIGN_OR_RETURN(void* an, up(L.attn_norm, DType::kF32));
    KVQ_ASSIGN_OR_RETURN(void* fn, up(L.ffn_norm, DType::kF32));
    d.attn_norm = static_cast<float*>(an);
    d.ffn_norm = static_cast<float*>(fn);
    if (c.attention_bias) {
      KVQ_ASSIGN_OR_RETURN(void* bq, up(L.bq, DType::kF32));
      KVQ_ASSIGN_OR_RETURN(void* bk, up(L.bk, DType::kF32));
      KVQ_ASSIGN_OR_RETURN(void* bv, up(L.bv, DType::kF32));
      d.bq = static_cast<float*>(bq);
      d.bk = static_cast<float*>(bk);
      d.bv = static_cast<float*>(bv);
    }
    std::vector<float> qkv(L.wq);
    qkv.insert(qkv.end(), L.wk.begin(), L.wk.end());
    qkv.insert(qkv.end(), L.wv.begin(), L.wv.end());
    KVQ_ASSIGN_OR_RETURN(d.wq, up(qkv, dtype));
    d.wk = static_cast<uint8_t*>(d.wq) + L.wq.size() * kernels::DTypeBytes(dtype);
    d.wv = static_cast<uint8_t*>(d.wk) + L.wk.size() * kernels::DTypeBytes(dtype);
    KVQ_ASSIGN_OR_RETURN(d.wo, up(L.wo, dtype));
    std::vector<float> gu(L.w_gate);
    gu.insert(gu.end(), L.w_up.begin(), L.w_up.end());
    KVQ_ASSIGN_OR_RETURN(d.w_gu, up(gu, dtype));
    KVQ_ASSIGN_OR_RETURN(d.w_down, up(L.w_down, dtype));
    m.layers.push_back(d);
  }
  KVQ_RETURN_IF_ERROR(m.UploadRope(c));
  size_t free1 = 0;
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free1, &total));
  f->weight_bytes_ = static_cast<int64_t>(free0) - static_cast<int64_t>(free1);
  return f;
}

absl::StatusOr<std::unique_ptr<GpuForward>> GpuForward::CreateSynthetic(const model::ModelConfig& c,
                                                                        DType dtype, uint64_t seed,
                                                                        cudaStream_t stream) {
  KVQ_ASSIGN_OR_RETURN(std::unique_ptr<GpuForward> f, Empty(c, dtype, stream));
  Impl& m = *f->impl_;
  size_t free0 = 0, total = 0;
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free0, &total));
  uint64_t tensor = 0;
  // Each tensor filled from its own seed (in creation order), also where tensors share one
  // allocation (the q/k/v projection).
  auto fill = [&](void* d, int64_t n, DType t, bool ones) -> absl::Status {
    if (ones) return kernels::LaunchFillF32(n, 1.0f, static_cast<float*>(d), stream);
    return kernels::LaunchFillNormal(n, seed * 1000003 + (++tensor), 0.0f, 0.02f, d, t, stream);
  };
  auto alloc_n = [&](int64_t n, DType t) -> absl::StatusOr<void*> {
    void* d = nullptr;
    KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&d, static_cast<size_t>(n) * kernels::DTypeBytes(t)));
    m.allocations.push_back(d);
    return d;
  };
  auto alloc = [&](int64_t n, DType t, bool ones) -> absl::StatusOr<void*> {
    KVQ_ASSIGN_OR_RETURN(void* d, alloc_n(n, t));
    KVQ_RETURN_IF_ERROR(fill(d, n, t, ones));
    return d;
  };
  const int64_t h = c.hidden, q = c.q_dim(), kv = c.kv_dim(), ff = c.intermediate;
  KVQ_ASSIGN_OR_RETURN(m.embed, alloc(c.vocab_size * h, dtype, false));
  if (c.tie_word_embeddings) {
    m.lm_head = m.embed;
  } else {
    KVQ_ASSIGN_OR_RETURN(m.lm_head, alloc(c.vocab_size * h, dtype, false));
  }
  KVQ_ASSIGN_OR_RETURN(void* on, alloc(h, DType::kF32, true));
  m.out_norm = static_cast<float*>(on);
  for (int l = 0; l < c.n_layers; ++l) {
    DevLayer d;
    KVQ_ASSIGN_OR_RETURN(void* an, alloc(h, DType::kF32, true));
    KVQ_ASSIGN_OR_RETURN(void* fn, alloc(h, DType::kF32, true));
    d.attn_norm = static_cast<float*>(an);
    d.ffn_norm = static_cast<float*>(fn);
    if (c.attention_bias) {
      KVQ_ASSIGN_OR_RETURN(void* bq, alloc(q, DType::kF32, false));
      KVQ_ASSIGN_OR_RETURN(void* bk, alloc(kv, DType::kF32, false));
      KVQ_ASSIGN_OR_RETURN(void* bv, alloc(kv, DType::kF32, false));
      d.bq = static_cast<float*>(bq);
      d.bk = static_cast<float*>(bk);
      d.bv = static_cast<float*>(bv);
    }
    KVQ_ASSIGN_OR_RETURN(d.wq, alloc_n((q + 2 * kv) * h, dtype));
    d.wk = static_cast<uint8_t*>(d.wq) + q * h * kernels::DTypeBytes(dtype);
    d.wv = static_cast<uint8_t*>(d.wk) + kv * h * kernels::DTypeBytes(dtype);
    KVQ_RETURN_IF_ERROR(fill(d.wq, q * h, dtype, false));
    KVQ_RETURN_IF_ERROR(fill(d.wk, kv * h, dtype, false));
    KVQ_RETURN_IF_ERROR(fill(d.wv, kv * h, dtype, false));
    KVQ_ASSIGN_OR_RETURN(d.wo, alloc(h * q, dtype, false));
    KVQ_ASSIGN_OR_RETURN(d.w_gu, alloc(2 * ff * h, dtype, false));
    KVQ_ASSIGN_OR_RETURN(d.w_down, alloc(h * ff, dtype, false));
    m.layers.push_back(d);
  }
  KVQ_RETURN_IF_ERROR(m.UploadRope(c));
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream));
  size_t free1 = 0;
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free1, &total));
  f->weight_bytes_ = static_cast<int64_t>(free0) - static_cast<int64_t>(free1);
  return f;
}

absl::StatusOr<std::unique_ptr<GpuForward>> GpuForward::Empty(const model::ModelConfig& c, DType dtype,
                                                               cudaStream_t stream) {
  KVQ_RETURN_IF_ERROR(c.Validate());
  if (c.head_dim % 32 != 0 || c.head_dim > 256) {
    return absl::UnimplementedError(absl::StrCat("GPU engine: head_dim ", c.head_dim, " (32, 64, 128 or 256)"));
  }
  std::unique_ptr<GpuForward> f(new GpuForward());
  f->config_ = c;
  f->dtype_ = dtype;
  f->impl_ = std::make_unique<Impl>();
  // "1" on, anything else off; unset: the default.
  auto env_switch = [](const char* name, bool& field) {
    if (const char* e = std::getenv(name); e != nullptr) field = std::string(e) == "1";
  };
  env_switch("KVQ_DECODE_FOLD_SELF", f->impl_->fold_decode_self);
  env_switch("KVQ_DECODE_GEMV", f->impl_->decode_gemv);
  env_switch("KVQ_DECODE_PARALLEL_APPEND", f->impl_->parallel_append);
  env_switch("KVQ_DECODE_STACKED_QKV", f->impl_->stacked_qkv);
  KVQ_RETURN_IF_ERROR(f->impl_->Init(stream));
  return f;
}

// ---- Settings (gpu_forward.h); each env variable sets its switch at creation. ----

void GpuForward::set_cuda_graphs(bool on) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->use_graphs = on;
  if (!on) impl_->graphs.Drop();
}

bool GpuForward::cuda_graphs() const { return impl_->use_graphs; }

void GpuForward::set_prefill_kernel(bool on) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->use_prefill_kernel = on;
}

bool GpuForward::prefill_kernel() const { return impl_->use_prefill_kernel; }

void GpuForward::set_fold_decode_self(bool on) { impl_->SetStepSwitch(impl_->fold_decode_self, on); }
bool GpuForward::fold_decode_self() const { return impl_->fold_decode_self; }

void GpuForward::set_decode_gemv(bool on) { impl_->SetStepSwitch(impl_->decode_gemv, on); }
bool GpuForward::decode_gemv() const { return impl_->decode_gemv; }

void GpuForward::set_parallel_append(bool on) { impl_->SetStepSwitch(impl_->parallel_append, on); }
bool GpuForward::parallel_append() const { return impl_->parallel_append; }

void GpuForward::set_stacked_qkv(bool on) { impl_->SetStepSwitch(impl_->stacked_qkv, on); }
bool GpuForward::stacked_qkv() const { return impl_->stacked_qkv; }

void GpuForward::set_programmatic_launch(bool on) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (kernels::ProgrammaticLaunch() != on) impl_->graphs.Drop();  // captured with the other edges
  kernels::SetProgrammaticLaunch(on);
}

bool GpuForward::programmatic_launch() const { return kernels::ProgrammaticLaunch(); }

void GpuForward::ReleaseIdleResources() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->graphs.Drop();
}

int64_t GpuForward::graph_launches() const { return impl_->graphs.launches(); }

GpuForward::~GpuForward() = default;

}  // namespace kvq::sharding
