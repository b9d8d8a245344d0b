// The engine: continuous batching of generation requests over the KV store, on the CPU reference
// backend (and, later, on GPUs and across ranks). This is the seam the gRPC server drives; it knows
// nothing about gRPC or Prometheus. Thread-safe: every public method may be called from any thread.
// Token sinks are called from the engine's scheduler thread and must not block for long.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/tokenizer.h"
#include "sharding/kv_cache_factory.h"

namespace kvq::model {
class KvCache;
}  // namespace kvq::model

namespace kvq::engine {

// Unset fields in the API map to these defaults. temperature == 0 means greedy.
struct SamplingParams {
  float temperature = 0.0f;
  float top_p = 1.0f;          // (0, 1]
  int top_k = 0;               // 0 = off
  float min_p = 0.0f;          // [0, 1)
  float repetition_penalty = 1.0f;  // > 0; 1 = off (applied to logits of tokens already seen)
  uint64_t seed = 0;
  int max_tokens = 256;        // >= 1
  std::vector<int32_t> stop_token_ids;  // in addition to the model's end-of-turn ids
  bool ignore_eos = false;
  int top_logprobs = 0;        // 0 = none; otherwise the top-n alternatives per token (<= 20)
  bool logprobs = false;       // return the chosen token's logprob
};

enum class FinishReason { kStop, kLength, kCancelled, kError };
const char* FinishReasonName(FinishReason r);

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};

struct TokenEvent {
  int32_t token = 0;
  int index = 0;                          // 0-based index among generated tokens
  std::optional<float> logprob;           // when SamplingParams::logprobs
  std::vector<TokenLogprob> top_logprobs; // when top_logprobs > 0
};

struct Usage {
  int64_t prompt_tokens = 0;     // tokens in this request's prompt (excluding a session's context)
  int64_t cached_tokens = 0;     // tokens reused from a session (not prefilled again)
  int64_t generated_tokens = 0;
  int64_t kv_bytes = 0;          // KV bytes this sequence held at its peak
};

class TokenSink {
 public:
  virtual ~TokenSink() = default;
  // Prefill progress (tokens of the prompt done so far / total), reported per chunk.
  virtual void OnPrefillProgress(int64_t done, int64_t total) {}
  virtual void OnToken(const TokenEvent& event) = 0;
  // Exactly once per accepted request. status is OK unless reason == kError.
  virtual void OnFinish(FinishReason reason, const absl::Status& status, const Usage& usage) = 0;
};

struct GenerateRequest {
  std::vector<int32_t> prompt;           // token ids (non-empty unless session_id is set)
  std::string session_id;                // optional: continue after this session's context
  SamplingParams sampling;
  std::shared_ptr<TokenSink> sink;
};

struct SessionInfo {
  std::string id;
  int64_t tokens = 0;       // context length held
  int64_t kv_bytes = 0;
  int64_t created_unix_ms = 0;
  int64_t last_used_unix_ms = 0;
  int64_t ttl_seconds = 0;  // 0 = no expiry
};

struct EngineStats {
  int running = 0;
  int waiting = 0;
  int sessions = 0;
  int64_t kv_bytes_used = 0;
  int64_t kv_bytes_capacity = 0;
  int64_t max_context_tokens = 0;     // the largest single context that fits now
  double effective_bits_per_element = 16.0;
  double outlier_fraction = 0.0;
  double decode_tokens_per_second = 0.0;   // recent, all sequences
  double prefill_tokens_per_second = 0.0;  // recent
  int64_t prompt_tokens_total = 0;
  int64_t generated_tokens_total = 0;
  double merge_seconds_per_step = 0.0;     // sharded runs; 0 on one rank
  int64_t steps_total = 0;
  int64_t graph_steps_total = 0;              // GPU: decode steps run as a captured CUDA graph
  int64_t key_outlier_overflow_steps_total = 0;  // GPU: steps whose key outliers outgrew a block's area
};

struct EngineOptions {
  std::string model;                 // *.gguf, HF directory, or synthetic:<name>[:seed]
  std::string tokenizer;             // empty: from the model (GGUF) or tokenizer.json beside it
  std::string kv_format = "fp16";    // fp16 | nuq4-1% | nuq3-1% | ... (see kvstore)
  // "cpu": the reference backend (OpenBLAS). "cuda": the GPU engine on the current device
  // (weights in weights_dtype, KV in a paged pool sized from kv_capacity_bytes or
  // gpu_memory_fraction of the memory left after the weights).
  std::string device = "cpu";
  std::string weights_dtype = "f16"; // cuda: f16 | bf16 | f32 (f32: matches the CPU to rounding)
  double gpu_memory_fraction = 0.90;
  // cuda, formats with key outliers: every block's key-outlier area holds this many times the
  // nominal count (sharding/gpu_block_geometry.h measures the default); entries beyond it are
  // dropped with a warning. <= 0: the default.
  double key_outlier_reserve = 0;
  std::string quantizer;             // quantizer file for quantized formats
  int64_t kv_capacity_bytes = 0;     // 0: a default from available memory
  int max_batch = 16;                // sequences decoded together
  int prefill_chunk = 512;           // tokens per prefill chunk, interleaved with decode steps
  int threads = 0;                   // 0: hardware concurrency
  std::string session_dir;           // where SaveSession writes by default
  int64_t session_ttl_seconds = 0;   // default TTL for new sessions (0: none)
  // [sharding] Makes the KV cache of a generation that will hold up to `max_tokens` tokens, e.g.
  // ShardedKvCacheFactory::Make (sharding/sharded_kv_cache.h) spreading it over MPI ranks; it must
  // use kv_format. Null: one rank. Sessions and their forks always stay on rank 0.
  std::function<absl::StatusOr<std::unique_ptr<model::KvCache>>(int64_t max_tokens)>
      make_generation_cache;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const model::ModelConfig& config() const;
  const model::Tokenizer& tokenizer() const;
  const std::string& kv_format() const;
  // The factory of this engine's own caches (a GPU engine's: over its block pool), e.g. for rank
  // 0's shards of sequences spread over ranks. Lives as long as the engine.
  const sharding::KvCacheFactory& kv_factory() const;

  // Validates and queues a request. Errors (returned, nothing queued): InvalidArgument for bad
  // parameters or token ids outside the vocabulary; NotFound for an unknown session;
  // ResourceExhausted when prompt + max_tokens cannot fit (the limit is in the message);
  // Unavailable after Shutdown. On success returns the request id; the sink then receives
  // progress, tokens, and exactly one OnFinish.
  absl::StatusOr<uint64_t> Enqueue(GenerateRequest request);
  // Stops a request and frees its KV at once (OnFinish(kCancelled) follows). Unknown ids: no-op.
  void Cancel(uint64_t request_id);

  // Sessions: a prefilled context that stays resident and can be extended or queried many times.
  absl::StatusOr<SessionInfo> CreateSession(const std::string& id, int64_t ttl_seconds = -1);
  // Appends (prefills) tokens to a session. Blocks until done or cancelled via the flag.
  // progress(done, total) is called per chunk.
  absl::StatusOr<SessionInfo> ExtendSession(
      const std::string& id, const std::vector<int32_t>& tokens,
      const std::function<void(int64_t, int64_t)>& progress = nullptr,
      const std::atomic<bool>* cancelled = nullptr);
  absl::StatusOr<SessionInfo> GetSession(const std::string& id) const;
  std::vector<SessionInfo> ListSessions() const;
  absl::Status DeleteSession(const std::string& id);
  // Saves the session's compressed KV (plus its tokens) to `path`; Load restores it under `id`.
  absl::Status SaveSession(const std::string& id, const std::string& path);
  absl::StatusOr<SessionInfo> LoadSession(const std::string& id, const std::string& path);

  EngineStats Stats() const;
  // Stops accepting requests; running ones are finished (drain) or cancelled.
  void Shutdown(bool drain);

 private:
  class Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvq::engine
