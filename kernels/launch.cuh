// Kernel launches with programmatic dependent launch (PDL, compute capability 9.0+).
//
// A kernel launched through internal::Launch while ProgrammaticLaunch() is on may start before
// the kernel ahead of it in the stream has finished: its CTAs are scheduled once every CTA of the
// previous kernel has called GridDependencyTrigger (or exited), and they wait in
// GridDependencyWait until that kernel has completed and its writes are visible. What this could
// overlap is the launch itself (grid set-up and CTA dispatch), the part of a short kernel's time
// that a CUDA graph does not remove: a decode step at short contexts is a chain of ~12 kernels per
// layer of a few microseconds each. Measured on the H200 it does not pay (kernels/launch.h), so
// it is off by default; the waits stay in the kernels (no-ops without the attribute) and the
// engine test checks that toggling it changes no bit.
//
// The contract for a kernel launched this way: GridDependencyWait() is its first statement, on
// every path, before any global memory access (read or write). Ending without waiting would let
// the kernel after it run before the one before it has finished (waits chain only through
// kernels that wait). GridDependencyTrigger() may follow right after it: the next kernel's CTAs
// then take free SM slots while this one runs (every CTA of this kernel is already resident by
// then, so they never displace it). Kernels that are not launched this way may call both: they
// are no-ops without the launch attribute.
//
// CUDA graphs: a launch captured with the attribute becomes a programmatic edge of the graph.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "kernels/launch.h"

namespace kvq::kernels {

__device__ __forceinline__ void GridDependencyWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void GridDependencyTrigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

namespace internal {

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when `programmatic`.
template <typename... KArgs, typename... Args>
cudaError_t LaunchWith(bool programmatic, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute while ProgrammaticLaunch().
template <typename... KArgs, typename... Args>
cudaError_t Launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  return LaunchWith(ProgrammaticLaunch(), kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace internal
}  // namespace kvq::kernels
