// Tokenizers of Llama-family models: byte-level BPE (GGUF tokenizer.ggml.model = "gpt2", as SmolLM2
// and Llama-3, with the pre-tokenizer named by tokenizer.ggml.pre) and SentencePiece-style BPE
// ("llama", as LLaMA-2), built from GGUF metadata or from a Hugging Face tokenizer.json.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace kvq::model {

class GgufFile;

struct ChatMessage {
  std::string role;     // "system" | "user" | "assistant"
  std::string content;
};

// Everything a tokenizer is built from, independent of the file format (GGUF metadata or a
// Hugging Face tokenizer.json are both converted to this first).
struct TokenizerSpec {
  enum TokenType : int32_t {
    kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6,
  };
  std::string model = "gpt2";  // "gpt2": byte-level BPE; "llama": SentencePiece-style BPE
  std::string pre = "default";  // tokenizer.ggml.pre (byte-level BPE only)
  std::vector<std::string> tokens;  // as the vocabulary spells them (byte-level alphabet / U+2581)
  std::vector<int32_t> token_types;  // TokenType per token; empty = all normal
  std::vector<float> scores;         // "llama": merge priority of each token (higher first)
  // "gpt2": merge rules in rank order. "llama": optional; when scores is empty, a merged token's
  // score is minus the rank of the first rule that makes it (as tokenizer.json BPE ranks merges).
  std::vector<std::pair<std::string, std::string>> merges;
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t unk_id = -1;
  int32_t pad_id = -1;
  bool add_bos = false;
  bool add_space_prefix = false;  // "llama": a space before the text (and after special tokens)
  std::string chat_template;      // Jinja source; empty if none
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromSpec(const TokenizerSpec& spec);
  static absl::StatusOr<TokenizerSpec> SpecFromGguf(const GgufFile& gguf);
  // tokenizer.json (+ tokenizer_config.json beside it) to a spec, without building it.
  static absl::StatusOr<TokenizerSpec> SpecFromTokenizerJson(const std::string& path);

  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& gguf);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGgufPath(const std::string& path);
  // tokenizer.json (+ tokenizer_config.json beside it for the chat template and BOS/EOS, if any).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromTokenizerJson(const std::string& path);

  // Text to ids. add_bos: prepend BOS if the model asks for it (tokenizer.ggml.add_bos_token).
  // parse_special: recognise special tokens such as "<|im_start|>" in the text.
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_bos = true,
                                      bool parse_special = true) const = 0;
  // Ids to text (special tokens rendered as their text unless skip_special).
  virtual std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const = 0;
  // The raw bytes one token stands for (may be part of a UTF-8 character).
  virtual std::string TokenBytes(int32_t id) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 if none
  virtual int32_t eos_id() const = 0;  // -1 if none
  // End-of-turn / end-of-generation ids (EOS plus e.g. <|im_end|>, <|eot_id|>).
  virtual std::vector<int32_t> stop_ids() const = 0;
  virtual bool IsSpecial(int32_t id) const = 0;

  // Renders messages with the chat template the model ships (ChatML for SmolLM2-Instruct,
  // Llama-3 and Llama-2 formats). An unknown template is an error that says so.
  virtual absl::StatusOr<std::string> ApplyChatTemplate(const std::vector<ChatMessage>& messages,
                                                        bool add_generation_prompt) const = 0;
};

// Streaming-safe decoding: feeds ids one at a time and emits only complete UTF-8 characters,
// holding back a character split across tokens until its last byte arrives.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true)
      : tok_(tok), skip_special_(skip_special) {}
  // Returns the text that became complete with this token (possibly empty).
  std::string Push(int32_t id);
  // Returns what is left at the end (an incomplete character is emitted as U+FFFD per byte run).
  std::string Flush();

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace kvq::model
