// Quantize-append kernels (kv_append.h). The arithmetic is block_layout.h section 4, exactly as
// kvstore/quantized_kv_cache.cc does it (fp32, IEEE division via __fdiv_rn, fmaf, RNE fp16):
//
// Keys (KeyAppendKernel, grid = (kv head, sequence), one thread per channel, tokens in order so
// that outlier entries stay sorted by (token, channel)):
//   per-channel formats: x_n = (x - zp_c) / r_c; outlier iff |x_n| > 1 (entry token | c << 8 |
//   fp16(x) << 16, appended after the head's existing entries, channel order via a ballot scan);
//   code = #{ j : clamp(x_n, -1, 1) > mid_j } (ties to the lower centroid); codes are packed as
//   kernels/code_layout.h says (2 and 3 bits bit-sliced, 4 bits a stream) and written as whole words.
//   (Post-RoPE formats would rotate x first; not implemented, the launcher rejects them.)
// Values (ValueAppendKernel, grid = (token, sequence), 256 threads over the L = n_kv * head_dim
// elements of the token):
//   the k_v outliers are the k_lo = k/2 smallest and k_hi = k - k_lo largest elements in the
//   order (value, index), found by max(k_lo, k_hi) rounds of a block-wide min/max over 64-bit
//   keys (ordered float bits << 32 | index); lower/upper are the min/max of the rest;
//   zp = fp16(0.5f (upper + lower)), r = max(fp16(0.5f (upper - lower)), 2^-14) (then fp16);
//   outliers are written in ascending index order (block scan), codes as for keys with (zp, r).
// Sink tokens (local index < sink capacity) are written as fp16 to the sink buffer instead.
// fp16 codec: plain halves. Not supported: int per-token formats (per-token key scaling).
#include "kernels/kv_append.h"

#include <cuda_fp16.h>

#include <atomic>

#include "absl/strings/str_cat.h"
#include "kernels/code_layout.h"
#include "kernels/cuda_check.h"
#include "kernels/launch.cuh"

namespace kvq::kernels {
namespace {

// Floats between consecutive tokens' rows of p.k / p.v (KvAppendParams::kv_row_stride).
__device__ __forceinline__ int64_t RowStride(const KvAppendParams& p) {
  return p.kv_row_stride > 0 ? p.kv_row_stride : static_cast<int64_t>(p.kv.geom.n_kv_heads) * p.kv.geom.head_dim;
}

constexpr int kValueThreads = 256;
constexpr int kKeyThreads = 256;  // one thread per token of a block segment
static_assert(kKeyThreads >= kKvBlockTokens, "KeyAppendKernel: one thread per token of a block");
constexpr int kMaxValueElems = 8192;  // n_kv_heads * head_dim per layer (smem: 32 KiB of floats)
constexpr float kMinTokenRange = 6.103515625e-05f;

__device__ __forceinline__ int SinkCapacity(const PagedKvCache& kv, int b) {
  const int64_t fp = kv.first_positions[b];
  return static_cast<int>(min(max(static_cast<int64_t>(kv.sink_tokens) - fp, int64_t{0}),
                              static_cast<int64_t>(kv.sink_tokens)));
}

__device__ __forceinline__ uint32_t EncodeNearest(float xn, const float* mids, int n_mids) {
  const float x = fminf(fmaxf(xn, -1.0f), 1.0f);
  uint32_t code = 0;
  for (int j = 0; j < n_mids; ++j) code += x > mids[j] ? 1u : 0u;
  return code;
}

// ORs `code` (bits wide) at code index i of a token's code words in shared memory.
__device__ __forceinline__ void OrCode(uint32_t* words, int i, int bits, uint32_t code) {
  if (SlicedCodes(bits)) {
    uint32_t* grp = words + (i >> 5) * bits;
    const int j = i & 31;
    atomicOr(&grp[j >> 4], (code & 3u) << SlicedLoShift(j));
    if (bits == 3) atomicOr(&grp[2], ((code >> 2) & 1u) << SlicedHiShift(j));
    return;
  }
  const int bit = i * bits, w = bit >> 5, sh = bit & 31;
  atomicOr(&words[w], code << sh);
  if (sh + bits > 32) atomicOr(&words[w + 1], code >> (32 - sh));
}

__device__ __forceinline__ uint32_t OrderedBits(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint16_t HalfBitsOf(float x) {
  return __half_as_ushort(__float2half_rn(x));
}

// Where local token i of sequence b lives: block base and slot (i >= sink capacity).
__device__ __forceinline__ uint8_t* TokenBlock(const KvAppendParams& p, int b, int64_t i,
                                               int n_sink_cap, int* t) {
  const int64_t j = i - n_sink_cap;
  *t = static_cast<int>(j % kKvBlockTokens);
  const int32_t blk =
      p.kv.block_table[p.kv.TableRow(b) + j / kKvBlockTokens];
  return p.pool + static_cast<int64_t>(blk) * p.kv.block_stride_bytes;
}

// Takes `want` words from the block's bump area (header word 0); when that no longer fits, a
// quarter of the room beyond `need` that want asked for (at least 4 words, so that the next token
// does not move the list again), then `need` alone. Returns the first word or ~0u when not even
// `need` fits.
__device__ __forceinline__ uint32_t TakeKeyWords(uint32_t* var, uint32_t end_words, uint32_t need, uint32_t* want) {
  uint32_t old = *reinterpret_cast<volatile uint32_t*>(var);
  const uint32_t some = need + max(4u, (*want - need) / 4u);
  while (true) {
    uint32_t take = old + *want <= end_words ? *want : (old + some <= end_words ? some : need);
    if (old + take > end_words) return ~0u;
    const uint32_t seen = atomicCAS(var, old, old + take);
    if (seen == old) {
      *want = take;
      return old;
    }
    old = seen;
  }
}

// Word w of a token's key codes from its per-channel codes (KeyAppendDecodeKernel); fp16 keys:
// two halves per word.
__device__ __forceinline__ uint32_t KeyCodeWord(const uint16_t* codes, int w, int bits, int D, bool quant) {
  if (!quant) return static_cast<uint32_t>(codes[2 * w]) | (static_cast<uint32_t>(codes[2 * w + 1]) << 16);
  uint32_t word = 0;
  if (SlicedCodes(bits)) {  // word w % bits of group w / bits
    const uint16_t* grp = codes + (w / bits) * 32;
    if (w % bits < 2) {
      const int j0 = (w % bits) * 16;
      for (int j = j0; j < j0 + 16; ++j) word |= (static_cast<uint32_t>(grp[j]) & 3u) << SlicedLoShift(j);
    } else {
      for (int j = 0; j < 32; ++j) word |= ((static_cast<uint32_t>(grp[j]) >> 2) & 1u) << SlicedHiShift(j);
    }
    return word;
  }
  const int c_lo = (32 * w) / bits, c_hi = min(D, (32 * w + 32 + bits - 1) / bits);
  for (int c = c_lo; c < c_hi; ++c) {
    const uint32_t code = codes[c];
    const int sh = c * bits - 32 * w;
    word |= sh >= 0 ? code << sh : code >> -sh;
  }
  return word;
}

// Where `total` new key-outlier entries of head h, from tokens [t0, t0 + n_tok) of a block, go
// (one thread per list): after the list's `count` entries at `first`; a growable list that is out
// of room first moves to a new region of the block's area (moved: its old entries, at
// moved_from, must be copied there); fits = 0 when there is no room.
struct KeyListSlot {
  uint32_t first, count, moved_from;
  int fits, moved;
};
__device__ KeyListSlot ReserveKeyOutliers(const KvAppendParams& p, uint8_t* block, const uint32_t* dir, int h, int t0,
                                          int n_tok, int total) {
  const KvBlockGeometry& g = p.kv.geom;
  KeyListSlot r{dir[0], dir[1], 0u, 1, 0};
  const uint32_t need = r.count + static_cast<uint32_t>(total);
  if (p.kv.key_outlier_header_words <= 0) {  // fixed reservations
    r.fits = need <= static_cast<uint32_t>(p.kv.key_outlier_capacity);
  } else if (total > 0) {
    uint32_t* var = reinterpret_cast<uint32_t*>(block + g.fixed_bytes);
    uint32_t* cap_w = var + 1 + (p.layer * g.n_kv_heads + h);
    if (need > *cap_w) {
      uint32_t want = PagedKvCache::KeyOutlierListWant(need, t0 + n_tok, kKvBlockTokens - t0 - n_tok,
                                                       p.kv.key_outlier_capacity);
      const uint32_t end_words = static_cast<uint32_t>((p.kv.block_stride_bytes - g.fixed_bytes) / 4);
      const uint32_t at = TakeKeyWords(var, end_words, need, &want);
      if (at != ~0u) {
        r.moved_from = r.first;
        r.first = at;
        *cap_w = want;
        r.moved = r.count > 0;
      } else {
        r.fits = 0;
      }
    }
  }
  return r;
}

// One CTA per (kv head, sequence, block segment): the new tokens of that sequence that fall in
// one block (CTA 0 also takes the sink tokens), one thread per token (a block has kKvBlockTokens
// <= kKeyThreads slots). Each thread quantizes its token's channels in order, packing the codes
// into whole words as it goes (a 64-bit accumulator for LSB-first widths, `bits` words per 32 channels for sliced ones) and
// keeping a bit mask of its outlier channels; a block-wide scan of the outlier counts gives every
// token its place in the list, which grows at most once (thread 0, from the block's area); then
// each thread writes its entries in channel order (re-reading only the outlier values), so the
// list stays sorted by (token, channel). (The kernel before 2026-12-02 staged 16-token tiles
// with three barriers each and counted and wrote outliers with one thread per token looping over
// the staged channels, twice over the segment: 168 us per layer for a 2,048-token SmolLM2 chunk
// at nuq3-1% on the H200, more than the chunk's attention and GEMMs together.)
constexpr int kKeyMaskWords = 8;  // head_dim <= 256, a multiple of 32 (LaunchKvAppend checks)

__global__ void __launch_bounds__(kKeyThreads) KeyAppendKernel(const KvAppendParams p) {
  GridDependencyWait();
  GridDependencyTrigger();
  const KvBlockGeometry& g = p.kv.geom;
  const int h = blockIdx.x, b = blockIdx.y, seg = blockIdx.z, tid = threadIdx.x;
  const int D = g.head_dim, H = g.n_kv_heads;
  const int bits = g.bits;
  const bool quant = p.kv.codec != KvCodec::kFp16;
  const bool outliers = quant && g.has_key_outliers;
  __shared__ float mids_s[15];
  __shared__ float zp_s[256], r_s[256];
  __shared__ int warp_s[kKeyThreads / 32];
  __shared__ uint32_t mask_s[kKeyMaskWords][kKeyThreads];  // per thread, its outlier channels
  __shared__ uint32_t first_s, count_s, moved_from_s;
  __shared__ int fits_s, moved_s, total_s;
  const int n_sink_cap = SinkCapacity(p.kv, b);
  const int64_t base = p.kv.seq_lens[b];
  // New tokens [j_sink, n_new) are block tokens; block of token j: (base + j - cap) / 256.
  const int j_sink = static_cast<int>(min(static_cast<int64_t>(p.n_new), max(int64_t{0}, n_sink_cap - base)));
  if (seg == 0) {  // sink tokens (fp16, pre-RoPE)
    const int64_t L = static_cast<int64_t>(H) * D;
    for (int j = 0; j < j_sink; ++j) {
      const float* x = p.k + (static_cast<int64_t>(b) * p.n_new + j) * RowStride(p) + static_cast<int64_t>(h) * D;
      for (int c = tid; c < D; c += blockDim.x) {
        p.sink[b][(static_cast<int64_t>(p.layer) * n_sink_cap + base + j) * L + h * D + c] = HalfBitsOf(x[c]);
      }
    }
  }
  if (j_sink >= p.n_new) return;
  const int64_t blk = (base + j_sink - n_sink_cap) / kKvBlockTokens + seg;
  const int64_t j_lo = max(static_cast<int64_t>(j_sink), blk * kKvBlockTokens + n_sink_cap - base);
  const int64_t j_hi = min(static_cast<int64_t>(p.n_new), (blk + 1) * kKvBlockTokens + n_sink_cap - base);
  if (j_lo >= j_hi) return;  // uniform over the CTA
  const int n_tok = static_cast<int>(j_hi - j_lo);
  const int t0 = static_cast<int>((base + j_lo - n_sink_cap) % kKvBlockTokens);
  uint8_t* block = p.pool + static_cast<int64_t>(p.kv.block_table[p.kv.TableRow(b) + blk]) * p.kv.block_stride_bytes;
  uint8_t* lbase = block + static_cast<int64_t>(p.layer) * g.layer_bytes;
  const int W = g.key_words_per_token;
  const int n_mids = (1 << min(bits, 4)) - 1;
  if (quant) {
    if (tid < n_mids) {
      const float* lut = p.kv.key_lut + p.layer * (n_mids + 1);
      mids_s[tid] = 0.5f * (lut[tid] + lut[tid + 1]);
    }
    const int64_t at = (static_cast<int64_t>(p.layer) * H + h) * D;
    for (int c = tid; c < D; c += blockDim.x) {
      zp_s[c] = p.kv.key_zero_point[at + c];
      r_s[c] = p.kv.key_range[at + c];
    }
  }
  __syncthreads();
  // Thread tid: token j_lo + tid, block slot t0 + tid.
  const bool mine_ok = tid < n_tok;
  const float* x = p.k + (static_cast<int64_t>(b) * p.n_new + j_lo + tid) * RowStride(p) + static_cast<int64_t>(h) * D;
  const int t = t0 + tid;
  uint32_t* words = reinterpret_cast<uint32_t*>(lbase + g.key_codes_offset) + (static_cast<int64_t>(h) * kKvBlockTokens + t) * W;
  int n_out = 0;
  if (mine_ok) {
    const int code_bits = quant ? bits : 16;
    const bool sliced = quant && SlicedCodes(bits);  // a group of 32 codes per round: `bits` words
    uint64_t acc = 0;
    int nbits = 0, w = 0;
    const bool vec = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
    // 32 channels per round, the round not unrolled: an unrolled body of head_dim IEEE divisions
    // and encodes overflowed the instruction cache (H200, Llama-3-8B 2,048-token chunk: 144 us).
#pragma unroll 1
    for (int m = 0; m < D / 32; ++m) {
      float xs[32];
      uint32_t mk = 0;  // 32 channels' loads in flight before any is used
      if (vec) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float4 v = __ldg(reinterpret_cast<const float4*>(x + 32 * m) + i);
          xs[4 * i] = v.x;
          xs[4 * i + 1] = v.y;
          xs[4 * i + 2] = v.z;
          xs[4 * i + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 32; ++i) xs[i] = __ldg(x + 32 * m + i);
      }
      uint32_t grp[3] = {0u, 0u, 0u};  // sliced: the round's group words
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int c = 32 * m + i;
        uint32_t code;
        if (quant) {
          const float xn = __fdiv_rn(xs[i] - zp_s[c], r_s[c]);
          code = EncodeNearest(xn, mids_s, n_mids);
          if (outliers && fabsf(xn) > 1.0f) mk |= 1u << i;
        } else {
          code = HalfBitsOf(xs[i]);
        }
        if (sliced) {
          grp[i >> 4] |= (code & 3u) << SlicedLoShift(i);
          grp[2] |= ((code >> 2) & 1u) << SlicedHiShift(i);
          continue;
        }
        acc |= static_cast<uint64_t>(code) << nbits;
        nbits += code_bits;
        if (nbits >= 32) {
          words[w++] = static_cast<uint32_t>(acc);
          acc >>= 32;
          nbits -= 32;
        }
      }
      if (sliced) {
        words[w] = grp[0];
        words[w + 1] = grp[1];
        if (bits == 3) words[w + 2] = grp[2];
        w += bits;
      }
      mask_s[m][tid] = mk;
      n_out += __popc(mk);
    }
    if (nbits > 0) words[w++] = static_cast<uint32_t>(acc);
    for (; w < W; ++w) words[w] = 0u;
  }
  if (!outliers) return;  // uniform
  // Exclusive offsets of the tokens' entries: a block-wide scan of the counts.
  const int lane = tid & 31, wid = tid >> 5;
  int incl = n_out;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += v;
  }
  if (lane == 31) warp_s[wid] = incl;
  __syncthreads();
  int before = incl - n_out, total = 0;
  for (int i = 0; i < kKeyThreads / 32; ++i) {
    if (i < wid) before += warp_s[i];
    total += warp_s[i];
  }
  uint32_t* dir = reinterpret_cast<uint32_t*>(lbase + g.key_outlier_dir_offset) + 2 * h;
  uint32_t* var = reinterpret_cast<uint32_t*>(block + g.fixed_bytes);
  if (tid == 0) {
    const KeyListSlot slot = ReserveKeyOutliers(p, block, dir, h, t0, n_tok, total);
    first_s = slot.first;
    count_s = slot.count;
    moved_from_s = slot.moved_from;
    fits_s = slot.fits;
    moved_s = slot.moved;
    total_s = total;
  }
  __syncthreads();
  if (total_s == 0) return;
  if (!fits_s) {
    if (tid == 0 && p.overflow != nullptr) *p.overflow = 1;
    return;
  }
  if (moved_s) {  // the list moves to its new region (one writer per list)
    for (uint32_t e = tid; e < count_s; e += blockDim.x) var[first_s + e] = var[moved_from_s + e];
  }
  if (n_out > 0) {  // this token's entries, in channel order
    uint32_t* out = var + first_s + count_s + before;
    int k = 0;
    for (int m = 0; m < D / 32; ++m) {
      uint32_t bitsm = mask_s[m][tid];
      while (bitsm != 0u) {
        const int i = __ffs(bitsm) - 1;
        bitsm &= bitsm - 1u;
        const int c = 32 * m + i;
        out[k++] = static_cast<uint32_t>(t & 0xff) | (static_cast<uint32_t>(c) << 8) |
                   (static_cast<uint32_t>(HalfBitsOf(x[c])) << 16);
      }
    }
  }
  __syncthreads();
  if (tid == 0) {  // every entry (and a moved list) is written: publish
    dir[0] = first_s;
    dir[1] = count_s + static_cast<uint32_t>(total_s);
  }
}

// Decode steps (one new token per sequence): one warp per (kv head, sequence), the same bytes as
// KeyAppendKernel without its CTA-wide scan and barriers (H200, ncu, nuq3-1% decode: SmolLM2
// 9.0 -> 6.4 us, Llama-3-8B 10.8 -> 8.3 us; what is left is the chain of dependent loads: length,
// block table, list directory, bump pointer). Lane l holds channels l, l + 32, ...; codes are
// packed through the warp's shared row, outliers ranked in channel order by ballots.
constexpr int kKeyDecodeWarps = 4;

__global__ void __launch_bounds__(kKeyDecodeWarps * 32) KeyAppendDecodeKernel(const KvAppendParams p) {
  GridDependencyWait();
  GridDependencyTrigger();
  const KvBlockGeometry& g = p.kv.geom;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int H = g.n_kv_heads, D = g.head_dim;
  const int task = blockIdx.x * kKeyDecodeWarps + warp;
  if (task >= H * p.batch) return;  // whole warps
  const int h = task % H, b = task / H;
  const int bits = g.bits;
  const bool quant = p.kv.codec != KvCodec::kFp16;
  const bool outliers = quant && g.has_key_outliers;
  __shared__ uint16_t code_s[kKeyDecodeWarps][256];
  uint16_t* codes = code_s[warp];
  const int n_sink_cap = SinkCapacity(p.kv, b);
  const int64_t i = p.kv.seq_lens[b];  // the new token's local index
  const float* x = p.k + static_cast<int64_t>(b) * RowStride(p) + static_cast<int64_t>(h) * D;
  const int nq = D / 32;  // channels per lane
  if (i < n_sink_cap) {  // a sink token (fp16, pre-RoPE)
    const int64_t L = static_cast<int64_t>(H) * D;
    for (int c = lane; c < D; c += 32) p.sink[b][(static_cast<int64_t>(p.layer) * n_sink_cap + i) * L + h * D + c] = HalfBitsOf(x[c]);
    return;
  }
  int t0;
  uint8_t* block = TokenBlock(p, b, i, n_sink_cap, &t0);
  uint8_t* lbase = block + static_cast<int64_t>(p.layer) * g.layer_bytes;
  const int W = g.key_words_per_token;
  uint32_t* code_words = reinterpret_cast<uint32_t*>(lbase + g.key_codes_offset +
                                                     (static_cast<int64_t>(h) * kKvBlockTokens + t0) * W * 4);
  float xv[8];
  uint32_t out_mask[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) xv[q] = q < nq ? x[lane + 32 * q] : 0.0f;
  if (!quant) {
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if (q < nq) codes[lane + 32 * q] = HalfBitsOf(xv[q]);
    }
    __syncwarp();
    for (int w = lane; w < W; w += 32) code_words[w] = KeyCodeWord(codes, w, bits, D, false);
    return;
  }
  const int n_mids = (1 << min(bits, 4)) - 1;
  float mid = 0.0f;
  if (lane < n_mids) {
    const float* lut = p.kv.key_lut + p.layer * (n_mids + 1);
    mid = 0.5f * (lut[lane] + lut[lane + 1]);
  }
  const int64_t at = (static_cast<int64_t>(p.layer) * H + h) * D;
  int total = 0;
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    out_mask[q] = 0u;
    if (q >= nq) continue;  // uniform
    const int c = lane + 32 * q;
    const float xn = __fdiv_rn(xv[q] - p.kv.key_zero_point[at + c], p.kv.key_range[at + c]);
    const float xc = fminf(fmaxf(xn, -1.0f), 1.0f);
    uint32_t code = 0;
    for (int j = 0; j < n_mids; ++j) code += xc > __shfl_sync(0xffffffffu, mid, j) ? 1u : 0u;
    codes[c] = static_cast<uint16_t>(code);
    out_mask[q] = __ballot_sync(0xffffffffu, outliers && fabsf(xn) > 1.0f);
    total += __popc(out_mask[q]);
  }
  __syncwarp();
  for (int w = lane; w < W; w += 32) code_words[w] = KeyCodeWord(codes, w, bits, D, true);
  if (total == 0) return;  // uniform over the warp
  // The head's list: room for `total` more entries (KeyAppendKernel's rule with one token).
  uint32_t* dir = reinterpret_cast<uint32_t*>(lbase + g.key_outlier_dir_offset) + 2 * h;
  uint32_t* var = reinterpret_cast<uint32_t*>(block + g.fixed_bytes);
  KeyListSlot slot{};
  if (lane == 0) slot = ReserveKeyOutliers(p, block, dir, h, t0, 1, total);
  const uint32_t first = __shfl_sync(0xffffffffu, slot.first, 0);
  const uint32_t count = __shfl_sync(0xffffffffu, slot.count, 0);
  const uint32_t moved_from = __shfl_sync(0xffffffffu, slot.moved_from, 0);
  const int fits = __shfl_sync(0xffffffffu, slot.fits, 0);
  const int moved = __shfl_sync(0xffffffffu, slot.moved, 0);
  if (!fits) {
    if (lane == 0 && p.overflow != nullptr) *p.overflow = 1;
    return;
  }
  if (moved) {
    for (uint32_t e = lane; e < count; e += 32) var[first + e] = var[moved_from + e];
  }
  int rank = 0;
  const uint32_t below = (1u << lane) - 1u;
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    if (out_mask[q] >> lane & 1u) {
      const int c = lane + 32 * q;
      var[first + count + rank + __popc(out_mask[q] & below)] =
          static_cast<uint32_t>(t0 & 0xff) | (static_cast<uint32_t>(c) << 8) | (static_cast<uint32_t>(HalfBitsOf(xv[q])) << 16);
    }
    rank += __popc(out_mask[q]);
  }
  __syncwarp();
  if (lane == 0) {  // every entry (and a moved list) is written: publish
    __threadfence_block();
    dir[0] = first;
    dir[1] = count + static_cast<uint32_t>(total);
  }
}

// One CTA per block: rewrites the block's key-outlier lists contiguously (list order) with room
// for the rest of the block, from a scratch copy; full blocks get exactly their entries.
__global__ void CompactKeyOutliersKernel(const CompactKeyOutliersParams p) {
  const int lists = p.n_layers * p.n_kv_heads;
  const int32_t id = p.ids[blockIdx.x];
  const int filled = p.filled[blockIdx.x];
  uint8_t* blk = p.pool + static_cast<int64_t>(id) * p.block_stride_bytes;
  uint32_t* var = reinterpret_cast<uint32_t*>(blk + p.fixed_bytes);
  const uint32_t end_words = static_cast<uint32_t>((p.block_stride_bytes - p.fixed_bytes) / 4);
  uint32_t* scratch = p.scratch + static_cast<int64_t>(blockIdx.x) * end_words;
  auto dir_of = [&](int i) {
    return reinterpret_cast<uint32_t*>(blk + (i / p.n_kv_heads) * p.layer_bytes + p.dir_offset) + 2 * (i % p.n_kv_heads);
  };
  __shared__ uint32_t used_s, tight_s;
  // 1. Copy every list's entries to scratch, packed in list order (thread 0 assigns offsets).
  extern __shared__ uint32_t off_s[];  // [lists + 1]
  if (threadIdx.x == 0) {
    uint32_t at = 0, want_total = 0;
    for (int i = 0; i < lists; ++i) {
      off_s[i] = at;
      const uint32_t count = dir_of(i)[1];
      at += count;
      want_total += PagedKvCache::KeyOutlierListWant(count, filled, kKvBlockTokens - filled, p.key_outlier_capacity);
    }
    off_s[lists] = at;
    tight_s = p.header_words + want_total > end_words;
  }
  __syncthreads();
  for (int i = threadIdx.x / 32; i < lists; i += blockDim.x / 32) {
    const uint32_t* d = dir_of(i);
    const uint32_t first = d[0], count = d[1];
    for (uint32_t e = threadIdx.x % 32; e < count; e += 32) scratch[off_s[i] + e] = var[first + e];
  }
  __syncthreads();
  // 2. New regions: each list gets its entries plus the growth it may still need (only its
  // entries when the block cannot give everyone that).
  if (threadIdx.x == 0) {
    uint32_t at = p.header_words;
    for (int i = 0; i < lists; ++i) {
      const uint32_t count = off_s[i + 1] - off_s[i];
      const uint32_t cap = tight_s ? count : PagedKvCache::KeyOutlierListWant(count, filled, kKvBlockTokens - filled, p.key_outlier_capacity);
      uint32_t* d = dir_of(i);
      d[0] = at;
      var[1 + i] = cap;
      at += cap;
    }
    used_s = at;
  }
  __syncthreads();
  for (int i = threadIdx.x / 32; i < lists; i += blockDim.x / 32) {
    const uint32_t* d = dir_of(i);
    const uint32_t first = d[0], count = d[1];
    for (uint32_t e = threadIdx.x % 32; e < count; e += 32) var[first + e] = scratch[off_s[i] + e];
  }
  if (threadIdx.x == 0) var[0] = used_s;
}

__global__ void __launch_bounds__(kValueThreads) ValueAppendKernel(const KvAppendParams p) {
  GridDependencyWait();
  GridDependencyTrigger();
  const KvBlockGeometry& g = p.kv.geom;
  const int j = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int H = g.n_kv_heads, D = g.head_dim;
  const int L = H * D;
  const int bits = g.bits;
  const bool quant = p.kv.codec != KvCodec::kFp16;
  // The token's values, its code words and its outlier marks, sized by the launch to this layer's
  // L = n_kv * head_dim (ValueAppendSmemBytes): static arrays for the largest L (46 KB) held an SM
  // to 4 of these CTAs where 8 fit.
  extern __shared__ __align__(16) uint8_t value_smem[];
  float* x_s = reinterpret_cast<float*>(value_smem);
  uint32_t* words_s = reinterpret_cast<uint32_t*>(x_s + L);
  uint8_t* out_s = reinterpret_cast<uint8_t*>(words_s + (quant ? H * g.value_words_per_token : 0));
  __shared__ float mids_s[15];
  __shared__ unsigned long long red_s[2][kValueThreads / 32];
  __shared__ int cnt_s[kValueThreads];
  const int n_sink_cap = SinkCapacity(p.kv, b);
  const int64_t i = p.kv.seq_lens[b] + j;
  const float* v = p.v + (static_cast<int64_t>(b) * p.n_new + j) * RowStride(p);
  if (i < n_sink_cap) {
    const int64_t off = static_cast<int64_t>(g.n_layers) * n_sink_cap * L +
                        (static_cast<int64_t>(p.layer) * n_sink_cap + i) * L;
    for (int e = tid; e < L; e += kValueThreads) p.sink[b][off + e] = HalfBitsOf(v[e]);
    return;
  }
  int t;
  uint8_t* block = TokenBlock(p, b, i, n_sink_cap, &t);
  uint8_t* lbase = block + static_cast<int64_t>(p.layer) * g.layer_bytes;
  const int W = g.value_words_per_token;
  if (!quant) {
    for (int e = tid; e < L; e += kValueThreads) {
      const int h = e / D, c = e % D;
      reinterpret_cast<uint16_t*>(lbase + g.value_codes_offset +
                                  (static_cast<int64_t>(h) * kKvBlockTokens + t) * W * 4)[c] =
          HalfBitsOf(v[e]);
    }
    return;
  }
  const int C = 1 << bits;
  if (tid < C - 1) {
    const float* lut = p.kv.value_lut + p.layer * C;
    mids_s[tid] = 0.5f * (lut[tid] + lut[tid + 1]);
  }
  for (int e = tid; e < L; e += kValueThreads) {
    x_s[e] = v[e];
    out_s[e] = 0;
  }
  for (int w = tid; w < H * W; w += kValueThreads) words_s[w] = 0u;
  __syncthreads();
  const int k = g.value_outliers_per_token;
  const int k_lo = k / 2, k_hi = k - k_lo;
  const int rounds = max(k_lo, k_hi) + 1;  // the last round finds lower/upper of the rest
  unsigned long long lo_key = 0, hi_key = 0;
  for (int r = 0; r < rounds; ++r) {
    unsigned long long mn = ~0ull, mx = 0ull;
    for (int e = tid; e < L; e += kValueThreads) {
      if (out_s[e]) continue;
      const unsigned long long key =
          (static_cast<unsigned long long>(OrderedBits(x_s[e])) << 32) | static_cast<unsigned>(e);
      mn = key < mn ? key : mn;
      mx = key > mx ? key : mx;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const unsigned long long a = __shfl_xor_sync(0xffffffffu, mn, off);
      const unsigned long long c = __shfl_xor_sync(0xffffffffu, mx, off);
      mn = a < mn ? a : mn;
      mx = c > mx ? c : mx;
    }
    if ((tid & 31) == 0) {
      red_s[0][tid >> 5] = mn;
      red_s[1][tid >> 5] = mx;
    }
    __syncthreads();
    mn = red_s[0][0];
    mx = red_s[1][0];
    for (int w = 1; w < kValueThreads / 32; ++w) {
      mn = red_s[0][w] < mn ? red_s[0][w] : mn;
      mx = red_s[1][w] > mx ? red_s[1][w] : mx;
    }
    __syncthreads();  // red_s is reused next round; out_s is written below
    if (r == rounds - 1) {
      lo_key = mn;
      hi_key = mx;
    } else if (tid == 0) {
      if (r < k_lo) out_s[static_cast<uint32_t>(mn)] = 1;
      if (r < k_hi) out_s[static_cast<uint32_t>(mx)] = 1;
    }
    __syncthreads();
  }
  const float lower = x_s[static_cast<uint32_t>(lo_key)];
  const float upper = x_s[static_cast<uint32_t>(hi_key)];
  const uint16_t zp_h = HalfBitsOf(0.5f * (upper + lower));
  float r = __half2float(__float2half_rn(0.5f * (upper - lower)));
  if (!(r >= kMinTokenRange)) r = kMinTokenRange;
  const uint16_t r_h = HalfBitsOf(r);
  const float zp = __half2float(__ushort_as_half(zp_h)), rr = __half2float(__ushort_as_half(r_h));
  if (tid == 0) {
    uint16_t* sc = reinterpret_cast<uint16_t*>(lbase + g.value_scales_offset + t * 4);
    sc[0] = zp_h;
    sc[1] = r_h;
  }
  // Outliers in ascending index order: contiguous ranges per thread, exclusive scan of counts.
  const int per = (L + kValueThreads - 1) / kValueThreads;
  const int e0 = min(L, tid * per), e1 = min(L, e0 + per);
  int mine = 0;
  for (int e = e0; e < e1; ++e) mine += out_s[e];
  cnt_s[tid] = mine;
  __syncthreads();
  int rank = 0;
  for (int q = 0; q < tid; ++q) rank += cnt_s[q];
  if (k > 0) {
    uint8_t* idx = lbase + g.value_outlier_index_offset +
                   static_cast<int64_t>(t) * k * g.value_outlier_index_bytes;
    uint16_t* val = reinterpret_cast<uint16_t*>(lbase + g.value_outlier_value_offset +
                                                static_cast<int64_t>(t) * k * 2);
    // Head starts (block_layout.h): the thread whose range holds element h * D writes start[h],
    // the count of outliers before it.
    uint8_t* starts = g.value_outlier_head_start_offset >= 0 ? lbase + g.value_outlier_head_start_offset + t : nullptr;
    for (int e = e0; e < e1; ++e) {
      if (starts != nullptr && e % D == 0) starts[(e / D) * kKvBlockTokens] = static_cast<uint8_t>(rank);
      if (!out_s[e]) continue;
      if (g.value_outlier_index_bytes == 1) idx[rank] = static_cast<uint8_t>(e);
      else reinterpret_cast<uint16_t*>(idx)[rank] = static_cast<uint16_t>(e);
      val[rank] = HalfBitsOf(x_s[e]);
      ++rank;
    }
  }
  for (int e = tid; e < L; e += kValueThreads) {
    const float xn = __fdiv_rn(x_s[e] - zp, rr);
    const int h = e / D, c = e % D;
    OrCode(words_s + h * W, c, bits, EncodeNearest(xn, mids_s, C - 1));
  }
  __syncthreads();
  for (int w = tid; w < H * W; w += kValueThreads) {
    const int h = w / W, q = w % W;
    reinterpret_cast<uint32_t*>(lbase + g.value_codes_offset +
                                (static_cast<int64_t>(h) * kKvBlockTokens + t) * W * 4)[q] =
        words_s[w];
  }
}

// ValueAppendKernel's dynamic shared memory: x_s [L] floats, words_s [H * W] words (LUT codecs;
// fp16 values are written straight from global memory), out_s [L] bytes. At most 44 KB
// (L <= kMaxValueElems, 4-bit codes): no opt-in above the default 48 KB is needed.
size_t ValueAppendSmemBytes(const KvBlockGeometry& g, bool quant) {
  const size_t L = static_cast<size_t>(g.n_kv_heads) * g.head_dim;
  return L * 4 + (quant ? static_cast<size_t>(g.n_kv_heads) * g.value_words_per_token * 4 : 0) + L;
}

std::atomic<bool> g_key_decode_kernel{true};

}  // namespace

void SetKeyAppendDecodePath(bool on) { g_key_decode_kernel.store(on); }
bool KeyAppendDecodePath() { return g_key_decode_kernel.load(); }

absl::Status LaunchKvAppend(const KvAppendParams& p, cudaStream_t stream) { return LaunchKvAppend(p, stream, stream); }

absl::Status LaunchKvAppend(const KvAppendParams& p, cudaStream_t key_stream, cudaStream_t value_stream) {
  const KvBlockGeometry& g = p.kv.geom;
  auto bad = [](auto&&... args) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchKvAppend: ", args...));
  };
  if (p.batch < 0 || p.batch > 65535 || p.n_new < 0) return bad("batch ", p.batch, ", n_new ", p.n_new);
  if (p.batch == 0 || p.n_new == 0) return absl::OkStatus();
  if (g.head_dim <= 0 || g.head_dim > 256 || g.head_dim % 32 != 0) {
    return absl::UnimplementedError(absl::StrCat("LaunchKvAppend: head_dim ", g.head_dim,
                                                 " (need a multiple of 32, <= 256)"));
  }
  if (static_cast<int64_t>(g.n_kv_heads) * g.head_dim > kMaxValueElems) {
    return absl::UnimplementedError(absl::StrCat("LaunchKvAppend: n_kv_heads * head_dim = ",
                                                 g.n_kv_heads * g.head_dim, " > ", kMaxValueElems));
  }
  if (p.layer < 0 || p.layer >= g.n_layers) return bad("layer ", p.layer);
  const bool quant = p.kv.codec != KvCodec::kFp16;
  if (g.bits != (quant ? static_cast<int>(p.kv.codec) : 16)) {
    return bad("geometry bits ", g.bits, " vs codec ", KvCodecName(p.kv.codec));
  }
  if (g.key_scales_offset >= 0) {
    return absl::UnimplementedError("LaunchKvAppend: int per-token formats are not supported");
  }
  if (quant && p.kv.keys_rotated) {
    return absl::UnimplementedError(
        "LaunchKvAppend: post-RoPE key formats (intB-pc-post) are not supported yet");
  }
  if (quant && (p.kv.key_lut == nullptr || p.kv.value_lut == nullptr ||
                p.kv.key_zero_point == nullptr || p.kv.key_range == nullptr)) {
    return bad("LUT codec needs LUTs and per-channel key scaling");
  }
  if (p.kv.sink_tokens > 0 && p.sink == nullptr) return bad("sink buffers missing");
  if (p.kv_row_stride != 0 && p.kv_row_stride < static_cast<int64_t>(g.n_kv_heads) * g.head_dim) {
    return bad("kv_row_stride ", p.kv_row_stride, " is below n_kv_heads * head_dim = ",
               static_cast<int64_t>(g.n_kv_heads) * g.head_dim, " (0 for packed rows)");
  }
  if (p.pool == nullptr || p.k == nullptr || p.v == nullptr || p.kv.block_table == nullptr ||
      p.kv.seq_lens == nullptr || p.kv.first_positions == nullptr) {
    return bad("null pool/k/v/block_table/seq_lens/first_positions");
  }
  if (g.has_key_outliers && p.kv.key_outlier_capacity <= 0) {
    return bad("key_outlier_capacity must be > 0 when the format has key outliers");
  }
  if (p.n_new == 1 && g_key_decode_kernel.load(std::memory_order_relaxed)) {  // decode steps
    const int tasks = g.n_kv_heads * p.batch;
    KVQ_RETURN_IF_CUDA_ERROR(internal::Launch(KeyAppendDecodeKernel, dim3((tasks + kKeyDecodeWarps - 1) / kKeyDecodeWarps),
                                              kKeyDecodeWarps * 32, 0, key_stream, p));
  } else {
    // Block segments: the new tokens of one sequence span at most this many blocks.
    const int segments = (p.n_new + kKvBlockTokens - 1) / kKvBlockTokens + 1;
    KVQ_RETURN_IF_CUDA_ERROR(
        internal::Launch(KeyAppendKernel, dim3(g.n_kv_heads, p.batch, segments), kKeyThreads, 0, key_stream, p));
  }
  KVQ_RETURN_IF_LAUNCH_ERROR();
  // (A warp per token for the values was tried, H200 2026-12-02: no faster at SmolLM2's 192
  // elements (6.2 vs 6.2 us), 30 vs 11 us at Llama-3-8B's 1,024; not kept.)
  KVQ_RETURN_IF_CUDA_ERROR(
      internal::Launch(ValueAppendKernel, dim3(p.n_new, p.batch), kValueThreads, ValueAppendSmemBytes(g, quant), value_stream, p));
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchCompactKeyOutliers(const CompactKeyOutliersParams& p, cudaStream_t stream) {
  if (p.n <= 0) return absl::OkStatus();
  if (p.n > CompactKeyOutliersParams::kMaxBlocks || p.header_words <= 0 || p.dir_offset < 0 ||
      p.scratch == nullptr || p.pool == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchCompactKeyOutliers: n ", p.n, " (max ",
                                                   CompactKeyOutliersParams::kMaxBlocks, "), header ",
                                                   p.header_words, ", dir offset ", p.dir_offset));
  }
  const size_t smem = (static_cast<size_t>(p.n_layers) * p.n_kv_heads + 1) * 4;
  CompactKeyOutliersKernel<<<p.n, 256, smem, stream>>>(p);
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace kvq::kernels
