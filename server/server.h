// kvqd in one object: the gRPC server (kvq.v1, grpc.health.v1, reflection) listening before the
// model loads (health NOT_SERVING meanwhile), the Prometheus exposer, the engine, and the drain
// sequence for SIGTERM. Used by kvqd_main.cc and, in-process, by the integration tests.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/service.h"
#include "sharding/engine.h"

namespace kvq::server {

struct ServerOptions {
  std::string listen = "127.0.0.1:50051";   // port 0: pick a free one (see KvqServer::port)
  std::string metrics_listen;               // empty: no /metrics endpoint; port 0 allowed
  int64_t max_receive_message_bytes = 4 << 20;
  absl::Duration drain_grace = absl::Seconds(30);
  ServiceOptions service;
  engine::EngineOptions engine;
};

class KvqServer {
 public:
  // Listens at once (health NOT_SERVING); call LoadEngine() next.
  static absl::StatusOr<std::unique_ptr<KvqServer>> Start(const ServerOptions& options);
  ~KvqServer();

  // Creates the engine from options.engine, then health turns SERVING.
  absl::Status LoadEngine();
  // Health NOT_SERVING, new streams refused, in-flight ones finish within the grace period (then
  // are cancelled), the server stops and the engine shuts down. Idempotent.
  void Drain();

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  engine::Engine* engine() { return engine_.get(); }
  KvqService& service() { return *service_; }
  Metrics& metrics() { return *metrics_; }

 private:
  explicit KvqServer(const ServerOptions& options);
  void SetServing(bool serving);

  ServerOptions options_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<KvqService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  std::unique_ptr<engine::Engine> engine_;
  int port_ = 0;
  int metrics_port_ = 0;
  bool drained_ = false;
};

}  // namespace kvq::server
