// Chat templates without a Jinja engine: the template a model ships is recognised by signature
// and rendered by hand, byte for byte as Jinja (as transformers runs it) would render it.
//   kChatMl:  <|im_start|>{role}\n{content}<|im_end|>\n per message, optionally preceded by a
//             default system turn when the first message is not "system" (SmolLM2, Qwen2);
//             generation prompt <|im_start|>assistant\n.
//   kLlama3:  {bos}<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>;
//             generation prompt <|start_header_id|>assistant<|end_header_id|>\n\n.
//   kLlama2:  {bos}[INST] {<<SYS>>\n{system}\n<</SYS>>\n\n}{user|strip} [/INST] {assistant|strip} {eos}
//             with strict user/assistant alternation; no generation prompt.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "model/tokenizer.h"

namespace kvq::model {

class ChatTemplate {
 public:
  enum class Kind { kChatMl, kLlama3, kLlama2 };

  // Unimplemented (saying the template is not recognised) for anything else, including the
  // tool-calling / date-stamped variants (Llama-3.1+) that the renderers here do not reproduce.
  static absl::StatusOr<ChatTemplate> Recognize(std::string_view source, std::string bos_token,
                                                std::string eos_token);

  // InvalidArgument for conversations the template itself rejects (Llama-2 alternation).
  absl::StatusOr<std::string> Render(const std::vector<ChatMessage>& messages,
                                     bool add_generation_prompt) const;

  Kind kind() const { return kind_; }
  // ChatML only: the system turn added when the first message is not a system message ("" if none).
  const std::string& default_system() const { return default_system_; }
  bool has_default_system() const { return has_default_system_; }

 private:
  Kind kind_ = Kind::kChatMl;
  std::string bos_;
  std::string eos_;
  std::string default_system_;
  bool has_default_system_ = false;
  bool trim_content_ = false;  // Llama-3: message['content'] | trim
  bool llama3_bos_ = false;    // Llama-3: bos_token before the first message
};

// Python str.strip() (Jinja's trim filter): removes leading and trailing str.isspace chars.
std::string_view PythonStrip(std::string_view s);

}  // namespace kvq::model
