// Tokenizer tests: parity with Hugging Face tokenizers on the real SmolLM2 vocabulary (fixtures
// from tools/make_tokenizer_fixtures.py), pre-tokenizer splits, chat templates against jinja2
// renderings, the stream decoder, and SentencePiece-style BPE on a hand-built vocabulary.
#include "model/tokenizer.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "model/bpe_tokenizer.h"
#include "model/chat_template.h"
#include "model/gguf.h"
#include "model/pretokenizer.h"
#include "model/unicode.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace kvq::model {
namespace {

using Json = nlohmann::json;
using ::kvq::testing::CorpusPath;
using ::kvq::testing::FileExists;
using ::kvq::testing::FixturePath;
using ::kvq::testing::ModelPath;
using ::kvq::testing::ReadFileOrDie;

std::string Ids(const std::vector<int32_t>& ids) { return "[" + absl::StrJoin(ids, ", ") + "]"; }

uint64_t Fnv1a64(const std::vector<int32_t>& ids) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (int32_t id : ids) {
    const uint32_t v = static_cast<uint32_t>(id);
    for (int k = 0; k < 4; ++k) {
      h ^= (v >> (8 * k)) & 0xFF;
      h *= 0x100000001B3ull;
    }
  }
  return h;
}

std::vector<std::string> ReadLines(const std::string& path) {
  const std::string data = ReadFileOrDie(path);
  std::vector<std::string> lines;
  size_t start = 0;
  while (start < data.size()) {
    size_t nl = data.find('\n', start);
    if (nl == std::string::npos) nl = data.size();
    lines.push_back(data.substr(start, nl - start));
    start = nl + 1;
  }
  return lines;
}

bool IsValidUtf8(const std::string& s) { return unicode::ToValidUtf8(s) == s; }

std::vector<std::string> Split(PreTokenizerKind kind, std::string_view text) {
  std::vector<std::string_view> words;
  PreTokenize(kind, text, &words);
  return std::vector<std::string>(words.begin(), words.end());
}

using V = std::vector<std::string>;

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers, against splits worked out by hand from the regexes.

TEST(PreTokenizerTest, Gpt2) {
  const auto k = PreTokenizerKind::kGpt2;
  EXPECT_EQ(Split(k, "Hello  world"), (V{"Hello", " ", " world"}));
  EXPECT_EQ(Split(k, "don't I'LL we've"), (V{"don", "'t", " I", "'", "LL", " we", "'ve"}));
  EXPECT_EQ(Split(k, "x 123 4,5!? \n\n y  "), (V{"x", " 123", " 4", ",", "5", "!?", " \n\n", " y", "  "}));
  EXPECT_EQ(Split(k, "\t\tif"), (V{"\t", "\t", "if"}));
  EXPECT_EQ(Split(k, "你好 世界"), (V{"你好", " 世界"}));
  EXPECT_EQ(Split(k, "caf\xC3\xA9 e\xCC\x81"), (V{"caf\xC3\xA9", " e", "\xCC\x81"}));
  EXPECT_EQ(Split(k, "a\xFF" "b"), (V{"a", "\xFF", "b"}));  // invalid byte: punctuation-like
  EXPECT_EQ(Split(k, ""), V{});
}

TEST(PreTokenizerTest, SmolLMIsolatesEveryDigit) {
  const auto k = PreTokenizerKind::kSmolLM;
  EXPECT_EQ(Split(k, "a 12b"), (V{"a", " ", "1", "2", "b"}));
  // The whitespace run before a digit ends its stretch, so (?!\S) does not give a space back.
  EXPECT_EQ(Split(k, "x  7 y"), (V{"x", "  ", "7", " y"}));
  EXPECT_EQ(Split(k, "\xD9\xA1\xD9\xA2"), (V{"\xD9\xA1", "\xD9\xA2"}));  // Arabic-Indic digits
}

TEST(PreTokenizerTest, Llama3) {
  const auto k = PreTokenizerKind::kLlama3;
  EXPECT_EQ(Split(k, "Hello 12345 world!!\n\n  x"),
            (V{"Hello", " ", "123", "45", " world", "!!\n\n", " ", " x"}));
  EXPECT_EQ(Split(k, "I'LL \"quote\" a\n \n b"), (V{"I", "'LL", " \"", "quote", "\"", " a", "\n \n", " b"}));
  EXPECT_EQ(Split(k, "\tfoo"), (V{"\tfoo"}));
}

TEST(PreTokenizerTest, Names) {
  EXPECT_EQ(*PreTokenizerFromName("smollm"), PreTokenizerKind::kSmolLM);
  EXPECT_EQ(*PreTokenizerFromName("llama-bpe"), PreTokenizerKind::kLlama3);
  EXPECT_EQ(*PreTokenizerFromName("gpt2"), PreTokenizerKind::kGpt2);
  auto bad = PreTokenizerFromName("qwen2");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(bad.status().message().find("qwen2"), std::string::npos);
}

TEST(UnicodeTest, Classification) {
  EXPECT_TRUE(unicode::IsLetter(U'a'));
  EXPECT_TRUE(unicode::IsLetter(U'\u00e9'));
  EXPECT_TRUE(unicode::IsLetter(U'\u4f60'));
  EXPECT_FALSE(unicode::IsLetter(U'\u0301'));  // combining mark
  EXPECT_TRUE(unicode::IsNumber(U'\u00bd'));
  EXPECT_TRUE(unicode::IsNumber(U'\u2167'));
  EXPECT_FALSE(unicode::IsNumber(U'x'));
  EXPECT_TRUE(unicode::IsWhitespace(U'\u3000'));
  EXPECT_FALSE(unicode::IsWhitespace(U'\u200b'));
  EXPECT_EQ(unicode::ToValidUtf8("a\xE2\x82"), "a\xEF\xBF\xBD");
  EXPECT_EQ(unicode::ToValidUtf8("\xFF\xC3\xA9"), "\xEF\xBF\xBD\xC3\xA9");
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 vocabulary against the reference fixtures.

class SmolLMTokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!FileExists(ModelPath())) return;
    auto gguf = GgufFile::Open(ModelPath());
    ASSERT_TRUE(gguf.ok()) << gguf.status();
    auto spec = Tokenizer::SpecFromGguf(**gguf);
    ASSERT_TRUE(spec.ok()) << spec.status();
    spec_ = new TokenizerSpec(std::move(*spec));
    auto tok = Tokenizer::FromSpec(*spec_);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = tok->release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete spec_;
    tok_ = nullptr;
    spec_ = nullptr;
  }
  void SetUp() override {
    KVQ_REQUIRE_MODEL();
    ASSERT_NE(tok_, nullptr);
  }
  static Json Fixture(const std::string& name) {
    return Json::parse(ReadFileOrDie(FixturePath("tokenizer/" + name)));
  }
  // Every line of a corpus file: ids equal to the reference (full ids for test splits, per-line
  // hashes otherwise) and Decode(Encode(line)) == line.
  static void CheckCorpus(const Tokenizer& tok, const std::string& name, size_t max_lines);

  static TokenizerSpec* spec_;
  static Tokenizer* tok_;
};
TokenizerSpec* SmolLMTokenizerTest::spec_ = nullptr;
Tokenizer* SmolLMTokenizerTest::tok_ = nullptr;

TEST_F(SmolLMTokenizerTest, Metadata) {
  EXPECT_EQ(tok_->vocab_size(), 49152);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->stop_ids(), (std::vector<int32_t>{2, 0}));  // <|im_end|>, <|endoftext|>
  EXPECT_TRUE(tok_->IsSpecial(1));
  EXPECT_FALSE(tok_->IsSpecial(100));
  EXPECT_EQ(tok_->TokenBytes(216), " ");
  // add_bos_token is false in this file: no BOS even when the caller allows it.
  EXPECT_EQ(tok_->Encode("Hello", /*add_bos=*/true), (std::vector<int32_t>{19556}));
  ASSERT_EQ(spec_->pre, "smollm");
}

TEST_F(SmolLMTokenizerTest, TrickyStringsMatchReference) {
  const Json f = Fixture("strings.json");
  ASSERT_GT(f["cases"].size(), 40u);
  for (const Json& c : f["cases"]) {
    const std::string text = c["text"].get<std::string>();
    SCOPED_TRACE("text: \"" + text.substr(0, 80) + "\"");
    const auto ids = tok_->Encode(text, false, true);
    EXPECT_EQ(Ids(ids), Ids(c["ids"].get<std::vector<int32_t>>()));
    EXPECT_EQ(Ids(tok_->Encode(text, false, false)), Ids(c["ids_no_special"].get<std::vector<int32_t>>()));
    EXPECT_EQ(tok_->Decode(ids, false), c["decoded"].get<std::string>());
    EXPECT_EQ(tok_->Decode(ids, true), c["decoded_skip_special"].get<std::string>());
    EXPECT_EQ(tok_->Decode(tok_->Encode(text, false, false)), text);
  }
}

void SmolLMTokenizerTest::CheckCorpus(const Tokenizer& tok, const std::string& name,
                                      size_t max_lines) {
  const std::string path = CorpusPath(name + ".txt");
  if (!FileExists(path)) {
    GTEST_SKIP() << "corpus not found at " << path << " (run scripts/setup.sh)";
  }
  const std::vector<std::string> lines = ReadLines(path);
  const Json summary = Fixture("corpus.json")[name + ".txt"];
  ASSERT_EQ(lines.size(), summary["lines"].get<size_t>()) << name << ": corpus differs from the fixtures'";
  const std::string hashes = ReadFileOrDie(FixturePath("tokenizer/" + name + ".hashes"));
  ASSERT_EQ(hashes.size(), 8 * lines.size());
  const std::string id_path = FixturePath("tokenizer/" + name + ".ids");
  const bool full = FileExists(id_path);
  const std::string id_blob = full ? ReadFileOrDie(id_path) : std::string();
  size_t id_pos = 0;
  size_t mismatches = 0, roundtrip_failures = 0;
  std::vector<int32_t> stream;
  const size_t n = std::min(lines.size(), max_lines);
  for (size_t i = 0; i < n; ++i) {
    const std::vector<int32_t> ids = tok.Encode(lines[i], /*add_bos=*/false, /*parse_special=*/true);
    stream.insert(stream.end(), ids.begin(), ids.end());
    uint64_t want_hash;
    std::memcpy(&want_hash, hashes.data() + 8 * i, 8);  // little-endian host
    std::vector<int32_t> want;
    if (full) {
      uint32_t count;
      std::memcpy(&count, id_blob.data() + id_pos, 4);
      id_pos += 4;
      for (uint32_t k = 0; k < count; ++k, id_pos += 2) {
        uint16_t v;
        std::memcpy(&v, id_blob.data() + id_pos, 2);
        want.push_back(v);
      }
    }
    const bool ok = full ? ids == want : Fnv1a64(ids) == want_hash;
    if (!ok && mismatches++ == 0) {
      ADD_FAILURE() << name << " line " << i + 1 << ": \"" << lines[i] << "\"\n  ours:      " << Ids(ids)
                    << "\n  reference: " << (full ? Ids(want) : "(hash only) " + std::to_string(want_hash));
    }
    if (tok.Decode(ids) != lines[i] && roundtrip_failures++ == 0) {
      ADD_FAILURE() << name << " line " << i + 1 << " does not round-trip: \"" << tok.Decode(ids) << "\"";
    }
  }
  EXPECT_EQ(mismatches, 0u) << name << ": lines whose ids differ from the reference";
  EXPECT_EQ(roundtrip_failures, 0u) << name << ": lines where Decode(Encode(x)) != x";
  if (n == lines.size()) {
    EXPECT_EQ(stream.size(), summary["tokens"].get<size_t>());
    char hex[17];
    std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(Fnv1a64(stream)));
    EXPECT_EQ(std::string(hex), summary["fnv1a64"].get<std::string>());
  }
}

TEST_F(SmolLMTokenizerTest, CorporaMatchReferenceLineByLine) {
  const auto t0 = std::chrono::steady_clock::now();
  for (const char* name : {"kjv.test", "austen.test", "kjv.train", "austen.train"}) {
    SCOPED_TRACE(name);
    CheckCorpus(*tok_, name, SIZE_MAX);
    if (IsSkipped()) return;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("all corpus lines encoded, checked and decoded in %.2f s\n", s);
}

TEST_F(SmolLMTokenizerTest, ChatTemplateMatchesJinja) {
  const Json f = Fixture("chat.json");
  const Json& model = f["templates"][0];
  ASSERT_EQ(model["name"], "model");
  ASSERT_EQ(model["template"].get<std::string>(), spec_->chat_template)
      << "fixtures were made from another model file";
  for (const Json& r : model["renders"]) {
    std::vector<ChatMessage> msgs;
    for (const Json& m : r["messages"]) msgs.push_back({m["role"], m["content"]});
    auto out = tok_->ApplyChatTemplate(msgs, r["add_generation_prompt"].get<bool>());
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(*out, r["output"].get<std::string>());
  }
  // The rendered prompt tokenizes with the turn markers as single tokens.
  auto prompt = tok_->ApplyChatTemplate({{"user", "Hi"}}, true);
  ASSERT_TRUE(prompt.ok());
  const auto ids = tok_->Encode(*prompt, false, true);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 1), 3);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 2), 2);
}

TEST_F(SmolLMTokenizerTest, StreamDecoderHoldsSplitCharacters) {
  const std::string text =
      "Emoji \xF0\x9F\x98\x80\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD caf\xC3\xA9 \xE4\xBD\xA0\xE5\xA5\xBD "
      "\xF0\x9F\xA7\x91\xE2\x80\x8D\xF0\x9F\x92\xBB<|im_end|>";
  const auto ids = tok_->Encode(text, false, true);
  int split_tokens = 0;
  for (int32_t id : ids) split_tokens += IsValidUtf8(tok_->TokenBytes(id)) ? 0 : 1;
  ASSERT_GT(split_tokens, 2) << "the test needs characters split across tokens";
  StreamDecoder dec(*tok_);
  std::string all;
  int empty_pushes = 0;
  for (int32_t id : ids) {
    const std::string piece = dec.Push(id);
    EXPECT_TRUE(IsValidUtf8(piece)) << "emitted a partial character for id " << id;
    empty_pushes += piece.empty() ? 1 : 0;
    all += piece;
  }
  all += dec.Flush();
  EXPECT_GT(empty_pushes, 0);
  EXPECT_EQ(all, text.substr(0, text.size() - std::string("<|im_end|>").size()));  // skipped
  StreamDecoder keep(*tok_, /*skip_special=*/false);
  std::string all2;
  for (int32_t id : ids) all2 += keep.Push(id);
  EXPECT_EQ(all2 + keep.Flush(), text);
}

// tokenizer.json built from the same vocabulary in Hugging Face's format gives the same ids.
TEST_F(SmolLMTokenizerTest, TokenizerJsonGivesSameIds) {
  const std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / "kvq_tokenizer_json_smollm";
  std::filesystem::create_directories(dir);
  Json vocab = Json::object();
  Json added = Json::array();
  for (size_t i = 0; i < spec_->tokens.size(); ++i) {
    vocab[spec_->tokens[i]] = i;
    if (spec_->token_types[i] == TokenizerSpec::kControl) {
      added.push_back({{"id", i}, {"content", spec_->tokens[i]}, {"special", true},
                       {"normalized", false}, {"lstrip", false}, {"rstrip", false},
                       {"single_word", false}});
    }
  }
  Json merges = Json::array();
  for (size_t i = 0; i < spec_->merges.size(); ++i) {
    if (i % 2 == 0) merges.push_back(spec_->merges[i].first + " " + spec_->merges[i].second);
    else merges.push_back({spec_->merges[i].first, spec_->merges[i].second});  // both forms
  }
  Json tj = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Digits"}, {"individual_digits", true}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}}}}},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}, {"byte_fallback", false}}},
  };
  Json cfg = {{"bos_token", "<|im_start|>"}, {"eos_token", "<|im_end|>"}, {"add_bos_token", false},
              {"chat_template", spec_->chat_template}};
  std::ofstream(dir / "tokenizer.json") << tj.dump();
  std::ofstream(dir / "tokenizer_config.json") << cfg.dump();
  auto tok = Tokenizer::FromTokenizerJson((dir / "tokenizer.json").string());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);
  const Json f = Fixture("strings.json");
  for (const Json& c : f["cases"]) {
    const std::string text = c["text"].get<std::string>();
    EXPECT_EQ(Ids((*tok)->Encode(text, false, true)), Ids(c["ids"].get<std::vector<int32_t>>())) << text;
  }
  CheckCorpus(**tok, "kjv.test", 1000);
  auto chat = (*tok)->ApplyChatTemplate({{"user", "Hi"}}, true);
  ASSERT_TRUE(chat.ok()) << chat.status();
  EXPECT_EQ(*chat, *tok_->ApplyChatTemplate({{"user", "Hi"}}, true));
}

// ---------------------------------------------------------------------------------------------
// Chat templates without the model: the reference templates against their jinja2 renderings.

TEST(ChatTemplateTest, ReferenceTemplatesMatchJinja) {
  const Json f = Json::parse(ReadFileOrDie(FixturePath("tokenizer/chat.json")));
  int checked = 0;
  for (const Json& t : f["templates"]) {
    SCOPED_TRACE(t["name"].get<std::string>());
    auto tmpl = ChatTemplate::Recognize(t["template"].get<std::string>(), t["bos_token"], t["eos_token"]);
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    for (const Json& r : t["renders"]) {
      std::vector<ChatMessage> msgs;
      for (const Json& m : r["messages"]) msgs.push_back({m["role"], m["content"]});
      auto out = tmpl->Render(msgs, r["add_generation_prompt"].get<bool>());
      if (r["output"].is_object()) {  // the template raised
        ASSERT_FALSE(out.ok());
        EXPECT_EQ(out.status().message(), r["output"]["error"].get<std::string>());
      } else {
        ASSERT_TRUE(out.ok()) << out.status();
        EXPECT_EQ(*out, r["output"].get<std::string>());
      }
      ++checked;
    }
  }
  EXPECT_GE(checked, 40);
}

TEST(ChatTemplateTest, SmolLMDefaultSystemPrompt) {
  const Json f = Json::parse(ReadFileOrDie(FixturePath("tokenizer/chat.json")));
  auto tmpl = ChatTemplate::Recognize(f["templates"][0]["template"].get<std::string>(), "", "");
  ASSERT_TRUE(tmpl.ok()) << tmpl.status();
  EXPECT_EQ(tmpl->kind(), ChatTemplate::Kind::kChatMl);
  EXPECT_EQ(tmpl->default_system(), "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
}

TEST(ChatTemplateTest, UnknownTemplateIsUnimplemented) {
  for (const char* src : {"{{ messages[0]['content'] }}",
                          "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}",
                          ""}) {
    auto t = ChatTemplate::Recognize(src, "<s>", "</s>");
    ASSERT_FALSE(t.ok()) << src;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_NE(t.status().message().find("not recognised"), std::string::npos);
  }
  EXPECT_EQ(PythonStrip(" \t\n x y \xE3\x80\x80\x1f"), "x y");
}

// ---------------------------------------------------------------------------------------------
// SentencePiece-style BPE on a hand-built vocabulary.

constexpr const char* kU = "\xE2\x96\x81";  // U+2581

TokenizerSpec SmallSpmSpec(bool with_bytes) {
  TokenizerSpec s;
  s.model = "llama";
  s.add_bos = true;
  s.add_space_prefix = true;
  auto add = [&s](std::string text, float score, int32_t type) {
    s.tokens.push_back(std::move(text));
    s.scores.push_back(score);
    s.token_types.push_back(type);
  };
  add("<unk>", 0, TokenizerSpec::kUnknown);
  add("<s>", 0, TokenizerSpec::kControl);
  add("</s>", 0, TokenizerSpec::kControl);
  if (with_bytes) {
    for (int b = 0; b < 256; ++b) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
      add(buf, 0, TokenizerSpec::kByte);
    }
  }
  const std::string u = kU;
  for (const char* c : {"h", "e", "l", "o", "w", "r", "d"}) add(c, -100, TokenizerSpec::kNormal);
  add(u, -100, TokenizerSpec::kNormal);
  add("ll", -1, TokenizerSpec::kNormal);
  add("he", -2, TokenizerSpec::kNormal);
  add("hell", -3, TokenizerSpec::kNormal);
  add("hello", -4, TokenizerSpec::kNormal);
  add(u + "hello", -5, TokenizerSpec::kNormal);
  add("or", -1.5, TokenizerSpec::kNormal);
  add(u + "w", -2.5, TokenizerSpec::kNormal);
  add(u + "wor", -3.5, TokenizerSpec::kNormal);
  add("ld", -4.5, TokenizerSpec::kNormal);
  add(u + "world", -6, TokenizerSpec::kNormal);
  add(u + "h", -10, TokenizerSpec::kNormal);
  s.bos_id = 1;
  s.eos_id = 2;
  s.unk_id = 0;
  return s;
}

class SpmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spec_ = SmallSpmSpec(true);
    auto t = Tokenizer::FromSpec(spec_);
    ASSERT_TRUE(t.ok()) << t.status();
    tok_ = std::move(*t);
  }
  int32_t Id(const std::string& text) const {
    for (size_t i = 0; i < spec_.tokens.size(); ++i) {
      if (spec_.tokens[i] == text) return static_cast<int32_t>(i);
    }
    ADD_FAILURE() << "no token " << text;
    return -1;
  }
  int32_t Byte(int b) const { return 3 + b; }
  TokenizerSpec spec_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(SpmTest, MergesByScore) {
  const std::string u = kU;
  EXPECT_EQ(tok_->Encode("hello world", false), (std::vector<int32_t>{Id(u + "hello"), Id(u + "world")}));
  EXPECT_EQ(tok_->Encode("hello world", true),
            (std::vector<int32_t>{1, Id(u + "hello"), Id(u + "world")}));
  // Equal scores: the leftmost pair merges first.
  EXPECT_EQ(tok_->Encode("lll", false), (std::vector<int32_t>{Id(u), Id("ll"), Id("l")}));
  // A special token resets the space prefix, as llama.cpp does.
  EXPECT_EQ(tok_->Encode("hello</s>hello", false),
            (std::vector<int32_t>{Id(u + "hello"), 2, Id(u + "hello")}));
  // Without parse_special "</s>" is text: four characters outside this vocabulary, four bytes.
  EXPECT_EQ(tok_->Encode("hello</s>", false, /*parse_special=*/false),
            (std::vector<int32_t>{Id(u + "hello"), Byte('<'), Byte('/'), Byte('s'), Byte('>')}));
}

TEST_F(SpmTest, ByteFallbackAndDecode) {
  const std::string u = kU;
  const auto ids = tok_->Encode("h\xC3\xA9", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{Id(u + "h"), Byte(0xC3), Byte(0xA9)}));
  EXPECT_EQ(tok_->Decode(ids), "h\xC3\xA9");
  for (const std::string& s : {std::string("hello world"), std::string(" hello"), std::string("wow  \xF0\x9F\x98\x80 x"),
                               std::string("")}) {
    EXPECT_EQ(tok_->Decode(tok_->Encode(s, /*add_bos=*/false)), s);
    EXPECT_EQ(tok_->Decode(tok_->Encode(s, true), /*skip_special=*/true), s);
  }
  // Rendered specials: the prefix space is only dropped when text starts the output (as the
  // Metaspace decoder does for the first token).
  EXPECT_EQ(tok_->Decode({1, Id(u + "hello"), 2}), "<s> hello</s>");
  EXPECT_EQ(tok_->Decode({1, Id(u + "hello"), 2}, true), "hello");
  EXPECT_EQ(tok_->TokenBytes(Id(u + "world")), " world");
}

TEST_F(SpmTest, UnknownWithoutByteTokens) {
  auto t = Tokenizer::FromSpec(SmallSpmSpec(false));
  ASSERT_TRUE(t.ok()) << t.status();
  const auto ids = (*t)->Encode("h\xC3\xA9h", false);
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[1], 0);  // one <unk> for the whole character
}

TEST_F(SpmTest, StreamDecoderWithByteTokens) {
  StreamDecoder dec(*tok_);
  EXPECT_EQ(dec.Push(Id("h")), "h");
  EXPECT_EQ(dec.Push(Byte(0xF0)), "");
  EXPECT_EQ(dec.Push(Byte(0x9F)), "");
  EXPECT_EQ(dec.Push(Byte(0x98)), "");
  EXPECT_EQ(dec.Push(1), "");  // control token skipped, the character stays pending
  EXPECT_EQ(dec.Push(Byte(0x80)), "\xF0\x9F\x98\x80");
  EXPECT_EQ(dec.Push(Byte(0xFF)), "\xEF\xBF\xBD");  // never valid: replaced at once
  EXPECT_EQ(dec.Push(Byte(0xE2)), "");
  EXPECT_EQ(dec.Push(Byte(0x82)), "");
  EXPECT_EQ(dec.Push(Id("o")), "\xEF\xBF\xBDo");  // the run was cut short by an ASCII byte
  EXPECT_EQ(dec.Push(Byte(0xE2)), "");
  EXPECT_EQ(dec.Push(Byte(0x82)), "");
  EXPECT_EQ(dec.Flush(), "\xEF\xBF\xBD");  // one U+FFFD for the incomplete run
  EXPECT_EQ(dec.Flush(), "");
}

TEST_F(SpmTest, TokenizerJsonWithRankedMerges) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) / "kvq_tokenizer_json_spm";
  std::filesystem::create_directories(dir);
  const std::string u = kU;
  Json vocab = Json::object();
  for (size_t i = 0; i < spec_.tokens.size(); ++i) vocab[spec_.tokens[i]] = i;
  // Ranks in score order (the order SentencePiece's converter writes them).
  Json merges = Json::array({"l l", "h e", "o r", "he ll", u + " w", "hell o", u + "w or", "l d",
                             u + " hello", u + "wor ld", u + " h"});
  Json tj = {
      {"added_tokens", {{{"id", 1}, {"content", "<s>"}, {"special", true}},
                        {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
      {"normalizer", {{"type", "Sequence"}, {"normalizers", {{{"type", "Prepend"}, {"prepend", u}},
                                                             {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", u}}}}}},
      {"pre_tokenizer", nullptr},
      {"decoder", {{"type", "Sequence"}, {"decoders", {{{"type", "Replace"}, {"pattern", {{"String", u}}}, {"content", " "}},
                                                       {{"type", "ByteFallback"}}, {{"type", "Fuse"}}}}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}, {"byte_fallback", true}, {"unk_token", "<unk>"}}},
  };
  Json cfg = {{"bos_token", {{"content", "<s>"}}}, {"eos_token", "</s>"}, {"add_bos_token", true},
              {"chat_template", "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"}};
  std::ofstream(dir / "tokenizer.json") << tj.dump();
  std::ofstream(dir / "tokenizer_config.json") << cfg.dump();
  auto t = Tokenizer::FromTokenizerJson((dir / "tokenizer.json").string());
  ASSERT_TRUE(t.ok()) << t.status();
  for (const std::string& s : {std::string("hello world"), std::string("lll"), std::string("h\xC3\xA9"),
                               std::string("hello</s>hello")}) {
    EXPECT_EQ((*t)->Encode(s, true), tok_->Encode(s, true)) << s;
  }
  auto chat = (*t)->ApplyChatTemplate({{"system", "S"}, {"user", " q "}, {"assistant", "a"}}, true);
  ASSERT_TRUE(chat.ok()) << chat.status();
  // content.strip() applies to the whole first content, system block included.
  EXPECT_EQ(*chat, "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n q [/INST] a </s>");
}

TEST(TokenizerErrorsTest, UnsupportedInputsAreErrors) {
  TokenizerSpec s = SmallSpmSpec(true);
  s.model = "t5";
  auto t = Tokenizer::FromSpec(s);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kUnimplemented);

  TokenizerSpec b;
  b.model = "gpt2";
  b.pre = "falcon";
  for (int i = 0; i < 256; ++i) {
    std::string tok;
    unicode::AppendUtf8(ByteToUnicode(static_cast<uint8_t>(i)), &tok);
    b.tokens.push_back(tok);
  }
  t = Tokenizer::FromSpec(b);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("falcon"), std::string::npos);
  b.pre = "llama-bpe";
  b.merges = {{"a", "zz"}};
  t = Tokenizer::FromSpec(b);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  b.merges = {{"a", "b"}};
  b.tokens.push_back("ab");
  b.chat_template = "{{ nonsense }}";
  t = Tokenizer::FromSpec(b);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->Encode("abab ab", false), (std::vector<int32_t>{256, 256, ' ', 256}));  // byte i is token i here
  auto chat = (*t)->ApplyChatTemplate({{"user", "x"}}, true);
  ASSERT_FALSE(chat.ok());
  EXPECT_NE(chat.status().message().find("not recognised"), std::string::npos);
  EXPECT_FALSE(Tokenizer::FromTokenizerJson("/nonexistent/tokenizer.json").ok());
}

}  // namespace
}  // namespace kvq::model
