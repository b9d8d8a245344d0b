#include "sharding/sharded_kv_cache.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "sharding/worker.h"

namespace kvq::sharding {
namespace {

// Ids are unique per process (rank 0): several factories and caches share the workers.
std::atomic<uint32_t> next_factory_id{1};
std::atomic<uint64_t> next_cache_id{1};

constexpr char kBlobMagic[8] = {'K', 'V', 'Q', 'S', 'H', 'R', 'D', '1'};

// ShardedAttendTiming accumulators (nanoseconds).
std::atomic<int64_t> g_attend_calls{0}, g_send_ns{0}, g_local_ns{0}, g_wait_ns{0}, g_merge_ns{0};

// One Attend's phases: q sent (t0..t1), rank 0's shard (..t2), the workers' partials (..t3), merge (..t4).
void RecordAttendTiming(int64_t t0, int64_t t1, int64_t t2, int64_t t3, int64_t t4) {
  g_attend_calls.fetch_add(1, std::memory_order_relaxed);
  g_send_ns.fetch_add(t1 - t0, std::memory_order_relaxed);
  g_local_ns.fetch_add(t2 - t1, std::memory_order_relaxed);
  g_wait_ns.fetch_add(t3 - t2, std::memory_order_relaxed);
  g_merge_ns.fetch_add(t4 - t3, std::memory_order_relaxed);
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The next reply from `rank`: its status, and the reader left at the payload.
absl::Status ReceiveReply(Transport* t, int rank, std::string* msg, wire::Reader* r) {
  KVQ_ASSIGN_OR_RETURN(*msg, t->Receive(rank));
  *r = wire::Reader(*msg);
  return wire::DecodeReplyStatus(rank, *r);
}

absl::Status Call(Transport* t, int rank, const std::string& command) {
  KVQ_RETURN_IF_ERROR(t->Send(rank, command));
  std::string msg;
  wire::Reader r{std::string_view()};
  return ReceiveReply(t, rank, &msg, &r);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ShardedKvCacheFactory

ShardedKvCacheFactory::ShardedKvCacheFactory(Transport* t, const model::ModelConfig& c, uint32_t id,
                                             std::shared_ptr<const KvCacheFactory> local, ShardPlanner planner)
    : transport_(t), config_(c), id_(id), local_(std::move(local)), planner_(std::move(planner)) {}

absl::StatusOr<std::unique_ptr<ShardedKvCacheFactory>> ShardedKvCacheFactory::Create(
    Transport* transport, const model::ModelConfig& config, const std::string& format,
    const std::string& quantizer_path, const std::string& fingerprint, ShardPlanner planner,
    std::shared_ptr<const KvCacheFactory> local) {
  if (transport == nullptr || transport->rank() != 0) {
    return absl::FailedPreconditionError("sharded caches are made on rank 0");
  }
  if (planner.num_ranks() != transport->size()) {
    return absl::InvalidArgumentError(absl::StrCat("the plan has ", planner.num_ranks(),
                                                   " ranks; the job has ", transport->size()));
  }
  if (local == nullptr) {
    KVQ_ASSIGN_OR_RETURN(std::unique_ptr<KvCacheFactory> made,
                         KvCacheFactory::Create(config, format, quantizer_path, fingerprint));
    local = std::move(made);
  } else if (local->format() != format) {
    return absl::InvalidArgumentError(absl::StrCat("rank 0's KV factory serves ", local->format(), ", not ", format));
  }
  const uint32_t id = next_factory_id++;
  wire::Writer w;
  w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kDefineFactory)).Put<uint32_t>(id);
  wire::PutConfig(w, config);
  w.PutString(format).PutString(quantizer_path).PutString(fingerprint);
  for (int r = 1; r < transport->size(); ++r) KVQ_RETURN_IF_ERROR(transport->Send(r, w.str()));
  absl::Status first;
  for (int r = 1; r < transport->size(); ++r) {
    std::string msg;
    wire::Reader rd{std::string_view()};
    absl::Status s = ReceiveReply(transport, r, &msg, &rd);
    if (first.ok()) first = s;
  }
  KVQ_RETURN_IF_ERROR(first);
  return std::unique_ptr<ShardedKvCacheFactory>(
      new ShardedKvCacheFactory(transport, config, id, std::move(local), std::move(planner)));
}

absl::StatusOr<std::unique_ptr<model::KvCache>> ShardedKvCacheFactory::Make(int64_t max_tokens) const {
  KVQ_ASSIGN_OR_RETURN(std::vector<ShardRange> ranges, planner_.Plan(max_tokens));
  KVQ_ASSIGN_OR_RETURN(auto cache, MakeWithRanges(std::move(ranges)));
  return std::unique_ptr<model::KvCache>(std::move(cache));
}

absl::StatusOr<std::unique_ptr<ShardedKvCache>> ShardedKvCacheFactory::MakeWithRanges(
    std::vector<ShardRange> ranges) const {
  if (ranges.empty()) return absl::InvalidArgumentError("a sharded cache needs at least one range");
  std::vector<bool> seen(transport_->size(), false);
  for (size_t i = 0; i < ranges.size(); ++i) {
    const ShardRange& r = ranges[i];
    const bool last = i + 1 == ranges.size();
    if (r.rank < 0 || r.rank >= transport_->size() || seen[r.rank]) {
      return absl::InvalidArgumentError(absl::StrCat("range ", i, ": rank ", r.rank,
                                                     " is outside the job or used twice"));
    }
    seen[r.rank] = true;
    if (r.begin != (i == 0 ? 0 : ranges[i - 1].end) || (!last && r.end <= r.begin)) {
      return absl::InvalidArgumentError(absl::StrCat("range ", i, " [", r.begin, ", ", r.end,
                                                     ") does not continue the previous one"));
    }
  }
  auto cache = std::unique_ptr<ShardedKvCache>(new ShardedKvCache(transport_, config_));
  cache->plane_ = plane_;
  for (size_t i = 0; i < ranges.size(); ++i) {
    ShardedKvCache::Shard s;
    s.range = ranges[i];
    if (i + 1 == ranges.size()) s.range.end = ShardedKvCache::kOpenEnd;
    if (s.range.rank == 0) {
      KVQ_ASSIGN_OR_RETURN(s.local, local_->Make(s.range.begin));
    } else {
      s.id = next_cache_id++;
      wire::Writer w;
      w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kCreate)).Put<uint64_t>(s.id);
      w.Put<uint32_t>(id_).Put<int64_t>(s.range.begin);
      KVQ_RETURN_IF_ERROR(Call(transport_, s.range.rank, w.str()));
    }
    cache->shards_.push_back(std::move(s));  // freed by ~ShardedKvCache if a later one fails
  }
  return cache;
}

// ---------------------------------------------------------------------------------------------
// ShardedKvCache

ShardedKvCache::~ShardedKvCache() {
  if (!t_->health().ok()) return;  // the job is ending; the workers' memory goes with it
  for (const Shard& s : shards_) {
    if (s.local) continue;
    wire::Writer w;
    w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kFree)).Put<uint64_t>(s.id);
    (void)t_->Send(s.range.rank, std::move(w.str()));
  }
}

absl::Status ShardedKvCache::Reply(int rank, std::string* payload) const {
  wire::Reader r{std::string_view()};
  return ReceiveReply(t_, rank, payload, &r);
}

absl::Status ShardedKvCache::Append(int layer, const float* k, const float* v, int n) {
  return AppendImpl(layer, k, v, n, nullptr);
}

absl::Status ShardedKvCache::AppendDevice(int layer, const float* k, const float* v, int n, model::DeviceOps& ops) {
  return AppendImpl(layer, k, v, n, &ops);
}

absl::Status ShardedKvCache::AppendImpl(int layer, const float* k, const float* v, int n, model::DeviceOps* ops) {
  KVQ_RETURN_IF_ERROR(error_);
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("cannot append ", n, " tokens"));
  const int64_t kvd = config_.kv_dim();
  const int64_t first = length_, last = length_ + n;
  // Remote slices first, so the workers append while rank 0 appends its own. A worker does not
  // answer an append (a round trip per layer and step that rank 0 would only wait out): a failed
  // one comes back as the error of that cache's next command with a reply (the next layer's
  // attention, or the step's commit or discard), which this cache then keeps in status().
  absl::Status result;
  std::vector<float> host;  // device k, v of one remote slice
  bool sent_device = false;  // slices queued on the data plane
  for (Shard& s : shards_) {
    const int64_t b = std::max(first, s.range.begin), e = std::min(last, s.range.end);
    s.staged = static_cast<int>(std::max<int64_t>(0, e - b));
    if (s.staged == 0 || s.local) continue;
    const int64_t j0 = b - first;
    const size_t elems = static_cast<size_t>(s.staged) * kvd;
    wire::Writer w;
    if (ops != nullptr && plane_ != nullptr) {
      // Device k and v over the data plane, after the command that tells the worker to take them.
      w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kAppendDevice)).Put<uint64_t>(s.id);
      w.Put<int32_t>(layer).Put<int32_t>(s.staged).Put<int64_t>(static_cast<int64_t>(elems));
      absl::Status st = t_->Send(s.range.rank, std::move(w.str()));
      if (st.ok()) st = plane_->Send(s.range.rank, k + j0 * kvd, elems);
      if (st.ok()) st = plane_->Send(s.range.rank, v + j0 * kvd, elems);
      if (!st.ok()) {
        Fail(st);
        return st;
      }
      sent_device = true;
      continue;
    }
    w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kAppend)).Put<uint64_t>(s.id);
    w.Put<int32_t>(layer).Put<int32_t>(s.staged);
    if (ops != nullptr) {
      host.resize(2 * elems);
      absl::Status st = ops->ToHost(k + j0 * kvd, elems, host.data());
      if (st.ok()) st = ops->ToHost(v + j0 * kvd, elems, host.data() + elems);
      if (!st.ok()) return st;
      w.PutArray(host.data(), 2 * elems);
    } else {
      w.PutArray(k + j0 * kvd, elems);
      w.PutArray(v + j0 * kvd, elems);
    }
    absl::Status st = t_->Send(s.range.rank, std::move(w.str()));
    if (!st.ok()) {
      Fail(st);
      return st;
    }
  }
  for (Shard& s : shards_) {
    if (s.staged == 0 || !s.local) continue;
    const int64_t j0 = std::max(first, s.range.begin) - first;
    absl::Status st = ops != nullptr ? s.local->AppendDevice(layer, k + j0 * kvd, v + j0 * kvd, s.staged, *ops)
                                     : s.local->Append(layer, k + j0 * kvd, v + j0 * kvd, s.staged);
    if (result.ok()) result = st;
  }
  if (sent_device) {
    // The slices leave while rank 0 appends its own; k and v must stay until they have left.
    absl::Status st = plane_->Start();
    if (st.ok()) st = plane_->Wait();
    if (!st.ok()) {
      Fail(st);
      return st;
    }
  }
  if (!t_->health().ok()) Fail(result);
  return result;
}

void ShardedKvCache::Commit(int n) {
  int staged = 0;
  for (const Shard& s : shards_) staged += s.staged;
  if (!error_.ok()) return;
  if (staged != n) {
    Fail(absl::InternalError(absl::StrCat("commit of ", n, " tokens but ", staged, " are staged")));
    return;
  }
  std::vector<Shard*> sent;
  for (Shard& s : shards_) {
    if (s.staged == 0 || s.local) continue;
    wire::Writer w;
    w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kCommit)).Put<uint64_t>(s.id).Put<int32_t>(s.staged);
    absl::Status st = t_->Send(s.range.rank, std::move(w.str()));
    if (!st.ok()) return Fail(st);
    sent.push_back(&s);
  }
  for (Shard& s : shards_) {
    if (s.staged == 0 || !s.local) continue;
    s.local->Commit(s.staged);
    s.length += s.staged;
    s.staged = 0;
  }
  for (Shard* s : sent) {
    int64_t len = 0, bytes = 0;
    Fail(ReceiveLength(*s, s->length + s->staged, "commit", &len, &bytes));
    s->length += s->staged;
    s->staged = 0;
    s->bytes = bytes;
  }
  length_ += n;
}

absl::Status ShardedKvCache::ReceiveLength(const Shard& s, int64_t expected, const char* what, int64_t* length,
                                           int64_t* bytes) const {
  std::string msg;
  wire::Reader r{std::string_view()};
  absl::Status st = ReceiveReply(t_, s.range.rank, &msg, &r);
  *length = r.Get<int64_t>();
  *bytes = r.Get<int64_t>();
  if (st.ok() && *length != expected) {
    st = absl::InternalError(
        absl::StrCat("rank ", s.range.rank, " holds ", *length, " tokens after the ", what, "; expected ", expected));
  }
  return st;
}

absl::Status ShardedKvCache::FillSynthetic(int n_layers, int kv_dim, int64_t tokens, uint64_t seed,
                                           float key_sigma) {
  KVQ_RETURN_IF_ERROR(error_);
  if (length_ != 0) return absl::FailedPreconditionError("a synthetic fill needs an empty cache");
  if (tokens < 0) return absl::InvalidArgumentError(absl::StrCat("cannot fill ", tokens, " tokens"));
  auto part = [&](const Shard& s) {
    return std::clamp<int64_t>(tokens - s.range.begin, 0, s.range.end - s.range.begin);
  };
  std::vector<Shard*> sent;
  for (size_t i = 0; i < shards_.size(); ++i) {
    Shard& s = shards_[i];
    if (s.local || part(s) == 0) continue;
    wire::Writer w;
    w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kFillSynthetic)).Put<uint64_t>(s.id);
    w.Put<int64_t>(part(s)).Put<uint64_t>(seed + i).Put<float>(key_sigma);
    absl::Status st = t_->Send(s.range.rank, std::move(w.str()));
    if (!st.ok()) {
      Fail(st);
      return st;
    }
    sent.push_back(&s);
  }
  absl::Status result;
  for (size_t i = 0; i < shards_.size(); ++i) {
    Shard& s = shards_[i];
    if (!s.local || part(s) == 0) continue;
    absl::Status st = s.local->FillSynthetic(n_layers, kv_dim, part(s), seed + i, key_sigma);
    if (st.ok() && s.local->length() != part(s)) {
      st = absl::InternalError(absl::StrCat("rank 0's shard holds ", s.local->length(), " tokens after the fill; expected ",
                                            part(s)));
    }
    if (result.ok()) result = st;
    s.length = s.local->length();
  }
  for (Shard* s : sent) {
    int64_t len = 0, bytes = 0;
    const absl::Status st = ReceiveLength(*s, part(*s), "fill", &len, &bytes);
    if (result.ok()) result = st;
    s->length = len;
    s->bytes = bytes;
  }
  if (!result.ok()) {
    Fail(result);
    return result;
  }
  length_ = tokens;
  return absl::OkStatus();
}

void ShardedKvCache::DiscardStaged() {
  std::vector<int> sent;
  for (Shard& s : shards_) {
    if (s.staged == 0) continue;
    s.staged = 0;
    if (s.local) {
      s.local->DiscardStaged();
      continue;
    }
    wire::Writer w;
    w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kDiscard)).Put<uint64_t>(s.id);
    absl::Status st = t_->Send(s.range.rank, std::move(w.str()));
    if (!st.ok()) {
      Fail(st);
      continue;
    }
    sent.push_back(s.range.rank);
  }
  for (int rank : sent) {
    std::string msg;
    Fail(Reply(rank, &msg));
  }
}

void ShardedKvCache::ShardEnds(int n_q, const int64_t* key_end, std::vector<std::vector<int64_t>>* local_end,
                               std::vector<bool>* active) const {
  local_end->assign(shards_.size(), std::vector<int64_t>(n_q));
  active->assign(shards_.size(), false);
  for (size_t i = 0; i < shards_.size(); ++i) {
    const Shard& s = shards_[i];
    for (int j = 0; j < n_q; ++j) {
      (*local_end)[i][j] = std::clamp<int64_t>(key_end[j] - s.range.begin, 0, s.length + s.staged);
      if ((*local_end)[i][j] > 0) (*active)[i] = true;
    }
  }
}

absl::Status ShardedKvCache::SendAttend(int layer, const float* q, bool q_on_plane, int n_q,
                                        const std::vector<std::vector<int64_t>>& local_end,
                                        const std::vector<bool>& active, std::vector<size_t>* sent) const {
  const size_t q_floats = static_cast<size_t>(n_q) * config_.q_dim();
  for (size_t i = 0; i < shards_.size(); ++i) {
    const Shard& s = shards_[i];
    if (!active[i] || s.local) continue;
    wire::Writer w;
    w.Put<uint8_t>(static_cast<uint8_t>(q_on_plane ? wire::Op::kAttendDevice : wire::Op::kAttend)).Put<uint64_t>(s.id);
    w.Put<int32_t>(layer).Put<int32_t>(n_q);
    if (q_on_plane) w.Put<int64_t>(static_cast<int64_t>(q_floats));
    w.PutArray(local_end[i].data(), n_q);
    if (!q_on_plane) w.PutArray(q, q_floats);
    KVQ_RETURN_IF_ERROR(t_->Send(s.range.rank, std::move(w.str())));
    if (q_on_plane) KVQ_RETURN_IF_ERROR(plane_->Send(s.range.rank, q, q_floats));
    sent->push_back(i);
  }
  // Issued now, so the workers start while rank 0 attends its own shard.
  return q_on_plane ? plane_->Start() : absl::OkStatus();
}

absl::Status ShardedKvCache::ReceivePartial(size_t shard, size_t o_size, size_t lse_size, float* o,
                                            float* lse) const {
  const int rank = shards_[shard].range.rank;
  std::string msg;
  wire::Reader r{std::string_view()};
  absl::Status st = ReceiveReply(t_, rank, &msg, &r);
  r.GetArray(o, o_size);
  r.GetArray(lse, lse_size);
  if (st.ok() && !r.ok()) st = absl::DataLossError(absl::StrCat("rank ", rank, " sent a short attention reply"));
  return st;
}

void ShardedKvCache::Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
                            float* lse) const {
  const int nh = config_.n_heads, hd = config_.head_dim;
  const size_t o_size = static_cast<size_t>(n_q) * nh * hd, lse_size = static_cast<size_t>(n_q) * nh;
  std::fill(o, o + o_size, 0.0f);
  std::fill(lse, lse + lse_size, -std::numeric_limits<float>::infinity());
  if (!error_.ok() || n_q == 0) return;
  std::vector<std::vector<int64_t>> local_end;
  std::vector<bool> active;
  ShardEnds(n_q, key_end, &local_end, &active);
  const int64_t t0 = NowNs();
  std::vector<size_t> sent;
  if (absl::Status st = SendAttend(layer, q, /*q_on_plane=*/false, n_q, local_end, active, &sent); !st.ok()) {
    return Fail(st);
  }
  const int64_t t1 = NowNs();
  // Partials in rank order; rank 0's computed while the workers compute theirs.
  std::vector<std::vector<float>> part_o(shards_.size()), part_lse(shards_.size());
  for (size_t i = 0; i < shards_.size(); ++i) {
    const Shard& s = shards_[i];
    if (!active[i] || !s.local) continue;
    part_o[i].resize(o_size);
    part_lse[i].resize(lse_size);
    s.local->Attend(layer, q, n_q, local_end[i].data(), part_o[i].data(), part_lse[i].data());
  }
  const int64_t t2 = NowNs();
  for (size_t i : sent) {
    part_o[i].resize(o_size);
    part_lse[i].resize(lse_size);
    Fail(ReceivePartial(i, o_size, lse_size, part_o[i].data(), part_lse[i].data()));
  }
  if (!error_.ok()) return;
  const int64_t t3 = NowNs();
  bool first = true;
  for (size_t i = 0; i < shards_.size(); ++i) {
    if (!active[i]) continue;
    if (first) {
      std::copy(part_o[i].begin(), part_o[i].end(), o);
      std::copy(part_lse[i].begin(), part_lse[i].end(), lse);
      first = false;
    } else {
      model::MergeAttentionPartial(o, lse, part_o[i].data(), part_lse[i].data(), n_q * nh, hd);
    }
  }
  const int64_t t4 = NowNs();
  RecordAttendTiming(t0, t1, t2, t3, t4);
}

bool ShardedKvCache::device_memory() const {
  bool any = false;
  for (const Shard& s : shards_) {
    if (!s.local) continue;
    if (!s.local->device_memory()) return false;
    any = true;
  }
  return any;
}

absl::Status ShardedKvCache::AttendDevice(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
                                          float* lse, model::DeviceOps& ops) const {
  KVQ_RETURN_IF_ERROR(error_);
  if (n_q == 0) return absl::OkStatus();
  const int nh = config_.n_heads, hd = config_.head_dim;
  const int64_t rows = static_cast<int64_t>(n_q) * nh;
  const size_t o_size = static_cast<size_t>(rows) * hd, lse_size = static_cast<size_t>(rows);
  std::vector<std::vector<int64_t>> local_end;
  std::vector<bool> active;
  ShardEnds(n_q, key_end, &local_end, &active);
  int n_active = 0, n_remote = 0;
  for (size_t i = 0; i < shards_.size(); ++i) {
    n_active += active[i] ? 1 : 0;
    n_remote += active[i] && !shards_[i].local ? 1 : 0;
  }
  if (n_active == 0) return absl::OkStatus();  // no key in range: the caller's -inf stands
  const int64_t t0 = NowNs();
  std::vector<size_t> sent;
  const size_t q_floats = static_cast<size_t>(n_q) * config_.q_dim();
  if (n_remote > 0) {
    // q to the active workers: over the data plane, or in their commands through the host.
    std::vector<float> hq;
    if (plane_ == nullptr) {
      hq.resize(q_floats);
      KVQ_RETURN_IF_ERROR(ops.ToHost(q, hq.size(), hq.data()));
    }
    absl::Status st = SendAttend(layer, plane_ != nullptr ? q : hq.data(), plane_ != nullptr, n_q, local_end, active,
                                 &sent);
    if (!st.ok()) {
      Fail(st);
      return st;
    }
  }
  const int64_t t1 = NowNs();
  // One active shard (rank 0's own, or one worker's): straight into o, lse. Otherwise every
  // partial into its slot, in rank order, and one merge.
  model::DeviceOps::Parts parts{o, lse};
  if (n_active > 1) {
    KVQ_ASSIGN_OR_RETURN(parts, ops.PartsScratch(n_active, rows, hd));
  }
  std::vector<int> slot(shards_.size(), -1);
  for (size_t i = 0, k = 0; i < shards_.size(); ++i) {
    if (active[i]) slot[i] = static_cast<int>(k++);
  }
  auto slot_o = [&](size_t i) { return parts.o + static_cast<int64_t>(slot[i]) * rows * hd; };
  auto slot_lse = [&](size_t i) { return parts.lse + static_cast<int64_t>(slot[i]) * rows; };
  absl::Status result;
  for (size_t i = 0; i < shards_.size() && result.ok(); ++i) {
    if (!active[i] || !shards_[i].local) continue;
    result = shards_[i].local->AttendDevice(layer, q, n_q, local_end[i].data(), slot_o(i), slot_lse(i), ops);
  }
  const int64_t t2 = NowNs();
  if (plane_ != nullptr && !sent.empty()) {
    // Each worker's status (the command's reply), then the partials of those that succeeded, into
    // their slots over the data plane; one wait for everything (q's sends included).
    absl::Status st;
    for (size_t i : sent) {
      std::string msg;
      wire::Reader r{std::string_view()};
      absl::Status reply = ReceiveReply(t_, shards_[i].range.rank, &msg, &r);
      if (!reply.ok()) {
        if (st.ok()) st = reply;
        if (!t_->health().ok()) break;  // a broken transport: nothing more to read
        continue;
      }
      absl::Status qs = plane_->Recv(shards_[i].range.rank, slot_o(i), o_size);
      if (qs.ok()) qs = plane_->Recv(shards_[i].range.rank, slot_lse(i), lse_size);
      if (!qs.ok() && st.ok()) st = qs;
    }
    absl::Status ws = t_->health().ok() ? plane_->Start() : t_->health();
    if (ws.ok()) ws = plane_->Wait();
    if (st.ok()) st = ws;
    Fail(st);
    if (result.ok()) result = st;
  } else {
    std::vector<float> ho(o_size), hl(lse_size);
    for (size_t i : sent) {
      absl::Status st = ReceivePartial(i, o_size, lse_size, ho.data(), hl.data());
      if (st.ok() && result.ok()) st = ops.ToDevice(ho.data(), o_size, slot_o(i));
      if (st.ok() && result.ok()) st = ops.ToDevice(hl.data(), lse_size, slot_lse(i));
      Fail(st);
      if (result.ok()) result = st;
    }
  }
  KVQ_RETURN_IF_ERROR(result);
  const int64_t t3 = NowNs();
  if (n_active > 1) KVQ_RETURN_IF_ERROR(ops.MergeParts(parts, n_active, rows, hd, o, lse));
  const int64_t t4 = NowNs();
  RecordAttendTiming(t0, t1, t2, t3, t4);
  return absl::OkStatus();
}

ShardedAttendTiming GetShardedAttendTiming() {
  ShardedAttendTiming t;
  t.calls = g_attend_calls.load(std::memory_order_relaxed);
  t.send_s = g_send_ns.load(std::memory_order_relaxed) * 1e-9;
  t.local_s = g_local_ns.load(std::memory_order_relaxed) * 1e-9;
  t.wait_s = g_wait_ns.load(std::memory_order_relaxed) * 1e-9;
  t.merge_s = g_merge_ns.load(std::memory_order_relaxed) * 1e-9;
  return t;
}

void ResetShardedAttendTiming() {
  for (auto* a : {&g_attend_calls, &g_send_ns, &g_local_ns, &g_wait_ns, &g_merge_ns}) a->store(0, std::memory_order_relaxed);
}

int64_t ShardedKvCache::bytes() const {
  int64_t total = 0;
  for (const Shard& s : shards_) total += s.local ? s.local->bytes() : s.bytes;
  return total;
}

std::unique_ptr<model::KvCache> ShardedKvCache::Clone() const {
  auto c = std::unique_ptr<ShardedKvCache>(new ShardedKvCache(t_, config_));
  c->plane_ = plane_;
  c->length_ = length_;
  c->error_ = error_;
  for (const Shard& s : shards_) {
    Shard n;
    n.range = s.range;
    n.length = s.length;
    n.bytes = s.bytes;
    if (s.local) {
      n.local = s.local->Clone();
    } else {
      n.id = next_cache_id++;
      if (c->error_.ok()) {
        wire::Writer w;
        w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kClone)).Put<uint64_t>(s.id).Put<uint64_t>(n.id);
        c->Fail(Call(t_, s.range.rank, w.str()));
      }
    }
    c->shards_.push_back(std::move(n));
  }
  return c;
}

absl::StatusOr<std::string> ShardedKvCache::Serialize() const {
  KVQ_RETURN_IF_ERROR(error_);
  wire::Writer w;
  w.PutArray(kBlobMagic, sizeof(kBlobMagic)).Put<uint32_t>(static_cast<uint32_t>(shards_.size()));
  for (const Shard& s : shards_) {
    std::string bytes;
    if (s.local) {
      KVQ_ASSIGN_OR_RETURN(bytes, s.local->Serialize());
    } else {
      wire::Writer c;
      c.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kSerialize)).Put<uint64_t>(s.id);
      KVQ_RETURN_IF_ERROR(t_->Send(s.range.rank, c.str()));
      std::string msg;
      wire::Reader r{std::string_view()};
      KVQ_RETURN_IF_ERROR(ReceiveReply(t_, s.range.rank, &msg, &r));
      bytes = r.GetString();
      if (!r.ok()) return absl::DataLossError(absl::StrCat("rank ", s.range.rank, " sent a short shard"));
    }
    w.Put<int32_t>(s.range.rank).Put<int64_t>(s.range.begin).Put<int64_t>(s.range.begin + s.length);
    w.PutString(bytes);
  }
  return std::move(w.str());
}

std::vector<ShardRange> ShardedKvCache::ranges() const {
  std::vector<ShardRange> out;
  for (const Shard& s : shards_) {
    ShardRange r = s.range;
    if (r.end == kOpenEnd) r.end = std::max(r.begin, length_);
    out.push_back(r);
  }
  return out;
}

std::vector<int64_t> ShardedKvCache::shard_lengths() const {
  std::vector<int64_t> out;
  for (const Shard& s : shards_) out.push_back(s.length);
  return out;
}

absl::StatusOr<std::vector<ShardBlob>> SplitShardedBlob(const std::string& blob) {
  wire::Reader r(blob);
  char magic[sizeof(kBlobMagic)];
  r.GetArray(magic, sizeof(magic));
  if (!r.ok() || !std::equal(magic, magic + sizeof(magic), kBlobMagic)) {
    return absl::InvalidArgumentError("not a sharded KV blob (bad magic)");
  }
  const uint32_t n = r.Get<uint32_t>();
  std::vector<ShardBlob> out;
  for (uint32_t i = 0; i < n && r.ok(); ++i) {
    ShardBlob b;
    b.range.rank = r.Get<int32_t>();
    b.range.begin = r.Get<int64_t>();
    b.range.end = r.Get<int64_t>();
    b.bytes = r.GetString();
    out.push_back(std::move(b));
  }
  if (!r.ok()) return absl::DataLossError("truncated sharded KV blob");
  return out;
}

absl::Status ShutdownWorkers(Transport* transport) {
  absl::Status first;
  wire::Writer w;
  w.Put<uint8_t>(static_cast<uint8_t>(wire::Op::kShutdown));
  for (int r = 1; r < transport->size(); ++r) {
    absl::Status s = transport->Send(r, w.str());
    if (first.ok()) first = s;
  }
  return first;
}

}  // namespace kvq::sharding
