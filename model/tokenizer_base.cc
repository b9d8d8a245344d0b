#include "model/tokenizer_base.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "model/unicode.h"

namespace kvq::model {

absl::Status VocabTokenizer::InitBase(const TokenizerSpec& spec) {
  const int32_t n = static_cast<int32_t>(spec.tokens.size());
  if (n == 0) return absl::InvalidArgumentError("tokenizer: empty vocabulary");
  if (!spec.token_types.empty() && spec.token_types.size() != spec.tokens.size()) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer: ", spec.token_types.size(),
                                                   " token types for ", n, " tokens"));
  }
  auto check_id = [n](int32_t id, const char* what) -> absl::Status {
    if (id < -1 || id >= n) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: ", what, " id ", id, " outside the vocabulary of ", n));
    }
    return absl::OkStatus();
  };
  if (auto s = check_id(spec.bos_id, "bos"); !s.ok()) return s;
  if (auto s = check_id(spec.eos_id, "eos"); !s.ok()) return s;
  if (auto s = check_id(spec.unk_id, "unk"); !s.ok()) return s;
  texts_ = spec.tokens;
  types_ = spec.token_types;
  if (types_.empty()) types_.assign(n, TokenizerSpec::kNormal);
  bos_id_ = spec.bos_id;
  eos_id_ = spec.eos_id;
  unk_id_ = spec.unk_id;
  add_bos_ = spec.add_bos;

  by_text_.reserve(n);
  for (int32_t i = 0; i < n; ++i) by_text_.emplace(texts_[i], i);  // first spelling wins

  specials_by_byte_.assign(256, {});
  for (int32_t i = 0; i < n; ++i) {
    const int32_t t = types_[i];
    if ((t != TokenizerSpec::kControl && t != TokenizerSpec::kUserDefined) || texts_[i].empty()) {
      continue;
    }
    specials_by_byte_[static_cast<unsigned char>(texts_[i][0])].push_back(
        {texts_[i], i, t == TokenizerSpec::kControl});
  }
  for (auto& v : specials_by_byte_) {
    std::stable_sort(v.begin(), v.end(),
                     [](const Special& a, const Special& b) { return a.text.size() > b.text.size(); });
  }

  stop_ids_.clear();
  if (eos_id_ >= 0) stop_ids_.push_back(eos_id_);
  for (std::string_view s : {"<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>",
                             "<|eom_id|>"}) {
    const int32_t id = FindToken(s);
    if (id >= 0 && std::find(stop_ids_.begin(), stop_ids_.end(), id) == stop_ids_.end()) {
      stop_ids_.push_back(id);
    }
  }

  if (!spec.chat_template.empty()) {
    const std::string bos = bos_id_ >= 0 ? texts_[bos_id_] : "";
    const std::string eos = eos_id_ >= 0 ? texts_[eos_id_] : "";
    chat_ = ChatTemplate::Recognize(spec.chat_template, bos, eos);
  }
  return absl::OkStatus();
}

const std::string& VocabTokenizer::TokenText(int32_t id) const {
  static const std::string* const kEmpty = new std::string();
  return (id >= 0 && id < vocab_size()) ? texts_[id] : *kEmpty;
}

int32_t VocabTokenizer::TokenType(int32_t id) const {
  return (id >= 0 && id < vocab_size()) ? types_[id] : 0;
}

int32_t VocabTokenizer::FindToken(std::string_view text) const {
  auto it = by_text_.find(unicode::ToAbsl(text));
  return it == by_text_.end() ? -1 : it->second;
}

bool VocabTokenizer::IsSpecial(int32_t id) const {
  return TokenType(id) == TokenizerSpec::kControl;
}

std::string VocabTokenizer::TokenBytes(int32_t id) const {
  return (id >= 0 && id < vocab_size()) ? token_bytes_[id] : std::string();
}

std::vector<int32_t> VocabTokenizer::Encode(std::string_view text, bool add_bos,
                                            bool parse_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && add_bos_ && bos_id_ >= 0) out.push_back(bos_id_);
  // Leftmost-longest match of added tokens (control ones only when parse_special, as HF's
  // encode_special_tokens and llama.cpp's parse_special do); plain text between them.
  size_t start = 0;
  bool after_special = true;
  size_t pos = 0;
  while (pos < text.size()) {
    const auto& cands = specials_by_byte_[static_cast<unsigned char>(text[pos])];
    const Special* hit = nullptr;
    for (const Special& s : cands) {
      if (!parse_special && s.control) continue;
      if (text.compare(pos, s.text.size(), s.text) == 0) {
        hit = &s;
        break;
      }
    }
    if (hit == nullptr) {
      ++pos;
      continue;
    }
    if (pos > start) EncodeFragment(text.substr(start, pos - start), after_special, &out);
    out.push_back(hit->id);
    pos += hit->text.size();
    start = pos;
    after_special = true;
  }
  if (start < text.size()) EncodeFragment(text.substr(start), after_special, &out);
  return out;
}

std::string VocabTokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string bytes;
  bool first = true;
  bool starts_with_text = false;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) continue;
    if (skip_special && IsSpecial(id)) continue;
    if (first) {
      starts_with_text = TokenType(id) != TokenizerSpec::kControl &&
                         TokenType(id) != TokenizerSpec::kUserDefined;
      first = false;
    }
    bytes += token_bytes_[id];
  }
  return unicode::ToValidUtf8(FinishDecode(std::move(bytes), starts_with_text));
}

absl::StatusOr<std::string> VocabTokenizer::ApplyChatTemplate(
    const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  if (!chat_.ok()) return chat_.status();
  return chat_->Render(messages, add_generation_prompt);
}

}  // namespace kvq::model
