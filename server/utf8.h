// UTF-8 checks for text that arrives as bytes: prompts and documents are validated here so a bad
// byte is an INVALID_ARGUMENT that names its offset, not a parse failure deep in the tokenizer.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace kvq::server {

// Length of the longest prefix of `s` made of complete, valid UTF-8 characters. If the rest is
// only the start of a character (at most 3 bytes that could still become valid), *incomplete is
// set; otherwise the byte at the returned offset is invalid.
size_t ValidUtf8Prefix(std::string_view s, bool* incomplete = nullptr);

inline bool IsValidUtf8(std::string_view s) { return ValidUtf8Prefix(s) == s.size(); }

// Replaces each invalid byte with U+FFFD (for token texts that are parts of characters).
std::string SanitizeUtf8(std::string_view s);

}  // namespace kvq::server
