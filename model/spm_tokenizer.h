// SentencePiece-style BPE (GGUF tokenizer.ggml.model = "llama": LLaMA-1/2, Mistral): spaces
// become U+2581 (with one prepended when add_space_prefix), the text starts as UTF-8 characters
// and the adjacent pair whose concatenation is the vocabulary token of highest score merges
// first (leftmost among equals), as llama.cpp's llm_tokenizer_spm does. Characters that end up
// without a token fall back to <0xXX> byte tokens, or to unk when those are absent.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "model/tokenizer_base.h"

namespace kvq::model {

class SpmTokenizer final : public VocabTokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<SpmTokenizer>> Create(const TokenizerSpec& spec);

 private:
  SpmTokenizer() = default;
  void EncodeFragment(std::string_view text, bool after_special,
                      std::vector<int32_t>* out) const override;
  std::string FinishDecode(std::string bytes, bool starts_with_text) const override;

  bool add_space_prefix_ = false;
  std::vector<float> scores_;
  absl::flat_hash_map<std::string, int32_t> pieces_;  // mergeable / final pieces by spelling
  std::array<int32_t, 256> byte_ids_{};               // <0xXX> tokens, -1 if absent
};

}  // namespace kvq::model
