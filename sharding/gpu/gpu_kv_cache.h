// The KV cache in GPU memory: a pool of fixed-size token blocks (kvstore/block_layout.h bytes,
// plus a per-(layer, head) reservation for key outliers) and the per-sequence caches over it.
//
// GpuKvPool takes its whole arena at start-up (cudaMalloc once: from a byte budget, or a fraction
// of the free memory after weights and workspace), so serving never allocates device memory and a
// sequence that does not fit is refused before anything is written. Blocks are reference counted:
// a clone shares every full block and copies only the partly filled tail.
//
// GpuKvCache is a model::KvCache: the engine's GPU forward pass (gpu_forward.h) drives it through
// its device view (blocks, sink slot, lengths), and the host methods (Append, Attend, Serialize)
// work too, by copying through the same kernels, for the shards of sequences spread over ranks,
// tests and session files (their small device arrays come from a per-pool scratch, allocated once
// and reused). A session saved from a GPU cache is byte-identical to the CPU reference's
// (kvstore::QuantizedKvCache::Serialize). The pool is implemented in gpu_kv_pool.cc, the cache
// and its factory in gpu_kv_cache.cc.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/paged_kv.h"
#include "kernels/reference/rope.h"
#include "kvstore/block_layout.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantizer.h"
#include "model/forward.h"
#include "sharding/gpu_block_geometry.h"
#include "sharding/kv_cache_factory.h"

namespace kvq::sharding {

struct GpuKvOptions {
  // Bytes for blocks and sink slots; 0: memory_fraction of the device's free memory now.
  int64_t capacity_bytes = 0;
  double memory_fraction = 0.90;
  // fp16 sink slots (sequences and sessions that start at position 0 and hold sink tokens).
  int max_sink_slots = 4096;
  // Key outliers per block (their count depends on the text: per-channel thresholds are
  // calibrated offline): every block has an area of key_outlier_reserve times the nominal count
  // (sharding/gpu_block_geometry.h, where the default is measured), from which the append kernel
  // gives lists regions as they grow and which is packed again when a block fills
  // (kernels/paged_kv.h). Only when a block's area is used up are entries dropped (the dense code
  // keeps the clamped value), counted in GpuKvPool::CountOverflow() and logged by the forward pass.
  double key_outlier_reserve = kDefaultKeyOutlierReserve;
};

inline GpuBlockGeometry ComputeGpuBlockGeometry(const kvstore::KvShape& shape, const kvstore::KvFormat& format,
                                                const GpuKvOptions& options) {
  return ComputeGpuBlockGeometry(shape, format, options.key_outlier_reserve);
}

class GpuKvPool {
 public:
  // quantizer may be null for formats that need none (fp16, int per-token is not supported on the
  // GPU). The pool binds to the current device and does its work on `stream`.
  static absl::StatusOr<std::shared_ptr<GpuKvPool>> Create(
      const kvstore::KvShape& shape, const kvstore::KvFormat& format,
      std::shared_ptr<const kvstore::Quantizer> quantizer, const kernels::RopeParams& rope,
      const GpuKvOptions& options, cudaStream_t stream);
  ~GpuKvPool();
  GpuKvPool(const GpuKvPool&) = delete;
  GpuKvPool& operator=(const GpuKvPool&) = delete;

  const kvstore::KvShape& shape() const { return shape_; }
  const kvstore::KvFormat& format() const { return format_; }
  const kvstore::BlockLayout& layout() const { return layout_; }
  const std::shared_ptr<const kvstore::Quantizer>& quantizer() const { return quantizer_; }
  const kernels::RopeParams& rope() const { return rope_; }
  cudaStream_t stream() const { return stream_; }
  // The device view with every per-batch field (tables, lengths, sinks) left empty.
  const kernels::PagedKvCache& view() const { return view_; }

  int64_t block_bytes() const { return view_.block_stride_bytes; }
  int64_t sink_slot_bytes() const { return sink_slot_bytes_; }
  int key_outlier_capacity() const { return view_.key_outlier_capacity; }
  int64_t total_blocks() const { return n_blocks_; }
  int64_t free_blocks() const;
  int free_sink_slots() const;
  int64_t capacity_bytes() const { return n_blocks_ * block_bytes() + sink_slots_ * sink_slot_bytes_; }
  int64_t used_bytes() const;
  // Bytes a cache of `tokens` tokens starting at `first_position` occupies (whole blocks + sink).
  int64_t BytesForTokens(int64_t tokens, int64_t first_position = 0) const;
  int SinkCapacity(int64_t first_position) const;

  // n fresh blocks, initialized on the stream (zeroed, key-outlier directories set).
  // ResourceExhausted when fewer are free (nothing is taken then).
  absl::Status AllocateBlocks(int n, std::vector<int32_t>* ids);
  void RetainBlocks(const std::vector<int32_t>& ids);
  void ReleaseBlocks(const std::vector<int32_t>& ids);
  absl::StatusOr<int> AllocateSinkSlot();  // zeroed
  void ReleaseSinkSlot(int slot);
  uint16_t* sink_slot(int slot) const;
  // Packs the key-outlier lists of blocks (ids, tokens each holds) on the stream
  // (kernels::LaunchCompactKeyOutliers); a no-op for formats without key outliers.
  absl::Status CompactBlocks(const std::vector<int32_t>& ids, const std::vector<int>& filled);
  // Recorded after the pool's own work on its stream (block init, sink zeroing, compaction,
  // clone copies); a forward pass on another stream waits on it before touching the pool.
  cudaEvent_t work_event() const { return work_; }
  // Unique over the process's lifetime (a new pool may reuse a freed one's address; captured
  // CUDA graphs that hold a pool's pointers are keyed by this).
  uint64_t id() const { return id_; }
  absl::Status RecordWork();
  // Device flag the append kernel raises when a block's key-outlier area is used up.
  int* overflow_flag() const { return overflow_; }
  // After a step that found the flag raised: clears it (on the stream) and returns how many steps
  // overflowed so far.
  int64_t CountOverflow();
  int64_t overflow_steps() const { return overflow_count_.load(); }
  // Device scratch for the host-API calls of this pool's caches (GpuKvCache::Append, Attend):
  // chunks kept for the pool's life and handed out again on every call, one call at a time (a
  // lease holds the lock until its call has synchronized). A cudaMalloc and cudaFree per array
  // and call synchronized the device and cost ~0.5 ms per layer on the GPU workers' path.
  class ScratchLease;

 private:
  GpuKvPool() = default;
  struct ScratchChunk {
    uint8_t* p = nullptr;
    size_t size = 0;
    size_t used = 0;
  };
  mutable std::mutex scratch_mu_;
  mutable std::vector<ScratchChunk> scratch_;
  kvstore::KvShape shape_;
  kvstore::KvFormat format_;
  kvstore::BlockLayout layout_;
  std::shared_ptr<const kvstore::Quantizer> quantizer_;
  kernels::RopeParams rope_;
  cudaStream_t stream_ = nullptr;
  kernels::PagedKvCache view_;
  uint8_t* arena_ = nullptr;
  uint16_t* sink_arena_ = nullptr;
  float* tensors_ = nullptr;   // key zero-point, range, LUTs
  double* inv_freq_ = nullptr;
  void* rope_steps_ = nullptr;  // kernels::LaunchRopeStepTable of inv_freq_
  void* rope_anchors_ = nullptr;  // kernels::LaunchRopeAnchorTable of inv_freq_
  int* overflow_ = nullptr;
  cudaEvent_t work_ = nullptr;
  uint64_t id_ = 0;
  int32_t* init_ids_ = nullptr;  // staging for AllocateBlocks' init kernel
  uint32_t* compact_scratch_ = nullptr;  // CompactKeyOutliersParams::kMaxBlocks block areas
  int init_ids_cap_ = 0;
  int64_t n_blocks_ = 0;
  int sink_slots_ = 0;
  int64_t sink_slot_bytes_ = 0;
  std::atomic<int64_t> overflow_count_{0};
  mutable std::mutex mu_;
  std::vector<int32_t> free_blocks_;
  std::vector<int32_t> refs_;
  std::vector<int> free_sinks_;
};

class GpuKvCache : public model::KvCache {
 public:
  // A block being filled gets its key-outlier lists packed every this many tokens and when full.
  static constexpr int kCompactEvery = 64;
  GpuKvCache(std::shared_ptr<GpuKvPool> pool, int n_heads, int64_t first_position = 0);
  ~GpuKvCache() override;

  // model::KvCache
  int64_t length() const override { return length_; }
  absl::Status Append(int layer, const float* k, const float* v, int n) override;
  void Commit(int n) override;
  void DiscardStaged() override;
  void Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
              float* lse) const override;
  // Device memory (on the pool's stream, synchronized before returning).
  bool device_memory() const override { return true; }
  absl::Status AttendDevice(int layer, const float* q, int n_q, const int64_t* key_end, float* o, float* lse,
                            model::DeviceOps& ops) const override;
  absl::Status AppendDevice(int layer, const float* k, const float* v, int n, model::DeviceOps& ops) override;
  int64_t bytes() const override;  // whole blocks (with the key-outlier reservation) + sink slot
  int64_t exact_bytes() const override;  // the canonical form's bytes (kvstore::KvBytes)
  std::unique_ptr<model::KvCache> Clone() const override;
  absl::StatusOr<std::string> Serialize() const override;
  // SYNTHETIC FILL (benchmarks): random k/v generated on the device for the first sink + 256
  // tokens (real quantization and outliers through the append kernel), ReplicateFirstBlock for
  // the whole blocks after them, random tokens again for the rest: exactly `tokens` tokens.
  absl::Status FillSynthetic(int n_layers, int kv_dim, int64_t tokens, uint64_t seed, float key_sigma) override;
  // Restores what Serialize (of a GPU or a CPU cache of the same format) wrote.
  static absl::StatusOr<std::unique_ptr<GpuKvCache>> Deserialize(std::shared_ptr<GpuKvPool> pool,
                                                                 int n_heads,
                                                                 const std::string& bytes);

  // Device-side API of the GPU forward pass.
  // Append with k, v already in device memory ([n][n_kv][hd] f32, pre-RoPE): what Append does
  // after its upload. Synthetic fills of long contexts use it directly.
  absl::Status AppendDevice(int layer, const float* k_dev, const float* v_dev, int n);
  // SYNTHETIC FILL for speed and capacity runs: with exactly one full block held (length() ==
  // sink_capacity() + 256), grows the cache to `tokens` (rounded down to whole blocks) by copying
  // that block's bytes into fresh blocks. Every block is valid (codes, scales, outliers of real
  // appended data), so attention reads real bytes at real addresses.
  absl::Status ReplicateFirstBlock(int64_t tokens);
  // Makes room for length() + n tokens (blocks and the sink slot), before a step writes anything.
  absl::Status Reserve(int n);
  int64_t first_position() const override { return first_position_; }
  int sink_capacity() const { return sink_cap_; }
  const std::vector<int32_t>& blocks() const { return blocks_; }
  const uint16_t* sink() const { return sink_slot_ >= 0 ? pool_->sink_slot(sink_slot_) : nullptr; }
  uint16_t* mutable_sink() { return sink_slot_ >= 0 ? pool_->sink_slot(sink_slot_) : nullptr; }
  GpuKvPool& pool() const { return *pool_; }
  // A step failed after writing: the cache can no longer be trusted (its staged tokens may have
  // left key-outlier entries behind). Every later use fails.
  bool poisoned() const { return poisoned_; }
  void MarkStaged(int n) { staged_ = n; }

 private:
  // Attend's rows through the decode kernel, one row per batch entry (device arrays).
  absl::Status AttendRows(int layer, int n_q, int max_len, int sms, const int32_t* table, const int32_t* lens,
                          const int64_t* firsts, const uint16_t* const* sinks, const float* q, float* o,
                          float* lse, GpuKvPool::ScratchLease* lease) const;
  // Attend takes the prefill kernels from this many rows of one chunk.
  static constexpr int kPrefillMinRows = 64;
  // AppendDevice with its small arrays from `lease` (Append's lease covers its upload too).
  absl::Status AppendDeviceLeased(GpuKvPool::ScratchLease* lease, int layer, const float* k_dev, const float* v_dev,
                                  int n);
  // AppendDeviceLeased, then the overflow flag's check (synchronizes the pool's stream).
  absl::Status AppendChecked(GpuKvPool::ScratchLease* lease, int layer, const float* k_dev, const float* v_dev, int n);
  // Attention with device q, o, lse (queued on the pool's stream); *any: some key was in range
  // (otherwise nothing was written).
  absl::Status AttendLeased(GpuKvPool::ScratchLease* lease, int layer, const float* q, int n_q,
                            const int64_t* key_end, float* o, float* lse, bool* any) const;
  std::shared_ptr<GpuKvPool> pool_;
  int n_heads_;
  int64_t first_position_;
  int sink_cap_;
  int64_t length_ = 0;
  int staged_ = 0;
  bool poisoned_ = false;
  std::vector<int32_t> blocks_;
  int sink_slot_ = -1;
};

// The engine's factory over a pool: caches are GpuKvCache; admission counts whole blocks.
std::unique_ptr<KvCacheFactory> MakeGpuKvCacheFactory(std::shared_ptr<GpuKvPool> pool, int n_heads);

// Device key-outlier reservation <-> canonical block bytes (kvstore::QuantizedKvCache::ExportBlock):
// the canonical form packs each (layer, head)'s entries densely in (layer, head) order, sorted by
// (token, channel), after the fixed section.
std::string CanonicalBlockFromDevice(const kvstore::BlockLayout& layout, int64_t block_stride,
                                     const uint8_t* device_block_bytes);
// A block holding `filled` tokens gets, per list, its entries plus the room the append kernel
// would give it for the rest of the block (exactly its entries when full, or when the area cannot
// give every list that room).
absl::Status DeviceBlockFromCanonical(const kvstore::BlockLayout& layout, int key_outlier_capacity,
                                      int header_words, const std::string& canonical,
                                      int64_t block_stride, int filled, std::vector<uint8_t>* out);

}  // namespace kvq::sharding
