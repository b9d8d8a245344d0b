#include "model/bpe_tokenizer.h"

#include <queue>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/unicode.h"

namespace kvq::model {
namespace {

constexpr size_t kMaxCachedWordBytes = 64;
constexpr size_t kMaxCacheEntries = 1 << 20;

struct ByteMaps {
  std::array<char32_t, 256> to_unicode{};
  absl::flat_hash_map<char32_t, int> to_byte;
  ByteMaps() {
    // Printable Latin-1 bytes map to themselves; the rest to 256, 257, ... in byte order.
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      to_unicode[b] = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(next++);
      to_byte[to_unicode[b]] = b;
    }
  }
};

const ByteMaps& Maps() {
  static const ByteMaps* const maps = new ByteMaps();
  return *maps;
}

// A vocabulary spelling in the byte-level alphabet to raw bytes; false if a code point is
// outside the alphabet.
bool SpellingToBytes(std::string_view s, std::string* out) {
  out->clear();
  size_t pos = 0;
  while (pos < s.size()) {
    char32_t cp;
    const size_t len = unicode::DecodeUtf8(s, pos, &cp);
    if (len == 0) return false;
    const int b = UnicodeToByte(cp);
    if (b < 0) return false;
    out->push_back(static_cast<char>(b));
    pos += len;
  }
  return true;
}

}  // namespace

char32_t ByteToUnicode(uint8_t b) { return Maps().to_unicode[b]; }

int UnicodeToByte(char32_t cp) {
  const auto& m = Maps().to_byte;
  auto it = m.find(cp);
  return it == m.end() ? -1 : it->second;
}

absl::StatusOr<std::unique_ptr<BpeTokenizer>> BpeTokenizer::Create(const TokenizerSpec& spec) {
  std::unique_ptr<BpeTokenizer> t(new BpeTokenizer());
  if (auto s = t->InitBase(spec); !s.ok()) return s;
  auto pre = PreTokenizerFromName(spec.pre);
  if (!pre.ok()) return pre.status();
  t->pre_ = *pre;

  const int32_t n = t->vocab_size();
  t->token_bytes_.resize(n);
  absl::flat_hash_map<std::string, int32_t> by_bytes;
  by_bytes.reserve(n);
  std::string bytes;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t type = t->types_[i];
    const bool literal = type == TokenizerSpec::kControl || type == TokenizerSpec::kUserDefined;
    if (!literal && SpellingToBytes(t->texts_[i], &bytes)) {
      t->token_bytes_[i] = bytes;
      if (type != TokenizerSpec::kUnused) by_bytes.emplace(bytes, i);
    } else {
      t->token_bytes_[i] = t->texts_[i];  // added tokens decode to their text
    }
  }
  for (int b = 0; b < 256; ++b) {
    auto it = by_bytes.find(std::string(1, static_cast<char>(b)));
    t->byte_ids_[b] = it == by_bytes.end() ? -1 : it->second;
  }
  t->merges_.reserve(spec.merges.size());
  std::string left, right;
  for (size_t r = 0; r < spec.merges.size(); ++r) {
    const auto& [a, b] = spec.merges[r];
    if (!SpellingToBytes(a, &left) || !SpellingToBytes(b, &right)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokenizer: merge ", r, " (\"", a, " ", b, "\") is not in the byte-level alphabet"));
    }
    auto ia = by_bytes.find(left);
    auto ib = by_bytes.find(right);
    auto im = by_bytes.find(left + right);
    if (ia == by_bytes.end() || ib == by_bytes.end() || im == by_bytes.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokenizer: merge ", r, " (\"", a, " ", b, "\") uses or makes a token not in the vocabulary"));
    }
    t->merges_.try_emplace(PairKey(ia->second, ib->second),
                           Merge{static_cast<int32_t>(r), im->second});
  }
  return t;
}

void BpeTokenizer::EncodeFragment(std::string_view text, bool /*after_special*/,
                                  std::vector<int32_t>* out) const {
  thread_local std::vector<std::string_view> words;
  words.clear();
  PreTokenize(pre_, text, &words);
  for (std::string_view w : words) EncodeWord(w, out);
}

void BpeTokenizer::EncodeWord(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    auto it = cache_.find(unicode::ToAbsl(word));
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  // Symbols in a doubly linked list; candidate merges in a min-heap of (rank, position),
  // validated when popped (a neighbour may have changed since).
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    int32_t id = byte_ids_[static_cast<unsigned char>(word[i])];
    if (id < 0) id = unk_id_;
    sym.push_back({id, static_cast<int32_t>(i) - 1, static_cast<int32_t>(i) + 1});
  }
  sym.back().next = -1;
  struct Cand {
    int32_t rank;
    int32_t pos;
    int32_t left_id;
    int32_t right_id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t pos) {
    const int32_t nx = sym[pos].next;
    if (nx < 0 || sym[pos].id < 0 || sym[nx].id < 0) return;
    auto it = merges_.find(PairKey(sym[pos].id, sym[nx].id));
    if (it != merges_.end()) heap.push({it->second.rank, pos, sym[pos].id, sym[nx].id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(sym.size()); ++i) push(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Symbol& l = sym[c.pos];
    if (l.id != c.left_id || l.next < 0 || sym[l.next].id != c.right_id) continue;  // stale
    const int32_t r = l.next;
    l.id = merges_.find(PairKey(c.left_id, c.right_id))->second.id;
    l.next = sym[r].next;
    if (l.next >= 0) sym[l.next].prev = c.pos;
    sym[r].id = -2;  // dead
    if (l.prev >= 0) push(l.prev);
    push(c.pos);
  }
  const size_t before = out->size();
  for (int32_t i = 0; i >= 0; i = sym[i].next) {
    if (sym[i].id >= 0) out->push_back(sym[i].id);
  }
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mu_);
    if (cache_.size() >= kMaxCacheEntries) cache_.clear();
    cache_.emplace(std::string(word), std::vector<int32_t>(out->begin() + before, out->end()));
  }
}

}  // namespace kvq::model
