// The control plane between the coordinator (rank 0) and the attention workers (ranks 1..N-1):
// ordered byte messages per pair of ranks. The sharded KV cache and the worker loop see only the
// abstract Transport; MpiTransport is the one implementation today (the CPU backend; with GPUs,
// NCCL will carry the bulk tensors and MPI keeps the commands). This is the only file pair that
// includes <mpi.h>; without KVQ_HAVE_MPI, MpiTransport::Init returns Unimplemented.
//
// Failure is loud and fast: every wait has a deadline (options.reply_timeout_seconds) and every MPI
// call returns its error (MPI_ERRORS_RETURN on a private communicator). The first failure breaks
// the transport: every later call returns the same Status, so a step fails on rank 0 instead of
// hanging, and the caller ends the job (Abort) with a non-zero exit on every rank. A worker whose
// loop ends on an error tells rank 0 (a "gone" notice) before it leaves. A rank that dies outright
// is caught by mpirun, which ends the whole job; rank 0's deadline covers a rank that hangs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvq::sharding {

class Transport {
 public:
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Queues `message` for rank `dest` and returns without waiting for `dest` to take it: messages
  // to one rank arrive in order, and a send that fails or that `dest` does not take within the
  // reply timeout breaks the transport (the next call returns that error). The string_view form
  // copies the bytes; the rvalue form takes them over.
  virtual absl::Status Send(int dest, std::string_view message) = 0;
  virtual absl::Status Send(int dest, std::string&& message) { return Send(dest, std::string_view(message)); }
  // The next message from `source`. wait_forever: no deadline (a worker waiting for commands);
  // otherwise DeadlineExceeded after the reply timeout. Unavailable when `source` said it is gone.
  virtual absl::StatusOr<std::string> Receive(int source, bool wait_forever = false) = 0;
  // Tells rank 0 this rank is leaving because of `why` (best effort; workers only).
  virtual void NotifyGone(const absl::Status& why) = 0;
  // OK, or the first failure (after which every call fails with it).
  virtual absl::Status health() const = 0;
};

// max_nap_us for ranks that drive a GPU (one core each: latency matters, cores are not shared).
inline constexpr int kGpuRankMaxNapUs = 10;

struct MpiTransportOptions {
  // How long rank 0 waits for a worker's reply (or a send to complete). Attention over a long
  // shard on the CPU is slow; a hung or dead rank fails the step after this. 0: no deadline.
  double reply_timeout_seconds = 600.0;
  // Longest nap between polls of a wait, in microseconds (waits spin first, then nap longer and
  // longer up to this; a worker idle between commands naps up to twice it). Naps leave the cores
  // to computing ranks when ranks outnumber cores (CI: 4 ranks on 2 cores); a rank with a core of
  // its own (GPU ranks) wants a few microseconds, or every layer's command waits out a nap.
  int max_nap_us = 500;
  // Send waits until the peer has taken the message (the behaviour before sends were queued; kept
  // for comparisons: engine_bench --mpi_wait_sends).
  bool wait_for_sends = false;
};

class MpiTransport : public Transport {
 public:
  // Initializes MPI (MPI_THREAD_SERIALIZED: the engine's scheduler thread makes the calls, one at
  // a time) unless already initialized, and takes a private duplicate of MPI_COMM_WORLD.
  static absl::StatusOr<std::unique_ptr<MpiTransport>> Init(int* argc, char*** argv,
                                                            const MpiTransportOptions& options = {});
  ~MpiTransport() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status Send(int dest, std::string_view message) override;
  absl::Status Send(int dest, std::string&& message) override;
  absl::StatusOr<std::string> Receive(int source, bool wait_forever = false) override;
  void NotifyGone(const absl::Status& why) override;
  absl::Status health() const override;
  void set_reply_timeout_seconds(double s) { options_.reply_timeout_seconds = s; }
  void set_max_nap_us(int us);
  // Tests that break the transport on purpose use this to shut the job down cleanly afterwards.
  void ClearFailureForTesting();

  // Ends MPI cleanly (every rank must call it). Call after the workers have been shut down.
  absl::Status Finalize();
  // Ends every rank of the job now with `code` (MPI_Abort): the loud exit after a failure.
  [[noreturn]] void Abort(int code);

 private:
  struct Impl;
  explicit MpiTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  MpiTransportOptions options_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace kvq::sharding
