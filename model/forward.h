// The Llama-family decoder forward pass on the CPU (fp32 math, OpenBLAS GEMMs): embeddings,
// RMSNorm, q/k/v projections (keys stay pre-RoPE in the cache), RoPE, GQA attention, SwiGLU MLP,
// tied or untied output head. Batches of sequences with different numbers of new tokens (prefill
// chunks and single decode tokens mixed). This is the reference backend and the oracle for the GPU.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/reference/rope.h"
#include "model/weights.h"

namespace kvq::model {

// What a cache that works on device memory needs from the GPU forward pass that calls it (which
// owns the CUDA stream): copies between the caller's device and the host, and the merge of
// attention partials, so that caches built over other caches (sharding/sharded_kv_cache.h) need
// no CUDA of their own. Every call is complete when it returns.
class DeviceOps {
 public:
  virtual ~DeviceOps() = default;
  virtual absl::Status ToHost(const float* device, size_t n, float* host) = 0;
  virtual absl::Status ToDevice(const float* host, size_t n, float* device) = 0;
  // Device scratch for `parts` attention partials of `rows` rows (rows = queries x heads):
  // o of part i at o + i * rows * head_dim, lse at lse + i * rows. Valid until the next call.
  struct Parts {
    float* o = nullptr;
    float* lse = nullptr;
  };
  virtual absl::StatusOr<Parts> PartsScratch(int parts, int64_t rows, int head_dim) = 0;
  // o, lse (device) = the exact merge of the first `parts` partials of `p`, in order.
  virtual absl::Status MergeParts(const Parts& p, int parts, int64_t rows, int head_dim, float* o,
                                  float* lse) = 0;
};

// One sequence's stored keys (pre-RoPE) and values, per layer. Implementations: the dense
// DenseKvCache below (fp16 or fp32 storage) and, in the engine, the KVQuant quantized cache.
class KvCache {
 public:
  virtual ~KvCache() = default;
  // Committed tokens (visible to attention).
  virtual int64_t length() const = 0;
  // Stages n new tokens' keys (pre-RoPE) and values of one layer at positions
  // [length(), length() + n). k, v: [n, n_kv_heads, head_dim].
  virtual absl::Status Append(int layer, const float* k, const float* v, int n) = 0;
  // Makes n staged tokens visible, after every layer appended them.
  virtual void Commit(int n) = 0;
  // Drops staged tokens that were not committed (a step that failed part-way).
  virtual void DiscardStaged() = 0;
  // Attention of n_q queries over the stored tokens: query i attends to positions
  // [0, key_end[i]), which may include staged tokens. q: [n_q, n_heads, head_dim], already rotated
  // at the query positions; keys are rotated at their own positions inside. Outputs the normalized
  // o [n_q, n_heads, head_dim] and the natural-log log-sum-exp lse [n_q, n_heads] of the scaled
  // scores (-inf with o = 0 for an empty range), so that partials merge exactly.
  virtual void Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
                      float* lse) const = 0;
  // Device-memory forms of Attend and Append, for caches on (or in front of) the GPU of the
  // forward pass that calls them (GPU caches, and sharded caches whose local shards are GPU
  // caches): q, o, lse, k, v are device pointers of the current CUDA device; the caller's work
  // that produced the inputs is complete before the call, and the outputs are complete when it
  // returns. AttendDevice leaves o and lse untouched when no key is in range (the caller fills
  // them); otherwise as Attend. Unimplemented unless device_memory() says so.
  virtual bool device_memory() const { return false; }
  virtual absl::Status AttendDevice(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
                                    float* lse, DeviceOps& ops) const {
    return absl::UnimplementedError("this KV cache does not work on device memory");
  }
  virtual absl::Status AppendDevice(int layer, const float* k, const float* v, int n, DeviceOps& ops) {
    return absl::UnimplementedError("this KV cache does not work on device memory");
  }
  // Bytes this cache holds (for accounting).
  virtual int64_t bytes() const = 0;
  // Bytes of the cache's canonical compressed form (what the table of effective bits reports):
  // bytes() unless a paged pool reserves more than it uses.
  virtual int64_t exact_bytes() const { return bytes(); }
  // Dequantized pre-RoPE keys and values of one layer for local tokens [0, end), staged ones
  // included: [end][n_kv_heads][head_dim] each. Lets another backend (the GPU forward pass in
  // evaluation mode) attend through this cache's exact quantization. Unimplemented by default.
  virtual absl::Status ReadDequantized(int layer, int64_t end, std::vector<float>* k,
                                       std::vector<float>* v) const {
    return absl::UnimplementedError("this KV cache cannot be read back");
  }
  // RoPE position of local token 0.
  virtual int64_t first_position() const { return 0; }
  // Benchmarks only — a synthetic fill, to be labelled as such wherever its results are reported:
  // an empty cache comes to hold exactly `tokens` committed tokens of random pre-RoPE keys
  // (N(0, key_sigma^2)) and values (N(0, 1)) of a model with n_layers layers of kv_dim. The
  // default appends them chunk by chunk through Append (real quantization); the GPU cache appends
  // one block and replicates it (prefilling millions of tokens takes hours).
  virtual absl::Status FillSynthetic(int n_layers, int kv_dim, int64_t tokens, uint64_t seed, float key_sigma);
  // A copy that shares nothing mutable with this one (sessions fork from it).
  virtual std::unique_ptr<KvCache> Clone() const = 0;
  // The committed tokens in the cache's own compressed form (session save/restore).
  virtual absl::StatusOr<std::string> Serialize() const = 0;
};

// A cache that continues a shared, immutable prefix (a session's first `prefix_length` tokens):
// attention merges the prefix's partial with the private tail's, so forks never copy the prefix.
class PrefixKvCache : public KvCache {
 public:
  PrefixKvCache(std::shared_ptr<const KvCache> prefix, int64_t prefix_length,
                std::unique_ptr<KvCache> tail, int n_heads, int head_dim);
  int64_t length() const override { return prefix_length_ + tail_->length(); }
  absl::Status Append(int layer, const float* k, const float* v, int n) override {
    return tail_->Append(layer, k, v, n);
  }
  void Commit(int n) override { tail_->Commit(n); }
  void DiscardStaged() override { tail_->DiscardStaged(); }
  void Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
              float* lse) const override;
  int64_t bytes() const override { return tail_->bytes(); }  // the prefix is the session's
  std::unique_ptr<KvCache> Clone() const override;
  absl::StatusOr<std::string> Serialize() const override {
    return absl::UnimplementedError("a forked cache is not saved; save the session it came from");
  }
  const KvCache& prefix() const { return *prefix_; }
  int64_t prefix_length() const { return prefix_length_; }
  KvCache& tail() { return *tail_; }

 private:
  std::shared_ptr<const KvCache> prefix_;
  int64_t prefix_length_;
  std::unique_ptr<KvCache> tail_;
  int n_heads_, head_dim_;
};

// Plain fp16 (or fp32) storage of pre-RoPE keys and values.
class DenseKvCache : public KvCache {
 public:
  // position_offset: the RoPE position of this cache's first token (a cache that continues another
  // one, e.g. a fork of a session, starts at the session's length).
  DenseKvCache(const ModelConfig& config, bool fp32_storage = false, int64_t position_offset = 0);
  int64_t length() const override { return length_; }
  absl::Status Append(int layer, const float* k, const float* v, int n) override;
  void Commit(int n) override;
  void DiscardStaged() override;
  void Attend(int layer, const float* q, int n_q, const int64_t* key_end, float* o,
              float* lse) const override;
  int64_t bytes() const override;
  std::unique_ptr<KvCache> Clone() const override;
  absl::StatusOr<std::string> Serialize() const override;
  // Restores what Serialize wrote (checks the shape against config).
  static absl::StatusOr<std::unique_ptr<DenseKvCache>> Deserialize(const ModelConfig& config,
                                                                   const std::string& bytes);
  // Dequantized pre-RoPE keys / values of one layer for tokens [begin, end): [n, n_kv, hd].
  void Read(int layer, int64_t begin, int64_t end, std::vector<float>* k,
            std::vector<float>* v) const;
  absl::Status ReadDequantized(int layer, int64_t end, std::vector<float>* k,
                               std::vector<float>* v) const override {
    Read(layer, 0, end, k, v);
    return absl::OkStatus();
  }
  int64_t first_position() const override { return position_offset_; }

 private:
  int n_layers_, n_heads_, n_kv_heads_, head_dim_;
  bool fp32_;
  int64_t position_offset_;
  std::vector<double> inv_freq_;
  int64_t length_ = 0;
  int64_t staged_ = 0;  // tokens appended to the last layer beyond length_
  std::vector<std::vector<uint16_t>> k16_, v16_;  // per layer, [tokens, n_kv, hd] (fp16 bits)
  std::vector<std::vector<float>> k32_, v32_;     // per layer, when fp32_storage
};

// Dense attention math shared by the caches: q [n_q, n_heads, hd] (rotated), k_rot and v
// [n_keys, n_kv, hd] (keys rotated), query i attends keys [0, key_end[i]). Outputs as KvCache::Attend.
void AttendDense(const float* q, int n_q, int n_heads, const float* k_rot, const float* v,
                 int64_t n_keys, int n_kv_heads, int head_dim, const int64_t* key_end, float* o,
                 float* lse);

// Rope parameters of a model.
kernels::RopeParams RopeParamsFor(const ModelConfig& config);

struct ForwardItem {
  KvCache* cache = nullptr;               // the sequence's cache; new tokens are appended
  absl::Span<const int32_t> tokens;       // new tokens, at positions cache->length() + i
  bool all_logits = false;                // logits for every new token, else the last only
  // What the step returns for the item's last token when all_logits is false (serving):
  //   kLogits: its row of logits (the default);
  //   kGreedy: its greedy token, model::Argmax of that row, in `token`;
  //   kSample: a token drawn by the rule of kernels/sampling.h with `sample` (temperature, top-k,
  //            top-p, min-p; the Philox uniform of (seed, step)) in `token`;
  //   for both, a sample.repetition_penalty other than 1 first penalises the row's logits of the
  //   distinct token ids in sample.penalized (model::ApplyRepetitionPenalty);
  //   kNone:   nothing (a prefill chunk before the prompt's last one).
  // With kGreedy and kSample the row in `logits` is left unspecified unless `also_logits` (e.g. for
  // log-probabilities; the row before the penalty): a GPU pass picks the token on the device and
  // copies 4 bytes, not the row.
  enum class Output { kLogits, kGreedy, kSample, kNone };
  struct Sample {
    float temperature = 1.0f;  // > 0 (<= 0 picks the greedy token)
    int top_k = 0;             // 0 = off
    float top_p = 1.0f;        // 1 = off
    float min_p = 0.0f;        // 0 = off
    uint64_t seed = 0;
    uint64_t step = 0;         // the draw's counter, e.g. the index of the token in its generation
    float repetition_penalty = 1.0f;       // 1 = off; > 0
    absl::Span<const int32_t> penalized;  // distinct token ids in [0, vocab): the penalty's history
  };
  Output output = Output::kLogits;
  bool also_logits = false;
  Sample sample;
  int32_t token = -1;  // out, with kGreedy and kSample
  // Whether the step returns the item's logits row(s) / picks a token for it.
  bool wants_logits() const { return all_logits || output == Output::kLogits || also_logits; }
  bool wants_token() const { return !all_logits && (output == Output::kGreedy || output == Output::kSample); }
};

struct ForwardOptions {
  // false (serving): attention inside the new chunk is full precision (before quantization) and
  // the stored past is attended through the cache; the two partials are merged.
  // true (evaluation): the chunk is appended first and every query attends through the cache,
  // exactly as if the tokens had been decoded one by one from the compressed cache.
  bool chunk_through_cache = false;
};

// One step of the model over a batch of items: the CPU reference (Forward below) and the GPU
// engine's pass (sharding/gpu/gpu_forward.h) implement it with the same meaning.
class ForwardPass {
 public:
  virtual ~ForwardPass() = default;
  // Runs one step. logits: for each item in order, tokens.size() rows (all_logits) or one row,
  // each of vocab_size floats. On error nothing is committed to any cache.
  virtual absl::Status Run(absl::Span<ForwardItem> items, const ForwardOptions& options,
                           std::vector<float>* logits) const = 0;
  virtual const ModelConfig& config() const = 0;
  // Called by the engine when it has no running sequences: frees what only speeds up steps (the
  // GPU pass's captured CUDA graphs).
  virtual void ReleaseIdleResources() const {}
};

class Forward : public ForwardPass {
 public:
  explicit Forward(const LlamaWeights& weights);
  absl::Status Run(absl::Span<ForwardItem> items, const ForwardOptions& options,
                   std::vector<float>* logits) const override;
  const ModelConfig& config() const override { return w_.config; }
  const LlamaWeights& weights() const { return w_; }

 private:
  const LlamaWeights& w_;
  std::vector<double> inv_freq_;
};

// Threads the CPU backend's BLAS uses (OpenBLAS). n <= 0 picks the default: half the hardware
// threads, at most 8 (BLAS threads busy-wait, so leave room for the rest of the process).
void SetCpuThreads(int n);
int DefaultCpuThreads();

// Merges attention partials: lse = log(exp(lse_a) + exp(lse_b)), o = weighted sum. In place on a.
void MergeAttentionPartial(float* o_a, float* lse_a, const float* o_b, const float* lse_b,
                           int rows, int head_dim);

}  // namespace kvq::model
