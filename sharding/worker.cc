#include "sharding/worker.h"

#include <algorithm>
#include <limits>
#include <map>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "model/forward.h"
#include "sharding/kv_cache_factory.h"

namespace kvq::sharding {
namespace wire {

void PutConfig(Writer& w, const model::ModelConfig& c) {
  w.Put<int32_t>(c.n_layers).Put<int32_t>(c.hidden).Put<int32_t>(c.n_heads);
  w.Put<int32_t>(c.n_kv_heads).Put<int32_t>(c.head_dim).Put<float>(c.rope_theta);
  w.Put<uint8_t>(c.rope_scaling.enabled ? 1 : 0).Put<float>(c.rope_scaling.factor);
  w.Put<float>(c.rope_scaling.low_freq_factor).Put<float>(c.rope_scaling.high_freq_factor);
  w.Put<int32_t>(c.rope_scaling.original_max_position);
}

model::ModelConfig GetConfig(Reader& r) {
  model::ModelConfig c;
  c.n_layers = r.Get<int32_t>();
  c.hidden = r.Get<int32_t>();
  c.n_heads = r.Get<int32_t>();
  c.n_kv_heads = r.Get<int32_t>();
  c.head_dim = r.Get<int32_t>();
  c.rope_theta = r.Get<float>();
  c.rope_scaling.enabled = r.Get<uint8_t>() != 0;
  c.rope_scaling.factor = r.Get<float>();
  c.rope_scaling.low_freq_factor = r.Get<float>();
  c.rope_scaling.high_freq_factor = r.Get<float>();
  c.rope_scaling.original_max_position = r.Get<int32_t>();
  return c;
}

std::string EncodeReply(const absl::Status& s, std::string_view payload) {
  Writer w;
  w.Put<uint8_t>(static_cast<uint8_t>(s.code())).PutString(std::string(s.message()));
  if (s.ok()) w.str().append(payload.data(), payload.size());
  return std::move(w.str());
}

absl::Status DecodeReplyStatus(int rank, Reader& r) {
  const auto code = static_cast<absl::StatusCode>(r.Get<uint8_t>());
  const std::string message = r.GetString();
  if (!r.ok()) return absl::DataLossError(absl::StrCat("rank ", rank, " sent a malformed reply"));
  if (code == absl::StatusCode::kOk) return absl::OkStatus();
  return absl::Status(code, absl::StrCat("rank ", rank, ": ", message));
}

}  // namespace wire

namespace {

class Worker {
 public:
  Worker(Transport* t, WorkerFactoryMaker make, WorkerDevice* device)
      : t_(t), make_(std::move(make)), device_(device) {
    if (!make_) make_ = [](const model::ModelConfig& c, const std::string& f, const std::string& q, const std::string& fp) {
      return KvCacheFactory::Create(c, f, q, fp);
    };
  }

  absl::Status Serve() {
    for (;;) {
      absl::StatusOr<std::string> msg = t_->Receive(0, /*wait_forever=*/true);
      if (!msg.ok()) {
        t_->NotifyGone(msg.status());
        return msg.status();
      }
      wire::Reader r(*msg);
      const auto op = static_cast<wire::Op>(r.Get<uint8_t>());
      if (op == wire::Op::kShutdown) return absl::OkStatus();
      if (op == wire::Op::kFree) {
        const uint64_t id = r.Get<uint64_t>();
        caches_.erase(id);
        append_errors_.erase(id);
        continue;
      }
      // The cache this command is about (every op but kDefineFactory and kCreate starts with it).
      const uint64_t id = wire::Reader(r).Get<uint64_t>();
      if (op == wire::Op::kAttendDevice || op == wire::Op::kAppendDevice) {
        if (absl::Status s = ServeDevice(op, id, r); !s.ok()) {
          t_->NotifyGone(s);
          return s;
        }
        continue;
      }
      if (op == wire::Op::kAppend) {
        absl::Status s = Handle(op, r, nullptr);
        if (s.ok() && !r.ok()) s = absl::DataLossError("malformed command");
        KeepAppendError(id, s);
        continue;
      }
      std::string payload;
      absl::Status s;
      if (op != wire::Op::kDefineFactory && op != wire::Op::kCreate) s = TakeAppendError(id, /*clear=*/true);
      if (!s.ok()) {
        if (op == wire::Op::kDiscard) (void)Handle(op, r, &payload);
        payload.clear();
      } else {
        s = Handle(op, r, &payload);
      }
      if (s.ok() && !r.ok()) s = absl::DataLossError("malformed command");
      absl::Status sent = t_->Send(0, wire::EncodeReply(s, payload));
      if (!sent.ok()) {
        t_->NotifyGone(sent);
        return sent;
      }
    }
  }

 private:
  struct Factory {
    model::ModelConfig config;
    std::unique_ptr<KvCacheFactory> factory;
  };
  struct Cache {
    const Factory* factory = nullptr;
    std::unique_ptr<model::KvCache> kv;
  };

  // kAttendDevice and kAppendDevice. The inputs are always taken off the data plane (the peer has
  // sent them whatever happens here); the result of the command is the reply (attention) or kept
  // for the cache's next reply (append). Returns an error only when the data plane or the
  // transport failed (the loop ends: the job must).
  absl::Status ServeDevice(wire::Op op, uint64_t id, wire::Reader& r) {
    (void)r.Get<uint64_t>();
    const int layer = r.Get<int32_t>(), n = r.Get<int32_t>();
    const int64_t floats = r.Get<int64_t>();
    std::vector<int64_t> key_end;
    if (op == wire::Op::kAttendDevice) {
      key_end.resize(static_cast<size_t>(std::max(n, 0)));
      r.GetArray(key_end.data(), key_end.size());
    }
    if (!r.ok() || n < 0 || floats < 0 || device_ == nullptr || device_->plane == nullptr) {
      // Nothing can be taken off the plane in step with rank 0: the job must end.
      return absl::DataLossError(device_ == nullptr ? "a device command reached a worker without a data plane"
                                                    : "malformed device command");
    }
    const bool attend = op == wire::Op::kAttendDevice;
    DeviceDataPlane& plane = *device_->plane;
    KVQ_ASSIGN_OR_RETURN(float* in0, device_->scratch(0, static_cast<size_t>(floats)));
    KVQ_RETURN_IF_ERROR(plane.Recv(0, in0, static_cast<size_t>(floats)));
    float* in1 = nullptr;
    if (!attend) {
      KVQ_ASSIGN_OR_RETURN(in1, device_->scratch(1, static_cast<size_t>(floats)));
      KVQ_RETURN_IF_ERROR(plane.Recv(0, in1, static_cast<size_t>(floats)));
    }
    KVQ_RETURN_IF_ERROR(plane.Start());
    KVQ_RETURN_IF_ERROR(plane.Wait());
    // A pending append error answers the attention (and stays for an append).
    absl::Status s = TakeAppendError(id, /*clear=*/attend);
    Cache* c = nullptr;
    if (s.ok()) {
      absl::StatusOr<Cache*> found = Find(id);
      s = found.status();
      if (s.ok()) c = *found;
    }
    if (s.ok() && !c->kv->device_memory()) s = absl::FailedPreconditionError("this worker's caches are not on a GPU");
    const model::ModelConfig* mc = c != nullptr ? &c->factory->config : nullptr;
    if (s.ok() && (layer < 0 || layer >= mc->n_layers)) s = absl::InvalidArgumentError(absl::StrCat("layer ", layer));
    if (s.ok() && floats != static_cast<int64_t>(n) * (attend ? mc->q_dim() : mc->kv_dim())) {
      s = absl::InvalidArgumentError(absl::StrCat(floats, " floats for ", n, attend ? " queries" : " tokens"));
    }
    if (!attend) {
      if (s.ok()) s = c->kv->AppendDevice(layer, in0, in1, n, *device_->ops);
      KeepAppendError(id, s);
      return absl::OkStatus();
    }
    if (s.ok()) s = CheckKeyEnds(*c, key_end);
    float* o = nullptr;
    float* lse = nullptr;
    const size_t o_n = s.ok() ? static_cast<size_t>(n) * mc->q_dim() : 0;
    const size_t l_n = s.ok() ? static_cast<size_t>(n) * mc->n_heads : 0;
    if (s.ok()) {
      absl::StatusOr<float*> so = device_->scratch(2, o_n), sl = device_->scratch(3, l_n);
      s = !so.ok() ? so.status() : sl.status();
      if (s.ok()) {
        o = *so;
        lse = *sl;
        // Rows without keys keep o = 0 and lse = -inf (AttendDevice leaves them when no row has any).
        std::vector<float> init(std::max(o_n, l_n), 0.0f);
        s = device_->ops->ToDevice(init.data(), o_n, o);
        std::fill(init.begin(), init.begin() + l_n, -std::numeric_limits<float>::infinity());
        if (s.ok()) s = device_->ops->ToDevice(init.data(), l_n, lse);
      }
    }
    if (s.ok()) s = c->kv->AttendDevice(layer, in0, n, key_end.data(), o, lse, *device_->ops);
    KVQ_RETURN_IF_ERROR(t_->Send(0, wire::EncodeReply(s, "")));
    if (!s.ok()) return absl::OkStatus();
    KVQ_RETURN_IF_ERROR(plane.Send(0, o, o_n));
    KVQ_RETURN_IF_ERROR(plane.Send(0, lse, l_n));
    KVQ_RETURN_IF_ERROR(plane.Start());
    return plane.Wait();
  }

  // A failed append (the first per cache) waits for the cache's next command with a reply.
  void KeepAppendError(uint64_t id, const absl::Status& s) {
    if (!s.ok() && !append_errors_.count(id)) {
      append_errors_[id] = absl::Status(s.code(), absl::StrCat("append: ", s.message()));
    }
  }
  // The cache's pending append error (OK when none), forgotten when `clear`.
  absl::Status TakeAppendError(uint64_t id, bool clear) {
    auto it = append_errors_.find(id);
    if (it == append_errors_.end()) return absl::OkStatus();
    absl::Status s = it->second;
    if (clear) append_errors_.erase(it);
    return s;
  }
  // The coordinator clamps key_end to the shard; this only guards against a corrupt message.
  absl::Status CheckKeyEnds(const Cache& c, const std::vector<int64_t>& key_end) const {
    for (int64_t e : key_end) {
      if (e < 0 || e > c.kv->length() + kMaxStaged) {
        return absl::OutOfRangeError(absl::StrCat("key_end ", e, " outside the shard"));
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Cache*> Find(uint64_t id) {
    auto it = caches_.find(id);
    if (it == caches_.end()) {
      return absl::NotFoundError(absl::StrCat("rank ", t_->rank(), " holds no cache ", id));
    }
    return &it->second;
  }

  absl::Status Handle(wire::Op op, wire::Reader& r, std::string* payload) {
    switch (op) {
      case wire::Op::kDefineFactory: {
        const uint32_t id = r.Get<uint32_t>();
        Factory f;
        f.config = wire::GetConfig(r);
        const std::string format = r.GetString(), quantizer = r.GetString(), fp = r.GetString();
        if (!r.ok()) return absl::DataLossError("malformed kDefineFactory");
        KVQ_ASSIGN_OR_RETURN(f.factory, make_(f.config, format, quantizer, fp));
        factories_[id] = std::move(f);
        return absl::OkStatus();
      }
      case wire::Op::kCreate: {
        const uint64_t id = r.Get<uint64_t>();
        const uint32_t fid = r.Get<uint32_t>();
        const int64_t offset = r.Get<int64_t>();
        auto f = factories_.find(fid);
        if (f == factories_.end()) return absl::NotFoundError(absl::StrCat("unknown KV factory ", fid));
        if (caches_.count(id)) return absl::AlreadyExistsError(absl::StrCat("cache ", id, " exists"));
        KVQ_ASSIGN_OR_RETURN(auto kv, f->second.factory->Make(offset));
        caches_[id] = Cache{&f->second, std::move(kv)};
        return absl::OkStatus();
      }
      case wire::Op::kAppend: {
        KVQ_ASSIGN_OR_RETURN(Cache * c, Find(r.Get<uint64_t>()));
        const int layer = r.Get<int32_t>(), n = r.Get<int32_t>();
        const size_t elems = static_cast<size_t>(std::max(n, 0)) * c->factory->config.kv_dim();
        k_.resize(elems);
        v_.resize(elems);
        r.GetArray(k_.data(), elems);
        r.GetArray(v_.data(), elems);
        if (!r.ok()) return absl::DataLossError("malformed kAppend");
        return c->kv->Append(layer, k_.data(), v_.data(), n);
      }
      case wire::Op::kCommit: {
        KVQ_ASSIGN_OR_RETURN(Cache * c, Find(r.Get<uint64_t>()));
        c->kv->Commit(r.Get<int32_t>());
        wire::Writer w;
        w.Put<int64_t>(c->kv->length()).Put<int64_t>(c->kv->bytes());
        *payload = std::move(w.str());
        return absl::OkStatus();
      }
      case wire::Op::kDiscard: {
        KVQ_ASSIGN_OR_RETURN(Cache * c, Find(r.Get<uint64_t>()));
        c->kv->DiscardStaged();
        return absl::OkStatus();
      }
      case wire::Op::kAttend: {
        KVQ_ASSIGN_OR_RETURN(Cache * c, Find(r.Get<uint64_t>()));
        const model::ModelConfig& mc = c->factory->config;
        const int layer = r.Get<int32_t>(), n_q = r.Get<int32_t>();
        if (layer < 0 || layer >= mc.n_layers || n_q < 0) {
          return absl::InvalidArgumentError(absl::StrCat("bad attend: layer ", layer, ", n_q ", n_q));
        }
        std::vector<int64_t> key_end(n_q);
        r.GetArray(key_end.data(), key_end.size());
        q_.resize(static_cast<size_t>(n_q) * mc.q_dim());
        r.GetArray(q_.data(), q_.size());
        if (!r.ok()) return absl::DataLossError("malformed kAttend");
        KVQ_RETURN_IF_ERROR(CheckKeyEnds(*c, key_end));
        std::vector<float> o(q_.size()), lse(static_cast<size_t>(n_q) * mc.n_heads);
        c->kv->Attend(layer, q_.data(), n_q, key_end.data(), o.data(), lse.data());
        wire::Writer w;
        w.PutArray(o.data(), o.size()).PutArray(lse.data(), lse.size());
        *payload = std::move(w.str());
        return absl::OkStatus();
      }
      case wire::Op::kFillSynthetic: {
        KVQ_ASSIGN_OR_RETURN(Cache * c, Find(r.Get<uint64_t>()));
        const int64_t tokens = r.Get<int64_t>();
        const uint64_t seed = r.Get<uint64_t>();
        const float sigma = r.Get<float>();
        if (!r.ok()) return absl::DataLossError("malformed kFillSynthetic");
        const model::ModelConfig& mc = c->factory->config;
        KVQ_RETURN_IF_ERROR(c->kv->FillSynthetic(mc.n_layers, static_cast<int>(mc.kv_dim()), tokens, seed, sigma));
        wire::Writer w;
        w.Put<int64_t>(c->kv->length()).Put<int64_t>(c->kv->bytes());
        *payload = std::move(w.str());
        return absl::OkStatus();
      }
      case wire::Op::kClone: {
        KVQ_ASSIGN_OR_RETURN(Cache * c, Find(r.Get<uint64_t>()));
        const uint64_t id = r.Get<uint64_t>();
        if (caches_.count(id)) return absl::AlreadyExistsError(absl::StrCat("cache ", id, " exists"));
        Cache copy{c->factory, c->kv->Clone()};
        caches_[id] = std::move(copy);
        return absl::OkStatus();
      }
      case wire::Op::kSerialize: {
        KVQ_ASSIGN_OR_RETURN(Cache * c, Find(r.Get<uint64_t>()));
        KVQ_ASSIGN_OR_RETURN(std::string bytes, c->kv->Serialize());
        wire::Writer w;
        w.PutString(bytes);
        *payload = std::move(w.str());
        return absl::OkStatus();
      }
      default:
        return absl::InvalidArgumentError(absl::StrCat("unknown command ", static_cast<int>(op)));
    }
  }

  static constexpr int64_t kMaxStaged = int64_t{1} << 20;

  Transport* t_;
  WorkerFactoryMaker make_;
  WorkerDevice* device_;
  std::map<uint32_t, Factory> factories_;
  std::map<uint64_t, Cache> caches_;
  // Failed appends not yet reported (the first per cache), by cache id.
  std::map<uint64_t, absl::Status> append_errors_;
  std::vector<float> k_, v_, q_;
};

}  // namespace

absl::Status ServeWorker(Transport* transport, const WorkerFactoryMaker& make_factory, WorkerDevice* device) {
  Worker w(transport, make_factory, device);
  return w.Serve();
}

}  // namespace kvq::sharding
