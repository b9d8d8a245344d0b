#include "model/spm_tokenizer.h"

#include <cstdio>
#include <limits>
#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "model/unicode.h"

namespace kvq::model {
namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581

// "<0x41>" -> 0x41, or -1.
int ParseByteToken(std::string_view s) {
  if (s.size() != 6 || s.substr(0, 3) != "<0x" || s[5] != '>') return -1;
  int v = 0;
  for (size_t i = 3; i < 5; ++i) {
    const char c = s[i];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= c - '0';
    else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
    else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
    else return -1;
  }
  return v;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SpmTokenizer>> SpmTokenizer::Create(const TokenizerSpec& spec) {
  std::unique_ptr<SpmTokenizer> t(new SpmTokenizer());
  if (auto s = t->InitBase(spec); !s.ok()) return s;
  const int32_t n = t->vocab_size();
  t->add_space_prefix_ = spec.add_space_prefix;
  if (!spec.scores.empty()) {
    if (spec.scores.size() != spec.tokens.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: ", spec.scores.size(), " scores for ", n, " tokens"));
    }
    t->scores_ = spec.scores;
  } else {
    // Ranked merges (tokenizer.json): earlier rule, higher priority. Tokens no rule makes keep
    // the lowest score, so they never win a merge they could not have come from.
    t->scores_.assign(n, -std::numeric_limits<float>::max());
    for (size_t r = 0; r < spec.merges.size(); ++r) {
      const int32_t id = t->FindToken(spec.merges[r].first + spec.merges[r].second);
      if (id < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer: merge ", r, " makes a token not in the vocabulary"));
      }
      const float score = -static_cast<float>(r);
      if (t->scores_[id] < score) t->scores_[id] = score;
    }
  }
  t->byte_ids_.fill(-1);
  t->token_bytes_.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t type = t->types_[i];
    const std::string& text = t->texts_[i];
    if (type == TokenizerSpec::kByte) {
      const int b = ParseByteToken(text);
      if (b < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer: byte token ", i, " is spelled \"", text, "\", not <0xXX>"));
      }
      t->byte_ids_[b] = i;
      t->token_bytes_[i] = std::string(1, static_cast<char>(b));
      continue;
    }
    if (type == TokenizerSpec::kNormal || type == TokenizerSpec::kUserDefined) {
      t->pieces_.emplace(text, i);
    }
    t->token_bytes_[i] = absl::StrReplaceAll(text, {{unicode::ToAbsl(kSpace), " "}});
  }
  return t;
}

void SpmTokenizer::EncodeFragment(std::string_view text, bool after_special,
                                  std::vector<int32_t>* out) const {
  std::string s;
  s.reserve(text.size() + 4);
  if (add_space_prefix_ && after_special) s.append(kSpace);
  for (char c : text) {
    if (c == ' ') s.append(kSpace);
    else s.push_back(c);
  }
  // Symbols are UTF-8 characters (an invalid byte is a symbol of its own).
  struct Symbol {
    uint32_t begin;
    uint32_t len;
    int32_t prev;
    int32_t next;
  };
  std::vector<Symbol> sym;
  for (size_t pos = 0; pos < s.size();) {
    char32_t cp;
    size_t len = unicode::DecodeUtf8(s, pos, &cp);
    if (len == 0) len = 1;
    const int32_t i = static_cast<int32_t>(sym.size());
    sym.push_back({static_cast<uint32_t>(pos), static_cast<uint32_t>(len), i - 1, i + 1});
    pos += len;
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  struct Cand {
    float score;
    int32_t left;
    uint32_t size;  // bytes of the pair when queued, to detect stale entries
    bool operator<(const Cand& o) const {  // max-heap on score, then leftmost
      return score != o.score ? score < o.score : left > o.left;
    }
  };
  std::priority_queue<Cand> heap;
  auto try_pair = [&](int32_t l) {
    if (l < 0) return;
    const int32_t r = sym[l].next;
    if (r < 0) return;
    const std::string_view piece(s.data() + sym[l].begin, sym[l].len + sym[r].len);
    auto it = pieces_.find(unicode::ToAbsl(piece));
    if (it == pieces_.end()) return;
    heap.push({scores_[it->second], l, static_cast<uint32_t>(piece.size())});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) try_pair(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Symbol& l = sym[c.left];
    if (l.len == 0 || l.next < 0 || l.len + sym[l.next].len != c.size) continue;  // stale
    Symbol& r = sym[l.next];
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (l.next >= 0) sym[l.next].prev = c.left;
    try_pair(l.prev);
    try_pair(c.left);
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) {
    const std::string_view piece(s.data() + sym[i].begin, sym[i].len);
    auto it = pieces_.find(unicode::ToAbsl(piece));
    if (it != pieces_.end()) {
      out->push_back(it->second);
      continue;
    }
    for (char c : piece) {
      const int32_t id = byte_ids_[static_cast<unsigned char>(c)];
      if (id >= 0) {
        out->push_back(id);
      } else if (unk_id_ >= 0) {
        out->push_back(unk_id_);
        break;  // one unk per character, as SentencePiece does without byte fallback
      }
    }
  }
}

std::string SpmTokenizer::FinishDecode(std::string bytes, bool starts_with_text) const {
  // The space the encoder prepended is not part of the text.
  if (add_space_prefix_ && starts_with_text && !bytes.empty() && bytes[0] == ' ') bytes.erase(0, 1);
  return bytes;
}

}  // namespace kvq::model
