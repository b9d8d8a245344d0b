// Every Prometheus family kvqd exports is declared in metrics.cc, with help text and base units.
// Engine gauges and counters are refreshed from Engine::Stats() on each scrape, so /metrics is
// never staler than the scrape itself; request-level histograms are observed by the RPC handlers.
#pragma once

#include <memory>
#include <mutex>
#include <string_view>

#include "grpcpp/support/status.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "sharding/engine.h"

namespace kvq::server {

class Metrics {
 public:
  Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // The engine whose Stats() feed the engine families; nullptr while loading or after shutdown.
  void SetEngine(const engine::Engine* engine);
  void SetServing(bool serving);

  // What the /metrics endpoint serializes (refreshes the engine families, then collects).
  std::shared_ptr<prometheus::Collectable> collectable() { return collectable_; }

  void ObserveTimeToFirstToken(double seconds) { ttft_->Observe(seconds); }
  void ObserveInterTokenLatency(double seconds) { inter_token_->Observe(seconds); }
  void ObserveRequestDuration(double seconds) { e2e_->Observe(seconds); }
  void ObserveSessionPrefill(double seconds, int64_t tokens);
  // Generation outcomes: "stop" | "length" | "cancelled" | "error".
  void CountFinished(std::string_view reason);
  void CountError(std::string_view method, grpc::StatusCode code);

  void Refresh();  // engine families from Stats(); called per scrape

 private:
  class Collector;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<prometheus::Collectable> collectable_;

  prometheus::Family<prometheus::Gauge>* running_family_;
  prometheus::Gauge* up_;
  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* sessions_;
  prometheus::Histogram* ttft_;
  prometheus::Histogram* inter_token_;
  prometheus::Histogram* e2e_;
  prometheus::Histogram* session_prefill_;
  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generated_tokens_;
  prometheus::Counter* session_tokens_;
  prometheus::Counter* steps_;
  prometheus::Counter* graph_steps_;
  prometheus::Counter* overflow_steps_;
  prometheus::Gauge* prefill_tps_;
  prometheus::Gauge* decode_tps_;
  prometheus::Family<prometheus::Gauge>* kv_used_family_;
  prometheus::Family<prometheus::Gauge>* kv_capacity_family_;
  prometheus::Gauge* max_context_;
  prometheus::Gauge* bits_per_element_;
  prometheus::Gauge* outlier_ratio_;
  prometheus::Gauge* merge_seconds_;
  prometheus::Family<prometheus::Counter>* finished_family_;
  prometheus::Family<prometheus::Counter>* errors_family_;

  std::mutex mu_;  // guards engine_ and the last totals (counters advance by deltas)
  const engine::Engine* engine_ = nullptr;
  int64_t last_prompt_total_ = 0;
  int64_t last_generated_total_ = 0;
  int64_t last_graph_steps_ = 0;
  int64_t last_overflow_steps_ = 0;
  int64_t last_steps_ = 0;
};

}  // namespace kvq::server
