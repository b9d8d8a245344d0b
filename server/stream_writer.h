// Ordered, non-blocking writes for a callback-API reactor: producers (the engine's scheduler
// thread, a session worker) Post() messages at any pace; at most one write is in flight, and
// messages posted meanwhile may be folded into the last queued one (token deltas coalesce when the
// client reads slower than the model writes, so the engine never waits on the network).
// StartWrite and Finish are never called under the lock: gRPC may run reactions inline.
#pragma once

#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <utility>

#include "grpcpp/support/server_callback.h"
#include "grpcpp/support/status.h"

namespace kvq::server {

// Base: grpc::ServerWriteReactor<Response> or grpc::ServerBidiReactor<Request, Response>.
template <typename Base, typename Response>
class QueuedWriter : public Base {
 public:
  // Folds `next` into `last` (a queued, unsent message) and returns true, or returns false.
  using MergeFn = std::function<bool(Response& last, const Response& next)>;

 protected:
  void Post(Response msg, const MergeFn& merge = nullptr) {
    {
      std::lock_guard<std::mutex> lock(write_mu_);
      if (finish_requested_ || broken_) return;
      if (merge && !queue_.empty() && merge(queue_.back(), msg)) return;
      queue_.push_back(std::move(msg));
    }
    Pump();
  }

  // Finishes once the queued messages are written (at once if the stream is broken).
  void PostFinish(grpc::Status status) {
    {
      std::lock_guard<std::mutex> lock(write_mu_);
      if (finish_requested_) return;
      finish_requested_ = true;
      finish_status_ = std::move(status);
    }
    Pump();
  }

  // Drops what is queued and finishes as soon as no write is in flight (cancellation, errors).
  void AbortWrites(grpc::Status status) {
    {
      std::lock_guard<std::mutex> lock(write_mu_);
      queue_.clear();
      broken_ = true;
      if (!finish_requested_) {
        finish_requested_ = true;
        finish_status_ = std::move(status);
      }
    }
    Pump();
  }

  bool finish_requested() const {
    std::lock_guard<std::mutex> lock(write_mu_);
    return finish_requested_;
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(write_mu_);
      writing_ = false;
      if (!ok) {  // the client is gone; OnCancel follows
        broken_ = true;
        queue_.clear();
      }
    }
    Pump();
  }

 private:
  void Pump() {
    enum { kNothing, kWrite, kFinish } action = kNothing;
    {
      std::lock_guard<std::mutex> lock(write_mu_);
      if (writing_ || finished_) return;
      if (!queue_.empty()) {
        in_flight_ = std::move(queue_.front());
        queue_.pop_front();
        writing_ = true;
        action = kWrite;
      } else if (finish_requested_) {
        finished_ = true;
        action = kFinish;
      }
    }
    if (action == kWrite) this->StartWrite(&in_flight_);
    if (action == kFinish) this->Finish(finish_status_);
  }

  mutable std::mutex write_mu_;
  std::deque<Response> queue_;
  Response in_flight_;  // stays untouched until OnWriteDone
  bool writing_ = false;
  bool broken_ = false;
  bool finish_requested_ = false;
  bool finished_ = false;
  grpc::Status finish_status_;
};

}  // namespace kvq::server
