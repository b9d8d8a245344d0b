// The Prometheus endpoint of kvqd: GET /metrics over HTTP/1.1 from one thread, serialized by
// prometheus-cpp's TextSerializer from the daemon's registry.
//
// Why not prometheus-cpp's Exposer (civetweb): civetweb 1.15 in Debian creates its threads with a
// small fixed stack, and glibc carves a thread's static TLS out of its stack. With the CUDA
// runtime (and cuBLAS) in the process, their TLS leaves civetweb too little: measured here, its
// start fails ("null context when constructing CivetServer") or a worker overflows its stack
// while formatting a path (SIGSEGV) on the first scrape. This server's thread has a default stack.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"

namespace kvq::server {

class MetricsHttpServer {
 public:
  // Listens on "host:port" (IPv4 address or name; port 0 picks a free one) and serves until
  // destroyed. UNAVAILABLE when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& listen, std::shared_ptr<prometheus::Collectable> collectable);
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }
  int64_t scrapes() const { return scrapes_.load(); }

 private:
  MetricsHttpServer() = default;
  void Loop();
  void Serve(int fd);

  std::shared_ptr<prometheus::Collectable> collectable_;
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};  // a pipe: the destructor writes to stop the loop
  int port_ = 0;
  std::atomic<int64_t> scrapes_{0};
  std::thread thread_;
};

}  // namespace kvq::server
