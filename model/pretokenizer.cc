#include "model/pretokenizer.h"

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/unicode.h"

namespace kvq::model {
namespace {

enum CharClass : uint8_t { kLetter, kNumber, kSpace, kOther };

struct Char {
  char32_t cp;
  uint32_t offset;  // byte offset in the text
  CharClass cls;
};

CharClass Classify(char32_t cp) {
  if (unicode::IsLetter(cp)) return kLetter;
  if (unicode::IsNumber(cp)) return kNumber;
  if (unicode::IsWhitespace(cp)) return kSpace;
  return kOther;
}

void Decode(std::string_view text, std::vector<Char>* chars) {
  chars->clear();
  chars->reserve(text.size() + 1);
  size_t pos = 0;
  while (pos < text.size()) {
    char32_t cp;
    size_t len = unicode::DecodeUtf8(text, pos, &cp);
    CharClass cls;
    if (len == 0) {  // invalid byte: one "other" char
      len = 1;
      cp = 0xFFFD;
      cls = kOther;
    } else {
      cls = Classify(cp);
    }
    chars->push_back({cp, static_cast<uint32_t>(pos), cls});
    pos += len;
  }
  chars->push_back({0, static_cast<uint32_t>(text.size()), kOther});  // sentinel for offsets
}

char32_t Lower(char32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// Length of a contraction 's|'t|'re|'ve|'m|'ll|'d at i (0 if none).
size_t Contraction(const std::vector<Char>& c, size_t i, size_t end, bool ignore_case) {
  if (c[i].cp != '\'' || i + 1 >= end) return 0;
  auto at = [&](size_t k) { return ignore_case ? Lower(c[k].cp) : c[k].cp; };
  const char32_t a = at(i + 1);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
  if (i + 2 < end) {
    const char32_t b = at(i + 2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
  }
  return 0;
}

size_t RunOf(const std::vector<Char>& c, size_t i, size_t end, CharClass cls) {
  size_t j = i;
  while (j < end && c[j].cls == cls) ++j;
  return j;
}

// \s+(?!\S)|\s+ at i (c[i] is whitespace): the run, less its last char when a non-space follows
// and the run is longer than one.
size_t WhitespaceEnd(const std::vector<Char>& c, size_t i, size_t end) {
  const size_t j = RunOf(c, i, end, kSpace);
  if (j < end && j - i >= 2) return j - 1;
  return j;
}

// One GPT-2 regex match starting at i; returns its end.
size_t MatchGpt2(const std::vector<Char>& c, size_t i, size_t end) {
  if (size_t n = Contraction(c, i, end, /*ignore_case=*/false)) return i + n;
  const bool space = c[i].cp == ' ' && i + 1 < end;
  const size_t k = space ? i + 1 : i;  // after the optional space
  const CharClass cls = (space && c[k].cls != kSpace) ? c[k].cls : c[i].cls;
  if (space && c[k].cls != kSpace) return RunOf(c, k, end, cls);
  if (cls != kSpace) return RunOf(c, i, end, cls);
  return WhitespaceEnd(c, i, end);
}

bool IsCrLf(char32_t cp) { return cp == '\r' || cp == '\n'; }

size_t MatchLlama3(const std::vector<Char>& c, size_t i, size_t end) {
  if (size_t n = Contraction(c, i, end, /*ignore_case=*/true)) return i + n;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (c[i].cls == kLetter) return RunOf(c, i, end, kLetter);
  if (c[i].cls != kNumber && !IsCrLf(c[i].cp) && i + 1 < end && c[i + 1].cls == kLetter) {
    return RunOf(c, i + 1, end, kLetter);
  }
  // \p{N}{1,3}
  if (c[i].cls == kNumber) {
    size_t j = i;
    while (j < end && j - i < 3 && c[j].cls == kNumber) ++j;
    return j;
  }
  //  ?[^\s\p{L}\p{N}]+[\r\n]*
  const size_t k = (c[i].cp == ' ' && i + 1 < end && c[i + 1].cls == kOther) ? i + 1 : i;
  if (c[k].cls == kOther) {
    size_t j = RunOf(c, k, end, kOther);
    while (j < end && IsCrLf(c[j].cp)) ++j;
    return j;
  }
  // c[i] is whitespace. \s*[\r\n]+: up to and including the last newline of the run.
  const size_t j = RunOf(c, i, end, kSpace);
  for (size_t m = j; m > i; --m) {
    if (IsCrLf(c[m - 1].cp)) return m;
  }
  return WhitespaceEnd(c, i, end);
}

void SplitRange(PreTokenizerKind kind, std::string_view text, const std::vector<Char>& c,
                size_t begin, size_t end, std::vector<std::string_view>* words) {
  size_t i = begin;
  while (i < end) {
    const size_t j = kind == PreTokenizerKind::kLlama3 ? MatchLlama3(c, i, end) : MatchGpt2(c, i, end);
    words->push_back(text.substr(c[i].offset, c[j].offset - c[i].offset));
    i = j;
  }
}

}  // namespace

absl::StatusOr<PreTokenizerKind> PreTokenizerFromName(std::string_view name) {
  if (name == "default" || name == "gpt2" || name.empty()) return PreTokenizerKind::kGpt2;
  if (name == "llama-bpe" || name == "llama3" || name == "llama-v3") return PreTokenizerKind::kLlama3;
  if (name == "smollm") return PreTokenizerKind::kSmolLM;
  return absl::UnimplementedError(
      absl::StrCat("pre-tokenizer \"", unicode::ToAbsl(name), "\" (tokenizer.ggml.pre) is not supported; supported: "
                   "default, gpt2, llama-bpe, llama3, llama-v3, smollm"));
}

const char* PreTokenizerName(PreTokenizerKind kind) {
  switch (kind) {
    case PreTokenizerKind::kGpt2: return "gpt2";
    case PreTokenizerKind::kLlama3: return "llama-bpe";
    case PreTokenizerKind::kSmolLM: return "smollm";
  }
  return "?";
}

void PreTokenize(PreTokenizerKind kind, std::string_view text, std::vector<std::string_view>* words) {
  thread_local std::vector<Char> chars;
  Decode(text, &chars);
  const size_t n = chars.size() - 1;
  if (kind != PreTokenizerKind::kSmolLM) {
    SplitRange(kind, text, chars, 0, n, words);
    return;
  }
  // Digits(individual_digits=true): every number char is its own piece; the GPT-2 regex runs on
  // each stretch between them, so its lookahead stops at the stretch's end.
  size_t start = 0;
  for (size_t i = 0; i < n; ++i) {
    if (chars[i].cls != kNumber) continue;
    SplitRange(kind, text, chars, start, i, words);
    words->push_back(text.substr(chars[i].offset, chars[i + 1].offset - chars[i].offset));
    start = i + 1;
  }
  SplitRange(kind, text, chars, start, n, words);
}

}  // namespace kvq::model
