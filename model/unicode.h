// Code point classification (letters, numbers, whitespace) and UTF-8 helpers shared by the
// tokenizers, the stream decoder and the chat templates.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "absl/strings/string_view.h"

namespace kvq::model::unicode {

bool IsLetter(char32_t cp);      // \p{L}
bool IsNumber(char32_t cp);      // \p{N} (also Rust's char::is_numeric, used by HF Digits)
bool IsWhitespace(char32_t cp);  // regex \s: the White_Space property
bool IsPythonSpace(char32_t cp); // Python str.isspace (Jinja's trim / str.strip)

// Decodes the code point that starts at s[pos]. Returns its length in bytes (1..4), or 0 when
// the bytes there are not a complete, valid UTF-8 sequence (then *cp is unspecified).
size_t DecodeUtf8(std::string_view s, size_t pos, char32_t* cp);
// Length of a valid but possibly truncated sequence starting at s[pos] when s ends before the
// sequence does (1..3 bytes present, all consistent so far); 0 if s[pos] cannot start one or
// the sequence is complete or invalid.
size_t TruncatedUtf8Length(std::string_view s, size_t pos);
// Bytes covered by one U+FFFD when s[pos] does not start a valid sequence: the maximal
// subpart of a well-formed sequence there, at least 1.
size_t InvalidUtf8Length(std::string_view s, size_t pos);
void AppendUtf8(char32_t cp, std::string* out);
// Replaces invalid sequences with U+FFFD, one per maximal invalid subpart (as Rust's
// String::from_utf8_lossy and Python's errors="replace" do).
std::string ToValidUtf8(std::string_view bytes);

// absl here is built with its own string_view type; this bridges std::string_view to it.
inline absl::string_view ToAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";

}  // namespace kvq::model::unicode
