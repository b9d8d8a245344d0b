// LUT codes to fp16 by byte permutes, for the 2- and 3-bit (bit-sliced, kernels/code_layout.h)
// codecs: the 4- or 8-entry fp16 LUT held as four 32-bit "byte tables" (the low bytes of entries
// 0-3, of 4-7, then the high bytes of 0-3, of 4-7), so that the low nibbles of a selector word
// pick entries with two PRMT and two more interleave low and high bytes into half2 values — no
// shared-memory lookups. Used by the LUT decode-attention kernel (decode_attention_lut_mma.cuh) and
// its roofline probe (benchmarks/lut_core_bench.cu).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace kvq::kernels::lut_decode {

__device__ __forceinline__ uint32_t Prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}
// Four fp16 LUT values (two half2: codes 0,1 and 2,3) of the four codes (< 8) in the low nibbles
// of sel, from the byte tables t = {low bytes of entries 0-3, of 4-7, high bytes of 0-3, of 4-7}.
__device__ __forceinline__ void Decode4(const uint32_t (&t)[4], uint32_t sel, uint32_t& h01, uint32_t& h23) {
  const uint32_t lo = Prmt(t[0], t[1], sel), hi = Prmt(t[2], t[3], sel);
  h01 = Prmt(lo, hi, 0x5140u);
  h23 = Prmt(lo, hi, 0x7362u);
}
// Word w (0..3) of the byte tables (Decode4's t) of an n-entry LUT (n = 4 or 8), entries rounded
// to fp16; entries past n are 0.
__device__ __forceinline__ uint32_t LutByteTable(const float* lut, int n, int w) {
  uint32_t x = 0;
  for (int b = 0; b < 4; ++b) {
    const int e = 4 * (w & 1) + b;
    const uint32_t h = e < n ? __half_as_ushort(__float2half_rn(lut[e])) : 0u;
    x |= ((w < 2 ? h : h >> 8) & 0xffu) << (8 * b);
  }
  return x;
}
// The byte tables (Decode4's t) from shared memory, one broadcast 16-byte load.
__device__ __forceinline__ void LoadByteTable(const uint32_t* table_s, uint32_t (&t)[4]) {
  const uint4 x = *reinterpret_cast<const uint4*>(table_s);
  t[0] = x.x, t[1] = x.y, t[2] = x.z, t[3] = x.w;
}
// Eight LUT values of the 8 codes in `nibbles` (Codes8 at 2 or 3 bits) as four half2, channel order.
__device__ __forceinline__ void Decode8(const uint32_t (&t)[4], uint32_t nibbles, uint32_t (&w)[4]) {
  Decode4(t, nibbles, w[0], w[1]);
  Decode4(t, nibbles >> 16, w[2], w[3]);
}

}  // namespace kvq::kernels::lut_decode
