#include "server/session_upload.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/status_mapping.h"
#include "server/utf8.h"

namespace kvq::server {
namespace {

using kvq::v1::CreateSessionResponse;

// Reading pauses while this much received document waits for the worker.
constexpr int64_t kMaxQueuedBytes = int64_t{64} << 20;
// Tokens at the end of the pending text that may still change when more text arrives.
constexpr size_t kHoldbackTokens = 16;

bool MergeProgress(CreateSessionResponse& last, const CreateSessionResponse& next) {
  if (!last.has_progress() || !next.has_progress()) return false;
  *last.mutable_progress() = next.progress();
  return true;
}

// Whether concatenating tokens' bytes reproduces the encoded text exactly and a continuation is
// encoded without a dummy prefix (byte-level BPE); only then is incremental tokenization exact.
bool TokenizesIncrementally(const model::Tokenizer& tok) {
  for (const char* probe : {"ab cd\n\nef", "x"}) {
    std::string bytes;
    for (int32_t id : tok.Encode(probe, /*add_bos=*/false, /*parse_special=*/true)) bytes += tok.TokenBytes(id);
    if (bytes != probe) return false;
  }
  return true;
}

}  // namespace

SessionUpload::SessionUpload(KvqService* service, engine::Engine* engine)
    : service_(service), engine_(engine) {
  service_->StreamStarted();
  StartRead(&request_);
}

void SessionUpload::OnReadDone(bool ok) {
  if (!ok) {  // half-close: the document is complete
    std::lock_guard<std::mutex> lock(mu_);
    if (!created_) {
      failed_ = true;
    } else {
      input_done_ = true;
      cv_.notify_all();
      return;
    }
  }
  if (!ok) {
    Fail(absl::InvalidArgumentError("send at least one message with session_id before closing"));
    return;
  }
  if (!created_) {
    if (request_.session_id().empty()) {
      Fail(absl::InvalidArgumentError("the first CreateSession message must carry session_id"));
      return;
    }
    session_id_ = request_.session_id();
    absl::StatusOr<engine::SessionInfo> info =
        engine_->CreateSession(session_id_, request_.has_ttl_seconds() ? request_.ttl_seconds() : -1);
    if (!info.ok()) {
      Fail(info.status());
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      created_ = true;
    }
    worker_ = std::thread([this] { Work(); });
  } else if (!request_.session_id().empty() && request_.session_id() != session_id_) {
    Fail(absl::InvalidArgumentError(absl::StrCat("session_id changed mid-stream from '", session_id_,
                                                 "' to '", request_.session_id(), "'")));
    return;
  }
  Chunk chunk;
  if (request_.has_text()) {
    chunk.is_text = true;
    chunk.text = std::move(*request_.mutable_text());
  } else if (request_.has_token_ids()) {
    chunk.ids.assign(request_.token_ids().ids().begin(), request_.token_ids().ids().end());
  }
  bool read_more;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_) return;
    queued_bytes_ += static_cast<int64_t>(chunk.text.size() + 4 * chunk.ids.size());
    chunks_.push_back(std::move(chunk));
    cv_.notify_all();
    read_paused_ = queued_bytes_ > kMaxQueuedBytes;
    read_more = !read_paused_;
  }
  if (read_more) StartRead(&request_);
}

absl::StatusOr<std::vector<int32_t>> SessionUpload::TakeTextTokens(bool final) {
  static const bool incremental_ok = TokenizesIncrementally(engine_->tokenizer());
  std::vector<int32_t> out;
  if (pending_text_.empty()) return out;
  const model::Tokenizer& tok = engine_->tokenizer();
  bool incomplete = false;
  const size_t valid = ValidUtf8Prefix(pending_text_, &incomplete);
  if (valid < pending_text_.size() && (final || !incomplete)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the document is not valid UTF-8 at byte ", bytes_received_ - static_cast<int64_t>(pending_text_.size()) + valid,
        "; send text as UTF-8 or send token ids"));
  }
  if (!final && !incremental_ok) return out;  // tokenize the whole text at the end
  const std::string_view text(pending_text_.data(), valid);
  std::vector<int32_t> ids = tok.Encode(text, /*add_bos=*/!context_started_, /*parse_special=*/true);
  if (final) {
    pending_text_.clear();
    return ids;
  }
  if (ids.size() <= kHoldbackTokens) return out;
  ids.resize(ids.size() - kHoldbackTokens);
  std::string committed;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i == 0 && !context_started_ && ids[0] == tok.bos_id()) continue;  // BOS is not in the text
    committed += tok.TokenBytes(ids[i]);
  }
  if (text.substr(0, committed.size()) != committed) return out;  // not byte-exact here: wait
  pending_text_.erase(0, committed.size());
  return ids;
}

void SessionUpload::Work() {
  for (;;) {
    std::deque<Chunk> chunks;
    bool done;
    bool resume_read = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return !chunks_.empty() || input_done_ || cancelled_ || failed_; });
      if (cancelled_ || failed_) return;
      chunks.swap(chunks_);
      queued_bytes_ = 0;
      done = input_done_;
      if (read_paused_) {
        read_paused_ = false;
        resume_read = true;
      }
    }
    if (resume_read) StartRead(&request_);
    std::vector<int32_t> tokens;
    absl::Status status;
    for (Chunk& c : chunks) {
      if (c.is_text) {
        pending_text_ += c.text;
        bytes_received_ += static_cast<int64_t>(c.text.size());
        continue;
      }
      // Ids after text: the text so far is complete.
      absl::StatusOr<std::vector<int32_t>> t = TakeTextTokens(/*final=*/true);
      if (!t.ok()) { status = t.status(); break; }
      tokens.insert(tokens.end(), t->begin(), t->end());
      tokens.insert(tokens.end(), c.ids.begin(), c.ids.end());
    }
    if (status.ok()) {
      absl::StatusOr<std::vector<int32_t>> t = TakeTextTokens(/*final=*/done);
      if (t.ok()) tokens.insert(tokens.end(), t->begin(), t->end());
      status = t.status();
    }
    if (status.ok() && !tokens.empty()) {
      context_started_ = true;
      tokens_received_ += static_cast<int64_t>(tokens.size());
      const int64_t base = tokens_prefilled_;
      auto progress = [&](int64_t prefilled, int64_t) {
        CreateSessionResponse msg;
        msg.mutable_progress()->set_bytes_received(bytes_received_);
        msg.mutable_progress()->set_tokens_received(tokens_received_);
        msg.mutable_progress()->set_tokens_prefilled(base + prefilled);
        Post(std::move(msg), MergeProgress);
      };
      absl::StatusOr<engine::SessionInfo> info = engine_->ExtendSession(session_id_, tokens, progress, &cancelled_);
      status = info.status();
      if (status.ok()) tokens_prefilled_ = tokens_received_;
    }
    if (!status.ok()) {
      if (!cancelled_) Fail(status);
      return;
    }
    CreateSessionResponse msg;
    msg.mutable_progress()->set_bytes_received(bytes_received_);
    msg.mutable_progress()->set_tokens_received(tokens_received_);
    msg.mutable_progress()->set_tokens_prefilled(tokens_prefilled_);
    Post(std::move(msg), MergeProgress);
    if (done) {
      absl::StatusOr<engine::SessionInfo> info = engine_->GetSession(session_id_);
      if (!info.ok()) {
        Fail(info.status());
        return;
      }
      CreateSessionResponse last;
      auto* s = last.mutable_session();
      s->set_session_id(info->id);
      s->set_tokens(info->tokens);
      s->set_kv_bytes(info->kv_bytes);
      s->set_created_unix_ms(info->created_unix_ms);
      s->set_last_used_unix_ms(info->last_used_unix_ms);
      s->set_ttl_seconds(info->ttl_seconds);
      {
        std::lock_guard<std::mutex> lock(mu_);
        completed_ = true;
      }
      Post(std::move(last));
      service_->metrics().ObserveSessionPrefill(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(), info->tokens);
      PostFinish(grpc::Status::OK);
      return;
    }
  }
}

void SessionUpload::Fail(const absl::Status& status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed_ = true;
    cv_.notify_all();
  }
  cancelled_ = true;  // stops an extension in flight; OnDone drops the partial session
  AbortWrites(service_->Fail("CreateSession", status));
}

void SessionUpload::OnCancel() {
  cancelled_ = true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_all();
  }
  AbortWrites(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client or its deadline"));
}

void SessionUpload::OnDone() {
  if (worker_.joinable()) worker_.join();
  // A half-uploaded document is of no use: drop it so it does not hold KV.
  if (created_ && !completed_) (void)engine_->DeleteSession(session_id_);
  service_->StreamEnded();
  delete this;
}

}  // namespace kvq::server
