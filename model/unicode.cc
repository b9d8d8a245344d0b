#include "model/unicode.h"

#include <algorithm>

#include "model/unicode_tables.h"

namespace kvq::model::unicode {
namespace {

bool InRanges(const CodepointRange* r, int n, char32_t cp) {
  const CodepointRange* end = r + n;
  const CodepointRange* it = std::upper_bound(
      r, end, cp, [](char32_t c, const CodepointRange& range) { return c < range.first; });
  return it != r && cp <= (it - 1)->last;
}

}  // namespace

bool IsLetter(char32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  int n = 0;
  const CodepointRange* r = LetterRanges(&n);
  return InRanges(r, n, cp);
}

bool IsNumber(char32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  int n = 0;
  const CodepointRange* r = NumberRanges(&n);
  return InRanges(r, n, cp);
}

bool IsWhitespace(char32_t cp) {
  if (cp < 0x80) return cp == ' ' || (cp >= 0x09 && cp <= 0x0D);
  switch (cp) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F:
    case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

bool IsPythonSpace(char32_t cp) {
  return IsWhitespace(cp) || (cp >= 0x1C && cp <= 0x1F);
}

size_t DecodeUtf8(std::string_view s, size_t pos, char32_t* cp) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  const unsigned char c = p[pos];
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  size_t len;
  char32_t v;
  char32_t min;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2, v = c & 0x1F, min = 0x80;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3, v = c & 0x0F, min = 0x800;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4, v = c & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (pos + len > n) return 0;
  for (size_t i = 1; i < len; ++i) {
    if ((p[pos + i] & 0xC0) != 0x80) return 0;
    v = (v << 6) | (p[pos + i] & 0x3F);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  *cp = v;
  return len;
}

namespace {

// Number of bytes of s[pos..] that form a valid prefix of some UTF-8 sequence, and the full
// length that sequence would have. Follows the Unicode table of well-formed byte sequences so
// that e.g. E0 80 is rejected at its second byte.
size_t ValidPrefix(std::string_view s, size_t pos, size_t* full) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const unsigned char c = p[pos];
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    *full = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    *full = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    *full = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    *full = 1;
    return 0;
  }
  size_t k = 1;
  while (k < *full && pos + k < s.size()) {
    const unsigned char b = p[pos + k];
    if (k == 1 ? (b < lo || b > hi) : (b & 0xC0) != 0x80) break;
    ++k;
  }
  return k;
}

}  // namespace

size_t TruncatedUtf8Length(std::string_view s, size_t pos) {
  size_t full = 0;
  const size_t k = ValidPrefix(s, pos, &full);
  if (k == 0 || k == full || pos + k != s.size()) return 0;
  return k;
}

size_t InvalidUtf8Length(std::string_view s, size_t pos) {
  size_t full = 0;
  const size_t k = ValidPrefix(s, pos, &full);
  return k == 0 ? 1 : k;
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string ToValidUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t pos = 0;
  while (pos < bytes.size()) {
    char32_t cp;
    const size_t len = DecodeUtf8(bytes, pos, &cp);
    if (len > 0) {
      out.append(bytes.substr(pos, len));
      pos += len;
      continue;
    }
    out.append(kReplacementChar);
    pos += InvalidUtf8Length(bytes, pos);
  }
  return out;
}

}  // namespace kvq::model::unicode
