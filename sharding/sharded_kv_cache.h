// One sequence's KV cache spread by sequence range over ranks (DESIGN.md, "Sharding"), as a
// model::KvCache on rank 0, so model::Forward and the engine drive it like any other cache.
//
//   Append(layer, k, v, n)  the new tokens sit at positions [length(), length() + n); each slice
//                           goes to the rank that owns those positions (a chunk may straddle two
//                           or more ranks). Rank 0's own shard is a plain local cache.
//   Attend(layer, q, ...)   q and each query's key_end, clamped to the shard, go to every rank
//                           holding tokens in range; each attends with its local cache (made by
//                           the same KvCacheFactory at position_offset = its first position, so
//                           RoPE and the sink are the whole sequence's) and returns (o, lse); rank
//                           0 merges them in rank order with model::MergeAttentionPartial.
//   Commit / DiscardStaged  go to the ranks that staged tokens this step.
//   Clone                   forks every shard on its rank (between steps only, as for any cache).
//   Serialize               gathers every shard's own serialized bytes into one framed blob (see
//                           SplitShardedBlob); restoring a sharded session is not supported: the
//                           engine keeps sessions on one rank.
//
// Errors: KvCache::Attend, Commit and DiscardStaged return nothing, so a failure there (a worker
// that answers with an error, a transport that times out or sees a rank gone) is kept in status()
// and returned by the next Append of any layer. Workers do not answer appends: a worker's failed
// append is the error of that cache's next command with a reply (attention, commit, discard), so
// it too ends the step in status(). In serving mode Forward attends each layer before
// appending it, so a failed step always ends with that Status (and Forward discards the staged
// tokens). After a transport failure every call fails at once: the job must end (MpiTransport::
// Abort). The last range is open-ended: decode appends go to its rank.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/forward.h"
#include "sharding/device_data_plane.h"
#include "sharding/kv_cache_factory.h"
#include "sharding/mpi_transport.h"
#include "sharding/shard_planner.h"

namespace kvq::sharding {

class ShardedKvCache;

// Rank 0's side of one KV format over all ranks: registers the format with every worker (each
// builds the same KvCacheFactory from the model shape, without weights) and makes sharded caches.
// Must outlive the caches it makes. Calls from one thread at a time (the engine's scheduler).
class ShardedKvCacheFactory {
 public:
  // local: the factory of rank 0's own shards (e.g. the GPU engine's pool); null: one made here
  // from the format (CPU reference caches).
  static absl::StatusOr<std::unique_ptr<ShardedKvCacheFactory>> Create(
      Transport* transport, const model::ModelConfig& config, const std::string& format,
      const std::string& quantizer_path, const std::string& fingerprint, ShardPlanner planner,
      std::shared_ptr<const KvCacheFactory> local = nullptr);

  // A cache for a sequence that will hold up to `max_tokens` tokens, laid out by the planner.
  absl::StatusOr<std::unique_ptr<model::KvCache>> Make(int64_t max_tokens) const;
  // A cache with explicit ranges: contiguous from 0, one per rank; the last one is open-ended.
  absl::StatusOr<std::unique_ptr<ShardedKvCache>> MakeWithRanges(std::vector<ShardRange> ranges) const;

  // Caches made from now on move q, new k/v and partials between device buffers over `plane` when
  // driven through their device-memory forms (null: through the host, in the commands). Every
  // worker must serve the plane's commands (ServeWorker with a WorkerDevice); outlives the caches.
  void set_data_plane(DeviceDataPlane* plane) { plane_ = plane; }
  DeviceDataPlane* data_plane() const { return plane_; }
  const KvCacheFactory& local() const { return *local_; }
  const ShardPlanner& planner() const { return planner_; }
  Transport* transport() const { return transport_; }

 private:
  ShardedKvCacheFactory(Transport* t, const model::ModelConfig& c, uint32_t id,
                        std::shared_ptr<const KvCacheFactory> local, ShardPlanner planner);
  Transport* transport_;
  model::ModelConfig config_;
  uint32_t id_;
  std::shared_ptr<const KvCacheFactory> local_;
  ShardPlanner planner_;
  DeviceDataPlane* plane_ = nullptr;
};

class ShardedKvCache : public model::KvCache {
 public:
  ~ShardedKvCache() override;
  int64_t length() const override { return length_; }
  absl::Status Append(int layer, const float* k, const float* v, int n) override;
  void Commit(int n) override;
  void DiscardStaged() override;
  void Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
              float* lse) const override;
  // The same with device memory when rank 0's shards work on it (GPU shards): q, k and v reach the
  // host only for the slices and queries the workers need, rank 0's own shard attends and appends
  // on its GPU, and the workers' partials are merged there with its own (DeviceOps::MergeParts).
  bool device_memory() const override;
  absl::Status AttendDevice(int layer, const float* q, int n_q, const int64_t* key_end, float* o, float* lse,
                            model::DeviceOps& ops) const override;
  absl::Status AppendDevice(int layer, const float* k, const float* v, int n, model::DeviceOps& ops) override;
  // Rank 0's shard exactly; the workers' as of their last commit.
  int64_t bytes() const override;
  std::unique_ptr<model::KvCache> Clone() const override;
  absl::StatusOr<std::string> Serialize() const override;
  // Benchmarks: every shard fills its part of [0, tokens) (KvCache::FillSynthetic; shard i's
  // random stream is seeded with seed + i), the workers in parallel with rank 0.
  absl::Status FillSynthetic(int n_layers, int kv_dim, int64_t tokens, uint64_t seed, float key_sigma) override;

  // OK, or the first failure of an operation that could not return it.
  absl::Status status() const { return error_; }
  // The ranges (the last one's end is the sequence's committed length).
  std::vector<ShardRange> ranges() const;
  // Committed tokens held by each range, in order.
  std::vector<int64_t> shard_lengths() const;

 private:
  friend class ShardedKvCacheFactory;
  struct Shard {
    ShardRange range;                      // range.end == kOpenEnd for the tail
    uint64_t id = 0;                       // the cache's id on a worker
    std::unique_ptr<model::KvCache> local; // rank 0's shard
    int64_t length = 0;                    // committed
    int staged = 0;                        // appended in the open step
    int64_t bytes = 0;                     // workers: as of the last commit
  };
  static constexpr int64_t kOpenEnd = INT64_MAX;

  ShardedKvCache(Transport* t, const model::ModelConfig& c) : t_(t), config_(c) {}
  // Records the first failure (mutable: Attend is const).
  void Fail(const absl::Status& s) const {
    if (error_.ok() && !s.ok()) error_ = s;
  }
  // Waits for a reply from `rank` and checks its status; leaves `payload` at its data.
  absl::Status Reply(int rank, std::string* payload) const;
  // A worker's {length, bytes} reply to a command (`what`) after which its shard should hold
  // `expected` tokens; an error when it does not.
  absl::Status ReceiveLength(const Shard& s, int64_t expected, const char* what, int64_t* length,
                             int64_t* bytes) const;
  // Append's routing, for host (`ops` null) or device k and v.
  absl::Status AppendImpl(int layer, const float* k, const float* v, int n, model::DeviceOps* ops);
  // Each query's end inside every shard (staged tokens of this step included); active[i]: shard i
  // holds keys for some query.
  void ShardEnds(int n_q, const int64_t* key_end, std::vector<std::vector<int64_t>>* local_end,
                 std::vector<bool>* active) const;
  // The attention command to the active worker shards, appending their indices to `sent`: kAttend
  // with q (host) inside, or (q_on_plane) kAttendDevice with q (device) sent over the data plane
  // and issued.
  absl::Status SendAttend(int layer, const float* q, bool q_on_plane, int n_q,
                          const std::vector<std::vector<int64_t>>& local_end, const std::vector<bool>& active,
                          std::vector<size_t>* sent) const;
  // A worker's (o, lse) reply into o, lse (host arrays of o_size and lse_size floats).
  absl::Status ReceivePartial(size_t shard, size_t o_size, size_t lse_size, float* o, float* lse) const;

  Transport* t_;
  model::ModelConfig config_;
  DeviceDataPlane* plane_ = nullptr;  // the factory's, when set
  std::vector<Shard> shards_;
  int64_t length_ = 0;
  mutable absl::Status error_;
};

// Where ShardedKvCache::Attend spends its time, summed over calls (process-wide, relaxed atomics;
// benchmarks report the per-layer averages): the send of q, rank 0's own shard, the wait for the
// workers' partials after that, and the merge.
struct ShardedAttendTiming {
  int64_t calls = 0;
  double send_s = 0, local_s = 0, wait_s = 0, merge_s = 0;
};
ShardedAttendTiming GetShardedAttendTiming();
void ResetShardedAttendTiming();

// The shard blobs inside a ShardedKvCache::Serialize result, in range order.
struct ShardBlob {
  ShardRange range;
  std::string bytes;  // the shard cache's own Serialize output (KvCacheFactory::Deserialize)
};
absl::StatusOr<std::vector<ShardBlob>> SplitShardedBlob(const std::string& blob);

// Ends every worker's loop (end of the job). Best effort: returns the first send failure.
absl::Status ShutdownWorkers(Transport* transport);

}  // namespace kvq::sharding
