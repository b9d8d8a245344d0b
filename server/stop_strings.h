// Stop strings on streamed text: text that could be the start of a stop string is held back until
// it is known not to be one, so a stop string (or any part of it) is never emitted.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace kvq::server {

class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stops);

  // Appends text; returns the part that is now safe to emit. Once a stop string appears, returns
  // the text before it, matched() turns true and all later text is dropped.
  std::string Push(std::string_view text);
  // At the end of generation: everything still held back (nothing after a match).
  std::string Flush();

  bool matched() const { return matched_ >= 0; }
  const std::string& matched_string() const;

 private:
  std::vector<std::string> stops_;
  std::string held_;
  int matched_ = -1;
};

}  // namespace kvq::server
