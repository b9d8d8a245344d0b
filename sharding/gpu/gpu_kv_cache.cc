// GpuKvCache (sharding/gpu/gpu_kv_cache.h): one sequence's blocks in a GpuKvPool (gpu_kv_pool.cc)
// — the host-API append and attention (the GPU forward pass uses the device-side calls), the
// canonical <-> device block bytes of session files and clones, the synthetic fill, the factory.
#include "sharding/gpu/gpu_kv_cache.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "kernels/cuda_check.h"
#include "kernels/decode_attention.h"
#include "kernels/engine_ops.h"
#include "kernels/kv_append.h"
#include "kernels/prefill_attention.h"
#include "kvstore/kernel_geometry.h"
#include "kvstore/quantized_kv_cache.h"

namespace kvq::sharding {
namespace {

using kvstore::kBlockTokens;

uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
void Store32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

}  // namespace

class GpuKvPool::ScratchLease {
 public:
  explicit ScratchLease(const GpuKvPool& pool) : pool_(pool), lock_(pool.scratch_mu_) {
    for (ScratchChunk& c : pool_.scratch_) c.used = 0;
  }
  absl::StatusOr<void*> Get(size_t bytes) {
    bytes = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
    for (ScratchChunk& c : pool_.scratch_) {
      if (c.size - c.used >= bytes) {
        void* p = c.p + c.used;
        c.used += bytes;
        return p;
      }
    }
    ScratchChunk c;
    c.size = std::max<size_t>(bytes, size_t{4} << 20);
    KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&c.p, c.size));
    c.used = bytes;
    pool_.scratch_.push_back(c);
    return static_cast<void*>(c.p);
  }

 private:
  const GpuKvPool& pool_;
  std::lock_guard<std::mutex> lock_;
};

namespace {

// Temporary device buffer of the host-API paths: from the pool's scratch when given a lease (the
// per-step calls: Append, Attend), else its own cudaMalloc (session files, synthetic fills).
template <typename T>
class DeviceTemp {
 public:
  DeviceTemp() = default;
  explicit DeviceTemp(GpuKvPool::ScratchLease* lease) : lease_(lease) {}
  ~DeviceTemp() {
    if (p_ != nullptr && lease_ == nullptr) cudaFree(p_);
  }
  absl::Status Init(size_t n) {
    if (lease_ != nullptr) {
      KVQ_ASSIGN_OR_RETURN(void* p, lease_->Get(std::max<size_t>(n, 1) * sizeof(T)));
      p_ = static_cast<T*>(p);
      return absl::OkStatus();
    }
    KVQ_RETURN_IF_CUDA_ERROR(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)));
    return absl::OkStatus();
  }
  absl::Status Upload(const T* src, size_t n, cudaStream_t s) {
    KVQ_RETURN_IF_ERROR(Init(n));
    if (n > 0) KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(p_, src, n * sizeof(T), cudaMemcpyHostToDevice, s));
    return absl::OkStatus();
  }
  T* get() const { return p_; }

 private:
  GpuKvPool::ScratchLease* lease_ = nullptr;
  T* p_ = nullptr;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Canonical <-> device block bytes

std::string CanonicalBlockFromDevice(const kvstore::BlockLayout& layout, int64_t stride, const uint8_t* dev) {
  const uint32_t var_words = static_cast<uint32_t>((stride - layout.fixed_bytes) / 4);
  std::string out(reinterpret_cast<const char*>(dev), static_cast<size_t>(layout.fixed_bytes));
  if (!layout.has_key_outliers) return out;
  uint32_t first = 0;
  std::string entries;
  for (int l = 0; l < layout.n_layers; ++l) {
    for (int h = 0; h < layout.n_kv_heads; ++h) {
      uint8_t* dir = reinterpret_cast<uint8_t*>(out.data()) + layout.KeyOutlierDirAt(l, h);
      const uint32_t at = std::min(Load32(dir), var_words);
      const uint32_t count = std::min(Load32(dir + 4), var_words - at);
      std::vector<uint32_t> e(count);
      std::memcpy(e.data(), dev + layout.fixed_bytes + static_cast<int64_t>(at) * 4, count * 4);
      std::sort(e.begin(), e.end(), [](uint32_t a, uint32_t b) {
        return (a & 0xffffu) != (b & 0xffffu)
                   ? (kvstore::KeyOutlierToken(a) * 256 + kvstore::KeyOutlierChannel(a)) <
                         (kvstore::KeyOutlierToken(b) * 256 + kvstore::KeyOutlierChannel(b))
                   : a < b;
      });
      Store32(dir, first);
      Store32(dir + 4, count);
      first += count;
      entries.append(reinterpret_cast<const char*>(e.data()), e.size() * 4);
    }
  }
  return out + entries;
}

absl::Status DeviceBlockFromCanonical(const kvstore::BlockLayout& layout, int cap, int header,
                                      const std::string& canonical, int64_t stride, int filled,
                                      std::vector<uint8_t>* out) {
  out->assign(static_cast<size_t>(stride), 0);
  if (static_cast<int64_t>(canonical.size()) < layout.fixed_bytes) {
    return absl::DataLossError("block shorter than its fixed section");
  }
  std::memcpy(out->data(), canonical.data(), static_cast<size_t>(layout.fixed_bytes));
  if (!layout.has_key_outliers) return absl::OkStatus();
  const uint8_t* src = reinterpret_cast<const uint8_t*>(canonical.data());
  const int64_t n_entries = (static_cast<int64_t>(canonical.size()) - layout.fixed_bytes) / 4;
  uint8_t* var = out->data() + layout.fixed_bytes;
  const int64_t var_words = (stride - layout.fixed_bytes) / 4;
  const int lists = layout.n_layers * layout.n_kv_heads;
  auto dir_of = [&](int i) { return out->data() + layout.KeyOutlierDirAt(i / layout.n_kv_heads, i % layout.n_kv_heads); };
  int64_t total = 0, want_total = 0;
  for (int i = 0; i < lists; ++i) {
    const uint32_t first = Load32(dir_of(i)), count = Load32(dir_of(i) + 4);
    if (first + static_cast<int64_t>(count) > n_entries) return absl::DataLossError("key outlier directory out of range");
    if (header == 0 && count > static_cast<uint32_t>(cap)) {
      return absl::ResourceExhaustedError(absl::StrCat("a block holds ", count, " key outliers for layer ",
                                                       i / layout.n_kv_heads, " head ", i % layout.n_kv_heads,
                                                       ", more than the pool reserves (", cap, ")"));
    }
    total += count;
    want_total += kernels::PagedKvCache::KeyOutlierListWant(count, filled, kBlockTokens - filled, cap);
  }
  if (header > 0 && header + total > var_words) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "a block holds ", total, " key outliers, more than the GPU pool's area per block (", var_words - header,
        "); raise GpuKvOptions::key_outlier_reserve"));
  }
  const bool tight = header + want_total > var_words;
  int64_t at_next = header;
  for (int i = 0; i < lists; ++i) {
    uint8_t* dir = dir_of(i);
    const uint32_t first = Load32(dir), count = Load32(dir + 4);
    int64_t at = static_cast<int64_t>(i) * cap;  // fixed reservations
    if (header > 0) {
      const uint32_t list_cap =
          tight ? count : kernels::PagedKvCache::KeyOutlierListWant(count, filled, kBlockTokens - filled, cap);
      at = at_next;
      at_next += list_cap;
      Store32(var + (1 + i) * 4, list_cap);
    }
    std::memcpy(var + at * 4, src + layout.fixed_bytes + static_cast<int64_t>(first) * 4, count * 4);
    Store32(dir, static_cast<uint32_t>(at));
  }
  if (header > 0) Store32(var, static_cast<uint32_t>(at_next));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// GpuKvCache

GpuKvCache::GpuKvCache(std::shared_ptr<GpuKvPool> pool, int n_heads, int64_t first_position)
    : pool_(std::move(pool)), n_heads_(n_heads), first_position_(first_position),
      sink_cap_(pool_->SinkCapacity(first_position)) {}

GpuKvCache::~GpuKvCache() {
  pool_->ReleaseBlocks(blocks_);
  if (sink_slot_ >= 0) pool_->ReleaseSinkSlot(sink_slot_);
}

absl::Status GpuKvCache::Reserve(int n) {
  if (poisoned_) return absl::InternalError("KV cache is unusable after a failed GPU step");
  const int64_t tokens = length_ + n;
  const int64_t in_blocks = std::max<int64_t>(0, tokens - sink_cap_);
  const int64_t need = (in_blocks + kBlockTokens - 1) / kBlockTokens;
  const bool need_sink = sink_cap_ > 0 && sink_slot_ < 0 && tokens > 0;
  std::vector<int32_t> fresh;
  if (need > static_cast<int64_t>(blocks_.size())) {
    KVQ_RETURN_IF_ERROR(pool_->AllocateBlocks(static_cast<int>(need - blocks_.size()), &fresh));
  }
  if (need_sink) {
    auto slot = pool_->AllocateSinkSlot();
    if (!slot.ok()) {
      pool_->ReleaseBlocks(fresh);
      return slot.status();
    }
    sink_slot_ = *slot;
  }
  blocks_.insert(blocks_.end(), fresh.begin(), fresh.end());
  return absl::OkStatus();
}

absl::Status GpuKvCache::Append(int layer, const float* k, const float* v, int n) {
  cudaStream_t s = pool_->stream();
  const int64_t L = pool_->shape().ElementsPerTokenPerLayer();
  GpuKvPool::ScratchLease lease(*pool_);
  DeviceTemp<float> dk(&lease), dv(&lease);
  KVQ_RETURN_IF_ERROR(dk.Upload(k, static_cast<size_t>(n) * L, s));
  KVQ_RETURN_IF_ERROR(dv.Upload(v, static_cast<size_t>(n) * L, s));
  return AppendChecked(&lease, layer, dk.get(), dv.get(), n);
}

absl::Status GpuKvCache::AppendDevice(int layer, const float* k, const float* v, int n, model::DeviceOps&) {
  GpuKvPool::ScratchLease lease(*pool_);
  return AppendChecked(&lease, layer, k, v, n);
}

absl::Status GpuKvCache::AppendChecked(GpuKvPool::ScratchLease* lease, int layer, const float* k_dev,
                                       const float* v_dev, int n) {
  cudaStream_t s = pool_->stream();
  KVQ_RETURN_IF_ERROR(AppendDeviceLeased(lease, layer, k_dev, v_dev, n));
  // Callers of the host API and of AppendDevice (worker ranks' shards, rank 0's shards of sharded
  // sequences) have no GPU step that reads the append kernels' overflow flag: read it here.
  int overflowed = 0;
  KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(&overflowed, pool_->overflow_flag(), sizeof(int), cudaMemcpyDeviceToHost, s));
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s));
  if (overflowed != 0) {
    const int64_t steps = pool_->CountOverflow();
    std::fprintf(stderr,
                 "[kvq] warning: a block's key-outlier area was used up (%lld appends so far, shard at position "
                 "%lld, layer %d); the extra outliers were clamped. Raise --key_outlier_reserve.\n",
                 static_cast<long long>(steps), static_cast<long long>(first_position_), layer);
  }
  return absl::OkStatus();
}

absl::Status GpuKvCache::AppendDevice(int layer, const float* k_dev, const float* v_dev, int n) {
  GpuKvPool::ScratchLease lease(*pool_);
  return AppendDeviceLeased(&lease, layer, k_dev, v_dev, n);
}

absl::Status GpuKvCache::AppendDeviceLeased(GpuKvPool::ScratchLease* lease, int layer, const float* k_dev,
                                            const float* v_dev, int n) {
  if (layer == 0) KVQ_RETURN_IF_ERROR(Reserve(n));
  cudaStream_t s = pool_->stream();
  DeviceTemp<int32_t> table(lease), lens(lease);
  DeviceTemp<int64_t> first(lease);
  DeviceTemp<uint16_t*> sinks(lease);
  KVQ_RETURN_IF_ERROR(table.Upload(blocks_.data(), blocks_.size(), s));
  const int32_t len = static_cast<int32_t>(length_);
  KVQ_RETURN_IF_ERROR(lens.Upload(&len, 1, s));
  KVQ_RETURN_IF_ERROR(first.Upload(&first_position_, 1, s));
  uint16_t* sp = mutable_sink();
  KVQ_RETURN_IF_ERROR(sinks.Upload(&sp, 1, s));
  kernels::KvAppendParams ap;
  ap.kv = pool_->view();
  ap.kv.block_table = table.get();
  ap.kv.max_blocks_per_seq = std::max<int>(1, static_cast<int>(blocks_.size()));
  ap.kv.seq_lens = lens.get();
  ap.kv.first_positions = first.get();
  ap.kv.sink = reinterpret_cast<const uint16_t* const*>(sinks.get());
  ap.pool = const_cast<uint8_t*>(ap.kv.pool);
  ap.sink = sinks.get();
  ap.layer = layer;
  ap.batch = 1;
  ap.n_new = n;
  ap.k = k_dev;
  ap.v = v_dev;
  ap.overflow = pool_->overflow_flag();
  KVQ_RETURN_IF_ERROR(kernels::LaunchKvAppend(ap, s));
  // The temporaries are freed on return: wait for the kernel that reads them.
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s));
  staged_ = n;
  return absl::OkStatus();
}

absl::Status GpuKvCache::FillSynthetic(int n_layers, int kv_dim, int64_t tokens, uint64_t seed, float key_sigma) {
  if (length_ != 0 || staged_ != 0) return absl::FailedPreconditionError("a synthetic fill needs an empty cache");
  if (tokens < 0) return absl::InvalidArgumentError(absl::StrCat("cannot fill ", tokens, " tokens"));
  cudaStream_t s = pool_->stream();
  auto append_random = [&](int64_t n, uint64_t stream_id) -> absl::Status {
    if (n <= 0) return absl::OkStatus();
    DeviceTemp<float> k, v;
    KVQ_RETURN_IF_ERROR(k.Init(static_cast<size_t>(n) * kv_dim));
    KVQ_RETURN_IF_ERROR(v.Init(static_cast<size_t>(n) * kv_dim));
    for (int l = 0; l < n_layers; ++l) {
      const uint64_t base = (seed * 7919 + stream_id) * 4099 + static_cast<uint64_t>(l) * 2;
      KVQ_RETURN_IF_ERROR(kernels::LaunchFillNormal(n * kv_dim, base, 0.0f, key_sigma, k.get(), kernels::DType::kF32, s));
      KVQ_RETURN_IF_ERROR(kernels::LaunchFillNormal(n * kv_dim, base + 1, 0.0f, 1.0f, v.get(), kernels::DType::kF32, s));
      absl::Status st = AppendDevice(l, k.get(), v.get(), static_cast<int>(n));
      if (!st.ok()) {
        DiscardStaged();
        return st;
      }
    }
    Commit(static_cast<int>(n));
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s));
    return absl::OkStatus();
  };
  const int64_t first = sink_cap_ + kBlockTokens;
  if (tokens < first) return append_random(tokens, 0);
  KVQ_RETURN_IF_ERROR(append_random(first, 0));
  KVQ_RETURN_IF_ERROR(ReplicateFirstBlock(tokens));  // whole blocks
  return append_random(tokens - length_, 1);
}

absl::Status GpuKvCache::ReplicateFirstBlock(int64_t tokens) {
  if (length_ != sink_cap_ + kBlockTokens || staged_ != 0) {
    return absl::FailedPreconditionError("ReplicateFirstBlock needs exactly one full block and no open step");
  }
  const int64_t blocks = std::max<int64_t>(1, (tokens - sink_cap_) / kBlockTokens);
  std::vector<int32_t> fresh;
  if (blocks > 1) KVQ_RETURN_IF_ERROR(pool_->AllocateBlocks(static_cast<int>(blocks - 1), &fresh));
  const int64_t B = pool_->block_bytes();
  uint8_t* base = const_cast<uint8_t*>(pool_->view().pool);
  for (int32_t id : fresh) {
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(base + id * B, base + blocks_[0] * B, B, cudaMemcpyDeviceToDevice,
                                             pool_->stream()));
  }
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(pool_->stream()));
  blocks_.resize(1);
  blocks_.insert(blocks_.end(), fresh.begin(), fresh.end());
  length_ = sink_cap_ + blocks * kBlockTokens;
  return absl::OkStatus();
}

void GpuKvCache::Commit(int n) {
  // Blocks that filled up, or passed another quarter while being decoded into, get their
  // key-outlier lists packed (the space of lists that moved comes back).
  const int64_t before = std::max<int64_t>(0, length_ - sink_cap_), after = std::max<int64_t>(0, length_ + n - sink_cap_);
  std::vector<int32_t> ids;
  std::vector<int> filled;
  for (int64_t b = before / kBlockTokens; b * kBlockTokens < after && b < static_cast<int64_t>(blocks_.size()); ++b) {
    const int64_t f0 = std::clamp<int64_t>(before - b * kBlockTokens, 0, kBlockTokens);
    const int64_t f1 = std::clamp<int64_t>(after - b * kBlockTokens, 0, kBlockTokens);
    if (f1 / kCompactEvery > f0 / kCompactEvery) {
      ids.push_back(blocks_[b]);
      filled.push_back(static_cast<int>(f1));
    }
  }
  if (!ids.empty()) {
    const absl::Status s = pool_->CompactBlocks(ids, filled);
    if (!s.ok()) {
      std::fprintf(stderr, "[kvq] key-outlier compaction failed: %s\n", std::string(s.message()).c_str());
      poisoned_ = true;
    }
  }
  length_ += n;
  staged_ = 0;
}

void GpuKvCache::DiscardStaged() {
  if (staged_ > 0) poisoned_ = true;
  staged_ = 0;
}

void GpuKvCache::Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
                        float* lse) const {
  const int hd = pool_->shape().head_dim;
  const size_t qn = static_cast<size_t>(n_q) * n_heads_ * hd, ln = static_cast<size_t>(n_q) * n_heads_;
  std::fill(o, o + qn, 0.0f);
  std::fill(lse, lse + ln, -INFINITY);
  cudaStream_t s = pool_->stream();
  GpuKvPool::ScratchLease lease(*pool_);
  DeviceTemp<float> dq(&lease), dout(&lease), dlse(&lease);
  absl::Status st = dq.Upload(q, qn, s);
  if (st.ok()) st = dout.Init(qn);
  if (st.ok()) st = dlse.Init(ln);
  bool any = false;
  if (st.ok()) st = AttendLeased(&lease, layer, dq.get(), n_q, key_end, dout.get(), dlse.get(), &any);
  if (st.ok() && any && cudaMemcpyAsync(o, dout.get(), qn * 4, cudaMemcpyDeviceToHost, s) != cudaSuccess) {
    st = absl::InternalError("copy of o");
  }
  if (st.ok() && any && cudaMemcpyAsync(lse, dlse.get(), ln * 4, cudaMemcpyDeviceToHost, s) != cudaSuccess) {
    st = absl::InternalError("copy of lse");
  }
  if (st.ok() && cudaStreamSynchronize(s) != cudaSuccess) st = absl::InternalError("attention failed");
  if (!st.ok()) {
    std::fprintf(stderr, "[kvq] GpuKvCache::Attend failed: %s\n", std::string(st.message()).c_str());
    std::fill(o, o + qn, 0.0f);
    std::fill(lse, lse + ln, -INFINITY);
  }
}

absl::Status GpuKvCache::AttendDevice(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
                                      float* lse, model::DeviceOps&) const {
  GpuKvPool::ScratchLease lease(*pool_);
  bool any = false;
  KVQ_RETURN_IF_ERROR(AttendLeased(&lease, layer, q, n_q, key_end, o, lse, &any));
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(pool_->stream()));
  return absl::OkStatus();
}

absl::Status GpuKvCache::AttendLeased(GpuKvPool::ScratchLease* lease_p, int layer, const float* q, int n_q,
                                      const int64_t* key_end, float* o, float* lse, bool* any) const {
  GpuKvPool::ScratchLease& lease = *lease_p;
  const int hd = pool_->shape().head_dim;
  cudaStream_t s = pool_->stream();
  std::vector<int32_t> lens(n_q);
  int max_len = 0;
  for (int i = 0; i < n_q; ++i) {
    lens[i] = static_cast<int32_t>(std::clamp<int64_t>(key_end[i], 0, length_ + staged_));
    max_len = std::max(max_len, lens[i]);
  }
  *any = max_len > 0;
  if (max_len == 0) return absl::OkStatus();  // no key in range: the caller's -inf stands
  std::vector<int64_t> firsts(n_q, first_position_);
  std::vector<const uint16_t*> sinks(n_q, sink());
  DeviceTemp<int32_t> table(&lease), dlens(&lease);
  DeviceTemp<int64_t> dfirst(&lease);
  DeviceTemp<const uint16_t*> dsinks(&lease);
  KVQ_RETURN_IF_ERROR(table.Upload(blocks_.data(), blocks_.size(), s));
  KVQ_RETURN_IF_ERROR(dlens.Upload(lens.data(), lens.size(), s));
  KVQ_RETURN_IF_ERROR(dfirst.Upload(firsts.data(), firsts.size(), s));
  KVQ_RETURN_IF_ERROR(dsinks.Upload(sinks.data(), sinks.size(), s));
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  // The rows of a prefill chunk (consecutive causal ends, or one end for all: a shard before the
  // chunk) go through the prefill kernels, which read the past once per 64-128 rows instead of
  // once per row (kernels/prefill_attention.h; what the engine's own prefill does, fp16 P
  // included). Other patterns (a chunk that starts inside this shard's range) take the decode
  // kernel per row.
  bool causal = n_q >= kPrefillMinRows && (hd == 64 || hd == 128), flat = causal;
  for (int i = 1; i < n_q && (causal || flat); ++i) {
    causal = causal && lens[i] == lens[0] + i;
    flat = flat && lens[i] == lens[0];
  }
  if (causal || flat) {
    const int nkv = pool_->shape().n_kv_heads;
    kernels::PrefillPastParams pp;
    pp.plan = kernels::PlanPrefillPast(n_q, n_heads_, nkv, hd, max_len, sms, kernels::kPrefillExpandBudgetBytes,
                                       kernels::kPrefillPartialBudgetBytes);
    DeviceTemp<int32_t> seq_len(&lease);
    DeviceTemp<uint16_t> xk(&lease), xv(&lease);
    DeviceTemp<float> part_o(&lease), part_lse(&lease);
    const int32_t one_len = max_len;
    KVQ_RETURN_IF_ERROR(seq_len.Upload(&one_len, 1, s));
    KVQ_RETURN_IF_ERROR(xk.Init(pp.plan.expand_bytes / 2));
    KVQ_RETURN_IF_ERROR(xv.Init(pp.plan.expand_bytes / 2));
    if (pp.plan.partial_bytes > 0) {
      KVQ_RETURN_IF_ERROR(part_o.Init(pp.plan.partial_bytes / 4));
      KVQ_RETURN_IF_ERROR(part_lse.Init(pp.plan.partial_bytes / 4 / hd + 1));
    }
    pp.kv = pool_->view();
    pp.kv.block_table = table.get();
    pp.kv.max_blocks_per_seq = std::max<int>(1, static_cast<int>(blocks_.size()));
    pp.kv.seq_lens = seq_len.get();
    pp.kv.first_positions = dfirst.get();
    pp.kv.sink = dsinks.get();
    pp.layer = layer;
    pp.seq = 0;
    pp.n_keys = max_len;
    pp.rows = n_q;
    pp.n_heads = n_heads_;
    pp.q = q;
    pp.limit_base = lens[0];
    pp.causal = causal && n_q > 1;
    pp.o = o;
    pp.lse = lse;
    pp.xk = xk.get();
    pp.xv = xv.get();
    pp.part_o = pp.plan.partial_bytes > 0 ? part_o.get() : nullptr;
    pp.part_lse = pp.plan.partial_bytes > 0 ? part_lse.get() : nullptr;
    return kernels::LaunchPrefillPast(pp, s);
  }
  return AttendRows(layer, n_q, max_len, sms, table.get(), dlens.get(), dfirst.get(), dsinks.get(), q, o, lse,
                    &lease);
}

absl::Status GpuKvCache::AttendRows(int layer, int n_q, int max_len, int sms, const int32_t* table,
                                    const int32_t* lens, const int64_t* firsts, const uint16_t* const* sinks,
                                    const float* q, float* o, float* lse, GpuKvPool::ScratchLease* lease) const {
  const int hd = pool_->shape().head_dim;
  kernels::DecodeAttentionParams p;
  p.kv = pool_->view();
  p.kv.block_table = table;
  p.kv.max_blocks_per_seq = std::max<int>(1, static_cast<int>(blocks_.size()));
  p.kv.block_table_stride = 0;  // every query row reads this sequence's table
  p.kv.seq_lens = lens;
  p.kv.first_positions = firsts;
  p.kv.sink = sinks;
  p.layer = layer;
  p.batch = n_q;
  p.n_heads = n_heads_;
  p.q = q;
  p.o = o;
  p.lse = lse;
  p.max_seq_len = max_len;
  p.num_splits = kernels::ChooseDecodeSplits(n_q, pool_->shape().n_kv_heads, max_len, pool_->view().codec, sms,
                                             pool_->shape().head_dim);
  p.workspace_bytes = kernels::DecodeAttentionWorkspaceBytes(n_q, n_heads_, hd, p.num_splits);
  DeviceTemp<uint8_t> ws(lease);
  KVQ_RETURN_IF_ERROR(ws.Init(p.workspace_bytes));
  p.workspace = ws.get();
  return kernels::LaunchDecodeAttention(p, pool_->stream());
}

int64_t GpuKvCache::bytes() const {
  return static_cast<int64_t>(blocks_.size()) * pool_->block_bytes() +
         (sink_slot_ >= 0 ? pool_->sink_slot_bytes() : 0);
}

int64_t GpuKvCache::exact_bytes() const {
  auto ser = Serialize();
  if (!ser.ok()) return bytes();
  auto cpu = kvstore::QuantizedKvCache::Deserialize(*ser, pool_->quantizer(), pool_->rope());
  return cpu.ok() ? (*cpu)->Bytes().total_bytes : bytes();
}

std::unique_ptr<model::KvCache> GpuKvCache::Clone() const {
  auto c = std::make_unique<GpuKvCache>(pool_, n_heads_, first_position_);
  if (poisoned_ || staged_ != 0) return nullptr;
  c->length_ = length_;
  const int64_t in_blocks = std::max<int64_t>(0, length_ - sink_cap_);
  const int64_t used = (in_blocks + kBlockTokens - 1) / kBlockTokens;
  const bool partial = in_blocks % kBlockTokens != 0;
  std::vector<int32_t> shared(blocks_.begin(), blocks_.begin() + (used - (partial ? 1 : 0)));
  pool_->RetainBlocks(shared);
  c->blocks_ = shared;
  cudaStream_t s = pool_->stream();
  if (partial) {
    std::vector<int32_t> fresh;
    if (!pool_->AllocateBlocks(1, &fresh).ok()) return nullptr;  // c releases what it holds
    c->blocks_.push_back(fresh[0]);
    const int64_t B = pool_->block_bytes();
    uint8_t* base = const_cast<uint8_t*>(pool_->view().pool);
    if (cudaMemcpyAsync(base + fresh[0] * B, base + blocks_[used - 1] * B, B, cudaMemcpyDeviceToDevice, s) !=
        cudaSuccess) {
      return nullptr;
    }
  }
  if (sink_slot_ >= 0) {
    auto slot = pool_->AllocateSinkSlot();
    if (!slot.ok()) return nullptr;
    c->sink_slot_ = *slot;
    if (cudaMemcpyAsync(c->mutable_sink(), sink(), pool_->sink_slot_bytes(), cudaMemcpyDeviceToDevice, s) !=
        cudaSuccess) {
      return nullptr;
    }
  }
  if (!pool_->RecordWork().ok()) return nullptr;
  return c;
}

absl::StatusOr<std::string> GpuKvCache::Serialize() const {
  if (poisoned_) return absl::InternalError("KV cache is unusable after a failed GPU step");
  if (staged_ != 0) return absl::FailedPreconditionError("Serialize during an open step");
  cudaStream_t s = pool_->stream();
  KVQ_RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(s));
  const int64_t in_blocks = std::max<int64_t>(0, length_ - sink_cap_);
  const int64_t used = (in_blocks + kBlockTokens - 1) / kBlockTokens;
  const int64_t B = pool_->block_bytes();
  std::vector<std::string> blocks;
  std::vector<uint8_t> buf(static_cast<size_t>(B));
  for (int64_t b = 0; b < used; ++b) {
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(buf.data(), pool_->view().pool + blocks_[b] * B, B, cudaMemcpyDeviceToHost));
    blocks.push_back(CanonicalBlockFromDevice(pool_->layout(), B, buf.data()));
  }
  const kvstore::KvShape& sh = pool_->shape();
  const size_t half_n = static_cast<size_t>(sh.n_layers) * sink_cap_ * sh.ElementsPerTokenPerLayer();
  std::vector<uint16_t> sk(half_n, 0), sv(half_n, 0);
  if (sink_slot_ >= 0 && half_n > 0) {
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(sk.data(), sink(), half_n * 2, cudaMemcpyDeviceToHost));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(sv.data(), sink() + half_n, half_n * 2, cudaMemcpyDeviceToHost));
  }
  return kvstore::QuantizedKvCache::SerializeParts(pool_->format(), sh, first_position_, length_, sink_cap_,
                                                   sk, sv, blocks);
}

absl::StatusOr<std::unique_ptr<GpuKvCache>> GpuKvCache::Deserialize(std::shared_ptr<GpuKvPool> pool,
                                                                    int n_heads,
                                                                    const std::string& bytes) {
  KVQ_ASSIGN_OR_RETURN(auto cpu, kvstore::QuantizedKvCache::Deserialize(bytes, pool->quantizer(), pool->rope()));
  if (!(cpu->format() == pool->format()) || !(cpu->shape() == pool->shape())) {
    return absl::InvalidArgumentError(absl::StrCat("saved KV is ", cpu->format().ToString(),
                                                   ", this GPU pool holds ", pool->format().ToString()));
  }
  auto c = std::make_unique<GpuKvCache>(pool, n_heads, cpu->first_position());
  KVQ_RETURN_IF_ERROR(c->Reserve(static_cast<int>(cpu->length())));
  const int64_t B = pool->block_bytes();
  std::vector<uint8_t> buf;
  for (int64_t b = 0; b < cpu->num_blocks(); ++b) {
    const int filled = static_cast<int>(std::min<int64_t>(kBlockTokens, cpu->length() - c->sink_cap_ - b * kBlockTokens));
    KVQ_RETURN_IF_ERROR(DeviceBlockFromCanonical(pool->layout(), pool->key_outlier_capacity(),
                                                 pool->view().key_outlier_header_words, cpu->ExportBlock(b), B,
                                                 filled, &buf));
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(const_cast<uint8_t*>(pool->view().pool) + c->blocks_[b] * B, buf.data(), B,
                                        cudaMemcpyHostToDevice));
  }
  const int cap = c->sink_cap_;
  const int64_t have = std::min<int64_t>(cap, cpu->length());
  if (have > 0) {
    const kvstore::KvShape& sh = pool->shape();
    const int64_t L = sh.ElementsPerTokenPerLayer();
    std::vector<uint16_t> sink(static_cast<size_t>(sh.n_layers) * cap * L * 2, 0);
    for (int l = 0; l < sh.n_layers; ++l) {
      std::vector<float> k, v;
      KVQ_RETURN_IF_ERROR(cpu->ReadBack(l, 0, have, &k, &v));
      for (int64_t i = 0; i < have * L; ++i) {
        sink[static_cast<size_t>(l) * cap * L + i] = FloatToHalfBits(k[i]);
        sink[(static_cast<size_t>(sh.n_layers) * cap + static_cast<size_t>(l) * cap) * L + i] = FloatToHalfBits(v[i]);
      }
    }
    KVQ_RETURN_IF_CUDA_ERROR(cudaMemcpy(c->mutable_sink(), sink.data(), sink.size() * 2, cudaMemcpyHostToDevice));
  }
  c->length_ = cpu->length();
  return c;
}

// ---------------------------------------------------------------------------------------------
// Factory

namespace {

class GpuFactory : public KvCacheFactory {
 public:
  GpuFactory(std::shared_ptr<GpuKvPool> pool, int n_heads)
      : pool_(std::move(pool)), n_heads_(n_heads), name_(pool_->format().ToString()) {}
  absl::StatusOr<std::unique_ptr<model::KvCache>> Make(int64_t offset) const override {
    return std::unique_ptr<model::KvCache>(new GpuKvCache(pool_, n_heads_, offset));
  }
  absl::StatusOr<std::unique_ptr<model::KvCache>> Deserialize(const std::string& b) const override {
    KVQ_ASSIGN_OR_RETURN(auto c, GpuKvCache::Deserialize(pool_, n_heads_, b));
    return std::unique_ptr<model::KvCache>(std::move(c));
  }
  double BytesPerToken() const override {
    return static_cast<double>(pool_->block_bytes()) / kBlockTokens;
  }
  int64_t BytesForTokens(int64_t tokens) const override {
    const int64_t in_blocks = std::max<int64_t>(0, tokens - pool_->SinkCapacity(0));
    return (in_blocks + kBlockTokens - 1) / kBlockTokens * pool_->block_bytes();
  }
  double EffectiveBitsPerElement() const override {
    const kvstore::KvShape& s = pool_->shape();
    return 8.0 * BytesPerToken() / (2.0 * s.n_layers * s.ElementsPerTokenPerLayer());
  }
  double OutlierFraction() const override { return pool_->format().outlier_fraction; }
  const std::string& format() const override { return name_; }

 private:
  std::shared_ptr<GpuKvPool> pool_;
  int n_heads_;
  std::string name_;
};

}  // namespace

std::unique_ptr<KvCacheFactory> MakeGpuKvCacheFactory(std::shared_ptr<GpuKvPool> pool, int n_heads) {
  return std::make_unique<GpuFactory>(std::move(pool), n_heads);
}

}  // namespace kvq::sharding
