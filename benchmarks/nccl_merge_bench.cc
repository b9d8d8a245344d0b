// The data plane of sharded attention per layer, alone: rank 0 broadcasts a step's queries to every
// rank (ncclBroadcast), every rank sends back its attention partials (o, lse) (ncclSend/Recv to
// rank 0), rank 0 merges them (kernels/merge_attention). The target is <= 25 us per layer
// on NVLink. Under mpirun, one rank per GPU (NCCL refuses two ranks on one GPU: the bench says so):
//   mpirun -np 4 nccl_merge_bench [--shapes llama3-8b,llama2-7b,smollm2-135m] [--batches 1,8,32]
// Prints per shape and batch: bytes moved, mean microseconds of each phase (CUDA events on rank 0)
// and of the whole layer (host clock, with the stream synchronized as a decode step would).
// A second table times the pattern the sharded caches use (sharding/device_data_plane.h, the
// plane GpuPlaneEndpoint makes): q to each worker point-to-point, the workers' o and lse back
// point-to-point (one group each way), the merge on rank 0 — the per-layer cost of
// ShardedKvCache::AttendDevice's data movement (without the MPI command, a few microseconds).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

ABSL_FLAG(std::string, shapes, "llama3-8b,llama2-7b,smollm2-135m", "query-head shapes (n_heads x head_dim)");
ABSL_FLAG(std::string, batches, "1,8,32", "decode batch sizes");
ABSL_FLAG(int, iters, 200, "timed layers per row");

#if KVQ_HAVE_CUDA && KVQ_HAVE_MPI
#include <cuda_runtime.h>

#include <chrono>

#include "kernels/dtype.h"
#include "kernels/engine_ops.h"
#include "kernels/merge_attention.h"
#include "sharding/gpu/device_data_plane.h"
#include "sharding/gpu/gpu_backend.h"
#include "sharding/gpu/nccl_comm.h"
#include "sharding/mpi_transport.h"

namespace {

struct Shape {
  const char* name;
  int n_heads, head_dim;
};
constexpr Shape kShapes[] = {{"llama3-8b", 32, 128}, {"llama2-7b", 32, 128}, {"smollm2-135m", 9, 64}};

// The rows of both tables: every --shapes entry (unknown ones are reported once) with every batch.
struct Row {
  const Shape* shape;
  int batch;
};
std::vector<Row> Rows(int rank) {
  std::vector<Row> rows;
  for (absl::string_view sn : absl::StrSplit(absl::GetFlag(FLAGS_shapes), ',', absl::SkipEmpty())) {
    const Shape* shape = nullptr;
    for (const Shape& s : kShapes) {
      if (sn == s.name) shape = &s;
    }
    if (shape == nullptr) {
      if (rank == 0) std::fprintf(stderr, "nccl_merge_bench: unknown shape %s\n", std::string(sn).c_str());
      continue;
    }
    for (absl::string_view bs : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',', absl::SkipEmpty())) {
      int batch = 0;
      if (absl::SimpleAtoi(bs, &batch) && batch >= 1) rows.push_back({shape, batch});
    }
  }
  return rows;
}

// The merge of `parts` partials of `rows` rows: part i's o at o_parts + i * o_part_stride, its lse
// at lse_parts + i * lse_part_stride.
kvq::kernels::MergeAttentionParams MergeParams(int rows, int parts, int hd, const float* o_parts,
                                                int64_t o_part_stride, const float* lse_parts,
                                                int64_t lse_part_stride, float* o, float* lse) {
  kvq::kernels::MergeAttentionParams mp;
  mp.rows = rows;
  mp.n_parts = parts;
  mp.head_dim = hd;
  mp.o_parts = o_parts;
  mp.o_row_stride = hd;
  mp.o_part_stride = o_part_stride;
  mp.lse_parts = lse_parts;
  mp.lse_row_stride = 1;
  mp.lse_part_stride = lse_part_stride;
  mp.o = o;
  mp.lse = lse;
  return mp;
}

int Fail(kvq::sharding::Transport* t, const absl::Status& s) {
  std::fprintf(stderr, "nccl_merge_bench: rank %d: %s\n", t != nullptr ? t->rank() : -1, s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace kvq;
  if (absl::Status s = sharding::SelectDeviceForLocalRank(); !s.ok()) return Fail(nullptr, s);
  auto tr = sharding::MpiTransport::Init(&argc, &argv);
  if (!tr.ok()) return Fail(nullptr, tr.status());
  sharding::MpiTransport* t = tr->get();
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  auto comm = sharding::NcclComm::Create(t, stream);
  if (!comm.ok()) {
    const int rc = Fail(t, comm.status());
    (void)t->Finalize();
    return rc;
  }
  const int ranks = t->size(), rank = t->rank();
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  if (rank == 0) {
    std::printf("# nccl_merge_bench: %d ranks, %s\n", ranks, prop.name);
    std::printf("| shape | batch | ranks | q KiB | partials KiB per rank | broadcast us | gather us | merge us | "
                "per layer us (wall) |\n|---|---|---|---|---|---|---|---|---|\n");
  }
  cudaEvent_t ev[4];
  for (auto& e : ev) cudaEventCreate(&e);
  const int iters = absl::GetFlag(FLAGS_iters);
  const std::vector<Row> table_rows = Rows(rank);
  for (const auto& [shape, batch] : table_rows) {
    const int rows = batch * shape->n_heads, hd = shape->head_dim;
    const size_t q_bytes = static_cast<size_t>(rows) * hd * 4;
    const size_t part_floats = static_cast<size_t>(rows) * (hd + 1);  // o, then lse
    float *q, *part, *gathered = nullptr, *o, *lse;
    cudaMalloc(&q, q_bytes);
    cudaMalloc(&part, part_floats * 4);
    cudaMalloc(&o, static_cast<size_t>(rows) * hd * 4);
    cudaMalloc(&lse, static_cast<size_t>(rows) * 4);
    if (rank == 0) cudaMalloc(&gathered, part_floats * 4 * ranks);
    (void)kernels::LaunchFillNormal(static_cast<int64_t>(part_floats), 7 + rank, 0.0f, 1.0f, part,
                                    kernels::DType::kF32, stream);
    (void)kernels::LaunchFillNormal(static_cast<int64_t>(rows) * hd, 3, 0.0f, 1.0f, q, kernels::DType::kF32, stream);
    const kernels::MergeAttentionParams mp =
        MergeParams(rows, ranks, hd, gathered, static_cast<int64_t>(part_floats),
                    gathered != nullptr ? gathered + static_cast<size_t>(rows) * hd : nullptr,
                    static_cast<int64_t>(part_floats), o, lse);
    double t_b = 0, t_g = 0, t_m = 0, wall = 0;
    absl::Status st;
    for (int it = 0; it < iters + 10 && st.ok(); ++it) {
      const auto w0 = std::chrono::steady_clock::now();
      cudaEventRecord(ev[0], stream);
      st = (*comm)->Broadcast(q, q_bytes, 0);
      cudaEventRecord(ev[1], stream);
      if (st.ok()) st = (*comm)->Gather(part, gathered, part_floats * 4, 0);
      cudaEventRecord(ev[2], stream);
      if (st.ok() && rank == 0) st = kernels::LaunchMergeAttention(mp, stream);
      cudaEventRecord(ev[3], stream);
      if (st.ok()) st = (*comm)->Synchronize();
      const auto w1 = std::chrono::steady_clock::now();
      if (it < 10) continue;
      float ms[3] = {};
      for (int k = 0; k < 3; ++k) cudaEventElapsedTime(&ms[k], ev[k], ev[k + 1]);
      t_b += ms[0] * 1e3;
      t_g += ms[1] * 1e3;
      t_m += ms[2] * 1e3;
      wall += std::chrono::duration<double, std::micro>(w1 - w0).count();
    }
    if (!st.ok()) {
      const int rc = Fail(t, st);
      t->Abort(rc);
      return rc;
    }
    if (rank == 0) {
      std::printf("| %s | %d | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", shape->name, batch, ranks,
                  q_bytes / 1024.0, part_floats * 4 / 1024.0, t_b / iters, t_g / iters, t_m / iters, wall / iters);
      std::fflush(stdout);
    }
    cudaFree(q);
    cudaFree(part);
    cudaFree(o);
    cudaFree(lse);
    if (gathered != nullptr) cudaFree(gathered);
  }
  // The data plane's pattern, through the plane itself.
  auto ep = sharding::GpuPlaneEndpoint::Create(t, {});
  if (!ep.ok()) {
    const int rc = Fail(t, ep.status());
    t->Abort(rc);
    return rc;
  }
  sharding::DeviceDataPlane* plane = (*ep)->plane();
  if (rank == 0) {
    std::printf("\n# the sharded caches' data plane (%s): q out and partials back point-to-point, merge\n",
                (*ep)->description().c_str());
    std::printf("| shape | batch | ranks | per layer us (wall) |\n|---|---|---|---|\n");
  }
  for (const auto& [shape, batch] : table_rows) {
    const int rows = batch * shape->n_heads, hd = shape->head_dim;
    const size_t q_n = static_cast<size_t>(rows) * hd;
    float *q, *parts, *o, *lse;
    cudaMalloc(&q, q_n * 4);
    cudaMalloc(&parts, static_cast<size_t>(ranks) * rows * (hd + 1) * 4);  // [ranks] o, then [ranks] lse
    cudaMalloc(&o, q_n * 4);
    cudaMalloc(&lse, static_cast<size_t>(rows) * 4);
    (void)kernels::LaunchFillNormal(static_cast<int64_t>(ranks) * rows * (hd + 1), 11 + rank, 0.0f, 1.0f, parts,
                                    kernels::DType::kF32, stream);
    cudaStreamSynchronize(stream);
    float* part_lse = parts + static_cast<size_t>(ranks) * q_n;
    const kernels::MergeAttentionParams mp =
        MergeParams(rows, ranks, hd, parts, static_cast<int64_t>(q_n), part_lse, rows, o, lse);
    double wall = 0;
    absl::Status st;
    for (int it = 0; it < iters + 10 && st.ok(); ++it) {
      const auto w0 = std::chrono::steady_clock::now();
      if (rank == 0) {
        for (int r = 1; r < ranks && st.ok(); ++r) st = plane->Send(r, q, q_n);
        if (st.ok()) st = plane->Start();
        for (int r = 1; r < ranks && st.ok(); ++r) {
          st = plane->Recv(r, parts + static_cast<size_t>(r) * q_n, q_n);
          if (st.ok()) st = plane->Recv(r, part_lse + static_cast<size_t>(r) * rows, rows);
        }
        if (st.ok()) st = plane->Wait();
        if (st.ok()) st = kernels::LaunchMergeAttention(mp, stream);
        if (st.ok() && cudaStreamSynchronize(stream) != cudaSuccess) st = absl::InternalError("merge");
      } else {
        st = plane->Recv(0, q, q_n);
        if (st.ok()) st = plane->Wait();
        if (st.ok()) st = plane->Send(0, parts, q_n);
        if (st.ok()) st = plane->Send(0, part_lse, rows);
        if (st.ok()) st = plane->Wait();
      }
      const auto w1 = std::chrono::steady_clock::now();
      if (it >= 10) wall += std::chrono::duration<double, std::micro>(w1 - w0).count();
    }
    if (!st.ok()) {
      const int rc = Fail(t, st);
      t->Abort(rc);
      return rc;
    }
    if (rank == 0) {
      std::printf("| %s | %d | %d | %.1f |\n", shape->name, batch, ranks, wall / iters);
      std::fflush(stdout);
    }
    cudaFree(q);
    cudaFree(parts);
    cudaFree(o);
    cudaFree(lse);
  }
  ep->reset();
  comm->reset();
  (void)t->Finalize();
  return 0;
}
#else
int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::fprintf(stderr, "nccl_merge_bench: needs a build with CUDA and MPI\n");
  return 1;
}
#endif
