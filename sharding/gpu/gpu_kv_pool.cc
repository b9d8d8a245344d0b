// GpuKvPool (sharding/gpu/gpu_kv_cache.h): the device arena of KV blocks and fp16 sink slots, the
// quantizer's tensors, block and slot accounting, key-outlier compaction, the append kernels'
// overflow flag. The caches that live in it: gpu_kv_cache.cc.
#include "sharding/gpu/gpu_kv_cache.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda_check.h"
#include "kernels/decode_attention.h"
#include "kernels/engine_ops.h"
#include "kernels/kv_append.h"
#include "kernels/reference/rope.h"
#include "kvstore/kernel_geometry.h"

namespace kvq::sharding {

using kvstore::kBlockTokens;

absl::StatusOr<std::shared_ptr<GpuKvPool>> GpuKvPool::Create(
    const kvstore::KvShape& shape, const kvstore::KvFormat& format,
    std::shared_ptr<const kvstore::Quantizer> quantizer, const kernels::RopeParams& rope,
    const GpuKvOptions& options, cudaStream_t stream) {
  if (format.quantized() && !format.keys_per_channel()) {
    return absl::UnimplementedError(absl::StrCat(
        "KV format ", format.ToString(),
        " (keys scaled per token) runs on the CPU backend only; the GPU serves fp16, nuqB[-s%] "
        "and intB-pc-pre formats"));
  }
  if (format.keys_post_rope()) {
    return absl::UnimplementedError(absl::StrCat("KV format ", format.ToString(),
                                                 " (post-RoPE keys) runs on the CPU backend only"));
  }
  if (format.quantized() && quantizer == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("KV format ", format.ToString(), " needs its quantizer"));
  }
  static std::atomic<uint64_t> next_id{1};
  std::shared_ptr<GpuKvPool> p(new GpuKvPool());
  p->id_ = next_id.fetch_add(1);
  p->shape_ = shape;
  p->format_ = format;
  p->layout_ = kvstore::ComputeBlockLayout(format, shape);
  p->quantizer_ = std::move(quantizer);
  p->rope_ = rope;
  p->stream_ = stream;
  const kvstore::BlockLayout& lay = p->layout_;
  const GpuBlockGeometry bg = ComputeGpuBlockGeometry(shape, format, options);
  const int cap = bg.key_outlier_capacity, header = bg.key_outlier_header_words;
  const int64_t stride = bg.block_stride_bytes;
  const int64_t scratch_bytes =
      lay.has_key_outliers ? kernels::CompactKeyOutliersParams::kMaxBlocks * (stride - lay.fixed_bytes) : 0;
  const int64_t L = shape.ElementsPerTokenPerLayer();
  p->sink_slot_bytes_ = static_cast<int64_t>(shape.n_layers) * format.sink_tokens * L * 2 * 2;

  int64_t budget = options.capacity_bytes;
  if (budget <= 0) {
    size_t free_b = 0, total_b = 0;
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free_b, &total_b));
    budget = static_cast<int64_t>(static_cast<double>(free_b) * options.memory_fraction);
  }
  p->sink_slots_ = p->sink_slot_bytes_ > 0 ? std::max(1, options.max_sink_slots) : 0;
  const int64_t sink_total = p->sink_slots_ * p->sink_slot_bytes_;
  p->n_blocks_ = std::min<int64_t>((budget - sink_total - scratch_bytes) / stride, (int64_t{1} << 31) - 1);
  if (p->n_blocks_ < 1) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV pool: ", budget, " bytes leave no room for one ", stride, "-byte block of ",
        format.ToString(), " (raise --kv_capacity or free GPU memory)"));
  }
  KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p->arena_, static_cast<size_t>(p->n_blocks_ * stride)));
  if (sink_total > 0) KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p->sink_arena_, static_cast<size_t>(sink_total)));
  if (scratch_bytes > 0) KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p->compact_scratch_, static_cast<size_t>(scratch_bytes)));
  KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p->overflow_, sizeof(int)));
  KVQ_RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&p->work_, cudaEventDisableTiming));
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(p->overflow_, 0, sizeof(int), stream));
  const std::vector<double> inv = kernels::RopeInvFreq(rope);
  KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p->inv_freq_, inv.size() * sizeof(double)));
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(p->inv_freq_, inv.data(), inv.size() * sizeof(double), cudaMemcpyHostToDevice));
  // The decode kernels' RoPE step tables, once for the pool (not per CTA and layer).
  KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p->rope_steps_, kernels::RopeStepTableBytes(shape.head_dim)));
  KVQ_RETURN_IF_ERROR(kernels::LaunchRopeStepTable(p->inv_freq_, shape.head_dim, p->rope_steps_, stream));
  // And their anchors for positions below 2^24 (2 MB at head dim 128): no double sincos per split.
  const int64_t anchors = kernels::kRopeAnchorDefaultCount;
  KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p->rope_anchors_, kernels::RopeAnchorTableBytes(shape.head_dim, anchors)));
  KVQ_RETURN_IF_ERROR(kernels::LaunchRopeAnchorTable(p->inv_freq_, shape.head_dim, anchors, p->rope_anchors_, stream));

  kernels::PagedKvCache& v = p->view_;
  v.geom = kvstore::ToKernelGeometry(lay);
  v.codec = format.quantized() ? static_cast<kernels::KvCodec>(format.bits) : kernels::KvCodec::kFp16;
  v.pool = p->arena_;
  v.block_stride_bytes = stride;
  v.key_outlier_capacity = cap;
  v.key_outlier_header_words = header;
  v.sink_tokens = format.sink_tokens;
  v.keys_rotated = false;
  v.rope_inv_freq = p->inv_freq_;
  v.rope_steps = p->rope_steps_;
  v.rope_anchors = p->rope_anchors_;
  v.rope_anchor_count = anchors;
  if (format.quantized()) {
    const kvstore::Quantizer& q = *p->quantizer_;
    const int C = format.num_centroids();
    const size_t nk = static_cast<size_t>(shape.n_layers) * L;
    std::vector<float> t;
    t.insert(t.end(), q.KeyZeroPoint(0), q.KeyZeroPoint(0) + nk);
    t.insert(t.end(), q.KeyRange(0), q.KeyRange(0) + nk);
    for (int l = 0; l < shape.n_layers; ++l) {
      const auto kl = q.EffectiveKeyLut(l, format.qnorm);
      t.insert(t.end(), kl.begin(), kl.begin() + C);
    }
    for (int l = 0; l < shape.n_layers; ++l) {
      const auto vl = q.EffectiveValueLut(l, format.qnorm);
      t.insert(t.end(), vl.begin(), vl.begin() + C);
    }
    KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p->tensors_, t.size() * sizeof(float)));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(p->tensors_, t.data(), t.size() * sizeof(float), cudaMemcpyHostToDevice));
    v.key_zero_point = p->tensors_;
    v.key_range = p->tensors_ + nk;
    v.key_lut = p->tensors_ + 2 * nk;
    v.value_lut = p->tensors_ + 2 * nk + static_cast<size_t>(shape.n_layers) * C;
  }
  p->refs_.assign(static_cast<size_t>(p->n_blocks_), 0);
  p->free_blocks_.resize(static_cast<size_t>(p->n_blocks_));
  // Low ids are handed out first (pop from the back).
  for (int64_t i = 0; i < p->n_blocks_; ++i) p->free_blocks_[i] = static_cast<int32_t>(p->n_blocks_ - 1 - i);
  for (int i = p->sink_slots_ - 1; i >= 0; --i) p->free_sinks_.push_back(i);
  return p;
}

GpuKvPool::~GpuKvPool() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  if (work_ != nullptr) cudaEventDestroy(work_);
  for (void* ptr : {static_cast<void*>(arena_), static_cast<void*>(sink_arena_), static_cast<void*>(tensors_),
                    static_cast<void*>(inv_freq_), static_cast<void*>(overflow_), static_cast<void*>(init_ids_),
                    static_cast<void*>(compact_scratch_), rope_steps_, rope_anchors_}) {
    if (ptr != nullptr) cudaFree(ptr);
  }
  for (const ScratchChunk& c : scratch_) cudaFree(c.p);
}

int64_t GpuKvPool::free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(free_blocks_.size());
}

int GpuKvPool::free_sink_slots() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(free_sinks_.size());
}

int64_t GpuKvPool::used_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return (n_blocks_ - static_cast<int64_t>(free_blocks_.size())) * block_bytes() +
         (sink_slots_ - static_cast<int64_t>(free_sinks_.size())) * sink_slot_bytes_;
}

int GpuKvPool::SinkCapacity(int64_t first_position) const {
  return static_cast<int>(std::clamp<int64_t>(format_.sink_tokens - first_position, 0, format_.sink_tokens));
}

int64_t GpuKvPool::BytesForTokens(int64_t tokens, int64_t first_position) const {
  const int sink = SinkCapacity(first_position);
  const int64_t in_blocks = std::max<int64_t>(0, tokens - sink);
  return (in_blocks + kBlockTokens - 1) / kBlockTokens * block_bytes() + (sink > 0 ? sink_slot_bytes_ : 0);
}

absl::Status GpuKvPool::AllocateBlocks(int n, std::vector<int32_t>* ids) {
  if (n <= 0) return absl::OkStatus();
  std::vector<int32_t> got;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<int>(free_blocks_.size()) < n) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "KV pool exhausted: ", n, " blocks of ", kBlockTokens, " tokens needed, ", free_blocks_.size(),
          " free of ", n_blocks_));
    }
    got.assign(free_blocks_.end() - n, free_blocks_.end());
    free_blocks_.resize(free_blocks_.size() - n);
    for (int32_t id : got) refs_[id] = 1;
    if (n > init_ids_cap_) {
      if (init_ids_ != nullptr) {
        cudaStreamSynchronize(stream_);
        cudaFree(init_ids_);
        init_ids_ = nullptr;
      }
      init_ids_cap_ = std::max(n, 256);
      KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&init_ids_, sizeof(int32_t) * init_ids_cap_));
    }
    // Synchronous copy from pageable memory: the staging buffer is free again when it returns.
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(stream_));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(init_ids_, got.data(), sizeof(int32_t) * n, cudaMemcpyHostToDevice));
    kernels::InitKvBlocksParams ip;
    ip.pool = arena_;
    ip.block_stride_bytes = block_bytes();
    ip.ids = init_ids_;
    ip.n = n;
    ip.n_layers = shape_.n_layers;
    ip.n_kv_heads = shape_.n_kv_heads;
    ip.layer_bytes = layout_.layer_bytes;
    ip.fixed_bytes = layout_.fixed_bytes;
    ip.key_outlier_header_words = view_.key_outlier_header_words;
    ip.dir_offset = layout_.has_key_outliers ? layout_.key_outlier_dir_offset : -1;
    ip.key_outlier_capacity = view_.key_outlier_capacity;
    KVQ_RETURN_IF_ERROR(kernels::LaunchInitKvBlocks(ip, stream_));
    KVQ_RETURN_IF_ERROR(RecordWork());
  }
  ids->insert(ids->end(), got.begin(), got.end());
  return absl::OkStatus();
}

void GpuKvPool::RetainBlocks(const std::vector<int32_t>& ids) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int32_t id : ids) ++refs_[id];
}

void GpuKvPool::ReleaseBlocks(const std::vector<int32_t>& ids) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int32_t id : ids) {
    if (--refs_[id] == 0) free_blocks_.push_back(id);
  }
}

absl::StatusOr<int> GpuKvPool::AllocateSinkSlot() {
  int slot;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_sinks_.empty()) {
      return absl::ResourceExhaustedError(absl::StrCat("KV pool: all ", sink_slots_,
                                                       " fp16 sink slots are in use (sequences at once)"));
    }
    slot = free_sinks_.back();
    free_sinks_.pop_back();
  }
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemsetAsync(sink_slot(slot), 0, static_cast<size_t>(sink_slot_bytes_), stream_));
  KVQ_RETURN_IF_ERROR(RecordWork());
  return slot;
}

void GpuKvPool::ReleaseSinkSlot(int slot) {
  std::lock_guard<std::mutex> lock(mu_);
  free_sinks_.push_back(slot);
}

uint16_t* GpuKvPool::sink_slot(int slot) const {
  return sink_arena_ + static_cast<int64_t>(slot) * (sink_slot_bytes_ / 2);
}

absl::Status GpuKvPool::CompactBlocks(const std::vector<int32_t>& ids, const std::vector<int>& filled) {
  if (compact_scratch_ == nullptr || view_.key_outlier_header_words == 0) return absl::OkStatus();
  kernels::CompactKeyOutliersParams cp;
  cp.pool = arena_;
  cp.block_stride_bytes = block_bytes();
  cp.layer_bytes = layout_.layer_bytes;
  cp.fixed_bytes = layout_.fixed_bytes;
  cp.dir_offset = layout_.key_outlier_dir_offset;
  cp.n_layers = shape_.n_layers;
  cp.n_kv_heads = shape_.n_kv_heads;
  cp.header_words = view_.key_outlier_header_words;
  cp.key_outlier_capacity = view_.key_outlier_capacity;
  cp.scratch = compact_scratch_;
  for (size_t at = 0; at < ids.size(); at += kernels::CompactKeyOutliersParams::kMaxBlocks) {
    cp.n = static_cast<int>(std::min<size_t>(ids.size() - at, kernels::CompactKeyOutliersParams::kMaxBlocks));
    for (int i = 0; i < cp.n; ++i) {
      cp.ids[i] = ids[at + i];
      cp.filled[i] = filled[at + i];
    }
    KVQ_RETURN_IF_ERROR(kernels::LaunchCompactKeyOutliers(cp, stream_));
  }
  return RecordWork();
}

absl::Status GpuKvPool::RecordWork() {
  KVQ_RETURN_IF_CUDA_ERROR(cudaEventRecord(work_, stream_));
  return absl::OkStatus();
}

int64_t GpuKvPool::CountOverflow() {
  cudaMemsetAsync(overflow_, 0, sizeof(int), stream_);
  RecordWork().IgnoreError();
  return ++overflow_count_;
}

}  // namespace kvq::sharding
