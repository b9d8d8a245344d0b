#include "sharding/mpi_transport.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status.h"

#ifdef KVQ_HAVE_MPI
#include <mpi.h>
#endif

namespace kvq::sharding {

#ifdef KVQ_HAVE_MPI

namespace {

constexpr int kTagData = 1;
constexpr int kTagGone = 2;

absl::Status MpiError(int rc, const char* call, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  return absl::InternalError(absl::StrCat(call, " failed at ", file, ":", line, ": ",
                                          std::string(text, len), " (MPI error ", rc, ")"));
}

// The polling of every wait: tight at first (replies to small commands come back in microseconds),
// then naps longer and longer, up to cap_us, so that waiting ranks leave the cores to the ones
// computing (CI runs 4 ranks on 2 cores).
void Backoff(int spin, int cap_us, int* nap_us) {
  if (spin <= 200) return;
  *nap_us = std::min(cap_us, *nap_us + 10);
  std::this_thread::sleep_for(std::chrono::microseconds(*nap_us));
}

}  // namespace

// Turns a failed MPI call into a Status with file:line (the communicator returns errors).
#define KVQ_RETURN_IF_MPI_ERROR(call)                                          \
  do {                                                                         \
    const int kvq_mpi_rc_ = (call);                                            \
    if (kvq_mpi_rc_ != MPI_SUCCESS) return MpiError(kvq_mpi_rc_, #call, __FILE__, __LINE__); \
  } while (0)

struct MpiTransport::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  mutable std::mutex mu;
  absl::Status broken;  // the first failure
  bool finalized = false;
  int max_nap_us = 500;
  // Sends in flight, oldest first: MPI owns `bytes` until the request completes. A rendezvous
  // send (Open MPI's shared-memory eager limit is 4 KiB; q of one Llama layer is 16 KiB) completes
  // only once the peer has posted its receive, so waiting for it in Send made rank 0 wait out a
  // worker's nap before it could start its own shard (~0.3 ms per layer, measured 2026-12-01).
  struct PendingSend {
    MPI_Request request = MPI_REQUEST_NULL;
    std::string bytes;
    int dest = 0;
    std::chrono::steady_clock::time_point since;
  };
  std::deque<PendingSend> pending;
  size_t pending_bytes = 0;
  // Beyond these, Send waits for the oldest sends first (a peer that stopped taking messages must
  // not grow memory without bound).
  static constexpr size_t kMaxPendingSends = 256;
  static constexpr size_t kMaxPendingBytes = size_t{1} << 30;

  // Completes what has completed (in order; MPI keeps one peer's messages in order anyway) and
  // fails on an error or on a send older than timeout_s (0: none). Caller holds mu.
  absl::Status ProgressSends(double timeout_s) {
    while (!pending.empty()) {
      PendingSend& p = pending.front();
      int done = 0;
      KVQ_RETURN_IF_MPI_ERROR(MPI_Test(&p.request, &done, MPI_STATUS_IGNORE));
      if (!done) {
        if (timeout_s > 0) {
          const double waited =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - p.since).count();
          if (waited > timeout_s) {
            return absl::DeadlineExceededError(absl::StrCat(
                "sending to rank ", p.dest, ": not taken after ", timeout_s,
                " s (the rank hung or died; the job must end)"));
          }
        }
        return absl::OkStatus();
      }
      pending_bytes -= p.bytes.size();
      pending.pop_front();
    }
    return absl::OkStatus();
  }
  // Waits until no send is in flight (all) or until the limits above hold again.
  absl::Status DrainSends(bool all, double timeout_s) {
    int nap_us = 0;
    for (int spin = 0;; ++spin) {
      KVQ_RETURN_IF_ERROR(ProgressSends(timeout_s));
      if (pending.empty() ||
          (!all && pending.size() < kMaxPendingSends && pending_bytes <= kMaxPendingBytes)) {
        return absl::OkStatus();
      }
      Backoff(spin, max_nap_us, &nap_us);
    }
  }

  // Polls `request` until it completes (Backoff), or cancels it after timeout_s (0: never).
  absl::Status Wait(MPI_Request* request, double timeout_s, const char* what, int peer) {
    const auto start = std::chrono::steady_clock::now();
    int nap_us = 0;
    for (int spin = 0;; ++spin) {
      int done = 0;
      KVQ_RETURN_IF_MPI_ERROR(MPI_Test(request, &done, MPI_STATUS_IGNORE));
      if (done) return absl::OkStatus();
      if (timeout_s > 0 && spin % 64 == 0) {
        const double waited =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (waited > timeout_s) {
          MPI_Cancel(request);
          return absl::DeadlineExceededError(absl::StrCat(
              what, " rank ", peer, ": no answer after ", timeout_s,
              " s (the rank hung or died; the job must end)"));
        }
      }
      Backoff(spin, max_nap_us, &nap_us);
    }
  }

  absl::Status Fail(absl::Status s) {
    if (broken.ok()) broken = s;
    return s;
  }
};

absl::StatusOr<std::unique_ptr<MpiTransport>> MpiTransport::Init(int* argc, char*** argv,
                                                                 const MpiTransportOptions& options) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    KVQ_RETURN_IF_MPI_ERROR(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided));
    if (provided < MPI_THREAD_SERIALIZED) {
      return absl::FailedPreconditionError(absl::StrCat(
          "this MPI provides thread level ", provided,
          "; kvq needs MPI_THREAD_SERIALIZED (the engine thread makes the calls)"));
    }
  }
  auto impl = std::make_unique<Impl>();
  KVQ_RETURN_IF_MPI_ERROR(MPI_Comm_dup(MPI_COMM_WORLD, &impl->comm));
  KVQ_RETURN_IF_MPI_ERROR(MPI_Comm_set_errhandler(impl->comm, MPI_ERRORS_RETURN));
  KVQ_RETURN_IF_MPI_ERROR(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  auto t = std::unique_ptr<MpiTransport>(new MpiTransport(std::move(impl)));
  t->options_ = options;
  t->impl_->max_nap_us = std::max(options.max_nap_us, 1);
  KVQ_RETURN_IF_MPI_ERROR(MPI_Comm_rank(t->impl_->comm, &t->rank_));
  KVQ_RETURN_IF_MPI_ERROR(MPI_Comm_size(t->impl_->comm, &t->size_));
  return t;
}

MpiTransport::MpiTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MpiTransport::~MpiTransport() {
  // Sends still in flight own their bytes until MPI is done with them: give them a moment, and
  // leave whatever is still pending to the process's end rather than free it under MPI.
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->pending.empty()) return;
  int mpi_done = 0;
  MPI_Finalized(&mpi_done);
  if (!mpi_done && !impl_->finalized) (void)impl_->DrainSends(/*all=*/true, 5.0);
  if (!impl_->pending.empty()) new std::deque<Impl::PendingSend>(std::move(impl_->pending));  // leaked on purpose
}

void MpiTransport::set_max_nap_us(int us) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  options_.max_nap_us = us;
  impl_->max_nap_us = std::max(us, 1);
}

absl::Status MpiTransport::health() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->broken;
}

absl::Status MpiTransport::Send(int dest, std::string_view message) {
  return Send(dest, std::string(message));
}

absl::Status MpiTransport::Send(int dest, std::string&& message) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (!impl_->broken.ok()) return impl_->broken;
  if (dest < 0 || dest >= size_ || dest == rank_) {
    return absl::InvalidArgumentError(absl::StrCat("cannot send to rank ", dest, " of ", size_));
  }
  if (message.size() > static_cast<size_t>(INT_MAX)) {
    return impl_->Fail(absl::InvalidArgumentError(
        absl::StrCat("message of ", message.size(), " bytes to rank ", dest, " exceeds 2 GiB")));
  }
  absl::Status s = impl_->DrainSends(/*all=*/false, options_.reply_timeout_seconds);
  if (!s.ok()) return impl_->Fail(s);
  Impl::PendingSend& p = impl_->pending.emplace_back();
  p.bytes = std::move(message);
  p.dest = dest;
  p.since = std::chrono::steady_clock::now();
  impl_->pending_bytes += p.bytes.size();
  const int rc = MPI_Isend(p.bytes.data(), static_cast<int>(p.bytes.size()), MPI_BYTE, dest, kTagData,
                           impl_->comm, &p.request);
  if (rc != MPI_SUCCESS) {
    impl_->pending_bytes -= p.bytes.size();
    impl_->pending.pop_back();
    return impl_->Fail(MpiError(rc, "MPI_Isend", __FILE__, __LINE__));
  }
  s = options_.wait_for_sends ? impl_->DrainSends(/*all=*/true, options_.reply_timeout_seconds)
                              : impl_->ProgressSends(options_.reply_timeout_seconds);
  if (!s.ok()) return impl_->Fail(s);
  return absl::OkStatus();
}

absl::StatusOr<std::string> MpiTransport::Receive(int source, bool wait_forever) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (!impl_->broken.ok()) return impl_->broken;
  // Probe for the size without blocking, under the same deadline and gone-watch as any wait.
  const auto start = std::chrono::steady_clock::now();
  const double timeout = wait_forever ? 0.0 : options_.reply_timeout_seconds;
  int nap_us = 0;
  MPI_Status st;
  for (int spin = 0;; ++spin) {
    // Our own sends move on while we wait (and a peer that never takes them shows up here).
    if (absl::Status ps = impl_->ProgressSends(options_.reply_timeout_seconds); !ps.ok()) return impl_->Fail(ps);
    int ready = 0;
    int rc = MPI_Iprobe(source, kTagData, impl_->comm, &ready, &st);
    if (rc != MPI_SUCCESS) return impl_->Fail(MpiError(rc, "MPI_Iprobe", __FILE__, __LINE__));
    if (ready) break;
    if (rank_ == 0) {
      int gone = 0;
      MPI_Status gs;
      rc = MPI_Iprobe(source, kTagGone, impl_->comm, &gone, &gs);
      if (rc != MPI_SUCCESS) return impl_->Fail(MpiError(rc, "MPI_Iprobe", __FILE__, __LINE__));
      if (gone) {
        int n = 0;
        MPI_Get_count(&gs, MPI_CHAR, &n);
        std::string why(static_cast<size_t>(n), '\0');
        MPI_Recv(why.data(), n, MPI_CHAR, source, kTagGone, impl_->comm, MPI_STATUS_IGNORE);
        return impl_->Fail(absl::UnavailableError(absl::StrCat("rank ", source, " has exited: ", why)));
      }
    }
    if (timeout > 0 && spin % 64 == 0) {
      const double waited =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (waited > timeout) {
        return impl_->Fail(absl::DeadlineExceededError(absl::StrCat(
            "waiting for rank ", source, ": no answer after ", timeout,
            " s (the rank hung or died; the job must end)")));
      }
    }
    Backoff(spin, wait_forever ? 2 * impl_->max_nap_us : impl_->max_nap_us, &nap_us);
  }
  int n = 0;
  int rc = MPI_Get_count(&st, MPI_BYTE, &n);
  if (rc != MPI_SUCCESS) return impl_->Fail(MpiError(rc, "MPI_Get_count", __FILE__, __LINE__));
  std::string out(static_cast<size_t>(n), '\0');
  rc = MPI_Recv(out.data(), n, MPI_BYTE, source, kTagData, impl_->comm, MPI_STATUS_IGNORE);
  if (rc != MPI_SUCCESS) return impl_->Fail(MpiError(rc, "MPI_Recv", __FILE__, __LINE__));
  return out;
}

void MpiTransport::NotifyGone(const absl::Status& why) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (rank_ == 0) return;
  (void)impl_->DrainSends(/*all=*/true, 5.0);
  const std::string text = why.ToString();
  // Eager for a short text: completes locally even if rank 0 never reads it.
  MPI_Request req;
  if (MPI_Isend(text.data(), static_cast<int>(text.size()), MPI_CHAR, 0, kTagGone, impl_->comm,
                &req) == MPI_SUCCESS) {
    (void)impl_->Wait(&req, 5.0, "notifying", 0);
  }
}

void MpiTransport::ClearFailureForTesting() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->broken = absl::OkStatus();
}

absl::Status MpiTransport::Finalize() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (impl_->finalized) return absl::OkStatus();
  // Every send must be complete before MPI ends (ranks finalize together, so peers take them).
  absl::Status drained = impl_->DrainSends(/*all=*/true, options_.reply_timeout_seconds);
  if (!drained.ok()) return impl_->Fail(drained);
  impl_->finalized = true;
  MPI_Comm_free(&impl_->comm);
  KVQ_RETURN_IF_MPI_ERROR(MPI_Finalize());
  return absl::OkStatus();
}

void MpiTransport::Abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

#else  // !KVQ_HAVE_MPI

struct MpiTransport::Impl {};

absl::StatusOr<std::unique_ptr<MpiTransport>> MpiTransport::Init(int*, char***,
                                                                 const MpiTransportOptions&) {
  return absl::UnimplementedError("kvq was built without MPI: configure with -DKVQ_ENABLE_MPI=ON");
}
MpiTransport::MpiTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MpiTransport::~MpiTransport() = default;
absl::Status MpiTransport::Send(int, std::string_view) { return absl::UnimplementedError("no MPI"); }
absl::Status MpiTransport::Send(int, std::string&&) { return absl::UnimplementedError("no MPI"); }
void MpiTransport::set_max_nap_us(int us) { options_.max_nap_us = us; }
absl::StatusOr<std::string> MpiTransport::Receive(int, bool) { return absl::UnimplementedError("no MPI"); }
void MpiTransport::NotifyGone(const absl::Status&) {}
absl::Status MpiTransport::health() const { return absl::UnimplementedError("no MPI"); }
void MpiTransport::ClearFailureForTesting() {}
absl::Status MpiTransport::Finalize() { return absl::OkStatus(); }
void MpiTransport::Abort(int code) { std::_Exit(code); }

#endif  // KVQ_HAVE_MPI

}  // namespace kvq::sharding
