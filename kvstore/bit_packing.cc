#include "kvstore/bit_packing.h"

namespace kvq::kvstore {

void PackCodes(const uint8_t* codes, int64_t n, int bits, uint32_t* words) {
  const int64_t n_words = PackedWords(n, bits);
  if (kernels::SlicedCodes(bits)) {
    for (int64_t w = 0; w < n_words; ++w) words[w] = 0u;
    for (int64_t i = 0; i < n; ++i) SetPackedCode(words, i, bits, codes[i]);
    return;
  }
  uint64_t acc = 0;  // pending bits, LSB first
  int acc_bits = 0;
  int64_t w = 0;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t i = 0; i < n; ++i) {
    acc |= static_cast<uint64_t>(codes[i] & mask) << acc_bits;
    acc_bits += bits;
    if (acc_bits >= 32) {
      words[w++] = static_cast<uint32_t>(acc);
      acc >>= 32;
      acc_bits -= 32;
    }
  }
  if (w < n_words) words[w++] = static_cast<uint32_t>(acc);
}

void UnpackCodes(const uint32_t* words, int64_t n, int bits, uint8_t* codes) {
  for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<uint8_t>(GetPackedCode(words, i, bits));
}

}  // namespace kvq::kvstore
