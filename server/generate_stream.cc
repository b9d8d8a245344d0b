#include "server/generate_stream.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/status_mapping.h"
#include "server/utf8.h"

namespace kvq::server {
namespace {

using kvq::v1::GenerateResponse;

// Consecutive deltas (and progress reports) coalesce while the client is behind.
bool MergeQueued(GenerateResponse& last, const GenerateResponse& next) {
  if (last.has_delta() && next.has_delta()) {
    auto* d = last.mutable_delta();
    d->mutable_text()->append(next.delta().text());
    d->mutable_token_ids()->MergeFrom(next.delta().token_ids());
    d->mutable_logprobs()->MergeFrom(next.delta().logprobs());
    return true;
  }
  if (last.has_prefill_progress() && next.has_prefill_progress()) {
    *last.mutable_prefill_progress() = next.prefill_progress();
    return true;
  }
  return false;
}

kvq::v1::FinishReason ToProto(engine::FinishReason r) {
  switch (r) {
    case engine::FinishReason::kStop: return kvq::v1::FINISH_REASON_STOP;
    case engine::FinishReason::kLength: return kvq::v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kCancelled: return kvq::v1::FINISH_REASON_CANCELLED;
    case engine::FinishReason::kError: return kvq::v1::FINISH_REASON_UNSPECIFIED;
  }
  return kvq::v1::FINISH_REASON_UNSPECIFIED;
}

}  // namespace

// Lives as long as the engine holds it; forwards to the stream, which outlives every call
// (the stream is released only after OnFinish).
class GenerateStream::Sink final : public engine::TokenSink {
 public:
  explicit Sink(GenerateStream* stream) : stream_(stream) {}
  void OnPrefillProgress(int64_t done, int64_t total) override { stream_->HandleProgress(done, total); }
  void OnToken(const engine::TokenEvent& event) override { stream_->HandleToken(event); }
  void OnFinish(engine::FinishReason reason, const absl::Status& status, const engine::Usage& usage) override {
    stream_->HandleFinish(reason, status, usage);
  }

 private:
  GenerateStream* stream_;
};

GenerateStream::GenerateStream(KvqService* service, engine::Engine* engine,
                               const kvq::v1::GenerateRequest& request)
    : service_(service),
      engine_(engine),
      decoder_(engine->tokenizer(), /*skip_special=*/true),
      stops_(std::vector<std::string>(request.sampling().stop().begin(), request.sampling().stop().end())) {
  service_->StreamStarted();
  Start(request);
}

namespace {

// Stop strings are the server's own feature, so their limits are checked here.
absl::Status CheckStopStrings(const kvq::v1::SamplingParams& p, const ServiceOptions& o) {
  if (p.stop_size() > o.max_stop_strings) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", o.max_stop_strings, " stop strings; got ", p.stop_size()));
  }
  for (const std::string& s : p.stop()) {
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
    if (static_cast<int>(s.size()) > o.max_stop_string_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop strings are limited to ", o.max_stop_string_bytes, " bytes; got ", s.size()));
    }
  }
  return absl::OkStatus();
}

}  // namespace

void GenerateStream::Start(const kvq::v1::GenerateRequest& request) {
  absl::StatusOr<std::vector<int32_t>> tokens = PromptTokens(engine_->tokenizer(), request);
  absl::StatusOr<engine::SamplingParams> sampling = ToSamplingParams(request.sampling());
  absl::Status bad = CheckStopStrings(request.sampling(), service_->options());
  if (!sampling.ok()) bad = sampling.status();
  if (!tokens.ok()) bad = tokens.status();
  absl::StatusOr<uint64_t> id = absl::UnknownError("unreachable");
  if (!bad.ok()) id = bad;
  if (bad.ok()) {
    want_logprobs_ = sampling->logprobs || sampling->top_logprobs > 0;
    const int64_t prompt_tokens = static_cast<int64_t>(tokens->size());
    engine::GenerateRequest req;
    req.prompt = *std::move(tokens);
    req.session_id = request.session_id();
    req.sampling = *std::move(sampling);
    req.sink = std::make_shared<Sink>(this);
    // Hold the lock so an early token cannot overtake the Started message.
    std::lock_guard<std::mutex> lock(mu_);
    id = engine_->Enqueue(std::move(req));
    if (id.ok()) {
      request_id_ = *id;
      service_->RequestStarted(*id);
      GenerateResponse started;
      started.mutable_started()->set_request_id(*id);
      started.mutable_started()->set_prompt_tokens(prompt_tokens);
      if (!request.session_id().empty()) {
        auto info = engine_->GetSession(request.session_id());
        if (info.ok()) started.mutable_started()->set_cached_tokens(std::max<int64_t>(0, info->tokens - 1));
      }
      Post(std::move(started));
    }
  }
  if (!id.ok()) {
    --refs_;  // the engine will never call back
    PostFinish(service_->Fail("Generate", id.status()));
  }
}

void GenerateStream::HandleProgress(int64_t done, int64_t total) {
  GenerateResponse msg;
  msg.mutable_prefill_progress()->set_tokens_done(done);
  msg.mutable_prefill_progress()->set_tokens_total(total);
  Post(std::move(msg), MergeQueued);
}

void GenerateStream::HandleToken(const engine::TokenEvent& event) {
  GenerateResponse msg;
  bool stop_now = false;
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stops_.matched() || cancelled_by_client_) return;
    const Clock::time_point now = Clock::now();
    if (!first_token_) {
      first_token_ = now;
      service_->metrics().ObserveTimeToFirstToken(std::chrono::duration<double>(now - start_).count());
    } else {
      service_->metrics().ObserveInterTokenLatency(std::chrono::duration<double>(now - last_token_).count());
    }
    last_token_ = now;
    auto* delta = msg.mutable_delta();
    delta->add_token_ids(event.token);
    delta->set_text(stops_.Push(decoder_.Push(event.token)));
    if (want_logprobs_) {
      auto* lp = delta->add_logprobs();
      lp->set_token_id(event.token);
      if (event.logprob) lp->set_logprob(*event.logprob);
      for (const engine::TokenLogprob& alt : event.top_logprobs) {
        auto* top = lp->add_top();
        top->set_token_id(alt.token);
        top->set_logprob(alt.logprob);
        top->set_text(SanitizeUtf8(engine_->tokenizer().TokenBytes(alt.token)));
      }
    }
    // A stop string ends generation: cancel the engine request; its OnFinish reports "stop".
    stop_now = stops_.matched();
    id = request_id_.value_or(0);
  }
  Post(std::move(msg), MergeQueued);
  if (stop_now) engine_->Cancel(id);
}

void GenerateStream::HandleFinish(engine::FinishReason reason, const absl::Status& status,
                                  const engine::Usage& usage) {
  std::vector<GenerateResponse> out;
  std::optional<grpc::Status> finish;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (request_id_) service_->RequestEnded(*request_id_);
    const double total = std::chrono::duration<double>(Clock::now() - start_).count();
    if (stops_.matched()) reason = engine::FinishReason::kStop;
    service_->metrics().CountFinished(engine::FinishReasonName(reason));
    if (!cancelled_by_client_) {
      service_->metrics().ObserveRequestDuration(total);
      if (reason == engine::FinishReason::kError) {
        finish = service_->Fail("Generate", status);
      } else {
        GenerateResponse tail;
        tail.mutable_delta()->set_text(stops_.Push(decoder_.Flush()));
        tail.mutable_delta()->mutable_text()->append(stops_.Flush());
        if (!tail.delta().text().empty()) out.push_back(std::move(tail));
        GenerateResponse fin;
        auto* f = fin.mutable_finished();
        f->set_reason(ToProto(reason));
        f->set_stop_string(stops_.matched_string());
        auto* u = f->mutable_usage();
        u->set_prompt_tokens(usage.prompt_tokens);
        u->set_cached_tokens(usage.cached_tokens);
        u->set_generated_tokens(usage.generated_tokens);
        u->set_kv_bytes(usage.kv_bytes);
        if (first_token_) {
          u->set_time_to_first_token_seconds(std::chrono::duration<double>(*first_token_ - start_).count());
        }
        u->set_total_seconds(total);
        out.push_back(std::move(fin));
        finish = grpc::Status::OK;
      }
    }
  }
  for (GenerateResponse& msg : out) Post(std::move(msg), MergeQueued);
  if (finish) PostFinish(*std::move(finish));
  Release();
}

void GenerateStream::OnCancel() {
  std::optional<uint64_t> id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_by_client_ = true;
    id = request_id_;
  }
  if (id) engine_->Cancel(*id);  // frees the KV now; OnFinish(kCancelled) follows
  AbortWrites(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client or its deadline"));
}

void GenerateStream::OnDone() {
  service_->StreamEnded();
  Release();
}

void GenerateStream::Release() {
  bool last;
  {
    std::lock_guard<std::mutex> lock(mu_);
    last = --refs_ == 0;
  }
  if (last) delete this;
}

}  // namespace kvq::server
