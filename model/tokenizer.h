// Tokenizers of Llama-family models: byte-level BPE (GGUF tokenizer.ggml.model = "gpt2", as SmolLM2
// and Llama-3, with the pre-tokenizer named by tokenizer.ggml.pre) and SentencePiece-style BPE
// ("llama", as LLaMA-2), built from GGUF metadata or from a Hugging Face tokenizer.json.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvq::model {

class GgufFile;

struct ChatMessage {
  std::string role;     // "system" | "user" | "assistant"
  std::string content;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

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
