// Unicode general-category tables for the pre-tokenizers (generated into unicode_tables.cc by
// tools/make_tokenizer_fixtures.py unicode-tables): sorted, inclusive code point ranges.
#pragma once

namespace kvq::model::unicode {

struct CodepointRange {
  char32_t first;
  char32_t last;
};

const CodepointRange* LetterRanges(int* n);  // \p{L}: Lu Ll Lt Lm Lo
const CodepointRange* NumberRanges(int* n);  // \p{N}: Nd Nl No
const char* UnicodeVersion();                // of the Python unicodedata that made the tables

}  // namespace kvq::model::unicode
