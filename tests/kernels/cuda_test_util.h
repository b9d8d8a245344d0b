// Helpers for the CUDA kernel tests: device check, RAII device buffers, tolerance checks.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace kvq::testing {

inline bool HaveCudaDevice() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define KVQ_REQUIRE_CUDA_DEVICE()                                        \
  do {                                                                   \
    if (!::kvq::testing::HaveCudaDevice()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

#define KVQ_ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { Resize(n); }
  explicit DeviceBuffer(const std::vector<T>& h) { Upload(h); }
  ~DeviceBuffer() { if (ptr_) cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), n_(o.n_) { o.ptr_ = nullptr; o.n_ = 0; }

  void Resize(size_t n) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    n_ = n;
    if (n > 0 && cudaMalloc(&ptr_, n * sizeof(T)) != cudaSuccess) ptr_ = nullptr;
    if (ptr_) cudaMemset(ptr_, 0, n * sizeof(T));
  }
  void Upload(const std::vector<T>& h) {
    Resize(h.size());
    if (!h.empty()) cudaMemcpy(ptr_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  std::vector<T> Download() const {
    std::vector<T> h(n_);
    if (n_ > 0) cudaMemcpy(h.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Worst |a - b| over all elements, with its index; inf == inf and -inf == -inf count as 0.
struct WorstError {
  double err = 0.0;
  size_t index = 0;
};
inline WorstError MaxAbsError(const std::vector<float>& a, const std::vector<float>& b) {
  WorstError w;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    double e;
    if (std::isinf(a[i]) || std::isinf(b[i])) {
      e = (a[i] == b[i]) ? 0.0 : INFINITY;
    } else {
      e = std::fabs(static_cast<double>(a[i]) - b[i]);
      if (std::isnan(e)) e = INFINITY;
    }
    if (e > w.err || (i == 0 && e >= w.err)) { w.err = e; w.index = i; }
  }
  return w;
}

}  // namespace kvq::testing
