// Hugging Face config.json -> ModelConfig for LlamaForCausalLM, MistralForCausalLM and
// Qwen2ForCausalLM, with the defaults of the transformers config classes.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "model/weights.h"
#include "nlohmann/json.hpp"

namespace kvq::model {
namespace {

using nlohmann::json;

// Present and not null.
bool HasField(const json& j, const char* key) { return j.contains(key) && !j[key].is_null(); }

absl::Status GetInt(const json& j, const char* key, const std::string& file, int* out,
                    bool required) {
  if (!HasField(j, key)) {
    if (!required) return absl::OkStatus();
    return absl::NotFoundError(absl::StrCat(file, ": missing \"", key, "\""));
  }
  if (!j[key].is_number_integer() || j[key].get<int64_t>() <= 0 ||
      j[key].get<int64_t>() > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": \"", key, "\" must be a positive integer, got ", j[key].dump()));
  }
  *out = static_cast<int>(j[key].get<int64_t>());
  return absl::OkStatus();
}

absl::Status GetFloat(const json& j, const char* key, const std::string& file, float* out) {
  if (!HasField(j, key)) return absl::OkStatus();
  if (!j[key].is_number()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": \"", key, "\" must be a number, got ", j[key].dump()));
  }
  *out = j[key].get<float>();
  return absl::OkStatus();
}

absl::Status GetBool(const json& j, const char* key, const std::string& file, bool* out) {
  if (!HasField(j, key)) return absl::OkStatus();
  if (!j[key].is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": \"", key, "\" must be true or false, got ", j[key].dump()));
  }
  *out = j[key].get<bool>();
  return absl::OkStatus();
}

absl::Status ParseRopeScaling(const json& rs, const std::string& file, ModelConfig* c) {
  if (!rs.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": \"rope_scaling\" is not an object"));
  }
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    if (HasField(rs, key) && rs[key].is_string()) {
      type = rs[key].get<std::string>();
      break;
    }
  }
  if (type == "default") return absl::OkStatus();
  if (type != "llama3") {
    return absl::UnimplementedError(absl::StrCat(
        file, ": rope_scaling type '", type, "' is not supported (only \"llama3\")"));
  }
  RopeScaling& s = c->rope_scaling;
  s.enabled = true;
  KVQ_RETURN_IF_ERROR(GetFloat(rs, "factor", file, &s.factor));
  KVQ_RETURN_IF_ERROR(GetFloat(rs, "low_freq_factor", file, &s.low_freq_factor));
  KVQ_RETURN_IF_ERROR(GetFloat(rs, "high_freq_factor", file, &s.high_freq_factor));
  KVQ_RETURN_IF_ERROR(
      GetInt(rs, "original_max_position_embeddings", file, &s.original_max_position, false));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> LoadHfConfig(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const std::string file =
      fs::is_directory(path, ec) ? (fs::path(path) / "config.json").string() : path;
  std::ifstream in(file, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", file));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": not a JSON object"));
  }

  std::string architecture;
  if (HasField(j, "architectures") && j["architectures"].is_array() &&
      !j["architectures"].empty() && j["architectures"][0].is_string()) {
    architecture = j["architectures"][0].get<std::string>();
  }
  std::string model_type = HasField(j, "model_type") && j["model_type"].is_string()
                               ? j["model_type"].get<std::string>()
                               : "";
  ModelConfig c;
  if (architecture == "LlamaForCausalLM" || (architecture.empty() && model_type == "llama")) {
    c.arch = "llama";
  } else if (architecture == "MistralForCausalLM" ||
             (architecture.empty() && model_type == "mistral")) {
    c.arch = "mistral";
  } else if (architecture == "Qwen2ForCausalLM" ||
             (architecture.empty() && model_type == "qwen2")) {
    c.arch = "qwen2";
  } else {
    return absl::UnimplementedError(absl::StrCat(
        file, ": architecture '", architecture, "' (model_type '", model_type,
        "') is not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"));
  }
  if (HasField(j, "_name_or_path") && j["_name_or_path"].is_string() &&
      !j["_name_or_path"].get<std::string>().empty()) {
    c.name = j["_name_or_path"].get<std::string>();
  } else {
    c.name = fs::path(file).parent_path().filename().string();
  }
  if (HasField(j, "hidden_act") &&
      !(j["hidden_act"].is_string() && j["hidden_act"].get<std::string>() == "silu")) {
    return absl::UnimplementedError(
        absl::StrCat(file, ": hidden_act ", j["hidden_act"].dump(), " is not supported (silu)"));
  }
  KVQ_RETURN_IF_ERROR(GetInt(j, "hidden_size", file, &c.hidden, true));
  KVQ_RETURN_IF_ERROR(GetInt(j, "num_hidden_layers", file, &c.n_layers, true));
  KVQ_RETURN_IF_ERROR(GetInt(j, "num_attention_heads", file, &c.n_heads, true));
  c.n_kv_heads = c.n_heads;
  KVQ_RETURN_IF_ERROR(GetInt(j, "num_key_value_heads", file, &c.n_kv_heads, false));
  if (c.hidden % c.n_heads != 0 && !HasField(j, "head_dim")) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": hidden_size ", c.hidden,
                                                   " is not a multiple of num_attention_heads ",
                                                   c.n_heads, " and head_dim is absent"));
  }
  c.head_dim = c.hidden / c.n_heads;
  KVQ_RETURN_IF_ERROR(GetInt(j, "head_dim", file, &c.head_dim, false));
  KVQ_RETURN_IF_ERROR(GetInt(j, "intermediate_size", file, &c.intermediate, true));
  KVQ_RETURN_IF_ERROR(GetInt(j, "vocab_size", file, &c.vocab_size, true));
  KVQ_RETURN_IF_ERROR(GetInt(j, "max_position_embeddings", file, &c.max_position, false));
  c.rope_theta = 10000.0f;
  KVQ_RETURN_IF_ERROR(GetFloat(j, "rope_theta", file, &c.rope_theta));
  c.rms_norm_eps = 1e-6f;  // the transformers default of all three config classes
  KVQ_RETURN_IF_ERROR(GetFloat(j, "rms_norm_eps", file, &c.rms_norm_eps));
  c.tie_word_embeddings = false;
  KVQ_RETURN_IF_ERROR(GetBool(j, "tie_word_embeddings", file, &c.tie_word_embeddings));
  if (c.arch == "qwen2") {
    c.attention_bias = true;  // Qwen2Attention always has q/k/v biases
  } else {
    KVQ_RETURN_IF_ERROR(GetBool(j, "attention_bias", file, &c.attention_bias));
  }
  bool mlp_bias = false;
  KVQ_RETURN_IF_ERROR(GetBool(j, "mlp_bias", file, &mlp_bias));
  if (mlp_bias) return absl::UnimplementedError(absl::StrCat(file, ": mlp_bias is not supported"));
  if (HasField(j, "rope_scaling")) {
    KVQ_RETURN_IF_ERROR(ParseRopeScaling(j["rope_scaling"], file, &c));
  }
  // Sliding-window attention changes results beyond the window; we only run full attention.
  // (Mistral v0.1 sets a 4096 window; v0.2+ sets null. Qwen2 gates it with use_sliding_window.)
  bool use_window = c.arch == "mistral";
  if (c.arch == "qwen2") KVQ_RETURN_IF_ERROR(GetBool(j, "use_sliding_window", file, &use_window));
  if (use_window && HasField(j, "sliding_window")) {
    int window = 0;
    KVQ_RETURN_IF_ERROR(GetInt(j, "sliding_window", file, &window, false));
    if (window < c.max_position) {
      return absl::UnimplementedError(absl::StrCat(
          file, ": sliding-window attention (window ", window, " < max_position_embeddings ",
          c.max_position, ") is not supported"));
    }
  }
  KVQ_RETURN_IF_ERROR(c.Validate());
  return c;
}

}  // namespace kvq::model
