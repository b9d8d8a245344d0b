// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a
// counter-based generator, identical on host and device, so sampling is reproducible from
// (seed, step) alone and the CPU reference draws exactly the GPU's numbers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KVQ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KVQ_HOST_DEVICE inline
#endif

namespace kvq::kernels {

struct Philox4 {
  uint32_t x[4];
};

KVQ_HOST_DEVICE void PhiloxMulHiLo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

KVQ_HOST_DEVICE Philox4 Philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    PhiloxMulHiLo(kM0, ctr.x[0], &hi0, &lo0);
    PhiloxMulHiLo(kM1, ctr.x[2], &hi1, &lo1);
    ctr = Philox4{{hi1 ^ ctr.x[1] ^ k0, lo1, hi0 ^ ctr.x[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// The uniform in [0, 1) (24 random bits, exact in fp32) used to sample step `step` of a
// sequence seeded with `seed`.
KVQ_HOST_DEVICE float SamplingUniform(uint64_t seed, uint64_t step) {
  const Philox4 r = Philox4x32_10(
      Philox4{{static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), 0x6b7671u, 0u}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return static_cast<float>(r.x[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace kvq::kernels
