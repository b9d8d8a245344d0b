// Host side of kernels/launch.cuh: the process-wide switch for programmatic dependent launch.
#pragma once

namespace kvq::kernels {

// Launches through internal::Launch (kernels/launch.cuh) carry the PDL attribute while on.
// Default off: measured slower in the engine's decode graphs (H200, 2026-12-01, same process,
// ms per token on vs off: SmolLM2 shape fp16 1K batch 1 1.31 vs 1.34, batch 8 1.81-1.85 vs
// 1.72-1.91, nuq3-1% batch 8 2.37-2.39 vs 2.28-2.29; Llama-3-8B shape fp16 batch 8 6.57-6.60 vs
// 6.37-6.40, nuq3-1% batch 8 7.53-7.66 vs 7.17-7.25). KVQ_PDL=1 in the environment sets it on at
// start-up. Devices before compute capability 9.0 ignore the attribute. Captured CUDA graphs keep
// the setting they were captured with (drop them after a change).
bool ProgrammaticLaunch();
void SetProgrammaticLaunch(bool on);

}  // namespace kvq::kernels
