// Where the B-bit LUT codes of one token and KV head sit in its code words (kvstore/block_layout.h
// section 2): the one definition shared by the CPU codec (kvstore/bit_packing.h), the append
// kernels that write codes and every kernel that reads them. Host and device code.
//
// B = 2, 3 ("sliced"): groups of 32 codes in B words each (group g at words [g B, g B + B)):
//   word 0: the low two bits of codes 0-7 at nibble bits 0-1 (code j at bits 4j, 4j + 1) and of
//           codes 8-15 at nibble bits 2-3 (code j at 4(j - 8) + 2, + 3);
//   word 1: the same for codes 16-31;
//   word 2 (B = 3): the high bits, code j at bit 4 (j % 8) + j / 8.
// So eight consecutive codes become the low bits of eight nibbles with one or two shifts and masks
// (SlicedNibbles8): byte-permute (PRMT) selectors into a register LUT, so the decode kernel needs
// no shared-memory table and no per-code shifts (H200, 2026-12-02, Llama-3-8B shape, 1M tokens:
// benchmarks/lut_core_bench's staged dense tile 850 -> 609 us at 3 bits; the decode kernel with
// nuq3-1% 1,279 -> 1,207 us per layer). 32 codes still fill exactly B words.
// B = 4 (and any other width): an LSB-first bit stream (code i at stream bits [i B, i B + B)).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KVQ_CODE_HD __host__ __device__
#else
#define KVQ_CODE_HD
#endif

namespace kvq::kernels {

KVQ_CODE_HD constexpr bool SlicedCodes(int bits) { return bits == 2 || bits == 3; }

// Bits between consecutive codes in what the kernels' 8-code readers return: a nibble for the
// sliced widths, B for the LSB-first ones.
KVQ_CODE_HD constexpr int CodeStride(int bits) { return SlicedCodes(bits) ? 4 : bits; }

// Sliced widths, code j (0..31) of a group: its low two bits at bit SlicedLoShift(j) of group word
// j / 16; at 3 bits its high bit at bit SlicedHiShift(j) of group word 2.
KVQ_CODE_HD constexpr int SlicedLoShift(int j) { return 4 * (j & 7) + 2 * ((j >> 3) & 1); }
KVQ_CODE_HD constexpr int SlicedHiShift(int j) { return 4 * (j & 7) + (j >> 3); }

// Codes [8 m, 8 m + 8) (m = 0..3) of a sliced group from its words w0, w1 (and w2 at 3 bits):
// code 8 m + e in bits [4 e, 4 e + bits), the other nibble bits clear.
KVQ_CODE_HD inline uint32_t SlicedNibbles8(uint32_t w0, uint32_t w1, uint32_t w2, int bits, int m) {
  const uint32_t lo = (((m & 2) ? w1 : w0) >> (2 * (m & 1))) & 0x33333333u;
  if (bits != 3) return lo;
  switch (m & 3) {
    case 0: return lo | ((w2 << 2) & 0x44444444u);
    case 1: return lo | ((w2 << 1) & 0x44444444u);
    case 2: return lo | (w2 & 0x44444444u);
    default: return lo | ((w2 >> 1) & 0x44444444u);
  }
}

// Code i of a token's sliced code words.
KVQ_CODE_HD inline uint32_t SlicedCode(const uint32_t* words, int64_t i, int bits) {
  const uint32_t* grp = words + (i >> 5) * bits;
  const int j = static_cast<int>(i & 31);
  uint32_t code = (grp[j >> 4] >> SlicedLoShift(j)) & 3u;
  if (bits == 3) code |= ((grp[2] >> SlicedHiShift(j)) & 1u) << 2;
  return code;
}

}  // namespace kvq::kernels
