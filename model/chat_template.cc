#include "model/chat_template.h"

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "model/unicode.h"

namespace kvq::model {
namespace {

// The template with whitespace outside string literals removed and ' and " unified, so that
// signatures match regardless of the template's formatting.
std::string Squash(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  char quote = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (quote != 0) {
      if (c == '\\' && i + 1 < s.size()) {
        out.push_back(c);
        out.push_back(s[++i]);
        continue;
      }
      if (c == quote) {
        quote = 0;
        out.push_back('\'');
        continue;
      }
      out.push_back(c);
      continue;
    }
    if (c == '\'' || c == '"') {
      quote = c;
      out.push_back('\'');
      continue;
    }
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') continue;
    out.push_back(c);
  }
  return out;
}

// Jinja string-literal escapes (the subset templates use) to text; real newlines stay.
std::string Unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char e = s[++i];
      switch (e) {
        case 'n': out.push_back('\n'); break;
        case 't': out.push_back('\t'); break;
        case 'r': out.push_back('\r'); break;
        default: out.push_back(e); break;
      }
      continue;
    }
    out.push_back(s[i]);
  }
  return out;
}

absl::Status NotRecognised(std::string_view source, std::string_view why) {
  std::string head(source.substr(0, 120));
  absl::StrReplaceAll({{"\n", "\\n"}}, &head);
  return absl::UnimplementedError(absl::StrCat(
      "chat template not recognised (", unicode::ToAbsl(why),
      "); supported: ChatML (with or without a default system prompt), Llama-3, Llama-2 [INST]. "
      "Template starts: ",
      head));
}

bool ContainsAny(std::string_view s, std::initializer_list<std::string_view> needles) {
  for (std::string_view n : needles) {
    if (absl::StrContains(unicode::ToAbsl(s), unicode::ToAbsl(n))) return true;
  }
  return false;
}

}  // namespace

std::string_view PythonStrip(std::string_view s) {
  size_t b = 0;
  while (b < s.size()) {
    char32_t cp;
    const size_t len = unicode::DecodeUtf8(s, b, &cp);
    if (len == 0 || !unicode::IsPythonSpace(cp)) break;
    b += len;
  }
  size_t e = s.size();
  while (e > b) {
    size_t start = e - 1;
    while (start > b && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    char32_t cp;
    const size_t len = unicode::DecodeUtf8(s, start, &cp);
    if (len == 0 || start + len != e || !unicode::IsPythonSpace(cp)) break;
    e = start;
  }
  return s.substr(b, e - b);
}

absl::StatusOr<ChatTemplate> ChatTemplate::Recognize(std::string_view source, std::string bos_token,
                                                     std::string eos_token) {
  if (source.empty()) return NotRecognised(source, "the model ships no chat template");
  const std::string sq = Squash(source);
  ChatTemplate t;
  t.bos_ = std::move(bos_token);
  t.eos_ = std::move(eos_token);
  // Features none of the hand renderers reproduce.
  if (ContainsAny(sq, {"tools", "tool_calls", "Cutting Knowledge", "reasoning_content", "<think>",
                       "date_string", "strftime_now"})) {
    return NotRecognised(source, "it uses tools, reasoning or dates");
  }
  const bool loops = absl::StrContains(sq, "{%formessageinmessages%}") ||
                     absl::StrContains(sq, "{%formessageinloop_messages%}");
  if (!loops) return NotRecognised(source, "no loop over the messages");

  if (absl::StrContains(sq, "<|im_start|>") && absl::StrContains(sq, "<|im_end|>")) {
    // The per-message line, with '\n' as an escape or a real newline (Squash drops neither
    // inside literals).
    const bool line =
        absl::StrContains(sq, "'<|im_start|>'+message['role']+'\\n'+message['content']+'<|im_end|>'+'\\n'") ||
        absl::StrContains(sq, "'<|im_start|>'+message['role']+'\n'+message['content']+'<|im_end|>'+'\n'") ||
        absl::StrContains(sq, "'<|im_start|>'+message['role']+'\\n'+message['content']+'<|im_end|>\\n'") ||
        absl::StrContains(sq, "'<|im_start|>'+message['role']+'\n'+message['content']+'<|im_end|>\n'");
    if (!line) return NotRecognised(source, "ChatML markers without the plain per-message line");
    if (absl::StrContains(sq, "add_generation_prompt") &&
        !absl::StrContains(sq, "'<|im_start|>assistant\\n'") &&
        !absl::StrContains(sq, "'<|im_start|>assistant\n'")) {
      return NotRecognised(source, "ChatML with an unknown generation prompt");
    }
    t.kind_ = Kind::kChatMl;
    if (absl::StrContains(sq, "loop.firstandmessages[0]['role']!='system'")) {
      // {{ '<|im_start|>system\n<default><|im_end|>\n' }}: the literal after the condition.
      const size_t cond = sq.find("loop.firstandmessages[0]['role']!='system'");
      const size_t start = sq.find("'<|im_start|>system", cond);
      const size_t end = start == std::string::npos ? start : sq.find("<|im_end|>", start);
      if (end == std::string::npos) return NotRecognised(source, "ChatML default system turn");
      std::string body = Unescape(sq.substr(start + 1, end - start - 1));  // <|im_start|>system\n...
      constexpr std::string_view kHead = "<|im_start|>system\n";
      if (!absl::StartsWith(body, unicode::ToAbsl(kHead))) return NotRecognised(source, "ChatML default system turn");
      // Squash removed nothing inside the literal, so this is the prompt as written.
      t.default_system_ = body.substr(kHead.size());
      t.has_default_system_ = true;
    } else if (absl::StrContains(sq, "messages[0]['role']")) {
      return NotRecognised(source, "ChatML with unknown conditions on the first message");
    }
    return t;
  }
  if (absl::StrContains(sq, "<|start_header_id|>") && absl::StrContains(sq, "<|end_header_id|>") &&
      absl::StrContains(sq, "<|eot_id|>")) {
    const bool trim = absl::StrContains(sq, "message['content']|trim");
    if (!trim && !absl::StrContains(sq, "+message['content']+'<|eot_id|>'")) {
      return NotRecognised(source, "Llama-3 markers with an unknown content expression");
    }
    t.kind_ = Kind::kLlama3;
    t.trim_content_ = trim;
    t.llama3_bos_ = absl::StrContains(sq, "bos_token");
    return t;
  }
  if (absl::StrContains(sq, "[INST]") && absl::StrContains(sq, "[/INST]") &&
      absl::StrContains(sq, "<<SYS>>")) {
    if (!absl::StrContains(sq, "bos_token+'[INST]'+content.strip()+'[/INST]'") &&
        !absl::StrContains(sq, "bos_token+'[INST] '+content.strip()+' [/INST]'")) {
      return NotRecognised(source, "Llama-2 markers with an unknown message expression");
    }
    t.kind_ = Kind::kLlama2;
    return t;
  }
  return NotRecognised(source, "no known signature");
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::vector<ChatMessage>& messages,
                                                 bool add_generation_prompt) const {
  std::string out;
  switch (kind_) {
    case Kind::kChatMl:
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0 && has_default_system_ && messages[0].role != "system") {
          absl::StrAppend(&out, "<|im_start|>system\n", default_system_, "<|im_end|>\n");
        }
        absl::StrAppend(&out, "<|im_start|>", messages[i].role, "\n", messages[i].content,
                        "<|im_end|>\n");
      }
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      return out;
    case Kind::kLlama3:
      for (size_t i = 0; i < messages.size(); ++i) {
        if (i == 0 && llama3_bos_) out += bos_;
        std::string_view content = messages[i].content;
        if (trim_content_) content = PythonStrip(content);
        absl::StrAppend(&out, "<|start_header_id|>", messages[i].role, "<|end_header_id|>\n\n",
                        unicode::ToAbsl(content), "<|eot_id|>");
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return out;
    case Kind::kLlama2: {
      // The template reads messages[0]['role'] first; Jinja fails on an empty list there.
      if (messages.empty()) return absl::InvalidArgumentError("list object has no element 0");
      size_t first = 0;
      const std::string* system = nullptr;
      if (!messages.empty() && messages[0].role == "system") {
        system = &messages[0].content;
        first = 1;
      }
      for (size_t i = first; i < messages.size(); ++i) {
        const size_t index0 = i - first;
        const ChatMessage& m = messages[i];
        if ((m.role == "user") != (index0 % 2 == 0)) {
          return absl::InvalidArgumentError(
              "Conversation roles must alternate user/assistant/user/assistant/...");
        }
        std::string content = m.content;
        if (index0 == 0 && system != nullptr) {
          content = absl::StrCat("<<SYS>>\n", *system, "\n<</SYS>>\n\n", m.content);
        }
        if (m.role == "user") {
          absl::StrAppend(&out, bos_, "[INST] ", unicode::ToAbsl(PythonStrip(content)), " [/INST]");
        } else if (m.role == "assistant") {
          absl::StrAppend(&out, " ", unicode::ToAbsl(PythonStrip(content)), " ", eos_);
        }
      }
      return out;
    }
  }
  return absl::InternalError("unknown chat template kind");
}

}  // namespace kvq::model
