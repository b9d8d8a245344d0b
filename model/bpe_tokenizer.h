// Byte-level BPE (GGUF tokenizer.ggml.model = "gpt2": GPT-2, Llama-3, SmolLM2). Text is split by
// the pre-tokenizer, each word's UTF-8 bytes start as single-byte tokens, and merges apply by
// rank (lowest first, leftmost first among equals), as Hugging Face tokenizers' BPE does.
// Vocabulary strings use GPT-2's byte-to-unicode alphabet; internally tokens are raw bytes.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "model/pretokenizer.h"
#include "model/tokenizer_base.h"

namespace kvq::model {

// GPT-2's reversible byte <-> printable code point map.
char32_t ByteToUnicode(uint8_t b);
// The byte a code point of the byte-level alphabet stands for, or -1.
int UnicodeToByte(char32_t cp);

class BpeTokenizer final : public VocabTokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<BpeTokenizer>> Create(const TokenizerSpec& spec);

  PreTokenizerKind pre_tokenizer() const { return pre_; }

 private:
  BpeTokenizer() = default;
  void EncodeFragment(std::string_view text, bool after_special,
                      std::vector<int32_t>* out) const override;
  void EncodeWord(std::string_view word, std::vector<int32_t>* out) const;

  struct Merge {
    int32_t rank;
    int32_t id;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  PreTokenizerKind pre_ = PreTokenizerKind::kGpt2;
  std::array<int32_t, 256> byte_ids_{};  // token of each single byte, -1 if none
  absl::flat_hash_map<uint64_t, Merge> merges_;
  // Per-word results: corpora repeat words heavily, so this makes encoding mostly lookups.
  mutable std::mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace kvq::model
