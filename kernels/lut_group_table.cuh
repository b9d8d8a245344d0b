// The LUT decode kernel's per-group RoPE table (kernels/decode_attention_lut_mma.cuh): the cos and
// sin of every (token, frequency) of a 64-token group, in the order the kernel's lanes read them as
// mma A-operand factors. Layout, per tile of the group and lane (g, q4) = (lane / 4, lane % 4), at
// word (tile * 32 + lane) * kCsStride: for each lo chunk jj, 4 words of cos then 4 of sin, word
// r = token half + 2 * column half holding the half2 of frequencies f, f + 1 (f = 16 jj + 2 q4 +
// 8 * column half) at token 16 tile + g + 8 * token half.
#pragma once

#include <cstdint>

#include "kernels/decode_attention_mma.cuh"

namespace kvq::kernels::decode_attention_lut_mma {

// Writes the group that starts at gpos into cs_s (rot false: cos 1, sin 0), from the anchors
// rot_tab holds for it (RopeGroupAnchors::Anchor), with threads tid of nthreads; the caller puts
// the barriers around it. Rows of 8 absolute positions x frequency pairs, one per thread (9 rows
// when gpos % 8 != 0: at head dim 128, 288 rows, so in an 8-warp CTA warp 0 builds two, in a
// 16-warp one every thread at most one); each entry is RowStart(its row) times e1 stepped
// position % 8 times, the same bits in every split and shard.
//
// Tried and slower (H200, same call, 2026-12-02 20:52 UTC): every thread 8 consecutive positions of
// one pair (the tail of one row after gpos % 8 unstored steps and the head of the next: the same
// bits, no warp with twice the work), Llama-3-8B nuq3-1% 1M 1,102 / 1,096 against 1,075 / 1,067
// us, SmolLM2 333 against 306: more instructions in all, and the kernel is bound by issue, not by
// the barrier's wait for warp 0. What the rows cost (ablation 32): 82 us of the 904 of nuq3 at 1M;
// the two barriers around them (ablation 64) 49 us.
template <int kHalf, int kCsStride>
__device__ __forceinline__ void BuildGroupTable(uint32_t* cs_s, const decode_attention_mma::RopeGroupAnchors<kHalf>& rot_tab,
                                                bool rot, int64_t gpos, int tid, int nthreads) {
  using decode_attention_mma::CMul;
  using decode_attention_mma::PackF2;
  static_assert(decode_attention_mma::kTile * decode_attention_mma::kGroupTiles == 64,
                "a group is rows 0-7 of 8 positions");
  constexpr int kFPairs = kHalf / 2, kS = kCsStride;
  const int off = static_cast<int>(gpos & 63), o = off & 7;
  const int n_rows = o != 0 ? 9 : 8;
  for (int u = tid; u < n_rows * kFPairs; u += nthreads) {
    // Entry k of the thread's row is group token tau = 8 w - o + k (w = row - off / 8): for k < o
    // the end of group row w - 1, for k >= o the start of group row w. Word offset of group row R,
    // lane slot gg: (R / 2 * 32 + gg * 4 + qq) * stride + jj * 8 + R % 2 + 2 hi8, so each part is
    // one base plus k * 4 * stride (a constant once unrolled). The same entries as computing
    // tile, half and slot from tau for each k, ~0.5% faster (Llama-3-8B nuq3-1% 1M 1,062 / 1,059
    // against 1,070 / 1,067 us, LLaMA-2-7B 4,107 / 4,097 against 4,139 / 4,132; H200, same call,
    // 2026-12-02 20:57 UTC).
    const int w = u / kFPairs, row = (off >> 3) + w, f = 2 * (u % kFPairs);
    const float2 one = make_float2(1.0f, 0.0f);
    float2 c0 = rot ? rot_tab.RowStart(f, row) : one;
    float2 c1 = rot ? rot_tab.RowStart(f + 1, row) : one;
    const float2 s0 = rot ? rot_tab.e1[f] : one, s1 = rot ? rot_tab.e1[f + 1] : one;
    const int jj = f / 16, col = f % 16, hi8 = col / 8, qq = (col % 8) / 2;
    const int base = qq * kS + jj * 8 + 2 * hi8;
    const int lo_at = ((w - 1) >> 1) * 32 * kS + ((w - 1) & 1) + base + (8 - o) * 4 * kS;
    const int hi_at = (w >> 1) * 32 * kS + (w & 1) + base - o * 4 * kS;
    const bool lo_ok = w >= 1, hi_ok = w < 8;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const bool lo = k < o;
      if (lo ? lo_ok : hi_ok) {
        uint32_t* dst = cs_s + (lo ? lo_at : hi_at) + k * 4 * kS;
        dst[0] = PackF2(c0.x, c1.x);
        dst[4] = PackF2(c0.y, c1.y);
      }
      c0 = CMul(c0, s0);
      c1 = CMul(c1, s1);
    }
  }
}

}  // namespace kvq::kernels::decode_attention_lut_mma
