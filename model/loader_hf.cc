// Hugging Face safetensors checkpoints -> LlamaWeights. nn.Linear weights are stored [out, in],
// row-major, which is our layout; q/k are already in the rotate_half layout.
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "model/safetensors.h"
#include "model/weights.h"

namespace kvq::model {
namespace {

std::string ShapeString(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) absl::StrAppend(&s, i ? ", " : "", d[i]);
  return s + "]";
}

absl::Status Read(const SafetensorsCheckpoint& ck, const std::string& dir, const std::string& name,
                  const std::vector<int64_t>& shape, std::vector<float>* out) {
  const SafetensorsFile::TensorInfo* t = ck.Find(name);
  if (t == nullptr) {
    return absl::NotFoundError(absl::StrCat(dir, ": required tensor '", name, "' is missing"));
  }
  if (t->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": tensor '", name, "' has shape ",
                                                   ShapeString(t->shape), ", config.json needs ",
                                                   ShapeString(shape)));
  }
  KVQ_ASSIGN_OR_RETURN(*out, ck.ReadTensorF32(name));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaWeights> LoadHfWeights(const std::string& dir) {
  LlamaWeights w;
  KVQ_ASSIGN_OR_RETURN(w.config, LoadHfConfig(dir));
  KVQ_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsCheckpoint> ck, SafetensorsCheckpoint::Open(dir));
  const ModelConfig& c = w.config;
  const int64_t h = c.hidden, q = c.q_dim(), kv = c.kv_dim(), ff = c.intermediate;
  KVQ_RETURN_IF_ERROR(Read(*ck, dir, "model.embed_tokens.weight", {c.vocab_size, h}, &w.tok_embd));
  KVQ_RETURN_IF_ERROR(Read(*ck, dir, "model.norm.weight", {h}, &w.output_norm));
  if (!c.tie_word_embeddings) {
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, "lm_head.weight", {c.vocab_size, h}, &w.output));
  }
  w.layers.resize(c.n_layers);
  for (int l = 0; l < c.n_layers; ++l) {
    LayerWeights& L = w.layers[l];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "input_layernorm.weight", {h}, &L.attn_norm));
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "self_attn.q_proj.weight", {q, h}, &L.wq));
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "self_attn.k_proj.weight", {kv, h}, &L.wk));
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "self_attn.v_proj.weight", {kv, h}, &L.wv));
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "self_attn.o_proj.weight", {h, q}, &L.wo));
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "post_attention_layernorm.weight", {h}, &L.ffn_norm));
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "mlp.gate_proj.weight", {ff, h}, &L.w_gate));
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "mlp.up_proj.weight", {ff, h}, &L.w_up));
    KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "mlp.down_proj.weight", {h, ff}, &L.w_down));
    if (c.attention_bias) {
      KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "self_attn.q_proj.bias", {q}, &L.bq));
      KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "self_attn.k_proj.bias", {kv}, &L.bk));
      KVQ_RETURN_IF_ERROR(Read(*ck, dir, p + "self_attn.v_proj.bias", {kv}, &L.bv));
    }
  }
  return w;
}

}  // namespace kvq::model
