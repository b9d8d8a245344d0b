// kvqd: the kvq serving daemon. Listens first (health NOT_SERVING while the model loads), serves,
// and on SIGTERM/SIGINT drains: health NOT_SERVING, new streams refused, in-flight ones finish
// within --drain_grace_seconds, exit 0.
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <string>

#include <pthread.h>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "server/config.h"
#include "sharding/capacity_plan.h"
#include "server/server.h"
#include "sharding/kv_cache_factory.h"
#include "sharding/mpi_transport.h"
#include "sharding/sharded_kv_cache.h"
#include "sharding/shard_planner.h"
#include "sharding/worker.h"
#if KVQ_HAVE_CUDA
#include "sharding/gpu/device_data_plane.h"
#include "sharding/gpu/gpu_backend.h"
#endif

ABSL_FLAG(bool, experimental_gpu_shards, false,
          "--device=cuda under mpirun: spread sequences over the ranks' GPUs, q, new k/v and attention "
          "partials over the device data plane (NCCL with one GPU per rank, else staged through MPI; "
          "verified with 2-4 ranks sharing one H200, where NCCL cannot run). Off: kvqd refuses "
          "--device=cuda with several ranks.");
ABSL_FLAG(int64_t, min_tokens_per_rank, 65536,
          "under mpirun: a sequence spans another rank only past this many tokens per rank");
ABSL_FLAG(bool, plan, false,
          "print the capacity plan (bytes per token, each rank's capacity, the largest context, the "
          "ranges of --plan_context) for --model, --kv_format and the GPUs, then exit; nothing is "
          "allocated and the weights are not read");
ABSL_FLAG(int, plan_gpus, 0, "--plan: number of GPUs (ranks); 0: the mpirun world size, or 1");
ABSL_FLAG(std::string, plan_gpu_memory, "",
          "--plan: memory per GPU (e.g. 141GB, 80GiB); empty: the visible GPU's total memory");
ABSL_FLAG(int64_t, plan_context, 0, "--plan: also print the ranges of a sequence of this many tokens");
ABSL_FLAG(std::string, plan_workspace, "2GiB", "--plan: bytes every rank keeps for its workspace");
ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, kv_format);
ABSL_DECLARE_FLAG(double, gpu_memory_fraction);
ABSL_DECLARE_FLAG(double, key_outlier_reserve);

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

// kvqd --plan: the report of sharding/capacity_plan.h; exit 0, 1 when --plan_context does not
// fit, 2 on bad flags. Under mpirun only rank 0 prints.
int RunPlan() {
  if (const char* r = std::getenv("OMPI_COMM_WORLD_RANK"); r != nullptr && std::atoi(r) != 0) return 0;
  kvq::sharding::CapacityPlanRequest req;
  req.model = absl::GetFlag(FLAGS_model);
  req.kv_format = absl::GetFlag(FLAGS_kv_format);
  req.gpus = absl::GetFlag(FLAGS_plan_gpus);
  if (req.gpus <= 0) {
    const char* n = std::getenv("OMPI_COMM_WORLD_SIZE");
    req.gpus = n != nullptr && std::atoi(n) > 0 ? std::atoi(n) : 1;
  }
  const std::string mem = absl::GetFlag(FLAGS_plan_gpu_memory);
  if (!mem.empty()) {
    auto b = kvq::sharding::ParseByteSize(mem);
    if (!b.ok()) {
      std::fprintf(stderr, "kvqd: --plan_gpu_memory: %s\n", std::string(b.status().message()).c_str());
      return 2;
    }
    req.gpu_memory_bytes = *b;
  } else {
#if KVQ_HAVE_CUDA
    cudaDeviceProp prop{};
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) == cudaSuccess && n_dev > 0 && cudaGetDeviceProperties(&prop, 0) == cudaSuccess) {
      req.gpu_memory_bytes = static_cast<int64_t>(prop.totalGlobalMem);
    }
#endif
    if (req.gpu_memory_bytes <= 0) {
      std::fprintf(stderr, "kvqd: --plan: no GPU visible here; pass --plan_gpu_memory (e.g. 141GB)\n");
      return 2;
    }
  }
  auto ws = kvq::sharding::ParseByteSize(absl::GetFlag(FLAGS_plan_workspace));
  if (!ws.ok()) {
    std::fprintf(stderr, "kvqd: --plan_workspace: %s\n", std::string(ws.status().message()).c_str());
    return 2;
  }
  req.workspace_bytes = *ws;
  req.kv_memory_fraction = absl::GetFlag(FLAGS_gpu_memory_fraction);
  req.key_outlier_reserve = absl::GetFlag(FLAGS_key_outlier_reserve);
  req.min_tokens_per_rank = absl::GetFlag(FLAGS_min_tokens_per_rank);
  req.context = absl::GetFlag(FLAGS_plan_context);
  auto plan = kvq::sharding::MakeCapacityPlan(req);
  if (!plan.ok()) {
    std::fprintf(stderr, "kvqd: --plan: %s\n", std::string(plan.status().message()).c_str());
    return 2;
  }
  std::fputs(plan->report.c_str(), stdout);
  if (!plan->context_status.ok()) {
    std::fprintf(stderr, "kvqd: --plan: %s\n", std::string(plan->context_status.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("kvqd --model=MODEL.gguf [--listen=127.0.0.1:50051] [--metrics_listen=...]");
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_plan)) return RunPlan();
  absl::StatusOr<kvq::server::DaemonConfig> config = kvq::server::DaemonConfigFromFlags();
  if (!config.ok()) {
    std::fprintf(stderr, "kvqd: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  // Signals are taken by a sigwait below, never by a handler: block them before any thread starts.
  // Worker ranks keep them blocked: they end when rank 0 shuts them down after its drain.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  // Under mpirun (more than one rank) rank 0 serves and holds a shard; the others hold shards.
  std::unique_ptr<kvq::sharding::MpiTransport> transport;
  std::unique_ptr<kvq::sharding::ShardedKvCacheFactory> sharded;
  kvq::server::KvqServer* server_ptr = nullptr;  // set once started; read by the cache hook
  std::atomic<int64_t> rank0_pool_bytes{0};      // the engine's KV pool, once loaded (GPU shards)
  kvq::sharding::DeviceDataPlane* plane = nullptr;  // GPU shards: q, new k/v and partials
#if KVQ_HAVE_CUDA
  std::unique_ptr<kvq::sharding::GpuPlaneEndpoint> endpoint;
#endif
#ifdef KVQ_HAVE_MPI
  if (const char* n = std::getenv("OMPI_COMM_WORLD_SIZE"); n != nullptr && std::atoi(n) > 1) {
    const bool gpu = config->server.engine.device == "cuda";
    if (gpu && !absl::GetFlag(FLAGS_experimental_gpu_shards)) {
      // Refused up front, on every rank, rather than failing requests later.
      std::fprintf(stderr,
                   "kvqd: --device=cuda with %s ranks: spreading a sequence over GPUs is experimental (its NCCL "
                   "data plane has not yet run on a machine with one GPU per rank): pass "
                   "--experimental_gpu_shards, run one rank, or --device=cpu to shard over MPI on the CPU\n",
                   n);
      return 2;
    }
    if (gpu) {
#if KVQ_HAVE_CUDA
      // One GPU per rank on a node (ranks beyond the node's GPUs share them).
      if (absl::Status s = kvq::sharding::SelectDeviceForLocalRank(); !s.ok()) {
        std::fprintf(stderr, "kvqd: %s\n", std::string(s.message()).c_str());
        return 2;
      }
#else
      std::fprintf(stderr, "kvqd: --device=cuda: this build has no CUDA\n");
      return 2;
#endif
    }
    auto t = kvq::sharding::MpiTransport::Init(&argc, &argv);
    if (!t.ok()) {
      std::fprintf(stderr, "kvqd: MPI: %s\n", std::string(t.status().message()).c_str());
      return 1;
    }
    transport = std::move(*t);
    // A GPU rank has a core to itself: its waits poll every few microseconds instead of napping
    // (a worker napping between commands would add its nap to every layer's attention).
    if (gpu) transport->set_max_nap_us(kvq::sharding::kGpuRankMaxNapUs);
#if KVQ_HAVE_CUDA
    kvq::sharding::WorkerDevice* worker_device = nullptr;
    if (gpu) {
      // The data plane, made by every rank together: NCCL when each rank has a GPU of its own,
      // host staging through MPI otherwise (ranks sharing a GPU).
      auto ep = kvq::sharding::GpuPlaneEndpoint::Create(transport.get(), {});
      if (!ep.ok()) {
        std::fprintf(stderr, "kvqd: rank %d: data plane: %s\n", transport->rank(),
                     std::string(ep.status().message()).c_str());
        transport->Abort(1);
      }
      endpoint = std::move(*ep);
      plane = endpoint->plane();
      worker_device = endpoint->get();
      if (transport->rank() == 0) {
        std::fprintf(stderr, "kvqd: data plane between the ranks' GPUs: %s\n", endpoint->description().c_str());
      }
    }
#else
    kvq::sharding::WorkerDevice* worker_device = nullptr;
#endif
    if (transport->rank() > 0) {
      kvq::sharding::WorkerFactoryMaker maker;
#if KVQ_HAVE_CUDA
      if (gpu) {
        // GPU workers: each KV format's shards live in a block pool on this rank's GPU
        // (--kv_capacity_bytes per rank, or --gpu_memory_fraction of its free memory); q, new k/v
        // and partials come and go over the data plane above.
        kvq::sharding::GpuKvOptions po;
        po.capacity_bytes = config->server.engine.kv_capacity_bytes;
        po.memory_fraction = config->server.engine.gpu_memory_fraction;
        if (config->server.engine.key_outlier_reserve > 0) {
          po.key_outlier_reserve = config->server.engine.key_outlier_reserve;
        }
        maker = [po](const kvq::model::ModelConfig& c, const std::string& f, const std::string& q,
                     const std::string& fp) { return kvq::sharding::MakeGpuWorkerKvFactory(c, f, q, fp, po); };
      }
#endif
      const absl::Status s = kvq::sharding::ServeWorker(transport.get(), maker, worker_device);
      if (!s.ok()) {
        std::fprintf(stderr, "kvqd: rank %d: %s\n", transport->rank(), std::string(s.message()).c_str());
        transport->Abort(1);
      }
      (void)transport->Finalize();
      return 0;
    }
    // Rank 0: generations get caches spread over the ranks (sessions stay on rank 0). The
    // factory needs the model's shape, so it is made on first use, on the scheduler thread.
    kvq::engine::EngineOptions& eo = config->server.engine;
    const int ranks = transport->size();
    const std::string format = eo.kv_format, quantizer = eo.quantizer;
    const int64_t per_rank = eo.kv_capacity_bytes > 0 ? eo.kv_capacity_bytes : (int64_t{4} << 30);
    const double fraction = eo.gpu_memory_fraction;
    const bool capacity_given = eo.kv_capacity_bytes > 0;
    eo.make_generation_cache = [&transport, &sharded, &server_ptr, &rank0_pool_bytes, plane, ranks, format, quantizer,
                                per_rank, fraction, capacity_given, gpu](int64_t max_tokens) -> absl::StatusOr<std::unique_ptr<kvq::model::KvCache>> {
      if (!sharded) {
        const kvq::model::ModelConfig& mc = server_ptr->engine()->config();
        auto local = kvq::sharding::KvCacheFactory::Create(mc, format, quantizer, "");
        if (!local.ok()) return local.status();
        // On GPUs rank 0's own shards live in the engine's block pool (not owned here; the engine
        // outlives every cache it runs).
        std::shared_ptr<const kvq::sharding::KvCacheFactory> rank0;
        if (gpu) rank0 = std::shared_ptr<const kvq::sharding::KvCacheFactory>(&server_ptr->engine()->kv_factory(),
                                                                                [](const kvq::sharding::KvCacheFactory*) {});
        kvq::sharding::ShardPlannerOptions po;
        po.bytes_per_token = (*local)->BytesPerToken();
        po.min_tokens_per_rank = absl::GetFlag(FLAGS_min_tokens_per_rank);
        for (int r = 0; r < ranks; ++r) po.ranks.push_back({per_rank, 0});
        if (gpu) {
          // GPU pools: their blocks' bytes per token (key-outlier area included); rank 0's
          // capacity is the engine's pool; a worker's is --kv_capacity_bytes, or its share
          // (--gpu_memory_fraction) of a GPU like this one less a 2 GiB workspace (workers hold
          // no weights), the pool it makes from its free memory.
          po.bytes_per_token = server_ptr->engine()->kv_factory().BytesPerToken();
          // (Read by main once the engine has loaded: Stats() takes the scheduler's lock, which is
          // held while this hook runs.)
          if (rank0_pool_bytes.load() > 0) po.ranks[0].total_bytes = rank0_pool_bytes.load();
          int64_t worker = per_rank;
#if KVQ_HAVE_CUDA
          size_t free_b = 0, total_b = 0;
          if (!capacity_given && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
            worker = static_cast<int64_t>((static_cast<double>(total_b) - 2.0 * 1073741824.0) * fraction);
          }
#endif
          for (int r = 1; r < ranks; ++r) po.ranks[r].total_bytes = worker;
        }
        auto planner = kvq::sharding::ShardPlanner::Create(po);
        if (!planner.ok()) return planner.status();
        auto f = kvq::sharding::ShardedKvCacheFactory::Create(transport.get(), mc, format, quantizer,
                                                              "", std::move(*planner), rank0);
        if (!f.ok()) return f.status();
        sharded = std::move(*f);
        sharded->set_data_plane(plane);
      }
      return sharded->Make(max_tokens);
    };
  }
#endif

  absl::StatusOr<std::unique_ptr<kvq::server::KvqServer>> server = kvq::server::KvqServer::Start(config->server);
  if (!server.ok()) {
    std::fprintf(stderr, "kvqd: %s\n", std::string(server.status().message()).c_str());
    return 1;
  }
  server_ptr = server->get();
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
  rank0_pool_bytes.store((*server)->engine()->Stats().kv_bytes_capacity);
  std::printf("kvqd: serving %s (%s KV)\n", (*server)->engine()->config().name.c_str(),
              (*server)->engine()->kv_format().c_str());
  std::fflush(stdout);

  int sig = 0;
  sigwait(&signals, &sig);
  std::printf("kvqd: %s: draining\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  std::fflush(stdout);
  (*server)->Drain();
  if (transport) {
    server->reset();  // the engine and its sharded caches first, then the workers
    sharded.reset();
    const absl::Status s = kvq::sharding::ShutdownWorkers(transport.get());
    if (!s.ok()) {
      std::fprintf(stderr, "kvqd: shutting down ranks: %s\n", std::string(s.message()).c_str());
      transport->Abort(1);
    }
    (void)transport->Finalize();
  }
  std::printf("kvqd: drained; bye\n");
  return 0;
}
