// Shared test helpers: where the model and corpora live.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace kvq::testing {

// The set-up script's cache folder: $KVQ_CACHE, else <source>/.cache.
inline std::string CacheDir() {
  const char* env = std::getenv("KVQ_CACHE");
  if (env != nullptr && *env != '\0') return env;
  return std::string(KVQ_SOURCE_DIR) + "/.cache";
}

inline std::string ModelPath() { return CacheDir() + "/SmolLM2-135M-Instruct.Q4_1.gguf"; }
inline std::string CorpusPath(const std::string& name) { return CacheDir() + "/corpora/" + name; }
inline std::string FixturePath(const std::string& rel) {
  return std::string(KVQ_SOURCE_DIR) + "/tests/fixtures/" + rel;
}

inline bool FileExists(const std::string& path) { return std::ifstream(path).good(); }

// The whole file; a file that cannot be opened or read ends the test binary with its path (an
// empty string would fail far from the cause: a missing corpus read as zero tokens).
inline std::string ReadFileOrDie(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  if (f) ss << f.rdbuf();
  if (!f || f.bad()) {
    std::fprintf(stderr, "cannot read %s (the set-up script writes the model and corpora under $KVQ_CACHE, else <source>/.cache: bash scripts/setup.sh)\n", path.c_str());
    std::abort();
  }
  return ss.str();
}

}  // namespace kvq::testing

// Skips the current test when the real model has not been set up (scripts/setup.sh).
#define KVQ_REQUIRE_MODEL()                                                              \
  do {                                                                                   \
    if (!::kvq::testing::FileExists(::kvq::testing::ModelPath())) {                     \
      GTEST_SKIP() << "model not found at " << ::kvq::testing::ModelPath()               \
                   << " (run scripts/setup.sh)";                                         \
    }                                                                                    \
  } while (0)
