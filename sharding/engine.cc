// The CPU engine: one scheduler thread runs steps of the forward pass over a batch that mixes
// decode tokens of running sequences with (at most) one prefill chunk, so long prompts never stall
// running streams. Requests join between steps; finished or cancelled ones free their KV at once.
#include "sharding/engine.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <cmath>
#include <cstring>
#include <fstream>
#include <future>
#include <list>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "model/fingerprint.h"
#include "model/forward.h"
#include "model/sampling.h"
#include "model/weights.h"
#include "sharding/kv_cache_factory.h"
#include "sharding/session_file.h"
#if KVQ_HAVE_CUDA
#include "sharding/gpu/gpu_backend.h"
#endif

namespace kvq::engine {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "unknown";
}

namespace {

using Clock = std::chrono::steady_clock;

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::Status ValidateSampling(const SamplingParams& s, int vocab) {
  if (!std::isfinite(s.temperature) || s.temperature < 0.0f) {
    return absl::InvalidArgumentError(absl::StrCat(
        "temperature must be a finite number >= 0 (0 = greedy); got ", s.temperature));
  }
  if (!std::isfinite(s.top_p) || s.top_p <= 0.0f || s.top_p > 1.0f) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1]; got ", s.top_p));
  }
  if (s.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0; got ", s.top_k));
  if (!std::isfinite(s.min_p) || s.min_p < 0.0f || s.min_p >= 1.0f) {
    return absl::InvalidArgumentError(absl::StrCat("min_p must be in [0, 1); got ", s.min_p));
  }
  if (!std::isfinite(s.repetition_penalty) || s.repetition_penalty <= 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be > 0 (1 = off); got ", s.repetition_penalty));
  }
  if (s.max_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1; got ", s.max_tokens));
  }
  if (s.top_logprobs < 0 || s.top_logprobs > 20) {
    return absl::InvalidArgumentError(absl::StrCat("top_logprobs must be in [0, 20]; got ", s.top_logprobs));
  }
  for (int32_t t : s.stop_token_ids) {
    if (t < 0 || t >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop token id ", t, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  return absl::OkStatus();
}

struct Session {
  std::string id;
  // The cache holds every token but the last, which stays pending: a request that continues the
  // session feeds it first, so its logits come from the request's own forward step.
  std::shared_ptr<model::KvCache> cache;
  std::vector<int32_t> tokens;
  int64_t created_ms = 0;
  int64_t last_used_ms = 0;
  int64_t ttl_seconds = 0;
  int busy = 0;  // extensions in flight

  SessionInfo Info() const {
    return SessionInfo{id, static_cast<int64_t>(tokens.size()), cache ? cache->bytes() : 0,
                       created_ms, last_used_ms, ttl_seconds};
  }
};

// One unit of scheduled work: a generation, or the extension (prefill) of a session.
struct Job {
  uint64_t id = 0;
  bool is_extension = false;
  GenerateRequest req;
  std::unique_ptr<model::KvCache> cache;        // generation: own cache (or a fork's tail)
  std::shared_ptr<Session> session;             // the session forked from / extended
  std::vector<int32_t> prompt;                  // tokens still to prefill come from here
  size_t prefilled = 0;
  // The repetition penalty's history (sized only for requests with a penalty): the distinct tokens
  // of the context (session and prompt) and of the generation so far.
  model::SeenTokens seen;
  std::vector<int32_t> stops;
  int32_t next_input = -1;                      // sampled token to feed at the next step
  int generated = 0;
  bool cancelled = false;
  Usage usage;
  int64_t reserved_bytes = 0;
  // Extension bookkeeping.
  std::function<void(int64_t, int64_t)> progress;
  const std::atomic<bool>* ext_cancelled = nullptr;
  std::vector<int32_t> ext_tokens;              // the tokens the extension adds
  std::promise<absl::Status>* done = nullptr;
  absl::Status admit_error;                     // set when admission failed

  bool prefilling() const { return prefilled < prompt.size(); }
};

}  // namespace

class Engine::Impl {
 public:
  absl::Status Init(const EngineOptions& o) {
    options_ = o;
    KVQ_ASSIGN_OR_RETURN(weights_, model::LoadWeights(o.model));
    const std::string& spec = o.model;
    std::string tok_path = o.tokenizer;
    if (tok_path.empty()) tok_path = spec;
    if (tok_path.size() > 5 && tok_path.substr(tok_path.size() - 5) == ".gguf") {
      KVQ_ASSIGN_OR_RETURN(tokenizer_, model::Tokenizer::FromGgufPath(tok_path));
    } else if (tok_path.rfind("synthetic:", 0) == 0) {
      return absl::InvalidArgumentError("a synthetic model needs --tokenizer (a GGUF or tokenizer.json)");
    } else {
      const std::string json = tok_path.size() > 5 && tok_path.substr(tok_path.size() - 5) == ".json"
                                   ? tok_path
                                   : tok_path + "/tokenizer.json";
      KVQ_ASSIGN_OR_RETURN(tokenizer_, model::Tokenizer::FromTokenizerJson(json));
    }
    if (o.device == "cuda") {
      KVQ_RETURN_IF_ERROR(InitGpu(o));
    } else if (o.device == "cpu" || o.device.empty()) {
      KVQ_ASSIGN_OR_RETURN(factory_, sharding::KvCacheFactory::Create(weights_.config, o.kv_format, o.quantizer,
                                                                      model::ModelFingerprint(weights_)));
      forward_ = std::make_unique<model::Forward>(weights_);
      capacity_ = o.kv_capacity_bytes > 0 ? o.kv_capacity_bytes : (int64_t{4} << 30);
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown device '", o.device, "' (cpu or cuda)"));
    }
    model::SetCpuThreads(o.threads);
    model_stops_ = tokenizer_->stop_ids();
    thread_ = std::thread([this] { Loop(); });
    return absl::OkStatus();
  }

  ~Impl() {
    Shutdown(false);
    // Caches (sessions, jobs) go before the pool and the forward pass that own device memory.
    sessions_.clear();
    waiting_.clear();
    running_.clear();
    factory_.reset();
    forward_.reset();
#if KVQ_HAVE_CUDA
    gpu_.reset();
#endif
  }

  absl::Status InitGpu(const EngineOptions& o) {
#if KVQ_HAVE_CUDA
    KVQ_ASSIGN_OR_RETURN(const kernels::DType dt, sharding::ParseWeightsDtype(o.weights_dtype));
    sharding::GpuKvOptions po;
    po.capacity_bytes = o.kv_capacity_bytes;
    po.memory_fraction = o.gpu_memory_fraction;
    if (o.key_outlier_reserve > 0) po.key_outlier_reserve = o.key_outlier_reserve;
    po.max_sink_slots = 2 * o.max_batch + 1024;
    KVQ_ASSIGN_OR_RETURN(gpu_, sharding::GpuBackend::Create(weights_, o.kv_format, o.quantizer, dt, po));
    KVQ_RETURN_IF_ERROR(gpu_->WarmUp());  // before work is taken: see GpuBackend::WarmUp
    // The engine owns the pass and the factory like the CPU ones; gpu_ keeps the pool and stream.
    gpu_forward_ = gpu_->forward.get();
    forward_ = std::move(gpu_->forward);
    factory_ = std::move(gpu_->factory);
    const sharding::GpuKvPool& pool = *gpu_->pool;
    capacity_ = pool.total_blocks() * pool.block_bytes();
    std::fprintf(stderr, "[kvq] GPU engine: weights %s, KV %s, pool %lld blocks x %lld B (%.2f GiB), %d sink slots\n",
                 o.weights_dtype.c_str(), pool.format().ToString().c_str(), static_cast<long long>(pool.total_blocks()),
                 static_cast<long long>(pool.block_bytes()), capacity_ / 1073741824.0, pool.free_sink_slots());
    graph_launches_at_start_ = gpu_forward_->graph_launches();  // the warm-up's are not the users'
    return absl::OkStatus();
#else
    return absl::FailedPreconditionError("--device=cuda: this build has no CUDA (configure with -DKVQ_ENABLE_CUDA=ON)");
#endif
  }

  int64_t TokensToBytes(int64_t tokens) const {
    return factory_->BytesForTokens(tokens);
  }

  // Bytes held by sessions plus those reserved by admitted jobs. Caller holds mu_.
  int64_t UsedLocked() const {
    int64_t used = reserved_total_;
    for (const auto& [id, s] : sessions_) used += s->cache ? s->cache->bytes() : 0;
    return used;
  }

  int64_t MaxContextLocked() const {
    const int64_t free = std::max<int64_t>(0, capacity_ - UsedLocked());
    return static_cast<int64_t>(free / factory_->BytesPerToken());
  }

  absl::StatusOr<uint64_t> Enqueue(GenerateRequest req) {
    const int vocab = weights_.config.vocab_size;
    if (!req.sink) return absl::InvalidArgumentError("request has no token sink");
    KVQ_RETURN_IF_ERROR(ValidateSampling(req.sampling, vocab));
    for (int32_t t : req.prompt) {
      if (t < 0 || t >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("prompt token id ", t,
                                                       " is outside the vocabulary [0, ", vocab, ")"));
      }
    }
    auto job = std::make_unique<Job>();
    std::unique_lock<std::mutex> lock(mu_);
    if (stopping_) return absl::UnavailableError("the engine is shutting down");
    int64_t context = 0;
    if (!req.session_id.empty()) {
      auto it = sessions_.find(req.session_id);
      if (it == sessions_.end()) {
        return absl::NotFoundError(absl::StrCat("unknown session '", req.session_id,
                                                "': create it first or check ListSessions"));
      }
      job->session = it->second;
      context = static_cast<int64_t>(job->session->tokens.size());
      job->session->last_used_ms = NowUnixMs();
    }
    if (req.prompt.empty() && context == 0) {
      return absl::InvalidArgumentError("the prompt is empty: give text, messages or token ids");
    }
    const int64_t need_tokens = static_cast<int64_t>(req.prompt.size()) + req.sampling.max_tokens;
    const int64_t need = TokensToBytes(need_tokens + (context > 0 ? 1 : 0));
    // A request that can never fit is refused now; one that fits later waits.
    const int64_t limit_tokens = static_cast<int64_t>(capacity_ / factory_->BytesPerToken());
    if (need > capacity_) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "prompt (", req.prompt.size(), " tokens) + max_tokens (", req.sampling.max_tokens,
          ") = ", need_tokens, " tokens exceeds the largest context that fits (", limit_tokens,
          " tokens of ", factory_->format(), " KV); shorten the prompt or lower max_tokens"));
    }
    job->id = next_id_++;
    if (job->session) job->prompt.push_back(job->session->tokens.back());  // the pending token
    job->prompt.insert(job->prompt.end(), req.prompt.begin(), req.prompt.end());
    if (req.sampling.repetition_penalty != 1.0f) {
      job->seen = model::SeenTokens(weights_.config.vocab_size);
      if (job->session) {
        for (int32_t t : job->session->tokens) job->seen.Add(t);
      }
      for (int32_t t : req.prompt) job->seen.Add(t);
    }
    job->stops = req.sampling.stop_token_ids;
    if (!req.sampling.ignore_eos) job->stops.insert(job->stops.end(), model_stops_.begin(), model_stops_.end());
    job->usage.prompt_tokens = static_cast<int64_t>(req.prompt.size());
    job->usage.cached_tokens = std::max<int64_t>(0, context - 1);
    job->reserved_bytes = need;
    job->req = std::move(req);
    const uint64_t id = job->id;
    waiting_.push_back(std::move(job));
    cv_.notify_all();
    return id;
  }

  void Cancel(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_ids_.push_back(id);
    cv_.notify_all();
  }

  absl::StatusOr<SessionInfo> CreateSession(const std::string& id, int64_t ttl) {
    if (id.empty()) return absl::InvalidArgumentError("session id is empty");
    KVQ_ASSIGN_OR_RETURN(auto cache, factory_->Make(0));
    std::lock_guard<std::mutex> lock(mu_);
    if (sessions_.count(id)) return absl::AlreadyExistsError(absl::StrCat("session '", id, "' exists"));
    auto s = std::make_shared<Session>();
    s->id = id;
    s->cache = std::shared_ptr<model::KvCache>(std::move(cache));
    s->created_ms = s->last_used_ms = NowUnixMs();
    s->ttl_seconds = ttl >= 0 ? ttl : options_.session_ttl_seconds;
    sessions_[id] = s;
    return s->Info();
  }

  absl::StatusOr<SessionInfo> ExtendSession(const std::string& id, const std::vector<int32_t>& tokens,
                                            const std::function<void(int64_t, int64_t)>& progress,
                                            const std::atomic<bool>* cancelled) {
    const int vocab = weights_.config.vocab_size;
    for (int32_t t : tokens) {
      if (t < 0 || t >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("token id ", t, " is outside the vocabulary [0, ", vocab, ")"));
      }
    }
    std::promise<absl::Status> done;
    auto fut = done.get_future();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return absl::UnavailableError("the engine is shutting down");
      auto it = sessions_.find(id);
      if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session '", id, "'"));
      const int64_t need = TokensToBytes(static_cast<int64_t>(tokens.size()));
      if (need > capacity_ - UsedLocked()) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "extending session '", id, "' by ", tokens.size(), " tokens needs ", need,
            " bytes of KV; ", std::max<int64_t>(0, capacity_ - UsedLocked()), " are free (",
            MaxContextLocked(), " tokens)"));
      }
      if (tokens.empty()) return it->second->Info();
      Session& sess = *it->second;
      if (sess.busy) {
        return absl::FailedPreconditionError(absl::StrCat("session '", id, "' is already being extended"));
      }
      // Prefill the pending token and all new ones but the last, which becomes pending.
      std::vector<int32_t> prefill;
      if (!sess.tokens.empty()) prefill.push_back(sess.tokens.back());
      prefill.insert(prefill.end(), tokens.begin(), tokens.end() - 1);
      if (prefill.empty()) {
        sess.tokens.push_back(tokens.back());
        return sess.Info();
      }
      auto job = std::make_unique<Job>();
      job->id = next_id_++;
      job->is_extension = true;
      job->session = it->second;
      job->session->busy++;
      job->prompt = std::move(prefill);
      job->ext_tokens = tokens;
      job->progress = progress;
      job->ext_cancelled = cancelled;
      job->done = &done;
      job->reserved_bytes = need;
      waiting_.push_back(std::move(job));
      cv_.notify_all();
    }
    absl::Status s = fut.get();
    if (!s.ok()) return s;
    return GetSession(id);
  }

  absl::StatusOr<SessionInfo> GetSession(const std::string& id) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session '", id, "'"));
    return it->second->Info();
  }

  std::vector<SessionInfo> ListSessions() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<SessionInfo> out;
    for (const auto& [id, s] : sessions_) out.push_back(s->Info());
    return out;
  }

  absl::Status DeleteSession(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session '", id, "'"));
    if (it->second->busy) return absl::FailedPreconditionError(absl::StrCat("session '", id, "' is being extended"));
    sessions_.erase(it);  // forks that still read it keep it alive until they finish
    return absl::OkStatus();
  }

  absl::Status SaveSession(const std::string& id, const std::string& path) {
    std::shared_ptr<Session> s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = sessions_.find(id);
      if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session '", id, "'"));
      if (it->second->busy) return absl::FailedPreconditionError(absl::StrCat("session '", id, "' is being extended"));
      s = it->second;
    }
    sharding::SessionImage image;
    image.kv_format = factory_->format();
    image.tokens = s->tokens;
    KVQ_ASSIGN_OR_RETURN(image.kv, s->cache->Serialize());
    return sharding::WriteSessionFile(path, image);
  }

  absl::StatusOr<SessionInfo> LoadSession(const std::string& id, const std::string& path) {
    KVQ_ASSIGN_OR_RETURN(sharding::SessionImage image, sharding::ReadSessionFile(path));
    if (image.kv_format != factory_->format()) {
      return absl::FailedPreconditionError(absl::StrCat("session was saved with KV format ", image.kv_format,
                                                        ", this server runs ", factory_->format()));
    }
    std::vector<int32_t>& tokens = image.tokens;
    KVQ_ASSIGN_OR_RETURN(auto cache, factory_->Deserialize(image.kv));
    // The cache holds every token but the pending last one.
    if (cache->length() != std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - 1)) {
      return absl::DataLossError(absl::StrCat(path, ": KV holds ", cache->length(), " tokens, token list ", tokens.size()));
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (sessions_.count(id)) return absl::AlreadyExistsError(absl::StrCat("session '", id, "' exists"));
    if (cache->bytes() > capacity_ - UsedLocked()) {
      return absl::ResourceExhaustedError(absl::StrCat("session needs ", cache->bytes(), " bytes of KV; ",
                                                       std::max<int64_t>(0, capacity_ - UsedLocked()), " are free"));
    }
    auto s = std::make_shared<Session>();
    s->id = id;
    s->cache = std::shared_ptr<model::KvCache>(std::move(cache));
    s->tokens = std::move(tokens);
    s->created_ms = s->last_used_ms = NowUnixMs();
    s->ttl_seconds = options_.session_ttl_seconds;
    sessions_[id] = s;
    return s->Info();
  }

  EngineStats Stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    EngineStats st;
    st.running = static_cast<int>(std::count_if(running_.begin(), running_.end(),
                                                [](const auto& j) { return !j->is_extension; }));
    st.waiting = static_cast<int>(waiting_.size());
    st.sessions = static_cast<int>(sessions_.size());
    int64_t used = 0;
    for (const auto& [id, s] : sessions_) used += s->cache ? s->cache->bytes() : 0;
    st.kv_bytes_used = used + running_kv_bytes_;
    st.kv_bytes_capacity = capacity_;
    st.max_context_tokens = MaxContextLocked();
    st.effective_bits_per_element = factory_->EffectiveBitsPerElement();
    st.outlier_fraction = factory_->OutlierFraction();
    st.decode_tokens_per_second = decode_tps_;
    st.prefill_tokens_per_second = prefill_tps_;
    st.prompt_tokens_total = prompt_total_;
    st.generated_tokens_total = generated_total_;
    st.steps_total = steps_;
#if KVQ_HAVE_CUDA
    if (gpu_ != nullptr) {
      st.graph_steps_total = gpu_forward_ != nullptr ? gpu_forward_->graph_launches() - graph_launches_at_start_ : 0;
      st.key_outlier_overflow_steps_total = gpu_->pool != nullptr ? gpu_->pool->overflow_steps() : 0;
    }
#endif
    return st;
  }

  void Shutdown(bool drain) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (!thread_.joinable()) return;
      stopping_ = true;
      drain_ = drain;
      cv_.notify_all();
    }
    thread_.join();
  }

  const model::ModelConfig& config() const { return weights_.config; }
  const model::Tokenizer& tokenizer() const { return *tokenizer_; }
  const std::string& kv_format() const { return factory_->format(); }
  const sharding::KvCacheFactory& kv_factory() const { return *factory_; }

 private:
  void Finish(Job& j, FinishReason reason, const absl::Status& status) {
    if (j.is_extension) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        Session& s = *j.session;
        s.busy--;
        s.last_used_ms = NowUnixMs();
        // Whatever was prefilled stays: tokens = the cache's tokens + one pending.
        const int64_t held = s.cache->length() + 1;
        const int64_t add = std::min<int64_t>(held - static_cast<int64_t>(s.tokens.size()),
                                              static_cast<int64_t>(j.ext_tokens.size()));
        if (add > 0) s.tokens.insert(s.tokens.end(), j.ext_tokens.begin(), j.ext_tokens.begin() + add);
      }
      j.done->set_value(reason == FinishReason::kCancelled
                            ? absl::CancelledError("session extension cancelled")
                            : status);
      return;
    }
    j.usage.generated_tokens = j.generated;
    j.cache.reset();  // frees the KV now
    j.req.sink->OnFinish(reason, status, j.usage);
  }

  // Moves waiting jobs into the running set while KV and batch room allow. Caller holds mu_.
  void AdmitLocked() {
    while (!waiting_.empty() && static_cast<int>(running_.size()) < options_.max_batch) {
      Job& j = *waiting_.front();
      int64_t free = capacity_ - UsedLocked();
      if (j.reserved_bytes > free) {
        EvictIdleSessionsLocked(j.reserved_bytes - free);
        free = capacity_ - UsedLocked();
        if (j.reserved_bytes > free) break;  // waits for running jobs to finish
      }
      std::unique_ptr<Job> job = std::move(waiting_.front());
      waiting_.pop_front();
      if (!job->is_extension) {
        const int64_t offset = job->session ? job->session->cache->length() : 0;
        // [sharding] a generation without a session may be spread over ranks (EngineOptions).
        auto tail = !job->session && options_.make_generation_cache
                        ? options_.make_generation_cache(static_cast<int64_t>(job->prompt.size()) +
                                                         job->req.sampling.max_tokens)
                        : factory_->Make(offset);
        if (!tail.ok()) {
          // Finished by the loop after mu_ is released: sinks may take their own locks.
          job->admit_error = tail.status();
          failed_admissions_.push_back(std::move(job));
          continue;
        }
        if (job->session) {
          job->cache = std::make_unique<model::PrefixKvCache>(job->session->cache, offset, std::move(*tail),
                                                              weights_.config.n_heads, weights_.config.head_dim);
        } else {
          job->cache = std::move(*tail);
        }
      }
      reserved_total_ += job->reserved_bytes;
      running_.push_back(std::move(job));
    }
  }

  // Frees idle sessions, least recently used first, until `need` bytes are free. Caller holds mu_.
  void EvictIdleSessionsLocked(int64_t need) {
    std::vector<std::shared_ptr<Session>> idle;
    for (const auto& [id, s] : sessions_) {
      if (s->busy == 0 && s.use_count() == 1) idle.push_back(s);
    }
    std::sort(idle.begin(), idle.end(), [](const auto& a, const auto& b) { return a->last_used_ms < b->last_used_ms; });
    int64_t freed = 0;
    for (const auto& s : idle) {
      if (freed >= need) break;
      freed += s->cache->bytes();
      std::fprintf(stderr, "[kvq] evicting idle session '%s' (%lld bytes) under memory pressure\n",
                   s->id.c_str(), static_cast<long long>(s->cache->bytes()));
      sessions_.erase(s->id);
    }
  }

  void ExpireSessionsLocked() {
    const int64_t now = NowUnixMs();
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      const Session& s = *it->second;
      if (s.ttl_seconds > 0 && s.busy == 0 && now - s.last_used_ms > s.ttl_seconds * 1000) {
        it = sessions_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void Loop() {
    std::vector<float> logits;
    for (;;) {
      std::vector<std::unique_ptr<Job>> finished_cancel, finished_error;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait_for(lock, std::chrono::milliseconds(500), [&] {
          return stopping_ || !waiting_.empty() || !running_.empty() || !cancelled_ids_.empty();
        });
        ExpireSessionsLocked();
        // Cancellations (by id) and shutdown without drain.
        for (uint64_t id : cancelled_ids_) {
          for (auto& j : running_) if (j->id == id) j->cancelled = true;
          for (auto& j : waiting_) if (j->id == id) j->cancelled = true;
        }
        cancelled_ids_.clear();
        if (stopping_ && !drain_) {
          for (auto& j : running_) j->cancelled = true;
          for (auto& j : waiting_) j->cancelled = true;
        }
        for (auto it = waiting_.begin(); it != waiting_.end();) {
          if ((*it)->cancelled) { finished_cancel.push_back(std::move(*it)); it = waiting_.erase(it); }
          else ++it;
        }
        for (auto it = running_.begin(); it != running_.end();) {
          Job& j = **it;
          const bool ext_cancel = j.is_extension && j.ext_cancelled && j.ext_cancelled->load();
          if (j.cancelled || ext_cancel) {
            reserved_total_ -= j.reserved_bytes;
            if (!j.is_extension && j.cache) running_kv_bytes_ -= j.cache->bytes();
            finished_cancel.push_back(std::move(*it));
            it = running_.erase(it);
          } else {
            ++it;
          }
        }
        AdmitLocked();
        for (auto& j : failed_admissions_) finished_error.push_back(std::move(j));
        failed_admissions_.clear();
        if (stopping_ && running_.empty() && (waiting_.empty() || !drain_) && finished_cancel.empty() &&
            finished_error.empty()) {
          for (auto& j : waiting_) finished_cancel.push_back(std::move(j));
          waiting_.clear();
          lock.unlock();
          for (auto& j : finished_cancel) Finish(*j, FinishReason::kCancelled, absl::OkStatus());
          return;
        }
      }
      for (auto& j : finished_cancel) Finish(*j, FinishReason::kCancelled, absl::OkStatus());
      for (auto& j : finished_error) Finish(*j, FinishReason::kError, j->admit_error);
      if (running_.empty()) continue;
      Step(&logits);
      // Idle now (every sequence finished): drop what only speeds up steps right away.
      if (running_.empty()) forward_->ReleaseIdleResources();
    }
  }

  // One forward step over every running job: one decode token each, plus one prefill chunk.
  void Step(std::vector<float>* logits) {
    std::vector<model::ForwardItem> items;
    std::vector<Job*> jobs;
    std::vector<std::vector<int32_t>> inputs(running_.size());
    int prefill_budget = options_.prefill_chunk;
    int64_t prefill_tokens = 0, decode_tokens = 0;
    for (size_t i = 0; i < running_.size(); ++i) {
      Job& j = *running_[i];
      if (j.prefilling()) {
        if (prefill_budget <= 0) continue;
        const size_t n = std::min<size_t>(prefill_budget, j.prompt.size() - j.prefilled);
        inputs[i].assign(j.prompt.begin() + j.prefilled, j.prompt.begin() + j.prefilled + n);
        prefill_budget -= static_cast<int>(n);
        prefill_tokens += static_cast<int64_t>(n);
      } else {
        inputs[i].assign(1, j.next_input);
        ++decode_tokens;
      }
      model::KvCache* cache = j.is_extension ? j.session->cache.get() : j.cache.get();
      model::ForwardItem item{cache, inputs[i], false};
      // What the step must return for the row: nothing before a prompt's last chunk (and for a
      // session extension, which samples nothing); else the token alone, greedy or drawn by the
      // rule of kernels/sampling.h with the Philox uniform of (seed, index of the token), after
      // the repetition penalty (a GPU pass does all of it on the device; the row, as it was before
      // the penalty, comes back too when log-probabilities are asked for).
      const bool last_chunk = !j.prefilling() || j.prefilled + inputs[i].size() == j.prompt.size();
      const SamplingParams& so = j.req.sampling;
      if (j.is_extension || !last_chunk) {
        item.output = model::ForwardItem::Output::kNone;
      } else {
        item.output = so.temperature > 0.0f ? model::ForwardItem::Output::kSample : model::ForwardItem::Output::kGreedy;
        item.sample = {so.temperature, so.top_k, so.top_p, so.min_p, so.seed, static_cast<uint64_t>(j.generated),
                       so.repetition_penalty, j.seen.ids()};
        item.also_logits = so.logprobs || so.top_logprobs > 0;
      }
      items.push_back(item);
      jobs.push_back(&j);
    }
    const auto t0 = Clock::now();
    absl::Status s = forward_->Run(absl::MakeSpan(items), {}, logits);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    std::vector<std::pair<Job*, std::pair<FinishReason, absl::Status>>> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++steps_;
      if (secs > 0) {
        const double a = 0.2;  // exponential moving average over steps
        if (decode_tokens) decode_tps_ = (1 - a) * decode_tps_ + a * decode_tokens / secs;
        if (prefill_tokens) prefill_tps_ = (1 - a) * prefill_tps_ + a * prefill_tokens / secs;
      }
      prompt_total_ += prefill_tokens;
      running_kv_bytes_ = 0;
      for (Job* j : jobs) {
        if (!j->is_extension) running_kv_bytes_ += j->cache->bytes();
      }
    }
    const int vocab = weights_.config.vocab_size;
    for (size_t b = 0; b < jobs.size(); ++b) {
      Job& j = *jobs[b];
      if (!s.ok()) {
        done.push_back({&j, {FinishReason::kError, s}});
        continue;
      }
      const float* row = logits->data() + static_cast<int64_t>(b) * vocab;
      if (j.prefilling()) {
        j.prefilled += items[b].tokens.size();
        if (j.is_extension) {
          if (j.progress) j.progress(static_cast<int64_t>(j.prefilled), static_cast<int64_t>(j.prompt.size()));
          if (!j.prefilling()) done.push_back({&j, {FinishReason::kStop, absl::OkStatus()}});
          continue;
        }
        j.req.sink->OnPrefillProgress(static_cast<int64_t>(j.prefilled), static_cast<int64_t>(j.prompt.size()));
        if (j.prefilling()) continue;
      }
      j.usage.kv_bytes = std::max(j.usage.kv_bytes, j.cache->bytes());
      TokenEvent ev;
      ev.index = j.generated;
      ev.token = items[b].token;
      if (j.req.sampling.logprobs || j.req.sampling.top_logprobs > 0) {  // of the row before the penalty
        if (j.req.sampling.logprobs) ev.logprob = model::LogProb(row, vocab, ev.token);
        for (auto [t, lp] : model::TopLogProbs(row, vocab, j.req.sampling.top_logprobs)) ev.top_logprobs.push_back({t, lp});
      }
      const bool stop = std::find(j.stops.begin(), j.stops.end(), ev.token) != j.stops.end();
      if (stop) {
        done.push_back({&j, {FinishReason::kStop, absl::OkStatus()}});
        continue;
      }
      ++j.generated;
      j.seen.Add(ev.token);
      j.next_input = ev.token;
      j.req.sink->OnToken(ev);
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++generated_total_;
      }
      if (j.generated >= j.req.sampling.max_tokens) done.push_back({&j, {FinishReason::kLength, absl::OkStatus()}});
    }
    if (done.empty()) return;
    std::vector<std::unique_ptr<Job>> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [jp, r] : done) {
        for (auto it = running_.begin(); it != running_.end(); ++it) {
          if (it->get() == jp) {
            reserved_total_ -= jp->reserved_bytes;
            if (!jp->is_extension) running_kv_bytes_ -= jp->cache->bytes();
            out.push_back(std::move(*it));
            running_.erase(it);
            break;
          }
        }
      }
    }
    for (size_t i = 0; i < out.size(); ++i) Finish(*out[i], done[i].second.first, done[i].second.second);
  }

  EngineOptions options_;
  model::LlamaWeights weights_;
  std::unique_ptr<model::Tokenizer> tokenizer_;
  std::unique_ptr<sharding::KvCacheFactory> factory_;
  std::unique_ptr<model::ForwardPass> forward_;
#if KVQ_HAVE_CUDA
  std::unique_ptr<sharding::GpuBackend> gpu_;  // pool and stream; outlives factory_ and forward_
  const sharding::GpuForward* gpu_forward_ = nullptr;  // == forward_ (its graph counter)
  int64_t graph_launches_at_start_ = 0;  // after the warm-up (InitGpu)
#endif
  std::vector<int32_t> model_stops_;
  int64_t capacity_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Job>> waiting_;
  std::vector<std::unique_ptr<Job>> running_;  // touched by the loop thread; guarded for Stats
  std::vector<uint64_t> cancelled_ids_;
  std::vector<std::unique_ptr<Job>> failed_admissions_;  // finished outside mu_
  std::map<std::string, std::shared_ptr<Session>> sessions_;
  int64_t reserved_total_ = 0;
  uint64_t next_id_ = 1;
  bool stopping_ = false;
  bool drain_ = false;
  double decode_tps_ = 0, prefill_tps_ = 0;
  int64_t prompt_total_ = 0, generated_total_ = 0, steps_ = 0;
  int64_t running_kv_bytes_ = 0;  // KV held by running generations, as of the last step
  std::thread thread_;
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  auto impl = std::make_unique<Impl>();
  KVQ_RETURN_IF_ERROR(impl->Init(options));
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() { impl_->Shutdown(false); }

const model::ModelConfig& Engine::config() const { return impl_->config(); }
const model::Tokenizer& Engine::tokenizer() const { return impl_->tokenizer(); }
const std::string& Engine::kv_format() const { return impl_->kv_format(); }
const sharding::KvCacheFactory& Engine::kv_factory() const { return impl_->kv_factory(); }
absl::StatusOr<uint64_t> Engine::Enqueue(GenerateRequest r) { return impl_->Enqueue(std::move(r)); }
void Engine::Cancel(uint64_t id) { impl_->Cancel(id); }
absl::StatusOr<SessionInfo> Engine::CreateSession(const std::string& id, int64_t ttl) {
  return impl_->CreateSession(id, ttl);
}
absl::StatusOr<SessionInfo> Engine::ExtendSession(const std::string& id, const std::vector<int32_t>& tokens,
                                                  const std::function<void(int64_t, int64_t)>& progress,
                                                  const std::atomic<bool>* cancelled) {
  return impl_->ExtendSession(id, tokens, progress, cancelled);
}
absl::StatusOr<SessionInfo> Engine::GetSession(const std::string& id) const { return impl_->GetSession(id); }
std::vector<SessionInfo> Engine::ListSessions() const { return impl_->ListSessions(); }
absl::Status Engine::DeleteSession(const std::string& id) { return impl_->DeleteSession(id); }
absl::Status Engine::SaveSession(const std::string& id, const std::string& path) {
  return impl_->SaveSession(id, path);
}
absl::StatusOr<SessionInfo> Engine::LoadSession(const std::string& id, const std::string& path) {
  return impl_->LoadSession(id, path);
}
EngineStats Engine::Stats() const { return impl_->Stats(); }
void Engine::Shutdown(bool drain) { impl_->Shutdown(drain); }

}  // namespace kvq::engine
