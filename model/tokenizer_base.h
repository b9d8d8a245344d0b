// What the byte-level and SentencePiece-style tokenizers share: the vocabulary and token types,
// special-token matching in the text, decoding, stop ids and the chat template. Subclasses
// provide the raw bytes of each token and the encoding of plain text between special tokens.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"

namespace kvq::model {

class VocabTokenizer : public Tokenizer {
 public:
  std::vector<int32_t> Encode(std::string_view text, bool add_bos = true,
                              bool parse_special = true) const override;
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const override;
  std::string TokenBytes(int32_t id) const override;

  int32_t vocab_size() const override { return static_cast<int32_t>(texts_.size()); }
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  std::vector<int32_t> stop_ids() const override { return stop_ids_; }
  // Control tokens (token_type 3): skipped by Decode(skip_special) and the stream decoder.
  bool IsSpecial(int32_t id) const override;

  absl::StatusOr<std::string> ApplyChatTemplate(const std::vector<ChatMessage>& messages,
                                                bool add_generation_prompt) const override;

  // The vocabulary's spelling of a token (byte-level alphabet or U+2581); "" if out of range.
  const std::string& TokenText(int32_t id) const;
  int32_t TokenType(int32_t id) const;
  // Id of a token by its spelling, or -1.
  int32_t FindToken(std::string_view text) const;

 protected:
  VocabTokenizer() = default;
  // Validates and stores what the base needs; subclasses then fill token_bytes_.
  absl::Status InitBase(const TokenizerSpec& spec);
  // Plain text (no special tokens) to ids. after_special: the fragment starts the text or
  // follows a special token.
  virtual void EncodeFragment(std::string_view text, bool after_special,
                              std::vector<int32_t>* out) const = 0;
  // Hook for decoders that post-process the joined bytes (SentencePiece's leading space).
  virtual std::string FinishDecode(std::string bytes, bool starts_with_text) const { return bytes; }

  std::vector<std::string> texts_;
  std::vector<int32_t> types_;
  std::vector<std::string> token_bytes_;  // what each token decodes to
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int32_t unk_id_ = -1;
  bool add_bos_ = false;

 private:
  struct Special {
    std::string text;
    int32_t id;
    bool control;
  };
  absl::flat_hash_map<std::string, int32_t> by_text_;
  // Tokens matched verbatim in the text, by first byte, longest first.
  std::vector<std::vector<Special>> specials_by_byte_;
  std::vector<int32_t> stop_ids_;
  absl::StatusOr<ChatTemplate> chat_ = absl::UnimplementedError("no chat template");
};

}  // namespace kvq::model
