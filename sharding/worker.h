// An attention worker (ranks 1..N-1): holds KV shards of sequences and serves rank 0's commands
// until told to shut down. No weights: a worker builds each KV format's KvCacheFactory from the
// model shape rank 0 sends, and per sequence a local cache whose first token sits at the shard's
// first position (so RoPE and the sink are those of the whole sequence).
//
// Also the command set and its encoding, shared with the coordinator (sharded_kv_cache.cc). Every
// command is one message from rank 0; all but kAppend, kAppendDevice, kFree and kShutdown get one
// reply, in order:
//   reply = u8 status code, string message, then the op's payload when OK.
// A failed kAppend is kept with its cache and is the reply of the cache's next command that has
// one (kDiscard still discards; the others do nothing else), so rank 0 never waits for appends.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "model/config.h"
#include "model/forward.h"
#include "sharding/device_data_plane.h"
#include "sharding/kv_cache_factory.h"
#include "sharding/mpi_transport.h"

namespace kvq::sharding {

// Serves commands from rank 0 until kShutdown (returns OK) or a transport failure (returns it,
// after telling rank 0). Errors of single commands (a bad cache id, a failed append) go back to
// rank 0 in the reply and the loop goes on.
// How a worker makes the KV factory of a format rank 0 defines: by default the CPU reference
// (KvCacheFactory::Create); a GPU worker passes one over its own block pool
// (sharding/gpu/gpu_backend.h, MakeGpuWorkerKvFactory).
using WorkerFactoryMaker = std::function<absl::StatusOr<std::unique_ptr<KvCacheFactory>>(
    const model::ModelConfig& config, const std::string& format, const std::string& quantizer_path,
    const std::string& fingerprint)>;
// A GPU worker's side of the device data plane (sharding/device_data_plane.h), for kAttendDevice
// and kAppendDevice: the plane (made collectively with rank 0's), the copies and merges of its
// stream, and device scratch by slot (0: q or k, 1: v, 2: o, 3: lse; valid until the next call
// for that slot).
struct WorkerDevice {
  DeviceDataPlane* plane = nullptr;
  model::DeviceOps* ops = nullptr;
  std::function<absl::StatusOr<float*>(int slot, size_t n)> scratch;
};
absl::Status ServeWorker(Transport* transport, const WorkerFactoryMaker& make_factory = nullptr,
                         WorkerDevice* device = nullptr);

namespace wire {

enum class Op : uint8_t {
  kDefineFactory = 1,  // u32 factory, config, str format, str quantizer path, str fingerprint
  kCreate = 2,         // u64 cache, u32 factory, i64 position_offset
  kFree = 3,           // u64 cache (no reply)
  kAppend = 4,         // u64 cache, i32 layer, i32 n, f32 k[n*kv_dim], f32 v[n*kv_dim] (no reply)
  kCommit = 5,         // u64 cache, i32 n -> i64 length, i64 bytes
  kDiscard = 6,        // u64 cache
  kAttend = 7,         // u64 cache, i32 layer, i32 n_q, i64 key_end[n_q], f32 q[n_q*q_dim]
                       //   -> f32 o[n_q*q_dim], f32 lse[n_q*n_heads]
  kClone = 8,          // u64 source cache, u64 new cache
  kSerialize = 9,      // u64 cache -> str bytes
  kShutdown = 10,      // (no reply)
  kFillSynthetic = 11, // u64 cache, i64 tokens, u64 seed, f32 key_sigma -> i64 length, i64 bytes
                       //   (benchmarks: KvCache::FillSynthetic)
  // The device data plane's forms (a worker with WorkerDevice; rank 0's caches on device memory):
  kAttendDevice = 12,  // u64 cache, i32 layer, i32 n_q, i64 q floats, i64 key_end[n_q]; then q over
                       //   the data plane (always taken) -> the reply (no payload), then when OK
                       //   f32 o[n_q*q_dim] and lse[n_q*n_heads] over the data plane
  kAppendDevice = 13,  // u64 cache, i32 layer, i32 n, i64 floats; then k and v over the data plane
                       //   (always taken); no reply, as kAppend
};

class Writer {
 public:
  template <typename T>
  Writer& Put(T v) {  // hosts are little-endian (x86-64, aarch64), ranks are the same binary
    out_.append(reinterpret_cast<const char*>(&v), sizeof(T));
    return *this;
  }
  Writer& PutString(std::string_view s) {
    Put<uint64_t>(s.size());
    out_.append(s.data(), s.size());
    return *this;
  }
  template <typename T>
  Writer& PutArray(const T* p, size_t n) {
    out_.append(reinterpret_cast<const char*>(p), n * sizeof(T));
    return *this;
  }
  std::string& str() { return out_; }

 private:
  std::string out_;
};

// Reads in order; a read past the end marks the message malformed and yields zeros.
class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  template <typename T>
  T Get() {
    T v{};
    GetArray(&v, 1);
    return v;
  }
  std::string GetString() {
    const uint64_t n = Get<uint64_t>();
    if (!ok_ || in_.size() - pos_ < n) {
      ok_ = false;
      return {};
    }
    std::string s(in_.substr(pos_, n));
    pos_ += n;
    return s;
  }
  template <typename T>
  void GetArray(T* p, size_t n) {
    const size_t bytes = n * sizeof(T);
    if (!ok_ || in_.size() - pos_ < bytes) {
      ok_ = false;
      std::memset(static_cast<void*>(p), 0, bytes);
      return;
    }
    std::memcpy(static_cast<void*>(p), in_.data() + pos_, bytes);
    pos_ += bytes;
  }
  bool ok() const { return ok_; }

 private:
  std::string_view in_;
  size_t pos_ = 0;
  bool ok_ = true;
};

// The fields of a ModelConfig that a KV cache depends on (shape and RoPE).
void PutConfig(Writer& w, const model::ModelConfig& c);
model::ModelConfig GetConfig(Reader& r);

// A reply: the status, then (when OK) the payload.
std::string EncodeReply(const absl::Status& s, std::string_view payload = {});
// Splits a reply; on a non-OK status returns it (naming the rank), else leaves `r` at the payload.
absl::Status DecodeReplyStatus(int rank, Reader& r);

}  // namespace wire
}  // namespace kvq::sharding
