// The reactor of one Generate stream. The engine's scheduler thread feeds it tokens through a
// TokenSink; text is decoded with model::StreamDecoder (UTF-8 never split) and passed through the
// stop-string matcher (stop strings never emitted) before it is queued for the client. Client
// cancellation or an expired deadline cancels the engine request, which frees its KV at once.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kvq/v1/kvq_service.grpc.pb.h"
#include "model/tokenizer.h"
#include "server/service.h"
#include "server/stop_strings.h"
#include "server/stream_writer.h"
#include "sharding/engine.h"

namespace kvq::server {

class GenerateStream final
    : public QueuedWriter<grpc::ServerWriteReactor<kvq::v1::GenerateResponse>, kvq::v1::GenerateResponse> {
 public:
  // Validates and enqueues; on error the stream finishes at once with that status.
  GenerateStream(KvqService* service, engine::Engine* engine, const kvq::v1::GenerateRequest& request);

  void OnCancel() override;
  void OnDone() override;

 private:
  class Sink;
  using Clock = std::chrono::steady_clock;

  void Start(const kvq::v1::GenerateRequest& request);
  void HandleProgress(int64_t done, int64_t total);
  void HandleToken(const engine::TokenEvent& event);
  void HandleFinish(engine::FinishReason reason, const absl::Status& status, const engine::Usage& usage);
  // Deletes this once both gRPC (OnDone) and the engine (OnFinish, or a refused Enqueue) are done.
  void Release();

  KvqService* service_;
  engine::Engine* engine_;
  const Clock::time_point start_ = Clock::now();

  std::mutex mu_;  // the engine thread and gRPC threads both touch the fields below
  std::optional<uint64_t> request_id_;
  bool cancelled_by_client_ = false;
  model::StreamDecoder decoder_;
  StopStringMatcher stops_;
  bool want_logprobs_ = false;
  std::optional<Clock::time_point> first_token_;
  Clock::time_point last_token_;
  int refs_ = 2;  // gRPC + engine
};

}  // namespace kvq::server
