// What the two sources of sharded_mpi_test share (sharded_mpi_main.cc: main, the worker ranks and
// the tests on CPU ranks; sharded_mpi_gpu.cc: the tests of GPU shards): the job's transport and
// mode, the small model shape and shard layouts of the tests, and the greedy-generation helpers.
// Defined in sharded_mpi_main.cc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/config.h"
#include "sharding/device_data_plane.h"
#include "sharding/engine.h"
#include "sharding/kv_cache_factory.h"
#include "sharding/mpi_transport.h"
#include "sharding/shard_planner.h"

namespace kvq::sharding::mpi_test {

extern MpiTransport* g_transport;
// KVQ_SHARDED_GPU=1: every rank's shards live in a GPU block pool (workers through
// MakeGpuWorkerKvFactory, rank 0 in its engine's pool) and only the GPU tests run.
extern bool g_gpu_mode;
// GPU mode: the sharded caches' device data plane (rank 0's end), made by every rank at start-up.
extern DeviceDataPlane* g_plane;
// KVQ_KEY_OUTLIER_RESERVE (GPU mode): the GPU pools' key-outlier reserve (0: default).
extern double g_key_outlier_reserve;

// SmolLM2's shape with two layers (the attention math per layer is what is tested).
model::ModelConfig SmallConfig();
ShardPlanner Planner(const KvCacheFactory& f, int ranks, int64_t block_tokens, int64_t min_tokens);
// Ranges that cut at odd places: rank r starts at 37 + 61 * (r - 1).
std::vector<ShardRange> OddRanges(int ranks);

// Greedy generations of `texts` (chat-templated, all enqueued before the first finishes, so they
// batch), prompt i with max_tokens(i) tokens.
std::vector<std::vector<int32_t>> GenerateAll(engine::Engine& e, const std::vector<std::string>& texts,
                                              const std::function<int(int)>& max_tokens);
// One rank's greedy tokens against several ranks' (see the definition for the quantized bound).
void ExpectSameGreedy(const std::vector<std::vector<int32_t>>& one, const std::vector<std::vector<int32_t>>& many,
                      const std::string& format, const char* tag, size_t min_prefix = 6);

}  // namespace kvq::sharding::mpi_test
