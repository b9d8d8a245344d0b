#include "server/server.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"

namespace kvq::server {

KvqServer::KvqServer(const ServerOptions& options)
    : options_(options),
      metrics_(std::make_unique<Metrics>()),
      service_(std::make_unique<KvqService>(options.service, metrics_.get())) {}

absl::StatusOr<std::unique_ptr<KvqServer>> KvqServer::Start(const ServerOptions& options) {
  std::unique_ptr<KvqServer> s(new KvqServer(options));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &s->port_);
  builder.RegisterService(s->service_.get());
  // Larger requests are refused by gRPC itself with RESOURCE_EXHAUSTED; documents go in chunks.
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_receive_message_bytes));
  s->server_ = builder.BuildAndStart();
  if (s->server_ == nullptr || s->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen,
                                               " (address in use or malformed)"));
  }
  s->SetServing(false);
  if (!options.metrics_listen.empty()) {
    auto http = MetricsHttpServer::Start(options.metrics_listen, s->metrics_->collectable());
    if (!http.ok()) {
      return absl::UnavailableError(absl::StrCat("cannot serve /metrics on ", options.metrics_listen, ": ",
                                                 http.status().message()));
    }
    s->metrics_http_ = std::move(*http);
    s->metrics_port_ = s->metrics_http_->port();
  }
  return s;
}

KvqServer::~KvqServer() { Drain(); }


absl::Status KvqServer::LoadEngine() {
  absl::StatusOr<std::unique_ptr<engine::Engine>> engine = engine::Engine::Create(options_.engine);
  if (!engine.ok()) return engine.status();
  engine_ = *std::move(engine);
  service_->AttachEngine(engine_.get());
  SetServing(true);
  return absl::OkStatus();
}

void KvqServer::SetServing(bool serving) {
  // "" is the whole server; kvq.v1.Kvq is the service clients ask about by name.
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus("", serving);
  health->SetServingStatus("kvq.v1.Kvq", serving);
}

void KvqServer::Drain() {
  if (drained_) return;
  drained_ = true;
  service_->StartDraining();
  SetServing(false);
  const absl::Time deadline = absl::Now() + options_.drain_grace;
  if (!service_->WaitForIdle(deadline)) {
    std::fprintf(stderr, "kvqd: %d streams still running after the grace period; cancelling them\n",
                 service_->active_streams());
  }
  // Streams left over are cancelled (their reactors cancel the engine requests).
  server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  if (engine_) engine_->Shutdown(/*drain=*/false);
  service_->AttachEngine(nullptr);
  metrics_->SetEngine(nullptr);
  metrics_http_.reset();
  // Reactors still waiting for the engine's OnFinish have it now; the engine can go.
  engine_.reset();
}

}  // namespace kvq::server
