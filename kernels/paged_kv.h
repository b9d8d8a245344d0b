// The device view of a paged KV cache in the block layout of kvstore/block_layout.h, as the CUDA
// attention and append kernels address it. kernels/ sits below kvstore/ in the dependency order,
// so this header mirrors the BlockLayout fields instead of including it; the owner of the pool
// fills KvBlockGeometry field by field from kvstore::ComputeBlockLayout() (tests/kernels does so
// and checks every offset). Host and device code.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define KVQ_HOST_DEVICE __host__ __device__
#else
#define KVQ_HOST_DEVICE
#endif

namespace kvq::kernels {

inline constexpr int kKvBlockTokens = 256;  // == kvstore::kBlockTokens

// How the codes of one element are stored. kFp16: plain halves ("codes" are fp16 bits);
// kLutB: B-bit LUT codes in 32-bit words per token and head, packed as kernels/code_layout.h says.
enum class KvCodec : uint8_t { kFp16 = 16, kLut2 = 2, kLut3 = 3, kLut4 = 4 };
std::string KvCodecName(KvCodec c);

// Byte offsets inside a block, mirroring kvstore::BlockLayout (-1 where absent).
struct KvBlockGeometry {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int bits = 16;
  int key_words_per_token = 0;        // per head: head_dim * bits / 32
  int value_words_per_token = 0;
  int value_outliers_per_token = 0;   // k_v
  int value_outlier_index_bytes = 0;  // 1 or 2 (0 if k_v == 0)
  bool has_key_outliers = false;
  int64_t key_codes_offset = -1;
  int64_t value_codes_offset = -1;
  int64_t key_scales_offset = -1;     // int per-token formats only (not supported by the kernels)
  int64_t value_scales_offset = -1;
  int64_t value_outlier_index_offset = -1;
  int64_t value_outlier_value_offset = -1;
  int64_t key_outlier_dir_offset = -1;
  int64_t value_outlier_head_start_offset = -1;  // uint8 [n_kv_heads][256]; see block_layout.h
  int64_t layer_bytes = 0;
  int64_t fixed_bytes = 0;
};

// A batch of sequences (or rank shards of sequences) over one block pool. Device pointers.
// Block-token j (local token n_sink + j) of sequence s lives in block
// block_table[s * max_blocks_per_seq + j / 256] at slot j % 256, at position
// first_positions[s] + n_sink_capacity(s) + j, where n_sink_capacity(s) =
// clamp(sink_tokens - first_positions[s], 0, sink_tokens) (block_layout.h section 1).
struct PagedKvCache {
  KvBlockGeometry geom;
  KvCodec codec = KvCodec::kFp16;
  const uint8_t* pool = nullptr;     // [n_pool_blocks][block_stride_bytes]
  int64_t block_stride_bytes = 0;    // >= fixed_bytes + key-outlier capacity; multiple of 16
  // Key outliers: entries of (layer, head) in block B are the uint32 words
  // [first, first + count) after B's fixed section, {first, count} read from the directory.
  // Append kernels write up to key_outlier_capacity entries per (layer, head) and block with
  // first = (layer * n_kv_heads + head) * key_outlier_capacity (the pool's reservation).
  int key_outlier_capacity = 0;
  // Growable lists (key_outlier_header_words > 0): the variable section starts with a header of
  // that many uint32 words: word 0 = next free word of the block's area (a bump pointer, starting
  // at the header's end), words 1 + i = the capacity of list i = layer * n_kv_heads + head (0 until
  // the list gets its first entries). A list that must grow takes a new region from the bump
  // pointer, sized for what the rest of the block is likely to add (its rate so far or
  // key_outlier_capacity per 256 tokens, whichever is larger, plus a quarter; exactly its entries
  // once the block is full), and its entries move there. LaunchCompactKeyOutliers (kv_append.h)
  // packs a block's lists again when it fills. Only when the area is used up are new entries
  // dropped (the overflow flag). Readers use {first, count} from the directory as always.
  int key_outlier_header_words = 0;
  // The capacity a growable list takes when it holds `need` entries after `filled` tokens of its
  // block, with `remaining` tokens still to come (nominal = key_outlier_capacity). The rate it
  // extrapolates is the list's own, smoothed as if kPriorTokens more tokens at the nominal rate
  // had been seen (and never below nominal): a prompt's first chunk often starts with a few
  // outlier-heavy tokens (chat-template markers), and extrapolating those over the whole block
  // made every list of a short prompt ask for many times what it would use, which used up the
  // block's area after a few steps (measured on SmolLM2 chat prompts, 2026-12-01).
  static constexpr int kPriorTokens = 64;
  KVQ_HOST_DEVICE static uint32_t KeyOutlierListWant(uint32_t need, int filled, int remaining, int nominal) {
    if (remaining <= 0) return need;
    const float r0 = static_cast<float>(nominal) / kKvBlockTokens;
    const float r1 = (static_cast<float>(need) + r0 * kPriorTokens) / static_cast<float>(filled + kPriorTokens);
    const float rate = r0 > r1 ? r0 : r1;
    const float extra = 1.25f * rate * static_cast<float>(remaining);
    uint32_t e = static_cast<uint32_t>(extra);
    if (static_cast<float>(e) < extra) ++e;
    return need + e + 4u;
  }
  KVQ_HOST_DEVICE static int KeyOutlierHeaderWords(int n_layers, int n_kv_heads) {
    return (1 + n_layers * n_kv_heads + 3) / 4 * 4;
  }
  const int32_t* block_table = nullptr;      // [batch][max_blocks_per_seq]
  int max_blocks_per_seq = 0;
  // Elements between consecutive batch rows of block_table; -1 means max_blocks_per_seq. 0 makes
  // every row read row 0: the query rows of one sequence's prefill chunk share one table row.
  int64_t block_table_stride = -1;
  KVQ_HOST_DEVICE int64_t TableRow(int b) const {
    return static_cast<int64_t>(b) * (block_table_stride < 0 ? max_blocks_per_seq : block_table_stride);
  }
  const int32_t* seq_lens = nullptr;         // [batch] local tokens (sink + block tokens)
  const int64_t* first_positions = nullptr;  // [batch] RoPE position of local token 0
  int sink_tokens = 0;                       // format.sink_tokens
  // [batch] fp16 sink buffers (SinkLayout: K [n_layers][n_sink_cap][n_kv][hd] pre-RoPE, then V
  // of the same shape); entries may be null where n_sink_capacity is 0.
  const uint16_t* const* sink = nullptr;
  // Quantizer tensors (fp32, device): per-channel key scaling and the effective LUTs.
  const float* key_zero_point = nullptr;  // [n_layers][n_kv][hd]
  const float* key_range = nullptr;       // [n_layers][n_kv][hd]
  const float* key_lut = nullptr;         // [n_layers][2^B] (Q-Norm applied)
  const float* value_lut = nullptr;       // [n_layers][2^B]
  // Stored keys are already rotated (post-RoPE formats, or a plain fp16 baseline cache). Sink
  // tokens are always stored pre-RoPE and always rotated.
  bool keys_rotated = false;
  const double* rope_inv_freq = nullptr;  // [head_dim / 2], kernels::RopeInvFreq()
  // Optional: the RoPE step tables of rope_inv_freq (LaunchRopeStepTable, RopeStepTableBytes),
  // which the tensor-core decode kernels then copy instead of computing per CTA. 16-byte aligned.
  const void* rope_steps = nullptr;
  // Optional: the RoPE anchors exp(i 4096 a w) of the first rope_anchor_count 4096-position
  // blocks a (LaunchRopeAnchorTable, RopeAnchorTableBytes; float2 (cos, sin) [count][head_dim / 2],
  // 8-byte aligned), which the tensor-core decode kernels then load instead of computing a double
  // sincos per frequency at each split's first group (positions past the table: computed).
  const void* rope_anchors = nullptr;
  int64_t rope_anchor_count = 0;
};

}  // namespace kvq::kernels
