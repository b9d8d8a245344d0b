// kvq.v1.Kvq on the gRPC callback API: one reactor per stream (generate_stream.cc,
// session_upload.cc); unary methods answer inline. The engine is attached once it has loaded;
// until then, and while draining, new work is refused with UNAVAILABLE.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvq/v1/kvq_service.grpc.pb.h"
#include "server/metrics.h"
#include "sharding/engine.h"

namespace kvq::server {

struct ServiceOptions {
  std::string session_dir;      // SaveSession/RestoreSession files live here; empty: disabled
  std::string quantizer;        // reported by GetModelInfo
  std::string device = "cpu";   // reported by GetModelInfo: the engine's device (cpu | cuda)
  int max_batch = 0;            // reported by GetModelInfo
  int prefill_chunk = 0;        // reported by GetModelInfo
  int max_stop_strings = 16;
  int max_stop_string_bytes = 256;
};

class KvqService final : public kvq::v1::Kvq::CallbackService {
 public:
  KvqService(ServiceOptions options, Metrics* metrics);

  void AttachEngine(engine::Engine* engine);  // SERVING from now on (unless draining)
  void StartDraining();                       // new Generate/CreateSession streams: UNAVAILABLE
  // Waits until no stream is in flight or the deadline passes; true if none is left.
  bool WaitForIdle(absl::Time deadline);
  int active_streams() const;

  grpc::ServerWriteReactor<kvq::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* ctx, const kvq::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* ctx, const kvq::v1::AbortRequest* request,
                                  kvq::v1::AbortResponse* response) override;
  grpc::ServerBidiReactor<kvq::v1::CreateSessionRequest, kvq::v1::CreateSessionResponse>* CreateSession(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx,
                                       const kvq::v1::GetSessionRequest* request,
                                       kvq::v1::Session* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx,
                                         const kvq::v1::ListSessionsRequest* request,
                                         kvq::v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* ctx,
                                          const kvq::v1::DeleteSessionRequest* request,
                                          kvq::v1::DeleteSessionResponse* response) override;
  grpc::ServerUnaryReactor* SaveSession(grpc::CallbackServerContext* ctx,
                                        const kvq::v1::SaveSessionRequest* request,
                                        kvq::v1::SaveSessionResponse* response) override;
  grpc::ServerUnaryReactor* RestoreSession(grpc::CallbackServerContext* ctx,
                                           const kvq::v1::RestoreSessionRequest* request,
                                           kvq::v1::Session* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* ctx, const kvq::v1::TokenizeRequest* request,
                                     kvq::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* CountTokens(grpc::CallbackServerContext* ctx,
                                        const kvq::v1::TokenizeRequest* request,
                                        kvq::v1::CountTokensResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* ctx,
                                         const kvq::v1::GetModelInfoRequest* request,
                                         kvq::v1::ModelInfo* response) override;

  // For the stream reactors.
  Metrics& metrics() { return *metrics_; }
  const ServiceOptions& options() const { return options_; }
  // The engine if serving, else UNAVAILABLE with a message (loading or draining).
  absl::StatusOr<engine::Engine*> EngineForNewWork() const;
  engine::Engine* engine() const { return engine_.load(); }
  void StreamStarted();
  void StreamEnded();
  void RequestStarted(uint64_t request_id);
  void RequestEnded(uint64_t request_id);
  // Ends an RPC with `status`, counting errors by method and code.
  grpc::Status Fail(std::string_view method, const absl::Status& status);

 private:
  grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* ctx, std::string_view method,
                                  const absl::Status& status);

  ServiceOptions options_;
  Metrics* metrics_;
  std::atomic<engine::Engine*> engine_{nullptr};
  std::atomic<bool> draining_{false};

  mutable std::mutex mu_;
  std::condition_variable idle_cv_;
  int active_streams_ = 0;
  std::set<uint64_t> active_requests_;
};

// Prompt → token ids: text (UTF-8 checked) or chat messages through the chat template, or ids as
// given. BOS is added only at the start of a context (not when continuing a session).
absl::StatusOr<std::vector<int32_t>> PromptTokens(const model::Tokenizer& tokenizer,
                                                  const kvq::v1::GenerateRequest& request);

// Unset fields take the documented defaults; range checks the engine does are left to it.
absl::StatusOr<engine::SamplingParams> ToSamplingParams(const kvq::v1::SamplingParams& p);

}  // namespace kvq::server
