// kvqd: the kvq serving daemon. Listens first (health NOT_SERVING while the model loads), serves,
// and on SIGTERM/SIGINT drains: health NOT_SERVING, new streams refused, in-flight ones finish
// within --drain_grace_seconds, exit 0.
#include <csignal>
#include <cstdio>
#include <fstream>
#include <string>

#include <pthread.h>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "server/config.h"
#include "server/server.h"

namespace {

// Written to a temporary file and renamed, so a reader never sees a partial number.
bool WritePortFile(const std::string& path, int port) {
  if (path.empty()) return true;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << port << "\n";
    if (!f) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("kvqd --model=MODEL.gguf [--listen=127.0.0.1:50051] [--metrics_listen=...]");
  absl::ParseCommandLine(argc, argv);
  absl::StatusOr<kvq::server::DaemonConfig> config = kvq::server::DaemonConfigFromFlags();
  if (!config.ok()) {
    std::fprintf(stderr, "kvqd: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  // Signals are taken by a sigwait below, never by a handler: block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::StatusOr<std::unique_ptr<kvq::server::KvqServer>> server = kvq::server::KvqServer::Start(config->server);
  if (!server.ok()) {
    std::fprintf(stderr, "kvqd: %s\n", std::string(server.status().message()).c_str());
    return 1;
  }
  std::printf("kvqd: listening on port %d (metrics port %d); loading %s\n", (*server)->port(),
              (*server)->metrics_port(), config->server.engine.model.c_str());
  std::fflush(stdout);
  if (!WritePortFile(config->port_file, (*server)->port()) ||
      !WritePortFile(config->metrics_port_file, (*server)->metrics_port())) {
    std::fprintf(stderr, "kvqd: cannot write the port file\n");
    return 1;
  }
  if (absl::Status s = (*server)->LoadEngine(); !s.ok()) {
    std::fprintf(stderr, "kvqd: cannot load the model: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::printf("kvqd: serving %s (%s KV)\n", (*server)->engine()->config().name.c_str(),
              (*server)->engine()->kv_format().c_str());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&signals, &sig);
  std::printf("kvqd: %s: draining\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  std::fflush(stdout);
  (*server)->Drain();
  std::printf("kvqd: drained; bye\n");
  return 0;
}
