#include "sharding/gpu/decode_graphs.h"

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"

namespace kvq::sharding {

absl::Status DecodeGraphs::Launch(const DecodeGraphKey& key, cudaStream_t stream,
                                  absl::FunctionRef<absl::Status()> enqueue) {
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    if (graphs_.size() >= kMax) Drop();
    KVQ_RETURN_IF_CUDA_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    const absl::Status st = enqueue();
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(stream, &g);
    if (!st.ok() || e != cudaSuccess) {
      if (g != nullptr) cudaGraphDestroy(g);
      return !st.ok() ? st : absl::InternalError(absl::StrCat("CUDA graph capture: ", cudaGetErrorString(e)));
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t ie = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);
    KVQ_RETURN_IF_CUDA_ERROR(ie);
    it = graphs_.emplace(key, exec).first;
  }
  KVQ_RETURN_IF_CUDA_ERROR(cudaGraphLaunch(it->second, stream));
  ++launches_;
  return absl::OkStatus();
}

void DecodeGraphs::Drop() {
  for (auto& [key, exec] : graphs_) cudaGraphExecDestroy(exec);
  graphs_.clear();
}

}  // namespace kvq::sharding
