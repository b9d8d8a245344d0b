// Bit-exact packing of B-bit codes (B in 1..8, used with 2, 3, 4) into little-endian uint32 words.
// B = 2, 3: bit-sliced groups of 32 codes in B words, the layout of kernels/code_layout.h (what
// the GPU decode kernels read without per-code shifts). Other widths: an LSB-first bit stream:
// code i occupies bits [i*B, i*B + B) of the stream; stream bit k is bit k % 32 of word k / 32.
// Either way a group of 32 codes fills exactly B words, so nothing is wasted when the code count is
// a multiple of 32; otherwise the last word (stream) or group (sliced) is zero-padded.
#pragma once

#include <cstdint>

#include "kernels/code_layout.h"

namespace kvq::kvstore {

inline constexpr int64_t PackedWords(int64_t n_codes, int bits) {
  return kernels::SlicedCodes(bits) ? (n_codes + 31) / 32 * bits : (n_codes * bits + 31) / 32;
}

// Reads code i of an LSB-first stream of `bits`-bit codes, whatever the width (GetPackedCode for
// the widths stored that way; also what older serialized caches hold at 2 and 3 bits).
inline uint32_t GetStreamCode(const uint32_t* words, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const int64_t w = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  uint64_t window = words[w] >> shift;
  if (shift + bits > 32) window |= static_cast<uint64_t>(words[w + 1]) << (32 - shift);
  return static_cast<uint32_t>(window) & ((1u << bits) - 1u);
}

// Reads code i of packed codes.
inline uint32_t GetPackedCode(const uint32_t* words, int64_t i, int bits) {
  return kernels::SlicedCodes(bits) ? kernels::SlicedCode(words, i, bits) : GetStreamCode(words, i, bits);
}

// Overwrites code i (the other codes are untouched). code must be < 2^bits.
inline void SetPackedCode(uint32_t* words, int64_t i, int bits, uint32_t code) {
  if (kernels::SlicedCodes(bits)) {
    uint32_t* g = words + (i >> 5) * bits;
    const int j = static_cast<int>(i & 31);
    const int lo = kernels::SlicedLoShift(j);
    uint32_t& a = g[j >> 4];
    a = (a & ~(3u << lo)) | ((code & 3u) << lo);
    if (bits == 3) {
      const int hi = kernels::SlicedHiShift(j);
      g[2] = (g[2] & ~(1u << hi)) | (((code >> 2) & 1u) << hi);
    }
    return;
  }
  const int64_t bit = i * bits;
  const int64_t w = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  const uint64_t mask = ((1ull << bits) - 1ull) << shift;
  const uint64_t val = static_cast<uint64_t>(code) << shift;
  words[w] = static_cast<uint32_t>((words[w] & ~mask) | (val & mask));
  if (shift + bits > 32) {
    const uint32_t hi_mask = static_cast<uint32_t>(mask >> 32);
    words[w + 1] = (words[w + 1] & ~hi_mask) | (static_cast<uint32_t>(val >> 32) & hi_mask);
  }
}

// Packs n codes into PackedWords(n, bits) words (padding bits zero).
void PackCodes(const uint8_t* codes, int64_t n, int bits, uint32_t* words);
// Unpacks n codes.
void UnpackCodes(const uint32_t* words, int64_t n, int bits, uint8_t* codes);

}  // namespace kvq::kvstore
