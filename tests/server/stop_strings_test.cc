// Stop strings on streamed text, and the UTF-8 checks that guard prompts.
#include "server/stop_strings.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/utf8.h"

namespace kvq::server {
namespace {

// Feeds pieces one at a time and returns everything emitted.
std::string Feed(StopStringMatcher& m, const std::vector<std::string>& pieces) {
  std::string out;
  for (const std::string& p : pieces) out += m.Push(p);
  return out + m.Flush();
}

TEST(StopStringMatcher, NoStopsPassesThrough) {
  StopStringMatcher m({});
  EXPECT_EQ(Feed(m, {"Hello", ", ", "world"}), "Hello, world");
  EXPECT_FALSE(m.matched());
}

TEST(StopStringMatcher, StopSplitAcrossPiecesIsNeverEmitted) {
  StopStringMatcher m({"###"});
  std::string out = m.Push("Answer: 4 #");
  EXPECT_EQ(out, "Answer: 4 ");  // "#" is held back
  out += m.Push("#");
  EXPECT_EQ(out, "Answer: 4 ");
  out += m.Push("# more");
  EXPECT_EQ(out, "Answer: 4 ");
  EXPECT_TRUE(m.matched());
  EXPECT_EQ(m.matched_string(), "###");
  EXPECT_EQ(m.Push("after"), "");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopStringMatcher, FalseStartIsReleased) {
  StopStringMatcher m({"STOP"});
  EXPECT_EQ(Feed(m, {"ST", "OR", "Y"}), "STORY");
  EXPECT_FALSE(m.matched());
}

TEST(StopStringMatcher, EarliestOfSeveralWins) {
  StopStringMatcher m({"world", "lo, w"});
  EXPECT_EQ(Feed(m, {"Hel", "lo, world"}), "Hel");
  EXPECT_EQ(m.matched_string(), "lo, w");
}

TEST(StopStringMatcher, HeldTailIsFlushedAtTheEnd) {
  StopStringMatcher m({"\n\nUser:"});
  EXPECT_EQ(m.Push("Done.\n\nUs"), "Done.");
  EXPECT_EQ(m.Flush(), "\n\nUs");
}

TEST(Utf8, ValidatesAndLocatesTheBadByte) {
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("h\xC3\xA9llo \xF0\x9F\x98\x80"));
  EXPECT_EQ(ValidUtf8Prefix("ab\xFF" "cd"), 2u);
  EXPECT_EQ(ValidUtf8Prefix("\xED\xA0\x80"), 0u);  // a surrogate
  EXPECT_EQ(ValidUtf8Prefix("\xC0\xAF"), 0u);      // overlong
  bool incomplete = false;
  EXPECT_EQ(ValidUtf8Prefix("ok\xF0\x9F", &incomplete), 2u);
  EXPECT_TRUE(incomplete);
  EXPECT_EQ(SanitizeUtf8("a\xFF" "b"), "a\xEF\xBF\xBD" "b");
}

}  // namespace
}  // namespace kvq::server
