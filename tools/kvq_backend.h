// The compute backend of a `kvq` command (--device cpu|cuda): the forward pass and the KV cache
// factory, CPU reference or GPU engine, chosen by flags shared by generate, eval-ppl and passkey.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/forward.h"
#include "model/weights.h"
#include "sharding/kv_cache_factory.h"

namespace kvq::tools {

struct Backend {
  std::unique_ptr<model::ForwardPass> forward;
  std::unique_ptr<sharding::KvCacheFactory> factory;
  std::shared_ptr<void> device_state;  // the GPU pool and stream (released after the caches)
  std::string description;
  ~Backend() {
    factory.reset();
    forward.reset();
    device_state.reset();
  }
};

// From --device, --weights_dtype, --kv_format, --quantizer, --kv_capacity_gb.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const model::LlamaWeights& weights);

}  // namespace kvq::tools
