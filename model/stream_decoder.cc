#include <string>

#include "model/tokenizer.h"
#include "model/unicode.h"

namespace kvq::model {

std::string StreamDecoder::Push(int32_t id) {
  if (skip_special_ && tok_.IsSpecial(id)) return "";
  pending_ += tok_.TokenBytes(id);
  // Emit everything up to a trailing, still-incomplete UTF-8 sequence. Bytes that can never
  // become valid are replaced now (one U+FFFD per maximal invalid subpart) rather than held.
  std::string out;
  size_t pos = 0;
  while (pos < pending_.size()) {
    char32_t cp;
    const size_t len = unicode::DecodeUtf8(pending_, pos, &cp);
    if (len > 0) {
      out.append(pending_, pos, len);
      pos += len;
    } else if (unicode::TruncatedUtf8Length(pending_, pos) > 0) {
      break;  // the rest of this character is in a later token
    } else {
      out.append(unicode::kReplacementChar);
      pos += unicode::InvalidUtf8Length(pending_, pos);
    }
  }
  pending_.erase(0, pos);
  return out;
}

std::string StreamDecoder::Flush() {
  std::string out = unicode::ToValidUtf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace kvq::model
