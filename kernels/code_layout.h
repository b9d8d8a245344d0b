// Where the B-bit LUT codes of one token and KV head sit in its code words (kvstore/block_layout.h
// section 2): the one definition shared by the CPU codec (kvstore/bit_packing.h), the append
// kernels that write codes and every kernel that reads them. Host and device code.
//
// B = 2, 4: an LSB-first bit stream (code i at stream bits [i B, i B + B)).
// B = 3: bit-sliced groups of 32 codes, 3 words (A, B, C) per group:
//   A: the low two bits of codes 0-7 at nibble bits 0-1 (code j at bits 4j, 4j + 1) and of codes
//      8-15 at nibble bits 2-3 (code j at 4(j - 8) + 2, + 3);
//   B: the same for codes 16-31;
//   C: the high bits, code j at bit 4 (j % 8) + j / 8.
// So eight consecutive codes become the low three bits of eight nibbles with one or two shifts and
// two masks (Lut3Nibbles8), which are byte-permute (PRMT) selectors into a register LUT: the decode
// kernel needs no shared-memory table and no per-code shifts (H200, 2026-12-02, Llama-3-8B shape,
// 1M tokens: benchmarks/lut_core_bench's staged dense tile 850 -> 609 us; the decode kernel with
// nuq3-1% 1,279 -> 1,207 us per layer). 32 codes still fill exactly 3 words.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KVQ_CODE_HD __host__ __device__
#else
#define KVQ_CODE_HD
#endif

namespace kvq::kernels {

// B = 3, code j (0..31) of a group: low two bits at bit Lut3LoShift(j) of group word
// Lut3LoWord(j) (0 = A, 1 = B); high bit at bit Lut3HiShift(j) of word 2 (C).
KVQ_CODE_HD constexpr int Lut3LoWord(int j) { return j >> 4; }
KVQ_CODE_HD constexpr int Lut3LoShift(int j) { return 4 * (j & 7) + 2 * ((j >> 3) & 1); }
KVQ_CODE_HD constexpr int Lut3HiShift(int j) { return 4 * (j & 7) + (j >> 3); }

// Codes [8 m, 8 m + 8) of a 3-bit group (m = 0..3) from its words a, b, c: code 8 m + e in bits
// [4 e, 4 e + 3), bit 4 e + 3 clear.
KVQ_CODE_HD inline uint32_t Lut3Nibbles8(uint32_t a, uint32_t b, uint32_t c, int m) {
  switch (m & 3) {
    case 0: return (a & 0x33333333u) | ((c << 2) & 0x44444444u);
    case 1: return ((a >> 2) & 0x33333333u) | ((c << 1) & 0x44444444u);
    case 2: return (b & 0x33333333u) | (c & 0x44444444u);
    default: return ((b >> 2) & 0x33333333u) | ((c >> 1) & 0x44444444u);
  }
}

// Bits between consecutive codes in what the kernels' 8-code readers return: B for the
// LSB-first widths, a nibble for B = 3.
KVQ_CODE_HD constexpr int CodeStride(int bits) { return bits == 3 ? 4 : bits; }

}  // namespace kvq::kernels
