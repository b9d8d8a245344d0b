// What the GPU tests of the forward pass (gpu_forward_test.cc) and of the engine
// (gpu_engine_test.cc) share: the GPU requirement, the real SmolLM2 and its tokenizer, the
// calibrated quantizer fixtures, book text. CUDA builds only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tests/test_util.h"

namespace kvq::sharding::gpu_test {

inline bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define KVQ_REQUIRE_GPU()                                                                   \
  do {                                                                                      \
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device here: GPU engine tests run on a GPU machine"; \
    KVQ_REQUIRE_MODEL();                                                                    \
  } while (0)

// The calibrated fixture of a format, or "" for formats that need none (fp16, int per-token).
inline std::string QuantizerFor(const std::string& fmt) {
  const std::string path = testing::FixturePath("quantizers/" + fmt + ".kvqq");
  return fmt != "fp16" && testing::FileExists(path) ? path : "";
}

inline const model::LlamaWeights& Weights() {
  static auto* w = new model::LlamaWeights(*model::LoadWeights(testing::ModelPath()));
  return *w;
}

inline const model::Tokenizer& Tok() {
  static auto* t = model::Tokenizer::FromGgufPath(testing::ModelPath())->release();
  return *t;
}

// The first n tokens of a test split (Austen's when it is there, else KJV's).
inline std::vector<int32_t> BookTokens(int n) {
  const std::string austen = testing::CorpusPath("austen.test.txt");
  const std::string text =
      testing::ReadFileOrDie(testing::FileExists(austen) ? austen : testing::CorpusPath("kjv.test.txt"));
  auto ids = Tok().Encode(text.substr(0, 40000), false, false);
  ids.resize(std::min<size_t>(ids.size(), n));
  return ids;
}

// How many leading tokens two generations share.
inline int SamePrefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return static_cast<int>(i);
}

}  // namespace kvq::sharding::gpu_test
