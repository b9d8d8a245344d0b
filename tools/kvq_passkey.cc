// `kvq passkey`: long-range retrieval through the (compressed) KV cache. A 5-digit pass key is
// planted at a given depth of ~N tokens of filler; the model is asked for it at the end and
// decodes greedily. Every query of the prompt attends through the cache (as if decoded token by
// token from it), so the test sees exactly what a quantized cache keeps.
//   kvq passkey --model M --kv_format nuq3-1% --quantizer Q --length 7000 --trials 10
// Prints one JSON line per trial and a summary line.
#include <cstdio>
#include <random>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_format.h"
#include "model/fingerprint.h"
#include "model/forward.h"
#include "model/sampling.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "sharding/kv_cache_factory.h"
#include "tools/kvq_backend.h"
#include "tools/kvq_commands.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, kv_format);
ABSL_DECLARE_FLAG(std::string, quantizer);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_FLAG(int, length, 7000, "passkey: prompt length in tokens (about)");
ABSL_FLAG(int, trials, 10, "passkey: trials, at depths evenly spread over the filler");

namespace kvq::tools {

int Passkey() {
  auto w = model::LoadWeights(absl::GetFlag(FLAGS_model));
  if (!w.ok()) return FailStatus(w.status());
  auto tok = model::Tokenizer::FromGgufPath(absl::GetFlag(FLAGS_model));
  if (!tok.ok()) return FailStatus(tok.status());
  auto backend = MakeBackend(*w);
  if (!backend.ok()) return FailStatus(backend.status());
  const auto& factory = (*backend)->factory;
  const std::string intro =
      "There is an important piece of information hidden inside a lot of irrelevant text. Find it "
      "and memorize it. I will quiz you about it.\n";
  const std::string filler =
      "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
  const std::string question = "\nWhat is the pass key? The pass key is";
  const auto filler_ids = (*tok)->Encode(filler, false, false);
  const int length = absl::GetFlag(FLAGS_length);
  const int repeats = std::max(1, (length - 80) / static_cast<int>(filler_ids.size()));
  const int trials = absl::GetFlag(FLAGS_trials);
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed) + 12345);
  const model::ForwardPass& fwd = *(*backend)->forward;
  int found = 0;
  for (int t = 0; t < trials; ++t) {
    const int key = 10000 + static_cast<int>(rng() % 90000);
    const int depth = trials > 1 ? repeats * t / (trials - 1) : repeats / 2;
    std::string text = intro;
    for (int r = 0; r < repeats; ++r) {
      if (r == depth) text += absl::StrCat("The pass key is ", key, ". Remember it. ", key, " is the pass key. ");
      text += filler;
    }
    if (depth >= repeats) text += absl::StrCat("The pass key is ", key, ". Remember it. ", key, " is the pass key. ");
    text += question;
    const std::vector<int32_t> ids = (*tok)->Encode(text, true, false);
    auto cache = factory->Make(0);
    if (!cache.ok()) return FailStatus(cache.status());
    model::ForwardOptions fo;
    fo.chunk_through_cache = true;
    std::vector<float> logits;
    std::vector<int32_t> step = ids, out;
    for (int i = 0; i < 8; ++i) {
      model::ForwardItem item{cache->get(), step, false};
      absl::Status s = fwd.Run(absl::MakeSpan(&item, 1), fo, &logits);
      if (!s.ok()) return FailStatus(s);
      const int32_t next = model::Argmax(logits.data(), w->config.vocab_size);
      out.push_back(next);
      step.assign(1, next);
    }
    const std::string answer = (*tok)->Decode(out, true);
    const bool ok = answer.find(std::to_string(key)) != std::string::npos;
    found += ok;
    std::printf("{\"kv_format\": \"%s\", \"trial\": %d, \"tokens\": %zu, \"depth\": %.3f, \"key\": %d, \"answer\": \"%s\", \"ok\": %s}\n",
                factory->format().c_str(), t, ids.size(), static_cast<double>(depth) / repeats, key,
                absl::CEscape(answer).c_str(), ok ? "true" : "false");
    std::fflush(stdout);
  }
  std::printf("{\"kv_format\": \"%s\", \"retrieved\": %d, \"trials\": %d}\n",
              factory->format().c_str(), found, trials);
  return 0;
}

}  // namespace kvq::tools
