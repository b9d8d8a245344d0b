// Tokenizer factories: GGUF metadata and Hugging Face tokenizer.json to a TokenizerSpec, and a
// spec to the byte-level or SentencePiece-style implementation.
#include "model/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "model/bpe_tokenizer.h"
#include "model/gguf.h"
#include "model/spm_tokenizer.h"
#include "nlohmann/json.hpp"

namespace kvq::model {
namespace {

using Json = nlohmann::json;

constexpr std::string_view kLlama3Split =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

absl::StatusOr<Json> ParseJsonFile(const std::string& path) {
  auto text = ReadFile(path);
  if (!text.ok()) return text.status();
  Json j = Json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return j;
}

// A token given as "text" or {"content": "text", ...} in tokenizer_config.json.
std::string TokenContent(const Json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return "";
}

std::string TypeOf(const Json& node) {
  return node.is_object() && node.contains("type") && node["type"].is_string()
             ? node["type"].get<std::string>()
             : "";
}

bool BoolOr(const Json& node, const char* key, bool dflt) {
  return node.is_object() && node.contains(key) && node[key].is_boolean() ? node[key].get<bool>()
                                                                          : dflt;
}

// Flattens a Sequence (pre_tokenizer, normalizer or decoder) into its steps.
std::vector<Json> Steps(const Json& node) {
  std::vector<Json> out;
  if (node.is_null()) return out;
  const std::string type = TypeOf(node);
  if (type == "Sequence") {
    for (const char* key : {"pretokenizers", "normalizers", "decoders"}) {
      if (node.contains(key) && node[key].is_array()) {
        for (const Json& s : node[key]) {
          for (Json& x : Steps(s)) out.push_back(std::move(x));
        }
      }
    }
    return out;
  }
  out.push_back(node);
  return out;
}

bool MentionsType(const Json& node, std::string_view type) {
  for (const Json& s : Steps(node)) {
    if (TypeOf(s) == type) return true;
  }
  return false;
}

// The GGUF pre-tokenizer name for a byte-level tokenizer.json pre_tokenizer.
absl::StatusOr<std::string> BytePreName(const Json& pre) {
  const std::vector<Json> steps = Steps(pre);
  auto is_byte_level = [](const Json& s, bool use_regex) {
    return TypeOf(s) == "ByteLevel" && BoolOr(s, "use_regex", true) == use_regex &&
           !BoolOr(s, "add_prefix_space", false);
  };
  if (steps.size() == 1 && is_byte_level(steps[0], true)) return std::string("gpt2");
  if (steps.size() == 2 && TypeOf(steps[0]) == "Digits" &&
      BoolOr(steps[0], "individual_digits", false) && is_byte_level(steps[1], true)) {
    return std::string("smollm");
  }
  if (steps.size() == 2 && TypeOf(steps[0]) == "Split" && is_byte_level(steps[1], false)) {
    const Json& p = steps[0].value("pattern", Json::object());
    const std::string behavior = steps[0].value("behavior", "");
    if (p.contains("Regex") && p["Regex"].is_string() && p["Regex"].get<std::string>() == kLlama3Split &&
        behavior == "Isolated" && !BoolOr(steps[0], "invert", false)) {
      return std::string("llama-bpe");
    }
  }
  return absl::UnimplementedError(absl::StrCat(
      "tokenizer.json: pre_tokenizer not supported (ByteLevel, Digits+ByteLevel and the Llama-3 "
      "Split+ByteLevel are): ",
      pre.dump().substr(0, 300)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Build(const TokenizerSpec& spec) {
  if (spec.model == "gpt2") {
    auto t = BpeTokenizer::Create(spec);
    if (!t.ok()) return t.status();
    return std::unique_ptr<Tokenizer>(std::move(*t));
  }
  if (spec.model == "llama") {
    auto t = SpmTokenizer::Create(spec);
    if (!t.ok()) return t.status();
    return std::unique_ptr<Tokenizer>(std::move(*t));
  }
  return absl::UnimplementedError(absl::StrCat(
      "tokenizer model \"", spec.model, "\" is not supported (gpt2 and llama are)"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromSpec(const TokenizerSpec& spec) {
  return Build(spec);
}

absl::StatusOr<TokenizerSpec> Tokenizer::SpecFromGguf(const GgufFile& gguf) {
  TokenizerSpec spec;
  auto model = gguf.GetString("tokenizer.ggml.model");
  if (!model.ok()) return model.status();
  spec.model = *model;
  if (gguf.Has("tokenizer.ggml.pre")) {
    auto pre = gguf.GetString("tokenizer.ggml.pre");
    if (!pre.ok()) return pre.status();
    spec.pre = *pre;
  }
  auto tokens = gguf.GetStringArray("tokenizer.ggml.tokens");
  if (!tokens.ok()) return tokens.status();
  spec.tokens = std::move(*tokens);
  if (gguf.Has("tokenizer.ggml.token_type")) {
    auto types = gguf.GetIntArray("tokenizer.ggml.token_type");
    if (!types.ok()) return types.status();
    spec.token_types.assign(types->begin(), types->end());
  }
  if (gguf.Has("tokenizer.ggml.scores")) {
    auto scores = gguf.GetFloatArray("tokenizer.ggml.scores");
    if (!scores.ok()) return scores.status();
    spec.scores = std::move(*scores);
  }
  if (gguf.Has("tokenizer.ggml.merges")) {
    auto merges = gguf.GetStringArray("tokenizer.ggml.merges");
    if (!merges.ok()) return merges.status();
    spec.merges.reserve(merges->size());
    for (size_t i = 0; i < merges->size(); ++i) {
      const std::string& m = (*merges)[i];
      const size_t sp = m.find(' ', 1);  // a left part may itself be a lone space in SPM vocabs
      if (sp == std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat("tokenizer.ggml.merges[", i, "] = \"", m, "\" is not \"a b\""));
      }
      spec.merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
    }
  }
  const bool spm = spec.model == "llama";
  struct IdKey {
    const char* key;
    int32_t* dst;
  };
  for (const IdKey& k : {IdKey{"tokenizer.ggml.bos_token_id", &spec.bos_id},
                         IdKey{"tokenizer.ggml.eos_token_id", &spec.eos_id},
                         IdKey{"tokenizer.ggml.unknown_token_id", &spec.unk_id},
                         IdKey{"tokenizer.ggml.padding_token_id", &spec.pad_id}}) {
    if (!gguf.Has(k.key)) continue;
    auto v = gguf.GetInt(k.key);
    if (!v.ok()) return v.status();
    *k.dst = static_cast<int32_t>(*v);
  }
  // Defaults as llama.cpp: SentencePiece vocabularies add BOS and a space prefix.
  spec.add_bos = spm;
  spec.add_space_prefix = spm;
  if (gguf.Has("tokenizer.ggml.add_bos_token")) {
    auto v = gguf.GetBool("tokenizer.ggml.add_bos_token");
    if (!v.ok()) return v.status();
    spec.add_bos = *v;
  }
  if (gguf.Has("tokenizer.ggml.add_space_prefix")) {
    auto v = gguf.GetBool("tokenizer.ggml.add_space_prefix");
    if (!v.ok()) return v.status();
    spec.add_space_prefix = *v;
  }
  if (gguf.Has("tokenizer.chat_template")) {
    auto v = gguf.GetString("tokenizer.chat_template");
    if (!v.ok()) return v.status();
    spec.chat_template = std::move(*v);
  }
  return spec;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& gguf) {
  auto spec = SpecFromGguf(gguf);
  if (!spec.ok()) return spec.status();
  return Build(*spec);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGgufPath(const std::string& path) {
  auto gguf = GgufFile::Open(path);
  if (!gguf.ok()) return gguf.status();
  return FromGguf(**gguf);
}

absl::StatusOr<TokenizerSpec> Tokenizer::SpecFromTokenizerJson(const std::string& path) {
  auto parsed = ParseJsonFile(path);
  if (!parsed.ok()) return parsed.status();
  const Json& j = *parsed;
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no \"model\" object"));
  }
  const Json& model = j["model"];
  const std::string mtype = model.value("type", "BPE");
  if (mtype != "BPE") {
    return absl::UnimplementedError(
        absl::StrCat(path, ": model.type \"", mtype, "\" is not supported (BPE is)"));
  }
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": model.vocab is not an object"));
  }
  TokenizerSpec spec;
  const Json& pre = j.contains("pre_tokenizer") ? j["pre_tokenizer"] : Json();
  const Json& dec = j.contains("decoder") ? j["decoder"] : Json();
  const Json& norm = j.contains("normalizer") ? j["normalizer"] : Json();
  const bool byte_level = MentionsType(pre, "ByteLevel") || MentionsType(dec, "ByteLevel");
  const bool metaspace = MentionsType(dec, "Metaspace") || MentionsType(pre, "Metaspace") ||
                         MentionsType(dec, "ByteFallback") || BoolOr(model, "byte_fallback", false);
  if (byte_level) {
    spec.model = "gpt2";
    auto name = BytePreName(pre);
    if (!name.ok()) return name.status();
    spec.pre = *name;
  } else if (metaspace) {
    spec.model = "llama";
    spec.add_space_prefix = false;
    for (const Json& s : Steps(norm)) {
      if (TypeOf(s) == "Prepend" && s.value("prepend", "") == "\xE2\x96\x81") spec.add_space_prefix = true;
    }
    for (const Json& s : Steps(pre)) {
      if (TypeOf(s) != "Metaspace") continue;
      const std::string scheme = s.value("prepend_scheme", "");
      if (scheme == "first" || scheme == "always" || BoolOr(s, "add_prefix_space", false)) {
        spec.add_space_prefix = true;
      }
    }
  } else {
    return absl::UnimplementedError(absl::StrCat(
        path, ": neither a ByteLevel nor a Metaspace/ByteFallback tokenizer"));
  }

  // Ids: the vocabulary plus added tokens; gaps are unused slots.
  int64_t max_id = -1;
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it.value().is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": vocab id of \"", it.key(), "\" is not an integer"));
    }
    max_id = std::max<int64_t>(max_id, it.value().get<int64_t>());
  }
  const Json added = j.contains("added_tokens") && j["added_tokens"].is_array() ? j["added_tokens"] : Json::array();
  for (const Json& a : added) max_id = std::max<int64_t>(max_id, a.value("id", int64_t{-1}));
  if (max_id < 0 || max_id >= (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": bad vocabulary ids"));
  }
  spec.tokens.assign(max_id + 1, "");
  spec.token_types.assign(max_id + 1, TokenizerSpec::kUnused);
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    const int64_t id = it.value().get<int64_t>();
    if (id < 0) return absl::InvalidArgumentError(absl::StrCat(path, ": negative id"));
    spec.tokens[id] = it.key();
    spec.token_types[id] = TokenizerSpec::kNormal;
    if (spec.model == "llama" && it.key().size() == 6 && absl::StartsWith(it.key(), "<0x") &&
        it.key()[5] == '>') {
      spec.token_types[id] = TokenizerSpec::kByte;
    }
  }
  for (const Json& a : added) {
    const int64_t id = a.value("id", int64_t{-1});
    if (id < 0 || !a.contains("content") || !a["content"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": malformed added token ", a.dump()));
    }
    spec.tokens[id] = a["content"].get<std::string>();
    spec.token_types[id] =
        a.value("special", false) ? TokenizerSpec::kControl : TokenizerSpec::kUserDefined;
  }
  auto id_of = [&spec](const std::string& text) -> int32_t {
    if (text.empty()) return -1;
    for (size_t i = 0; i < spec.tokens.size(); ++i) {
      if (spec.tokens[i] == text) return static_cast<int32_t>(i);
    }
    return -1;
  };
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    spec.unk_id = id_of(model["unk_token"].get<std::string>());
    if (spec.unk_id >= 0 && spec.token_types[spec.unk_id] == TokenizerSpec::kNormal) {
      spec.token_types[spec.unk_id] = TokenizerSpec::kUnknown;
    }
  }

  if (model.contains("merges") && model["merges"].is_array()) {
    for (const Json& m : model["merges"]) {
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const size_t sp = s.find(' ', 1);
        if (sp == std::string::npos) {
          return absl::InvalidArgumentError(absl::StrCat(path, ": merge \"", s, "\" is not \"a b\""));
        }
        spec.merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        spec.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      } else {
        return absl::InvalidArgumentError(absl::StrCat(path, ": malformed merge ", m.dump()));
      }
    }
  }

  // A post-processor that starts every sequence with a special token adds BOS.
  if (j.contains("post_processor") && TypeOf(j["post_processor"]) == "TemplateProcessing") {
    const Json& single = j["post_processor"].value("single", Json::array());
    if (single.is_array() && !single.empty() && single[0].contains("SpecialToken")) {
      spec.add_bos = true;
      spec.bos_id = id_of(single[0]["SpecialToken"].value("id", ""));
    }
  }

  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  const std::string config_path = (dir / "tokenizer_config.json").string();
  if (std::filesystem::exists(config_path)) {
    auto cfg = ParseJsonFile(config_path);
    if (!cfg.ok()) return cfg.status();
    const Json& c = *cfg;
    if (c.contains("bos_token")) spec.bos_id = id_of(TokenContent(c["bos_token"]));
    if (c.contains("eos_token")) spec.eos_id = id_of(TokenContent(c["eos_token"]));
    if (c.contains("pad_token")) spec.pad_id = id_of(TokenContent(c["pad_token"]));
    if (c.contains("add_bos_token") && c["add_bos_token"].is_boolean()) {
      spec.add_bos = c["add_bos_token"].get<bool>();
    }
    if (c.contains("chat_template")) {
      const Json& t = c["chat_template"];
      if (t.is_string()) {
        spec.chat_template = t.get<std::string>();
      } else if (t.is_array()) {  // [{"name": "default", "template": ...}, ...]
        for (const Json& e : t) {
          if (e.value("name", "") == "default" && e.contains("template") && e["template"].is_string()) {
            spec.chat_template = e["template"].get<std::string>();
          }
        }
      }
    }
  }
  const std::string jinja_path = (dir / "chat_template.jinja").string();
  if (spec.chat_template.empty() && std::filesystem::exists(jinja_path)) {
    auto t = ReadFile(jinja_path);
    if (!t.ok()) return t.status();
    spec.chat_template = std::move(*t);
  }
  if (spec.bos_id < 0) spec.add_bos = false;
  return spec;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromTokenizerJson(const std::string& path) {
  auto spec = SpecFromTokenizerJson(path);
  if (!spec.ok()) return spec.status();
  return Build(*spec);
}

}  // namespace kvq::model
