// End-to-end GPU engine benchmark (issue: GPU engine): time per output token versus context length
// and batch, time to first token and prefill tokens/s versus prompt length, for the real SmolLM2
// and for Llama-3-8B / LLaMA-2-7B shapes with synthetic (device-generated) weights; fp16 KV versus
// nuqB-1%. Every row shows its floor: the bytes one step must read (weights + KV) over the copy
// bandwidth measured in the same process, and achieved/floor. The largest context that fits is
// found by filling one sequence until the block pool is full, next to the planner's prediction.
//
// Long contexts are a SYNTHETIC FILL: one block of random normal pre-RoPE keys/values quantized by
// the real append kernel (valid codes, scales and outliers), replicated into every block of the
// context, with no forward pass; prefilling millions of tokens would take hours. Prefill speed is
// measured separately on real prefill (the forward pass).
//
//   engine_bench --model synthetic:llama-3-8b --formats fp16,nuq3-1% --contexts 1024,131072,1048576
//                --batches 1,8 [--prefill 1024,4096] [--capacity] [--quantizers DIR]
//
// --sharded, under mpirun (one rank per GPU; the same command on 1, 2, 4 or 8 GPUs): rank 0 holds
// the model and a shard, the other ranks KV shards; every sequence of a row spreads over the ranks
// by the shard planner (each rank's shard a synthetic fill of its range), and decode steps run
// through the sharded cache (rank 0's shard on device memory; q, new k/v and partials over the
// device data plane: NCCL with one GPU per rank, else staged through MPI; --data_plane). Each row adds the
// ranks' largest shard, the floor max(weights + rank 0's KV, a worker's KV) over the copy bandwidth,
// and per layer where ShardedKvCache::Attend spent its time.
//   mpirun -np 4 engine_bench --sharded --model synthetic:llama-3-8b --formats nuq3-1% \
//          --contexts 1048576,4194304 --batches 1
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "model/config.h"
#include "model/fingerprint.h"
#include "model/sampling.h"
#include "model/weights.h"

#if KVQ_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/engine_ops.h"
#include "kernels/kv_append.h"
#include "kernels/row_gemv.h"
#include "kernels/sampling.h"
#include "kvstore/quantized_kv_cache.h"
#include "sharding/gpu/gpu_forward.h"
#include "sharding/gpu/gpu_kv_cache.h"
#include "sharding/gpu/gpu_backend.h"
#include "sharding/gpu/device_data_plane.h"
#include "sharding/kv_cache_factory.h"
#include "sharding/shard_planner.h"
#include "sharding/sharded_kv_cache.h"
#include "sharding/worker.h"
#if KVQ_HAVE_MPI
#include "sharding/mpi_transport.h"
#endif
#endif

ABSL_FLAG(std::string, model, "synthetic:llama-3-8b", "*.gguf or synthetic:<builtin>");
ABSL_FLAG(std::string, formats, "fp16,nuq4-1%,nuq3-1%,nuq2-1%", "KV formats");
ABSL_FLAG(std::string, quantizers, "", "real model: directory of <format>.kvqq (synthetic: generated)");
ABSL_FLAG(std::string, contexts, "1024,32768,131072,1048576", "decode: context lengths");
ABSL_FLAG(std::string, batches, "1,8,32", "decode: batch sizes");
ABSL_FLAG(std::string, prefill, "", "prefill: prompt lengths (real prefill, batch 1)");
ABSL_FLAG(int, prefill_chunk, 2048, "prefill chunk");
ABSL_FLAG(int64_t, prefill_baseline_max, 16384,
          "prompts up to this length are also prefilled with the first implementation (decode kernel "
          "once per query row, scalar chunk kernel) for the speed-up column");
ABSL_FLAG(int, steps, 10, "timed decode steps per row");
ABSL_FLAG(std::string, ab, "",
          "decode: also time each row with the other setting of each listed GpuForward switch, same caches, "
          "same process: fold (set_fold_decode_self: the step's own token folded into the decode merge), gemv "
          "(set_decode_gemv: decode GEMV kernels with the RMSNorm / SwiGLU input stages), pdl "
          "(set_programmatic_launch: programmatic dependent launch of kvq's kernels), append (set_parallel_append: the "
          "key and value appends on side streams beside the RoPE), stacked (set_stacked_qkv: one q/k/v GEMM for batched "
          "decode steps), pick (the step's tokens picked on the device, 4 bytes per row to the host, or from the "
          "logits copied to the host by model::Argmax / model::Sampler there), cluster (kernels::SetSamplingClusters: sampled tokens on a cluster of CTAs per row), rowgemv (kernels::SetRowGemv: GEMMs of up to --row_gemv_rows rows by the row GEMV instead of cuBLAS), rowearly (kernels::SetRowGemvEarlyStart: the row GEMV started early, its first weights loaded before it waits for the kernel before), keydec (kernels::SetKeyAppendDecodePath: "
          "decode steps' key appends by a warp per head and sequence, or by the chunk kernel)");
ABSL_FLAG(float, temperature, 0.0f, "decode: > 0 samples each step's tokens (with --top_k, --top_p) instead of greedy");
ABSL_FLAG(int, top_k, 0, "decode: top-k of the sampled steps (0 = off)");
ABSL_FLAG(float, top_p, 1.0f, "decode: top-p of the sampled steps (1 = off)");
ABSL_FLAG(float, repetition_penalty, 1.0f,
          "decode: repetition penalty of every row (1 = off) over --penalized_ids distinct token ids");
ABSL_FLAG(int, penalized_ids, 512, "decode: with --repetition_penalty, the distinct ids of each row's history");
ABSL_FLAG(bool, capacity, false, "fill one sequence until the pool is full, then decode");
ABSL_FLAG(std::string, weights_dtype, "f16", "f16 | bf16 | f32");
ABSL_FLAG(double, pool_fraction, 0.92, "fraction of free memory (after weights) for the KV pool");
ABSL_FLAG(std::string, label, "", "free text printed with every row (e.g. the GPU)");
ABSL_FLAG(int, row_gemv_rows, -1,
          "GEMMs of up to this many rows go to the row GEMV (kernels::SetRowGemvRows; -1 keeps the default)");
ABSL_FLAG(bool, sharded, false,
          "under mpirun: sequences spread over the ranks' GPUs through the sharded cache (see the header)");
ABSL_FLAG(int64_t, min_tokens_per_rank, 65536, "--sharded: fewest tokens a rank holds before a sequence spreads");
ABSL_FLAG(int, mpi_max_nap_us, kvq::sharding::kGpuRankMaxNapUs,
          "--sharded: longest nap of a rank's MPI waits (the CPU backend's default is 500)");
ABSL_FLAG(std::string, data_plane, "auto",
          "--sharded: how q, new k/v and partials move between the ranks' GPUs: auto (NCCL when every rank has "
          "its own GPU, else host staging), host-staged, or host (the caches' host forms: MPI through the host "
          "inside the commands)");
ABSL_FLAG(bool, mpi_wait_sends, false,
          "--sharded: each MPI send waits until the peer takes it (the transport before queued sends; "
          "for comparisons)");

#if KVQ_HAVE_CUDA
namespace kvq {
namespace {

#define CHECK_OK(expr)                                                              \
  do {                                                                              \
    const absl::Status s_ = (expr);                                                 \
    if (!s_.ok()) {                                                                 \
      std::fprintf(stderr, "engine_bench: %s: %s\n", #expr, s_.ToString().c_str()); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

std::vector<int64_t> Ints(const std::string& s) {
  std::vector<int64_t> v;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int64_t x;
    if (absl::SimpleAtoi(p, &x)) v.push_back(x);
  }
  return v;
}

double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Device-to-device copy bandwidth (read + write bytes over time), the reference for every floor.
double CopyBandwidth() {
  const size_t n = size_t{4} << 30;
  void *a, *b;
  if (cudaMalloc(&a, n) != cudaSuccess || cudaMalloc(&b, n) != cudaSuccess) return 0;
  cudaMemset(a, 1, n);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
  cudaEventRecord(e0);
  for (int i = 0; i < 5; ++i) cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
  cudaEventRecord(e1);
  cudaEventSynchronize(e1);
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  cudaFree(a);
  cudaFree(b);
  return 5.0 * 2.0 * n / (ms * 1e-3);
}

// Per-channel thresholds and uniform LUTs for a synthetic model: keys ~ N(0, sigma) are clipped at
// +-2.576 sigma, i.e. 1% outliers for the -1% formats (no-outlier formats cover +-4 sigma).
std::shared_ptr<const kvstore::Quantizer> SyntheticQuantizer(const model::ModelConfig& c,
                                                             const kvstore::KvFormat& f, float sigma) {
  kvstore::QuantizerData d;
  d.shape = {c.n_layers, c.n_kv_heads, c.head_dim};
  d.fingerprint = "synthetic";
  d.format = f;
  const size_t n = static_cast<size_t>(c.n_layers) * c.kv_dim();
  const float t = (f.outlier_fraction > 0 ? 2.576f : 4.0f) * sigma;
  d.key_lower.assign(n, -t);
  d.key_upper.assign(n, t);
  const int C = f.num_centroids();
  for (int l = 0; l < c.n_layers; ++l) {
    for (int j = 0; j < C; ++j) {
      d.key_lut.push_back(-1.0f + 2.0f * j / (C - 1));
      d.value_lut.push_back(-1.0f + 2.0f * j / (C - 1));
    }
  }
  d.key_qnorm_scale.assign(c.n_layers, 1.0f);
  d.key_qnorm_offset.assign(c.n_layers, 0.0f);
  d.value_qnorm_scale.assign(c.n_layers, 1.0f);
  d.value_qnorm_offset.assign(c.n_layers, 0.0f);
  auto q = kvstore::Quantizer::Create(std::move(d));
  CHECK_OK(q.status());
  return std::make_shared<const kvstore::Quantizer>(std::move(*q));
}

struct Setup {
  cudaStream_t stream = nullptr;
  std::unique_ptr<sharding::GpuForward> fwd;
  std::shared_ptr<sharding::GpuKvPool> pool;
  std::unique_ptr<sharding::KvCacheFactory> factory;
  kvstore::KvFormat format;
  double expected_bytes_per_token = 0;  // canonical bytes one token's KV occupies (all layers)
  float sigma = 1.0f;
  std::shared_ptr<const kvstore::Quantizer> calibrated;  // the pool's quantizer when it is a real model's
};

// Two-sided normal quantile: the t with P(|X| > t) = f for X ~ N(0, 1) (bisection on erfc).
double NormalTwoSided(double f) {
  double lo = 0.0, hi = 10.0;
  for (int i = 0; i < 100; ++i) {
    const double mid = 0.5 * (lo + hi);
    (std::erfc(mid / std::sqrt(2.0)) > f ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

// Synthetic fill: the first sink + 256 tokens are random pre-RoPE k/v appended through the append
// kernel (real quantization, real outliers); the rest of the n tokens are copies of that block
// (GpuKvCache::ReplicateFirstBlock), rounded down to whole blocks. Returns the tokens held. Keys
// follow the pool's calibrated per-channel thresholds when it has them (a real model's quantizer):
// each channel normal around the middle of its [lower, upper] with the format's outlier fraction
// outside it, so the key outliers are as many as the format plans for (N(0, 1) keys against a real
// model's thresholds overflowed the blocks' key-outlier areas). Values are per-token formats:
// N(0, 1).
int64_t Fill(Setup& st, sharding::GpuKvCache* cache, int64_t n, uint64_t seed) {
  const model::ModelConfig& c = st.fwd->config();
  const int m = cache->sink_capacity() + 256;
  float *k, *v;
  CHECK_OK(cudaMalloc(&k, int64_t{m} * c.kv_dim() * 4) == cudaSuccess ? absl::OkStatus() : absl::InternalError("malloc"));
  CHECK_OK(cudaMalloc(&v, int64_t{m} * c.kv_dim() * 4) == cudaSuccess ? absl::OkStatus() : absl::InternalError("malloc"));
  const kvstore::QuantizerData* qd = st.calibrated != nullptr ? &st.calibrated->data() : nullptr;
  const bool calibrated = qd != nullptr && !qd->key_lower.empty();
  const double t = calibrated ? NormalTwoSided(std::max(1e-4, static_cast<double>(st.format.outlier_fraction))) : 0.0;
  std::vector<float> hk(calibrated ? static_cast<size_t>(m) * c.kv_dim() : 0);
  for (int l = 0; l < c.n_layers; ++l) {
    if (calibrated) {
      std::mt19937_64 rng(seed * 7919 + l * 2);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      const float* lo = qd->key_lower.data() + static_cast<size_t>(l) * c.kv_dim();
      const float* hi = qd->key_upper.data() + static_cast<size_t>(l) * c.kv_dim();
      for (int i = 0; i < m; ++i) {
        for (int ch = 0; ch < c.kv_dim(); ++ch) {
          hk[static_cast<size_t>(i) * c.kv_dim() + ch] =
              0.5f * (lo[ch] + hi[ch]) + 0.5f * (hi[ch] - lo[ch]) * static_cast<float>(nd(rng) / t);
        }
      }
      CHECK_OK(cudaMemcpyAsync(k, hk.data(), hk.size() * 4, cudaMemcpyHostToDevice, st.stream) == cudaSuccess
                   ? absl::OkStatus()
                   : absl::InternalError("copy of the keys"));
    } else {
      CHECK_OK(kernels::LaunchFillNormal(int64_t{m} * c.kv_dim(), seed * 7919 + l * 2, 0.0f, st.sigma, k,
                                         kernels::DType::kF32, st.stream));
    }
    CHECK_OK(kernels::LaunchFillNormal(int64_t{m} * c.kv_dim(), seed * 7919 + l * 2 + 1, 0.0f, 1.0f, v,
                                       kernels::DType::kF32, st.stream));
    CHECK_OK(cache->AppendDevice(l, k, v, m));
  }
  cache->Commit(m);
  cudaFree(k);
  cudaFree(v);
  CHECK_OK(cache->ReplicateFirstBlock(std::max<int64_t>(n, m)));
  return cache->length();
}

// How a decode step's tokens are chosen (--ab=pick flips it): on the device (the engine's path:
// ForwardItem::Output::kGreedy or kSample, with the repetition penalty, 4 bytes per row to the
// host), or from the logits copied to the host, by model::Argmax or a model::Sampler per row there
// (the path before 2026-12-02); with --repetition_penalty the host side is the engine's path for
// penalised requests before the penalty moved to the device (5d21b71):
// model::ApplyRepetitionPenalty, then model::SampleByDeviceRule (or model::Argmax).
bool g_pick_on_device = true;

// Median seconds of `steps` decode steps of `caches` (one token each, greedy or sampled as
// --temperature/--top_k/--top_p say, each step fed the token the previous one chose), after 2
// warm-up steps.
double DecodeSeconds(Setup& st, std::vector<std::unique_ptr<model::KvCache>>& caches, int steps) {
  std::vector<std::vector<int32_t>> tok(caches.size(), std::vector<int32_t>{17});
  std::vector<float> logits;
  std::vector<double> t;
  const int vocab = st.fwd->config().vocab_size;
  const float temperature = absl::GetFlag(FLAGS_temperature);
  const model::SamplerConfig sc{temperature, absl::GetFlag(FLAGS_top_p), absl::GetFlag(FLAGS_top_k)};
  std::vector<model::Sampler> samplers(caches.size(), model::Sampler(sc));
  const std::vector<int32_t> history;
  const float penalty = absl::GetFlag(FLAGS_repetition_penalty);
  std::vector<int32_t> penalized;  // distinct ids spread over the vocabulary
  for (int j = 0; penalty != 1.0f && j < std::min(absl::GetFlag(FLAGS_penalized_ids), vocab); ++j) {
    penalized.push_back(static_cast<int32_t>((int64_t{j} * 7919) % vocab));
  }
  std::sort(penalized.begin(), penalized.end());
  penalized.erase(std::unique(penalized.begin(), penalized.end()), penalized.end());
  int64_t sum = 0;  // of the chosen tokens (keeps the host's choice from being optimised away)
  for (int i = 0; i < steps + 2; ++i) {
    std::vector<model::ForwardItem> items;
    for (size_t b = 0; b < caches.size(); ++b) {
      items.push_back({caches[b].get(), tok[b], false});
      if (g_pick_on_device) {
        items.back().output = temperature > 0.0f ? model::ForwardItem::Output::kSample : model::ForwardItem::Output::kGreedy;
        items.back().sample = {temperature, sc.top_k, sc.top_p, 0.0f, 1000 + b, static_cast<uint64_t>(i),
                               penalty, penalized};
      }
    }
    const double t0 = Now();
    CHECK_OK(st.fwd->Run(absl::MakeSpan(items), {}, &logits));
    for (size_t b = 0; b < caches.size(); ++b) {
      float* row = logits.data() + b * vocab;
      int32_t next = 0;
      if (g_pick_on_device) {
        next = items[b].token;
      } else if (penalty != 1.0f) {
        model::ApplyRepetitionPenalty(row, vocab, penalized, penalty);
        next = model::SampleByDeviceRule(row, vocab, temperature, sc.top_k, sc.top_p, 0.0f, 1000 + b,
                                         static_cast<uint64_t>(i));
      } else {
        next = samplers[b].Sample(row, vocab, history);
      }
      sum += next;
      // The next step feeds the chosen token, as a generation does (every step used to feed id 17:
      // the same key appended again and again, suspected to fill its block's key-outlier area).
      tok[b][0] = next >= 0 && next < vocab ? next : 17;
    }
    if (i >= 2) t.push_back(Now() - t0);
  }
  if (sum < 0) std::printf("# negative token sum\n");
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

kernels::DType WeightsDtype() {
  if (absl::GetFlag(FLAGS_weights_dtype) == "bf16") return kernels::DType::kBF16;
  if (absl::GetFlag(FLAGS_weights_dtype) == "f32") return kernels::DType::kF32;
  return kernels::DType::kF16;
}

bool Synthetic(const std::string& spec) { return spec.rfind("synthetic:", 0) == 0; }

// The model on the GPU (st.fwd, st.stream) and the key sigma of its synthetic fills; *host keeps a
// real model's weights (its fingerprint selects the quantizers).
void LoadModel(Setup& st, const std::string& spec, model::LlamaWeights* host, model::ModelConfig* c) {
  cudaStreamCreateWithFlags(&st.stream, cudaStreamNonBlocking);
  if (Synthetic(spec)) {
    std::vector<std::string> parts = absl::StrSplit(spec, ':');
    CHECK_OK(model::BuiltinConfig(parts[1], c));
    auto f = sharding::GpuForward::CreateSynthetic(*c, WeightsDtype(), 1, st.stream);
    CHECK_OK(f.status());
    st.fwd = std::move(*f);
  } else {
    auto w = model::LoadWeights(spec);
    CHECK_OK(w.status());
    *host = std::move(*w);
    *c = host->config;
    auto f = sharding::GpuForward::Create(*host, WeightsDtype(), st.stream);
    CHECK_OK(f.status());
    st.fwd = std::move(*f);
  }
  // Synthetic weights: h = RMSNorm(x) has unit RMS, so k = h Wk has std sqrt(hidden) * 0.02.
  st.sigma = Synthetic(spec) ? 0.02f * std::sqrt(static_cast<float>(c->hidden)) : 1.0f;
}

// KV format `fmt` on the GPU: st.format, st.expected_bytes_per_token, a block pool of
// --pool_fraction of the free memory less `workspace`, its factory. Returns the quantizer (null for
// fp16): synthetic for a synthetic model or without --quantizers, else --quantizers/<fmt>.kvqq.
std::shared_ptr<const kvstore::Quantizer> MakePool(Setup& st, const model::ModelConfig& c, const std::string& fmt,
                                                  const model::LlamaWeights& host, bool synthetic, int64_t workspace) {
  st.factory.reset();
  st.pool.reset();
  std::shared_ptr<const kvstore::Quantizer> q;
  auto parsed = kvstore::KvFormat::Parse(fmt);
  CHECK_OK(parsed.status());
  st.format = *parsed;
  const kvstore::KvShape shape{c.n_layers, c.n_kv_heads, c.head_dim};
  if (st.format.quantized()) {
    if (synthetic || absl::GetFlag(FLAGS_quantizers).empty()) {
      q = SyntheticQuantizer(c, st.format, st.sigma);
    } else {
      CHECK_OK(sharding::ResolveKvFormat(c, fmt, absl::GetFlag(FLAGS_quantizers) + "/" + fmt + ".kvqq",
                                         model::ModelFingerprint(host), &st.format, &q));
    }
  }
  st.calibrated = q != nullptr && !synthetic && !absl::GetFlag(FLAGS_quantizers).empty() ? q : nullptr;
  st.expected_bytes_per_token = kvstore::ExpectedBytesPerToken(st.format, shape);
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  sharding::GpuKvOptions po;
  po.capacity_bytes = static_cast<int64_t>((static_cast<double>(free_b) - workspace) * absl::GetFlag(FLAGS_pool_fraction));
  po.max_sink_slots = 64;
  auto pool = sharding::GpuKvPool::Create(shape, st.format, q, model::RopeParamsFor(c), po, st.stream);
  CHECK_OK(pool.status());
  st.pool = *pool;
  st.factory = sharding::MakeGpuKvCacheFactory(st.pool, c.n_heads);
  return q;
}

int Main() {
  const std::string spec = absl::GetFlag(FLAGS_model);
  const std::string label = absl::GetFlag(FLAGS_label);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const double bw = CopyBandwidth();
  std::printf("# engine_bench: %s, %s, weights %s, D2D copy %.0f GB/s %s\n", prop.name, spec.c_str(),
              absl::GetFlag(FLAGS_weights_dtype).c_str(), bw / 1e9, label.c_str());
  Setup st;
  model::LlamaWeights host;
  model::ModelConfig c;
  const bool synthetic = Synthetic(spec);
  LoadModel(st, spec, &host, &c);
  const double weight_bytes = static_cast<double>(st.fwd->weight_bytes());
  std::printf("# %s: %d layers, %d/%d heads x %d, weights %.2f GiB on the GPU\n", c.name.c_str(), c.n_layers,
              c.n_heads, c.n_kv_heads, c.head_dim, weight_bytes / 1073741824.0);
  const int64_t workspace = int64_t{3} << 30;  // step buffers, cuBLAS, decode workspace
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  // A/B switches (--ab): name, getter, setter.
  struct Switch {
    std::string name;
    std::function<bool()> get;
    std::function<void(bool)> set;
  };
  using F = sharding::GpuForward;
  auto fwd_switch = [&](const char* name, bool (F::*get)() const, void (F::*set)(bool)) {
    F* f = st.fwd.get();
    return Switch{name, [f, get] { return (f->*get)(); }, [f, set](bool on) { (f->*set)(on); }};
  };
  const std::vector<Switch> switches = {
      fwd_switch("fold", &F::fold_decode_self, &F::set_fold_decode_self),
      fwd_switch("append", &F::parallel_append, &F::set_parallel_append),
      fwd_switch("stacked", &F::stacked_qkv, &F::set_stacked_qkv),
      fwd_switch("gemv", &F::decode_gemv, &F::set_decode_gemv),
      fwd_switch("pdl", &F::programmatic_launch, &F::set_programmatic_launch),
      Switch{"pick", [] { return g_pick_on_device; }, [](bool on) { g_pick_on_device = on; }},
      Switch{"cluster", [] { return kernels::SamplingClusters(); },
             [&st](bool on) {
               kernels::SetSamplingClusters(on);
               st.fwd->ReleaseIdleResources();  // the captured graphs hold the other kernel
             }},
      Switch{"rowgemv", [] { return kernels::RowGemv(); },
             [&st](bool on) {
               kernels::SetRowGemv(on);
               st.fwd->ReleaseIdleResources();  // the captured graphs hold the other GEMMs
             }},
      Switch{"rowearly", [] { return kernels::RowGemvEarlyStart(); },
             [&st](bool on) {
               kernels::SetRowGemvEarlyStart(on);
               st.fwd->ReleaseIdleResources();  // the captured graphs hold the other launches
             }},
      Switch{"keydec", [] { return kernels::KeyAppendDecodePath(); },
             [&st](bool on) {
               kernels::SetKeyAppendDecodePath(on);
               st.fwd->ReleaseIdleResources();  // the captured graphs hold the other kernel
             }},
  };
  std::vector<Switch> ab;
  for (absl::string_view a : absl::StrSplit(absl::GetFlag(FLAGS_ab), ',', absl::SkipEmpty())) {
    auto it = std::find_if(switches.begin(), switches.end(), [&](const Switch& w) { return w.name == a; });
    if (it == switches.end()) {
      std::string names;
      for (const Switch& w : switches) absl::StrAppend(&names, names.empty() ? "" : ", ", w.name);
      CHECK_OK(absl::InvalidArgumentError(absl::StrCat("--ab: unknown switch ", a, " (", names, ")")));
    }
    ab.push_back(*it);
  }
  for (absl::string_view fmt_sv : absl::StrSplit(absl::GetFlag(FLAGS_formats), ',', absl::SkipEmpty())) {
    const std::string fmt(fmt_sv);
    MakePool(st, c, fmt, host, synthetic, workspace);
    const double pool_bytes_per_token = static_cast<double>(st.pool->block_bytes()) / 256.0;
    std::printf("\n## %s: %.1f KV bytes/token (canonical), %.1f in the pool (key-outlier reservation), pool %.1f GiB = "
                "%lld tokens\n",
                fmt.c_str(), st.expected_bytes_per_token, pool_bytes_per_token,
                st.pool->capacity_bytes() / 1073741824.0, static_cast<long long>(st.pool->total_blocks() * 256));
    std::string ab_head, ab_rule, ab_empty;
    for (const Switch& w : ab) {
      ab_head += absl::StrCat(" ms/token, ", w.name, " ", w.get() ? "off" : "on", " |");
      ab_rule += "---|";
      ab_empty += " |";
    }
    std::printf("| model | KV | context | batch | ms/token (step) | floor ms | achieved/floor | tokens/s | ms/token without "
                "CUDA graphs |%s\n", ab_head.c_str());
    std::printf("|---|---|---|---|---|---|---|---|---|%s\n", ab_rule.c_str());
    for (int64_t ctx : Ints(absl::GetFlag(FLAGS_contexts))) {
      for (int64_t batch : Ints(absl::GetFlag(FLAGS_batches))) {
        const int64_t need = batch * st.pool->BytesForTokens(ctx + 64);
        if (need > st.pool->capacity_bytes()) {
          std::printf("| %s | %s | %lld | %lld | does not fit (%.1f GiB of KV) | | | | |%s\n", c.name.c_str(), fmt.c_str(),
                      static_cast<long long>(ctx), static_cast<long long>(batch), need / 1073741824.0,
                      ab_empty.c_str());
          continue;
        }
        std::vector<std::unique_ptr<model::KvCache>> caches;
        int64_t held = 0;
        for (int64_t b = 0; b < batch; ++b) {
          auto m = st.factory->Make(0);
          CHECK_OK(m.status());
          held = Fill(st, static_cast<sharding::GpuKvCache*>(m->get()), ctx, 100 + b);
          caches.push_back(std::move(*m));
        }
        ctx = held;
        const double secs = DecodeSeconds(st, caches, absl::GetFlag(FLAGS_steps));
        // The same caches, a few tokens longer, with every kernel launched one by one.
        st.fwd->set_cuda_graphs(false);
        const double plain = DecodeSeconds(st, caches, absl::GetFlag(FLAGS_steps));
        st.fwd->set_cuda_graphs(true);
        std::string other;
        for (const Switch& w : ab) {  // the same caches again, a few tokens longer, the switch flipped
          const bool was = w.get();
          w.set(!was);
          other += absl::StrFormat(" %.3f |", DecodeSeconds(st, caches, absl::GetFlag(FLAGS_steps)) * 1e3);
          w.set(was);
        }
        const double bytes = weight_bytes + static_cast<double>(batch) * ctx * st.expected_bytes_per_token;
        const double floor = bytes / bw;
        std::printf("| %s | %s | %lld | %lld | %.3f | %.3f | %.2f | %.1f | %.3f |%s\n", c.name.c_str(), fmt.c_str(),
                    static_cast<long long>(ctx), static_cast<long long>(batch), secs * 1e3, floor * 1e3,
                    floor / secs, batch / secs, plain * 1e3, other.c_str());
        std::fflush(stdout);
      }
    }
    const std::vector<int64_t> prefill = Ints(absl::GetFlag(FLAGS_prefill));
    if (!prefill.empty()) {
      std::printf("\n| model | KV | prompt | chunk | time to first token s | prefill tokens/s | TTFT, decode kernel per row s | speed-up |\n|---|---|---|---|---|---|---|---|\n");
      const int chunk = absl::GetFlag(FLAGS_prefill_chunk);
      auto ttft = [&](int64_t n) {
        auto m = st.factory->Make(0);
        CHECK_OK(m.status());
        std::vector<int32_t> ids(n);
        for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<int32_t>((i * 7919 + 13) % (c.vocab_size - 10) + 5);
        std::vector<float> logits;
        const double t0 = Now();
        for (int64_t at = 0; at < n; at += chunk) {
          std::vector<int32_t> part(ids.begin() + at, ids.begin() + std::min<int64_t>(n, at + chunk));
          model::ForwardItem item{m->get(), part, false};
          CHECK_OK(st.fwd->Run(absl::MakeSpan(&item, 1), {}, &logits));
        }
        return Now() - t0;
      };
      for (int64_t n : prefill) {
        ttft(std::min<int64_t>(n, chunk));  // warm-up: buffers, cuBLAS heuristics
        const double secs = ttft(n);
        double base = -1.0;
        if (n <= absl::GetFlag(FLAGS_prefill_baseline_max)) {
          st.fwd->set_prefill_kernel(false);
          base = ttft(n);
          st.fwd->set_prefill_kernel(true);
        }
        std::printf("| %s | %s | %lld | %d | %.3f | %.0f | %s | %s |\n", c.name.c_str(), fmt.c_str(),
                    static_cast<long long>(n), chunk, secs, n / secs,
                    base > 0 ? absl::StrFormat("%.3f", base).c_str() : "-",
                    base > 0 ? absl::StrFormat("%.2fx", base / secs).c_str() : "-");
        std::fflush(stdout);
      }
    }
    if (absl::GetFlag(FLAGS_capacity)) {
      // Planner's predictions, from the whole GPU down to what the pool holds: (a) all memory but
      // the weights and a 3 GiB workspace at the canonical bytes per token (what `kvqd --plan`
      // assumes); (b) the bytes this pool was given, canonical bytes per token; (c) the same bytes
      // at the pool's bytes per token (canonical + the per-block key-outlier reservation).
      auto predict = [&](int64_t total, int64_t reserved, double bpt) -> int64_t {
        sharding::ShardPlannerOptions pl;
        pl.bytes_per_token = bpt;
        pl.ranks.push_back({total, reserved});
        auto planner = sharding::ShardPlanner::Create(pl);
        return planner.ok() ? planner->MaxContextTokens() : -1;
      };
      const int64_t predicted = predict(static_cast<int64_t>(total_b), static_cast<int64_t>(weight_bytes) + (int64_t{3} << 30),
                                        st.expected_bytes_per_token);
      const int64_t pred_budget = predict(st.pool->capacity_bytes(), 0, st.expected_bytes_per_token);
      const int64_t pred_pool = predict(st.pool->capacity_bytes(), 0, static_cast<double>(st.pool->block_bytes()) / 256);
      // Every block but one (the decode steps' tail) filled.
      const int64_t target = (st.pool->total_blocks() - 1) * 256 + st.pool->SinkCapacity(0);
      auto m = st.factory->Make(0);
      CHECK_OK(m.status());
      const double t0 = Now();
      const int64_t tokens = Fill(st, static_cast<sharding::GpuKvCache*>(m->get()), target, 999);
      const double fill_s = Now() - t0;
      std::vector<std::unique_ptr<model::KvCache>> caches;
      caches.push_back(std::move(*m));
      const double secs = DecodeSeconds(st, caches, 3);
      const double floor = (weight_bytes + static_cast<double>(tokens) * st.expected_bytes_per_token) / bw;
      std::printf("\ncapacity %s: filled %lld tokens (synthetic fill, %.0f s); planner predicts %lld (whole GPU - weights "
                  "- 3 GiB, canonical bytes/token), %lld (the pool's %.1f GiB, canonical), %lld (the pool's bytes, "
                  "its %.1f bytes/token with the key-outlier reservation); decode %.2f ms/token, floor %.2f ms, "
                  "achieved/floor %.2f\n",
                  fmt.c_str(), static_cast<long long>(tokens), fill_s, static_cast<long long>(predicted),
                  static_cast<long long>(pred_budget), st.pool->capacity_bytes() / 1073741824.0,
                  static_cast<long long>(pred_pool), st.pool->block_bytes() / 256.0, secs * 1e3, floor * 1e3,
                  floor / secs);
      std::fflush(stdout);
    }
  }
  st.factory.reset();
  st.pool.reset();
  st.fwd.reset();
  return 0;
}

#if KVQ_HAVE_MPI
// --sharded (see the header). Worker ranks serve KV shards until rank 0 shuts them down.
int ShardedMain(int* argc, char*** argv) {
  CHECK_OK(sharding::SelectDeviceForLocalRank());
  // GPU ranks each have a core: waits poll every few microseconds instead of napping.
  sharding::MpiTransportOptions mo;
  mo.reply_timeout_seconds = 600.0;
  mo.max_nap_us = absl::GetFlag(FLAGS_mpi_max_nap_us);
  mo.wait_for_sends = absl::GetFlag(FLAGS_mpi_wait_sends);
  auto tr = sharding::MpiTransport::Init(argc, argv, mo);
  CHECK_OK(tr.status());
  sharding::MpiTransport* t = tr->get();
  const double fraction = absl::GetFlag(FLAGS_pool_fraction);
  const int64_t workspace = int64_t{3} << 30;  // step buffers, cuBLAS, decode workspace
  // The data plane, made by every rank together (it may bootstrap NCCL).
  const std::string plane_flag = absl::GetFlag(FLAGS_data_plane);
  if (plane_flag != "auto" && plane_flag != "host-staged" && plane_flag != "host") {
    std::fprintf(stderr, "engine_bench: --data_plane=%s: expected auto, host-staged or host\n", plane_flag.c_str());
    t->Abort(2);
  }
  std::unique_ptr<sharding::GpuPlaneEndpoint> endpoint;
  if (plane_flag != "host") {
    sharding::DataPlaneOptions dpo;
    dpo.try_nccl = plane_flag == "auto";
    auto ep = sharding::GpuPlaneEndpoint::Create(t, dpo);
    CHECK_OK(ep.status());
    endpoint = std::move(*ep);
  }
  if (t->rank() > 0) {
    sharding::GpuKvOptions po;
    po.memory_fraction = fraction;
    po.max_sink_slots = 64;
    const absl::Status s = sharding::ServeWorker(
        t, [po](const model::ModelConfig& c, const std::string& f, const std::string& q, const std::string& fp) {
          return sharding::MakeGpuWorkerKvFactory(c, f, q, fp, po);
        },
        endpoint ? endpoint->get() : nullptr);
    if (!s.ok()) {
      std::fprintf(stderr, "engine_bench: rank %d: %s\n", t->rank(), s.ToString().c_str());
      t->Abort(1);
    }
    (void)t->Finalize();
    return 0;
  }
  const std::string spec = absl::GetFlag(FLAGS_model);
  const bool synthetic = Synthetic(spec);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const double bw = CopyBandwidth();
  const int ranks = t->size();
  std::printf("# engine_bench --sharded: %d ranks, rank 0 on %s, %s, D2D copy %.0f GB/s, data plane %s %s\n", ranks,
              prop.name, spec.c_str(), bw / 1e9,
              endpoint ? endpoint->description().c_str() : "host (in the commands)",
              absl::GetFlag(FLAGS_label).c_str());
  Setup st;
  model::LlamaWeights host;
  model::ModelConfig c;
  LoadModel(st, spec, &host, &c);
  const double weight_bytes = static_cast<double>(st.fwd->weight_bytes());
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  for (absl::string_view fmt_sv : absl::StrSplit(absl::GetFlag(FLAGS_formats), ',', absl::SkipEmpty())) {
    const std::string fmt(fmt_sv);
    auto q = MakePool(st, c, fmt, host, synthetic, workspace);
    // Workers load the quantizer from a file: the synthetic one is written where rank 0 runs (one
    // node; on several nodes pass --quantizers on a shared file system).
    const bool own_file = q != nullptr && (synthetic || absl::GetFlag(FLAGS_quantizers).empty());
    std::string qpath;
    if (own_file) {
      qpath = absl::StrCat("/tmp/engine_bench_", getpid(), "_", fmt, ".kvqq");
      CHECK_OK(q->Save(qpath));
    } else if (q != nullptr) {
      qpath = absl::GetFlag(FLAGS_quantizers) + "/" + fmt + ".kvqq";
    }
    // Capacities: rank 0's pool as made; a worker's as it makes its own (a fraction of its free
    // memory, no weights), estimated from this GPU's total.
    sharding::ShardPlannerOptions pl;
    pl.bytes_per_token = static_cast<double>(st.pool->block_bytes()) / 256.0;
    pl.min_tokens_per_rank = absl::GetFlag(FLAGS_min_tokens_per_rank);
    pl.ranks.push_back({st.pool->capacity_bytes(), 0});
    for (int r = 1; r < ranks; ++r) {
      pl.ranks.push_back({static_cast<int64_t>((static_cast<double>(total_b) - workspace) * fraction), 0});
    }
    auto planner = sharding::ShardPlanner::Create(pl);
    CHECK_OK(planner.status());
    std::shared_ptr<const sharding::KvCacheFactory> rank0(st.factory.get(), [](const sharding::KvCacheFactory*) {});
    auto sf = sharding::ShardedKvCacheFactory::Create(t, c, fmt, qpath, "", std::move(*planner), rank0);
    CHECK_OK(sf.status());
    if (endpoint) (*sf)->set_data_plane(endpoint->plane());
    std::printf("\n## %s over %d ranks: %.1f KV bytes/token (canonical), %.1f in the pools; rank 0's pool %.1f GiB; "
                "largest context %lld tokens (planner)\n",
                fmt.c_str(), ranks, st.expected_bytes_per_token, pl.bytes_per_token,
                st.pool->capacity_bytes() / 1073741824.0, static_cast<long long>((*sf)->planner().MaxContextTokens()));
    std::printf("| model | KV | context (synthetic fill) | batch | ranks spanned | largest shard | ms/token | floor ms | "
                "achieved/floor | per layer: attend us | q send us | rank 0 shard us | wait for workers us | merge us |\n");
    std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (int64_t ctx : Ints(absl::GetFlag(FLAGS_contexts))) {
      for (int64_t batch : Ints(absl::GetFlag(FLAGS_batches))) {
        std::vector<std::unique_ptr<model::KvCache>> caches;
        absl::Status made;
        for (int64_t b = 0; b < batch && made.ok(); ++b) {
          auto m = (*sf)->Make(ctx + 64);
          if (!m.ok()) {
            made = m.status();
            break;
          }
          made = (*m)->FillSynthetic(c.n_layers, static_cast<int>(c.kv_dim()), ctx, 100 + b, st.sigma);
          caches.push_back(std::move(*m));
        }
        if (!made.ok()) {
          std::printf("| %s | %s | %lld | %lld | does not fit: %s | | | | | | | | | |\n", c.name.c_str(), fmt.c_str(),
                      static_cast<long long>(ctx), static_cast<long long>(batch), std::string(made.message()).c_str());
          continue;
        }
        auto* s0 = static_cast<sharding::ShardedKvCache*>(caches[0].get());
        const std::vector<int64_t> lens = s0->shard_lengths();
        int64_t largest = 0, spanned = 0;
        for (int64_t x : lens) {
          largest = std::max(largest, x);
          spanned += x > 0;
        }
        const double rank0_bytes = static_cast<double>(batch) * lens[0] * st.expected_bytes_per_token;
        const double worker_bytes = static_cast<double>(batch) * largest * st.expected_bytes_per_token;
        const double floor = std::max(weight_bytes + rank0_bytes, worker_bytes) / bw;
        DecodeSeconds(st, caches, 1);  // warm-up
        sharding::ResetShardedAttendTiming();
        const double secs = DecodeSeconds(st, caches, absl::GetFlag(FLAGS_steps));
        const sharding::ShardedAttendTiming tm = sharding::GetShardedAttendTiming();
        const double per = tm.calls > 0 ? 1e6 / static_cast<double>(tm.calls) : 0.0;
        std::printf("| %s | %s | %lld | %lld | %lld | %lld | %.3f | %.3f | %.2f | %.0f | %.0f | %.0f | %.0f | %.0f |\n",
                    c.name.c_str(), fmt.c_str(), static_cast<long long>(ctx), static_cast<long long>(batch),
                    static_cast<long long>(spanned), static_cast<long long>(largest), secs * 1e3, floor * 1e3,
                    floor / secs, (tm.send_s + tm.local_s + tm.wait_s + tm.merge_s) * per, tm.send_s * per,
                    tm.local_s * per, tm.wait_s * per, tm.merge_s * per);
        std::fflush(stdout);
      }
    }
    if (own_file) std::remove(qpath.c_str());
  }
  st.factory.reset();
  st.pool.reset();
  st.fwd.reset();
  CHECK_OK(sharding::ShutdownWorkers(t));
  (void)t->Finalize();
  return 0;
}
#endif

}  // namespace
}  // namespace kvq

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::fprintf(stderr, "engine_bench: no CUDA device\n");
    return 1;
  }
  if (absl::GetFlag(FLAGS_row_gemv_rows) >= 0) kvq::kernels::SetRowGemvRows(absl::GetFlag(FLAGS_row_gemv_rows));
  if (absl::GetFlag(FLAGS_sharded)) {
#if KVQ_HAVE_MPI
    return kvq::ShardedMain(&argc, &argv);
#else
    std::fprintf(stderr, "engine_bench: --sharded needs a build with MPI\n");
    return 1;
#endif
  }
  return kvq::Main();
}
#else
int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::fprintf(stderr, "engine_bench: built without CUDA\n");
  return 1;
}
#endif
