#include "tools/kvq_commands.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "model/fingerprint.h"
#include "model/forward.h"
#include "model/perplexity.h"
#include "model/sampling.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "sharding/kv_cache_factory.h"
#include "tools/kvq_backend.h"

ABSL_FLAG(std::string, model, "", "model: *.gguf, HF directory, or synthetic:<name>[:seed]");
ABSL_FLAG(std::string, prompt, "What is the capital of France?", "prompt text");
ABSL_FLAG(bool, chat, true, "wrap the prompt in the model's chat template");
ABSL_FLAG(int, max_tokens, 64, "tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "0 = greedy");
ABSL_FLAG(double, top_p, 1.0, "nucleus sampling");
ABSL_FLAG(int, top_k, 0, "top-k sampling (0 = off)");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed");
ABSL_FLAG(double, repetition_penalty, 1.0, "repetition penalty over the prompt and the output (1 = off)");
ABSL_FLAG(std::string, text, "", "eval-ppl: text file; tokenize: the text");
ABSL_FLAG(int, context, 2048, "eval-ppl: context length");
ABSL_FLAG(int, stride, 2048, "eval-ppl: stride");
ABSL_FLAG(int, max_windows, 0, "eval-ppl: limit windows (0 = all)");
ABSL_FLAG(std::string, kv_format, "fp16", "KV cache format: fp32 | fp16 | a kvstore format");
ABSL_FLAG(std::string, quantizer, "", "quantizer file for quantized KV formats");
ABSL_FLAG(std::string, ids, "", "logits: comma-separated token ids");
ABSL_FLAG(int, threads, 0, "CPU (BLAS) threads; 0 = half the hardware threads, at most 8");

namespace kvq::tools {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct Loaded {
  model::LlamaWeights weights;
  std::unique_ptr<model::Tokenizer> tokenizer;
};

absl::StatusOr<Loaded> LoadModel() {
  const std::string spec = absl::GetFlag(FLAGS_model);
  if (spec.empty()) return absl::InvalidArgumentError("--model is required");
  Loaded l;
  KVQ_ASSIGN_OR_RETURN(l.weights, model::LoadWeights(spec));
  if (spec.size() > 5 && spec.substr(spec.size() - 5) == ".gguf") {
    KVQ_ASSIGN_OR_RETURN(l.tokenizer, model::Tokenizer::FromGgufPath(spec));
  } else if (spec.rfind("synthetic:", 0) != 0) {
    KVQ_ASSIGN_OR_RETURN(l.tokenizer, model::Tokenizer::FromTokenizerJson(spec + "/tokenizer.json"));
  }
  return l;
}

int Fail(const absl::Status& s) { return FailStatus(s); }

int Generate() {
  auto loaded = LoadModel();
  if (!loaded.ok()) return Fail(loaded.status());
  if (!loaded->tokenizer) return Fail(absl::InvalidArgumentError("generate needs a tokenizer"));
  const model::Tokenizer& tok = *loaded->tokenizer;
  std::string text = absl::GetFlag(FLAGS_prompt);
  if (absl::GetFlag(FLAGS_chat)) {
    auto rendered = tok.ApplyChatTemplate({{"user", text}}, /*add_generation_prompt=*/true);
    if (!rendered.ok()) return Fail(rendered.status());
    text = *rendered;
  }
  std::vector<int32_t> ids = tok.Encode(text, /*add_bos=*/true, /*parse_special=*/true);
  auto backend = MakeBackend(loaded->weights);
  if (!backend.ok()) return Fail(backend.status());
  const model::ForwardPass& fwd = *(*backend)->forward;
  auto cache = (*backend)->factory->Make(0);
  if (!cache.ok()) return Fail(cache.status());
  // The serving path's token choice (the engine's): the repetition penalty over the distinct
  // tokens seen, then greedy or drawn by the rule of kernels/sampling.h with the Philox uniform of
  // (seed, index of the token), all on the device in a GPU pass; the same seed gives kvqd's tokens.
  model::ForwardItem::Sample sample;
  sample.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  sample.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  sample.top_k = absl::GetFlag(FLAGS_top_k);
  sample.seed = absl::GetFlag(FLAGS_seed);
  sample.repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
  if (!(sample.repetition_penalty > 0.0f) || !std::isfinite(sample.repetition_penalty)) {
    return Fail(absl::InvalidArgumentError("--repetition_penalty must be > 0 (1 = off)"));
  }
  // Distinct tokens of the prompt and the output so far (none kept without a penalty).
  model::SeenTokens seen(sample.repetition_penalty != 1.0f ? fwd.config().vocab_size : 0);
  for (int32_t t : ids) seen.Add(t);
  model::StreamDecoder decoder(tok);
  const auto stops = tok.stop_ids();
  std::vector<int32_t> step = ids;
  std::vector<float> logits;
  const auto t0 = std::chrono::steady_clock::now();
  double ttft = 0;
  int generated = 0;
  for (; generated < absl::GetFlag(FLAGS_max_tokens); ++generated) {
    model::ForwardItem item{cache->get(), step, false};
    item.output = sample.temperature > 0.0f ? model::ForwardItem::Output::kSample : model::ForwardItem::Output::kGreedy;
    item.sample = sample;
    item.sample.step = static_cast<uint64_t>(generated);
    item.sample.penalized = seen.ids();
    absl::Status s = fwd.Run(absl::MakeSpan(&item, 1), {}, &logits);
    if (!s.ok()) return Fail(s);
    if (generated == 0) {
      ttft = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    const int32_t next = item.token;
    if (std::find(stops.begin(), stops.end(), next) != stops.end()) break;
    std::fputs(decoder.Push(next).c_str(), stdout);
    std::fflush(stdout);
    step.assign(1, next);
    seen.Add(next);
  }
  std::fputs(decoder.Flush().c_str(), stdout);
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "\n[kvq] prompt %zu tokens, generated %d, time to first token %.3f s, %.1f tokens/s\n",
               ids.size(), generated, ttft, generated > 1 ? (generated - 1) / (total - ttft) : 0.0);
  return 0;
}

int EvalPpl() {
  auto loaded = LoadModel();
  if (!loaded.ok()) return Fail(loaded.status());
  auto text = ReadFile(absl::GetFlag(FLAGS_text));
  if (!text.ok()) return Fail(text.status());
  const std::vector<int32_t> ids = loaded->tokenizer->Encode(*text, /*add_bos=*/false, /*parse_special=*/false);
  auto backend = MakeBackend(loaded->weights);
  if (!backend.ok()) return Fail(backend.status());
  const model::ForwardPass& fwd = *(*backend)->forward;
  model::PerplexityOptions po;
  po.context = absl::GetFlag(FLAGS_context);
  po.stride = absl::GetFlag(FLAGS_stride);
  po.max_windows = absl::GetFlag(FLAGS_max_windows);
  const std::string fmt = absl::GetFlag(FLAGS_kv_format);
  auto factory = [&]() { return (*backend)->factory->Make(0); };
  const auto t0 = std::chrono::steady_clock::now();
  auto r = model::EvaluatePerplexity(fwd, ids, po, factory, [&](const model::PerplexityResult& p) {
    std::fprintf(stderr, "\r[kvq] window %d: %lld tokens, ppl %.4f", p.windows,
                 static_cast<long long>(p.tokens), p.ppl());
  });
  if (!r.ok()) return Fail(r.status());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "\n");
  const model::ModelConfig& c = loaded->weights.config;
  const double elems = static_cast<double>(r->last_window_tokens) * c.n_layers * 2.0 * c.kv_dim();
  const double bits = elems > 0 ? 8.0 * static_cast<double>(r->last_window_kv_bytes) / elems : 0.0;
  std::printf("{\"text\": \"%s\", \"kv_format\": \"%s\", \"quantizer\": \"%s\", \"context\": %d, "
              "\"stride\": %d, \"windows\": %d, \"tokens\": %lld, \"corpus_tokens\": %zu, "
              "\"nll\": %.6f, \"ppl\": %.6f, \"bits_per_element\": %.4f, \"seconds\": %.1f, "
              "\"device\": \"%s\"}\n",
              absl::GetFlag(FLAGS_text).c_str(), fmt.c_str(), absl::GetFlag(FLAGS_quantizer).c_str(),
              po.context, po.stride, r->windows, static_cast<long long>(r->tokens), ids.size(),
              r->nll_sum / r->tokens, r->ppl(), bits, secs, (*backend)->description.c_str());
  return 0;
}

int Tokenize() {
  auto tok = model::Tokenizer::FromGgufPath(absl::GetFlag(FLAGS_model));
  if (!tok.ok()) return Fail(tok.status());
  const auto ids = (*tok)->Encode(absl::GetFlag(FLAGS_text), false, true);
  for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%d", i ? "," : "", ids[i]);
  std::printf("\n");
  return 0;
}

int Logits() {
  auto loaded = LoadModel();
  if (!loaded.ok()) return Fail(loaded.status());
  std::vector<int32_t> ids;
  for (absl::string_view p : absl::StrSplit(absl::GetFlag(FLAGS_ids), ',', absl::SkipEmpty())) {
    int v;
    if (!absl::SimpleAtoi(p, &v)) return Fail(absl::InvalidArgumentError("bad --ids"));
    ids.push_back(v);
  }
  model::Forward fwd(loaded->weights);
  model::DenseKvCache cache(loaded->weights.config, true);
  model::ForwardItem item{&cache, ids, false};
  std::vector<float> logits;
  absl::Status s = fwd.Run(absl::MakeSpan(&item, 1), {}, &logits);
  if (!s.ok()) return Fail(s);
  for (auto [t, lp] : model::TopLogProbs(logits.data(), loaded->weights.config.vocab_size, 5)) {
    std::printf("%d %.6f %.6f\n", t, logits[t], lp);
  }
  return 0;
}

}  // namespace

int FailStatus(const absl::Status& s) {
  std::fprintf(stderr, "kvq: %s\n", std::string(s.ToString()).c_str());
  return 1;
}

std::vector<std::string> CommandNames() {
  return {"generate", "eval-ppl", "calibrate", "passkey", "tokenize", "logits", "plan", "outlier-census"};
}

int RunCommand(const std::string& name, int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  model::SetCpuThreads(absl::GetFlag(FLAGS_threads));
  if (name == "generate") return Generate();
  if (name == "eval-ppl") return EvalPpl();
  if (name == "tokenize") return Tokenize();
  if (name == "logits") return Logits();
  if (name == "calibrate") return Calibrate();
  if (name == "passkey") return Passkey();
  if (name == "plan") return Plan();  // [sharding]
  if (name == "outlier-census") return OutlierCensus();
  std::fprintf(stderr, "kvq: unknown command '%s'\n", name.c_str());
  return 2;
}

}  // namespace kvq::tools
