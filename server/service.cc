#include "server/service.h"

#include <cmath>
#include <filesystem>
#include <limits>

#include "absl/strings/str_cat.h"
#include "server/generate_stream.h"
#include "server/session_upload.h"
#include "server/status_mapping.h"
#include "server/utf8.h"

namespace kvq::server {
namespace {

// Beyond the longest context kvq serves (10M tokens): certainly a client bug, not a capacity issue.
constexpr int kMaxTokensLimit = 1 << 24;

absl::Status CheckUtf8(std::string_view text, std::string_view what) {
  const size_t valid = ValidUtf8Prefix(text);
  if (valid == text.size()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(std::string(what), " is not valid UTF-8 (byte ", valid, " of ",
                                                 text.size(), "); send UTF-8 text or token ids"));
}

absl::StatusOr<std::string> RenderChat(const model::Tokenizer& tok, const kvq::v1::ChatPrompt& chat) {
  if (chat.messages().empty()) return absl::InvalidArgumentError("the chat prompt has no messages");
  std::vector<model::ChatMessage> messages;
  for (const auto& m : chat.messages()) {
    if (m.role() != "system" && m.role() != "user" && m.role() != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat("chat message role must be system, user or assistant; got '",
                                                     SanitizeUtf8(m.role()), "'"));
    }
    if (absl::Status s = CheckUtf8(m.content(), absl::StrCat("chat message ", messages.size())); !s.ok()) return s;
    messages.push_back({m.role(), m.content()});
  }
  return tok.ApplyChatTemplate(messages, /*add_generation_prompt=*/true);
}

void ToProto(const engine::SessionInfo& info, kvq::v1::Session* out) {
  out->set_session_id(info.id);
  out->set_tokens(info.tokens);
  out->set_kv_bytes(info.kv_bytes);
  out->set_created_unix_ms(info.created_unix_ms);
  out->set_last_used_unix_ms(info.last_used_unix_ms);
  out->set_ttl_seconds(info.ttl_seconds);
}

absl::StatusOr<std::string> SessionPath(const std::string& dir, const std::string& id, const std::string& name) {
  if (dir.empty()) {
    return absl::FailedPreconditionError("saving sessions is disabled: start kvqd with --session_dir");
  }
  const std::string& file = name.empty() ? id : name;
  if (file.empty()) return absl::InvalidArgumentError("session_id is empty");
  for (char c : file) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok || file[0] == '.') {
      return absl::InvalidArgumentError(absl::StrCat("session file name '", SanitizeUtf8(file),
                                                     "' must match [A-Za-z0-9_-][A-Za-z0-9._-]*"));
    }
  }
  return (std::filesystem::path(dir) / (file + ".kvqs")).string();
}

}  // namespace

absl::StatusOr<std::vector<int32_t>> PromptTokens(const model::Tokenizer& tok,
                                                  const kvq::v1::GenerateRequest& request) {
  const bool add_bos = request.session_id().empty();
  switch (request.prompt_case()) {
    case kvq::v1::GenerateRequest::kText: {
      if (absl::Status s = CheckUtf8(request.text(), "the prompt"); !s.ok()) return s;
      if (request.text().empty() && request.session_id().empty()) {
        return absl::InvalidArgumentError("the prompt is empty: give text, chat messages or token ids");
      }
      return tok.Encode(request.text(), add_bos, /*parse_special=*/true);
    }
    case kvq::v1::GenerateRequest::kChat: {
      absl::StatusOr<std::string> text = RenderChat(tok, request.chat());
      if (!text.ok()) return absl::InvalidArgumentError(text.status().message());
      return tok.Encode(*text, add_bos, /*parse_special=*/true);
    }
    case kvq::v1::GenerateRequest::kTokenIds:
      return std::vector<int32_t>(request.token_ids().ids().begin(), request.token_ids().ids().end());
    case kvq::v1::GenerateRequest::PROMPT_NOT_SET:
      return std::vector<int32_t>{};  // fine with a session; the engine refuses it otherwise
  }
  return std::vector<int32_t>{};
}

absl::StatusOr<engine::SamplingParams> ToSamplingParams(const kvq::v1::SamplingParams& p) {
  engine::SamplingParams s;  // its defaults are the documented ones
  if (p.has_temperature()) s.temperature = p.temperature();
  if (p.has_top_p()) s.top_p = p.top_p();
  if (p.has_top_k()) s.top_k = p.top_k();
  if (p.has_min_p()) s.min_p = p.min_p();
  if (p.has_repetition_penalty()) s.repetition_penalty = p.repetition_penalty();
  if (p.has_seed()) s.seed = p.seed();
  if (p.has_max_tokens()) {
    if (p.max_tokens() > kMaxTokensLimit) {
      return absl::InvalidArgumentError(
          absl::StrCat("max_tokens must be in [1, ", kMaxTokensLimit, "]; got ", p.max_tokens()));
    }
    s.max_tokens = p.max_tokens();
  }
  s.stop_token_ids.assign(p.stop_token_ids().begin(), p.stop_token_ids().end());
  if (p.has_ignore_eos()) s.ignore_eos = p.ignore_eos();
  if (p.has_logprobs()) s.logprobs = p.logprobs();
  if (p.has_top_logprobs()) s.top_logprobs = p.top_logprobs();
  return s;
}

KvqService::KvqService(ServiceOptions options, Metrics* metrics)
    : options_(std::move(options)), metrics_(metrics) {}

void KvqService::AttachEngine(engine::Engine* engine) {
  engine_ = engine;
  metrics_->SetEngine(engine);
  metrics_->SetServing(engine != nullptr && !draining_);
}

void KvqService::StartDraining() {
  draining_ = true;
  metrics_->SetServing(false);
}

absl::StatusOr<engine::Engine*> KvqService::EngineForNewWork() const {
  if (draining_) return absl::UnavailableError("kvqd is draining (shutting down); send to another replica");
  engine::Engine* e = engine_.load();
  if (e == nullptr) {
    return absl::UnavailableError("the model is still loading; retry when grpc.health.v1 reports SERVING");
  }
  return e;
}

void KvqService::StreamStarted() {
  std::lock_guard<std::mutex> lock(mu_);
  ++active_streams_;
}

void KvqService::StreamEnded() {
  std::lock_guard<std::mutex> lock(mu_);
  if (--active_streams_ == 0) idle_cv_.notify_all();
}

int KvqService::active_streams() const {
  std::lock_guard<std::mutex> lock(mu_);
  return active_streams_;
}

bool KvqService::WaitForIdle(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  const auto until = absl::ToChronoTime(deadline);
  return idle_cv_.wait_until(lock, until, [&] { return active_streams_ == 0; });
}

void KvqService::RequestStarted(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  active_requests_.insert(id);
}

void KvqService::RequestEnded(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  active_requests_.erase(id);
}

grpc::Status KvqService::Fail(std::string_view method, const absl::Status& status) {
  grpc::Status s = ToGrpcStatus(status);
  if (!s.ok()) metrics_->CountError(method, s.error_code());
  return s;
}

grpc::ServerUnaryReactor* KvqService::Reply(grpc::CallbackServerContext* ctx, std::string_view method,
                                            const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(Fail(method, status));
  return reactor;
}

grpc::ServerWriteReactor<kvq::v1::GenerateResponse>* KvqService::Generate(
    grpc::CallbackServerContext* ctx, const kvq::v1::GenerateRequest* request) {
  absl::StatusOr<engine::Engine*> engine = EngineForNewWork();
  if (!engine.ok()) {
    // A reactor that only reports the error.
    class Refused : public grpc::ServerWriteReactor<kvq::v1::GenerateResponse> {
     public:
      explicit Refused(grpc::Status s) { Finish(std::move(s)); }
      void OnDone() override { delete this; }
    };
    return new Refused(Fail("Generate", engine.status()));
  }
  return new GenerateStream(this, *engine, *request);
}

grpc::ServerUnaryReactor* KvqService::Abort(grpc::CallbackServerContext* ctx, const kvq::v1::AbortRequest* request,
                                            kvq::v1::AbortResponse*) {
  engine::Engine* e = engine_.load();
  bool known;
  {
    std::lock_guard<std::mutex> lock(mu_);
    known = active_requests_.count(request->request_id()) > 0;
  }
  if (!known || e == nullptr) {
    return Reply(ctx, "Abort", absl::NotFoundError(absl::StrCat("no running request ", request->request_id(),
                                                                "; it may have finished already")));
  }
  e->Cancel(request->request_id());
  return Reply(ctx, "Abort", absl::OkStatus());
}

grpc::ServerBidiReactor<kvq::v1::CreateSessionRequest, kvq::v1::CreateSessionResponse>* KvqService::CreateSession(
    grpc::CallbackServerContext* ctx) {
  absl::StatusOr<engine::Engine*> engine = EngineForNewWork();
  if (!engine.ok()) {
    class Refused : public grpc::ServerBidiReactor<kvq::v1::CreateSessionRequest, kvq::v1::CreateSessionResponse> {
     public:
      explicit Refused(grpc::Status s) { Finish(std::move(s)); }
      void OnDone() override { delete this; }
    };
    return new Refused(Fail("CreateSession", engine.status()));
  }
  return new SessionUpload(this, *engine);
}

grpc::ServerUnaryReactor* KvqService::GetSession(grpc::CallbackServerContext* ctx,
                                                 const kvq::v1::GetSessionRequest* request,
                                                 kvq::v1::Session* response) {
  absl::StatusOr<engine::Engine*> e = EngineForNewWork();
  if (!e.ok()) return Reply(ctx, "GetSession", e.status());
  absl::StatusOr<engine::SessionInfo> info = (*e)->GetSession(request->session_id());
  if (info.ok()) ToProto(*info, response);
  return Reply(ctx, "GetSession", info.status());
}

grpc::ServerUnaryReactor* KvqService::ListSessions(grpc::CallbackServerContext* ctx,
                                                   const kvq::v1::ListSessionsRequest*,
                                                   kvq::v1::ListSessionsResponse* response) {
  absl::StatusOr<engine::Engine*> e = EngineForNewWork();
  if (!e.ok()) return Reply(ctx, "ListSessions", e.status());
  for (const engine::SessionInfo& info : (*e)->ListSessions()) ToProto(info, response->add_sessions());
  return Reply(ctx, "ListSessions", absl::OkStatus());
}

grpc::ServerUnaryReactor* KvqService::DeleteSession(grpc::CallbackServerContext* ctx,
                                                    const kvq::v1::DeleteSessionRequest* request,
                                                    kvq::v1::DeleteSessionResponse*) {
  absl::StatusOr<engine::Engine*> e = EngineForNewWork();
  if (!e.ok()) return Reply(ctx, "DeleteSession", e.status());
  return Reply(ctx, "DeleteSession", (*e)->DeleteSession(request->session_id()));
}

// Saving and restoring are disk-bound and short; they run on the callback thread.
grpc::ServerUnaryReactor* KvqService::SaveSession(grpc::CallbackServerContext* ctx,
                                                  const kvq::v1::SaveSessionRequest* request,
                                                  kvq::v1::SaveSessionResponse* response) {
  absl::StatusOr<engine::Engine*> e = EngineForNewWork();
  if (!e.ok()) return Reply(ctx, "SaveSession", e.status());
  absl::StatusOr<std::string> path = SessionPath(options_.session_dir, request->session_id(), request->name());
  if (!path.ok()) return Reply(ctx, "SaveSession", path.status());
  absl::Status s = (*e)->SaveSession(request->session_id(), *path);
  if (s.ok()) {
    response->set_path(*path);
    std::error_code ec;
    response->set_file_bytes(static_cast<int64_t>(std::filesystem::file_size(*path, ec)));
  }
  return Reply(ctx, "SaveSession", s);
}

grpc::ServerUnaryReactor* KvqService::RestoreSession(grpc::CallbackServerContext* ctx,
                                                     const kvq::v1::RestoreSessionRequest* request,
                                                     kvq::v1::Session* response) {
  absl::StatusOr<engine::Engine*> e = EngineForNewWork();
  if (!e.ok()) return Reply(ctx, "RestoreSession", e.status());
  absl::StatusOr<std::string> path = SessionPath(options_.session_dir, request->session_id(), request->name());
  if (!path.ok()) return Reply(ctx, "RestoreSession", path.status());
  if (!std::filesystem::exists(*path)) {
    return Reply(ctx, "RestoreSession",
                 absl::NotFoundError(absl::StrCat("no saved session at ", *path, "; SaveSession first")));
  }
  absl::StatusOr<engine::SessionInfo> info = (*e)->LoadSession(request->session_id(), *path);
  if (info.ok()) ToProto(*info, response);
  return Reply(ctx, "RestoreSession", info.status());
}

namespace {

absl::StatusOr<std::vector<int32_t>> TokenizeInput(const model::Tokenizer& tok, const kvq::v1::TokenizeRequest& r) {
  const bool add_bos = !r.has_add_bos() || r.add_bos();
  switch (r.input_case()) {
    case kvq::v1::TokenizeRequest::kText:
      if (absl::Status s = CheckUtf8(r.text(), "the text"); !s.ok()) return s;
      return tok.Encode(r.text(), add_bos, /*parse_special=*/true);
    case kvq::v1::TokenizeRequest::kChat: {
      absl::StatusOr<std::string> text = RenderChat(tok, r.chat());
      if (!text.ok()) return absl::InvalidArgumentError(text.status().message());
      return tok.Encode(*text, add_bos, /*parse_special=*/true);
    }
    case kvq::v1::TokenizeRequest::INPUT_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError("give text or chat messages to tokenize");
}

}  // namespace

grpc::ServerUnaryReactor* KvqService::Tokenize(grpc::CallbackServerContext* ctx,
                                               const kvq::v1::TokenizeRequest* request,
                                               kvq::v1::TokenizeResponse* response) {
  absl::StatusOr<engine::Engine*> e = EngineForNewWork();
  if (!e.ok()) return Reply(ctx, "Tokenize", e.status());
  const model::Tokenizer& tok = (*e)->tokenizer();
  absl::StatusOr<std::vector<int32_t>> ids = TokenizeInput(tok, *request);
  if (!ids.ok()) return Reply(ctx, "Tokenize", ids.status());
  for (int32_t id : *ids) {
    response->add_token_ids(id);
    if (request->return_pieces()) response->add_pieces(SanitizeUtf8(tok.TokenBytes(id)));
  }
  return Reply(ctx, "Tokenize", absl::OkStatus());
}

grpc::ServerUnaryReactor* KvqService::CountTokens(grpc::CallbackServerContext* ctx,
                                                  const kvq::v1::TokenizeRequest* request,
                                                  kvq::v1::CountTokensResponse* response) {
  absl::StatusOr<engine::Engine*> e = EngineForNewWork();
  if (!e.ok()) return Reply(ctx, "CountTokens", e.status());
  absl::StatusOr<std::vector<int32_t>> ids = TokenizeInput((*e)->tokenizer(), *request);
  if (ids.ok()) response->set_count(static_cast<int64_t>(ids->size()));
  return Reply(ctx, "CountTokens", ids.status());
}

grpc::ServerUnaryReactor* KvqService::GetModelInfo(grpc::CallbackServerContext* ctx,
                                                   const kvq::v1::GetModelInfoRequest*,
                                                   kvq::v1::ModelInfo* response) {
  absl::StatusOr<engine::Engine*> e = EngineForNewWork();
  if (!e.ok()) return Reply(ctx, "GetModelInfo", e.status());
  const model::ModelConfig& c = (*e)->config();
  const engine::EngineStats st = (*e)->Stats();
  response->set_name(c.name);
  response->set_arch(c.arch);
  response->set_layers(c.n_layers);
  response->set_hidden(c.hidden);
  response->set_heads(c.n_heads);
  response->set_kv_heads(c.n_kv_heads);
  response->set_head_dim(c.head_dim);
  response->set_vocab_size(c.vocab_size);
  response->set_trained_context(c.max_position);
  response->set_kv_format((*e)->kv_format());
  response->set_quantizer(options_.quantizer);
  response->set_effective_bits_per_element(st.effective_bits_per_element);
  response->set_outlier_fraction(st.outlier_fraction);
  response->set_max_context_tokens(st.max_context_tokens);
  response->set_kv_bytes_capacity(st.kv_bytes_capacity);
  response->set_kv_bytes_used(st.kv_bytes_used);
  response->set_max_batch(options_.max_batch);
  response->set_prefill_chunk(options_.prefill_chunk);
  response->set_sessions(st.sessions);
  // Rank 0, the engine's own cache (a sequence spread over MPI ranks keeps its shards on the
  // workers, which report nothing here).
  auto* rank = response->add_ranks();
  rank->set_rank(0);
  rank->set_device(options_.device);
  rank->set_kv_bytes_capacity(st.kv_bytes_capacity);
  rank->set_kv_bytes_used(st.kv_bytes_used);
  return Reply(ctx, "GetModelInfo", absl::OkStatus());
}

}  // namespace kvq::server
