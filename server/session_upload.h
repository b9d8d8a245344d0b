// The reactor of one CreateSession stream: the document arrives in chunks (text or token ids) and
// is prefilled while it arrives. Text is tokenized incrementally: all but the last few tokens of
// the text received so far are committed, so a chunk boundary inside a word or a UTF-8 character
// gives the same tokens as the whole text at once. A worker thread runs the blocking
// Engine::ExtendSession calls and posts progress; the reactor only reads and queues.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kvq/v1/kvq_service.grpc.pb.h"
#include "server/service.h"
#include "server/stream_writer.h"
#include "sharding/engine.h"

namespace kvq::server {

class SessionUpload final
    : public QueuedWriter<grpc::ServerBidiReactor<kvq::v1::CreateSessionRequest, kvq::v1::CreateSessionResponse>,
                          kvq::v1::CreateSessionResponse> {
 public:
  SessionUpload(KvqService* service, engine::Engine* engine);

  void OnReadDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // A chunk as received; tokenized on the worker.
  struct Chunk {
    bool is_text = false;
    std::string text;
    std::vector<int32_t> ids;
  };

  void Work();
  // Pending text → tokens safe to commit now (all of it when `final`).
  absl::StatusOr<std::vector<int32_t>> TakeTextTokens(bool final);
  void Fail(const absl::Status& status);

  KvqService* service_;
  engine::Engine* engine_;
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  kvq::v1::CreateSessionRequest request_;  // the read buffer
  std::string session_id_;
  bool created_ = false;
  std::atomic<bool> cancelled_{false};
  std::thread worker_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Chunk> chunks_;
  int64_t queued_bytes_ = 0;
  bool input_done_ = false;
  bool read_paused_ = false;
  bool failed_ = false;
  bool completed_ = false;  // the final Session message was queued

  // Worker-only state.
  std::string pending_text_;   // received, not yet committed to tokens
  bool context_started_ = false;  // BOS goes only before the first token
  int64_t bytes_received_ = 0;
  int64_t tokens_received_ = 0;
  int64_t tokens_prefilled_ = 0;
};

}  // namespace kvq::server
