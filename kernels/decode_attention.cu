// Launcher of DecodeAttentionKernel: validation, split choice, dispatch through the explicit
// instance table, and the merge of split partials. Math and layout: decode_attention.cuh.
#include "kernels/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"
#include "kernels/launch.cuh"
#include "kernels/decode_attention_instances.h"
#include "kernels/decode_attention_lut_mma.cuh"
#include "kernels/merge_attention.h"

namespace kvq::kernels {
namespace {

using decode_attention_internal::DecodeAttentionEntry;

constexpr int kThreads = 128;
// Tokens per split unit of the tensor-core kernels: one 16-token tile (a split may start on any
// tile of a cos/sin group or a block: the group tables are functions of the absolute position, the
// LUT kernel finds its key-outlier cursor inside a block).
constexpr int kMmaSplitUnit = decode_attention_mma::kTile;
// The split choice counts in 64-token groups (one cos/sin table fill each).
constexpr int kMmaGroupTokens = decode_attention_mma::kTile * decode_attention_mma::kGroupTiles;

// KVQ_DECODE_MIN_SPLIT_TILES (read once): the fewest tiles per split at short contexts, 1 to a group.
int MinSplitTiles() {
  static const int v = [] {
    const char* e = std::getenv("KVQ_DECODE_MIN_SPLIT_TILES");
    return std::clamp(e != nullptr ? std::atoi(e) : 1, 1, decode_attention_mma::kGroupTiles);
  }();
  return v;
}

const decode_attention_internal::DecodeAttentionMmaEntry* FindMmaEntry(int head_dim, KvCodec codec) {
  for (const auto& e : decode_attention_internal::MmaDecodeAttentionEntries()) {
    if (e.desc.head_dim == head_dim && e.desc.codec == codec) return &e;
  }
  return nullptr;
}

int GroupBucket(int group) { return group <= 1 ? 1 : (group <= 4 ? 4 : 8); }

const DecodeAttentionEntry* FindEntry(const DecodeAttentionDesc& d) {
  for (const auto* table : {&decode_attention_internal::Fp16DecodeAttentionEntries(),
                            &decode_attention_internal::LutDecodeAttentionEntries()}) {
    for (const DecodeAttentionEntry& e : *table) {
      if (e.desc == d) return &e;
    }
  }
  return nullptr;
}

absl::Status Validate(const DecodeAttentionParams& p) {
  const KvBlockGeometry& g = p.kv.geom;
  auto bad = [](auto&&... args) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchDecodeAttention: ", args...));
  };
  if (p.batch < 0 || p.batch > 65535) return bad("batch ", p.batch, " outside [0, 65535]");
  if (g.n_kv_heads <= 0 || p.n_heads <= 0 || p.n_heads % g.n_kv_heads != 0) {
    return bad("n_heads ", p.n_heads, " must be a positive multiple of n_kv_heads ", g.n_kv_heads);
  }
  if (p.n_heads / g.n_kv_heads > 8) {
    return absl::UnimplementedError(absl::StrCat(
        "LaunchDecodeAttention: GQA group ", p.n_heads / g.n_kv_heads, " > 8 is not instantiated"));
  }
  if (p.layer < 0 || p.layer >= g.n_layers) return bad("layer ", p.layer, " outside [0, ", g.n_layers, ")");
  const bool quant = p.kv.codec != KvCodec::kFp16;
  const int bits = quant ? static_cast<int>(p.kv.codec) : 16;
  if (g.bits != bits) return bad("geometry has ", g.bits, " bits, codec ", KvCodecName(p.kv.codec));
  if (g.key_words_per_token != g.head_dim * bits / 32 ||
      g.value_words_per_token != g.key_words_per_token) {
    return bad("words per token ", g.key_words_per_token, " != head_dim * bits / 32");
  }
  if (g.layer_bytes >= (int64_t{1} << 31)) {
    return bad("layer section of ", g.layer_bytes, " bytes: the kernels address it with 32-bit offsets");
  }
  if (g.key_scales_offset >= 0) {
    return absl::UnimplementedError(
        "LaunchDecodeAttention: int per-token formats (per-token key scaling) are not supported");
  }
  if (quant && (p.kv.key_lut == nullptr || p.kv.value_lut == nullptr ||
                p.kv.key_zero_point == nullptr || p.kv.key_range == nullptr ||
                g.value_scales_offset < 0)) {
    return bad("LUT codec needs key/value LUTs, per-channel key scaling and value scales");
  }
  if (quant && (reinterpret_cast<uintptr_t>(p.kv.key_zero_point) % 8 != 0 ||
                reinterpret_cast<uintptr_t>(p.kv.key_range) % 8 != 0)) {
    return bad("key_zero_point and key_range must be 8-byte aligned (read as float2)");
  }
  if (g.value_outliers_per_token > 0 &&
      (g.value_outlier_index_bytes < 1 || g.value_outlier_index_bytes > 2)) {
    return bad("value_outlier_index_bytes ", g.value_outlier_index_bytes);
  }
  if (g.value_outlier_head_start_offset >= 0 &&
      (g.value_outliers_per_token <= 0 || g.value_outliers_per_token > 255)) {
    return bad("value-outlier head starts with ", g.value_outliers_per_token, " outliers per token (1..255)");
  }
  if (!quant && (g.value_outliers_per_token > 0 || g.has_key_outliers)) {
    return bad("fp16 codec with outliers");
  }
  if (reinterpret_cast<uintptr_t>(p.kv.rope_steps) % 16 != 0) return bad("rope_steps not 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(p.kv.rope_anchors) % 8 != 0 || p.kv.rope_anchor_count < 0 ||
      (p.kv.rope_anchors == nullptr && p.kv.rope_anchor_count != 0)) {
    return bad("rope_anchors not 8-byte aligned, or a count without a table");
  }
  if ((!p.kv.keys_rotated || p.kv.sink_tokens > 0) && p.kv.rope_inv_freq == nullptr) {
    return bad("rope_inv_freq is required (keys pre-RoPE or sink tokens)");
  }
  if (p.kv.sink_tokens < 0 || p.kv.sink_tokens > 64) return bad("sink_tokens ", p.kv.sink_tokens);
  if (p.kv.sink_tokens > 0 && p.kv.sink == nullptr) return bad("sink buffers missing");
  if (p.kv.block_stride_bytes % 16 != 0 || p.kv.block_stride_bytes < g.fixed_bytes) {
    return bad("block_stride_bytes ", p.kv.block_stride_bytes, " must be a multiple of 16 and >= ",
               g.fixed_bytes);
  }
  if (p.max_seq_len < 0) return bad("max_seq_len ", p.max_seq_len);
  if (p.self.q != nullptr &&
      (p.self.k == nullptr || p.self.v == nullptr || p.self.n_heads != p.n_heads ||
       p.self.n_kv_heads != g.n_kv_heads)) {
    return bad("own-key partial needs k and v with n_heads ", p.n_heads, " and n_kv_heads ",
               g.n_kv_heads, " (got ", p.self.n_heads, ", ", p.self.n_kv_heads, ")");
  }
  if (p.batch > 0 && (p.q == nullptr || p.o == nullptr || p.lse == nullptr ||
                      p.kv.seq_lens == nullptr || p.kv.first_positions == nullptr ||
                      (p.max_seq_len > 0 && (p.kv.pool == nullptr || p.kv.block_table == nullptr)))) {
    return bad("null q/o/lse/seq_lens/first_positions/pool/block_table");
  }
  if (reinterpret_cast<uintptr_t>(p.q) % 8 != 0) return bad("q must be 8-byte aligned (read as float2)");
  // Sink tokens (at most 64) sit outside blocks, so a sequence needs at least this many.
  if (static_cast<int64_t>(p.kv.max_blocks_per_seq) * kKvBlockTokens + 64 < p.max_seq_len) {
    return bad("max_blocks_per_seq ", p.kv.max_blocks_per_seq, " too small for max_seq_len ",
               p.max_seq_len);
  }
  return absl::OkStatus();
}

}  // namespace

std::string KvCodecName(KvCodec c) {
  switch (c) {
    case KvCodec::kFp16: return "fp16";
    case KvCodec::kLut2: return "lut2";
    case KvCodec::kLut3: return "lut3";
    case KvCodec::kLut4: return "lut4";
  }
  return absl::StrCat("codec(", static_cast<int>(c), ")");
}

std::string DecodeAttentionDesc::ToString() const {
  return absl::StrCat("{head_dim=", head_dim, ", codec=", KvCodecName(codec),
                      ", group<=", max_group, "}");
}

int DecodeCtaWarps(int n_kv_heads, KvCodec codec) {
  return std::clamp(n_kv_heads, 1,
                    codec == KvCodec::kFp16 ? decode_attention_mma::kMaxWarps
                                            : decode_attention_lut_mma::kLutMaxWarps);
}

int DecodeCtasPerSm(int n_kv_heads, int head_dim, KvCodec codec) {
  // Registers: both kernels' launch bounds cap them at 128 per thread, 16 warps per SM (two CTAs
  // of 8 warps, one of 16). Shared memory: the 4-bit LUT instance (the largest) of that head dim,
  // plus 1 KB reserved per CTA, of the 228 KB of a Hopper SM.
  constexpr size_t kSmemPerSm = 233472, kReservedPerCta = 1024;
  const int warps = DecodeCtaWarps(n_kv_heads, codec);
  const size_t smem = head_dim <= 64 ? decode_attention_lut_mma::LutMmaCfg<64, 4>::SmemBytes(warps)
                                     : decode_attention_lut_mma::LutMmaCfg<128, 4>::SmemBytes(warps);
  const int by_regs = decode_attention_mma::kWarpsPerSm / warps;
  const int by_smem = static_cast<int>(kSmemPerSm / (smem + kReservedPerCta));
  return std::max(1, std::min(by_regs, by_smem));
}

int ChooseDecodeSplits(int batch, int n_kv_heads, int max_seq_len, KvCodec codec, int sm_count,
                       int head_dim) {
  const int max_units = std::max(1, (max_seq_len + kMmaGroupTokens - 1) / kMmaGroupTokens);
  // Tensor-core kernels: a CTA holds up to 8 (fp16) or 16 (LUT) KV heads, one warp each.
  const int warps = DecodeCtaWarps(n_kv_heads, codec);
  const int64_t heads_ctas = (n_kv_heads + warps - 1) / warps;
  const int64_t ctas = std::max<int64_t>(1, static_cast<int64_t>(batch) * heads_ctas);
  // Whole waves of resident CTAs (DecodeCtasPerSm per SM); never below 64 tokens per CTA.
  // (Whole blocks per split, as before, left a 1K-token context on 5 CTAs: a warp walks its tiles
  // one memory round trip at a time, ~3 us each, so Llama-3-8B fp16 spent 50 us per layer there.)
  // The split count
  // minimises waves x (units per CTA + two units of fixed cost per CTA) over 1..8 waves: filling
  // one wave as closely as possible could overshoot it (batch 32 x 9 splits = 288 CTAs on 264
  // slots ran a second wave of 24 CTAs: Llama-3-8B fp16 at 128K, 72% of the bandwidth floor;
  // 8 splits fit one wave). Both measured on the H200, 2026-12-01.
  const int64_t slots =
      static_cast<int64_t>(DecodeCtasPerSm(n_kv_heads, head_dim, codec)) * std::max(sm_count, 1);
  int best_splits = 1;
  int64_t best_cost = -1;
  for (int64_t waves = 1; waves <= 8; ++waves) {
    const int64_t fit = std::clamp<int64_t>(waves * slots / ctas, 1, std::min(max_units, 65535));
    const int64_t units_per_split = (max_units + fit - 1) / fit;
    const int64_t splits = (max_units + units_per_split - 1) / units_per_split;
    const int64_t cost = ((ctas * splits + slots - 1) / slots) * (units_per_split + 2);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_splits = static_cast<int>(splits);
    }
  }
  // Short contexts: at the floor of one group per split with no more CTAs than SMs, split
  // further, down to KVQ_DECODE_MIN_SPLIT_TILES tiles per split (default 1; 4 keeps whole
  // groups), up to one wave. Each CTA's warps walk their tiles as one dependent chain on an
  // otherwise idle SM. H200, 2026-12-02, µs per layer with the merge (kernels_bench), 64-token
  // groups -> tiles: Llama-3-8B 1K batch 1 fp16 16.9 -> 12.3, nuq3-1% 30.7 -> 21.0 (64 splits);
  // batch 8 nuq3-1% 31.6 -> 29.0 (33); 4K batch 1 nuq3-1% 31.2 -> 25.0 (256); SmolLM2 1K batch
  // 1 nuq3-1% 21.1 -> 16.3. Past one CTA per SM finer splits lost (SmolLM2 4K batch 8 fp16:
  // 64 splits 16.0, 128 20.8).
  // (With whole groups, 4 tiles, `finer` is max_units again.)
  if (best_splits == max_units && ctas * best_splits <= std::max(sm_count, 1)) {
    const int tiles = std::max(1, (max_seq_len + kMmaSplitUnit - 1) / kMmaSplitUnit);
    const int min_tiles = MinSplitTiles();
    const int64_t finer = std::min<int64_t>({(tiles + min_tiles - 1) / min_tiles, slots / ctas, 65535});
    best_splits = static_cast<int>(std::max<int64_t>(best_splits, finer));
  }
  return best_splits;
}

size_t DecodeAttentionWorkspaceBytes(int batch, int n_heads, int head_dim, int num_splits) {
  if (num_splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(batch) * n_heads;
  return rows * num_splits * (static_cast<size_t>(head_dim) + 1) * sizeof(float);
}

size_t RopeStepTableBytes(int head_dim) {
  return static_cast<size_t>(decode_attention_mma::kRopeStepSlots) * (head_dim / 2) * sizeof(float2);
}

namespace {
__global__ void RopeStepTableKernel(const double* inv_freq, int half, float2* out) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < decode_attention_mma::kRopeStepSlots * half;
       i += gridDim.x * blockDim.x) {
    decode_attention_mma::RopeStepEntry(inv_freq, half, i, out);
  }
}
__global__ void RopeAnchorTableKernel(const double* inv_freq, int half, int64_t count, float2* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count * half;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = i / half;
    const int f = static_cast<int>(i % half);
    // The expression of RopeGroupAnchors::Anchor, so that the table holds its bits.
    out[i] = decode_attention_mma::SinCosD(static_cast<double>(a << 12) * inv_freq[f]);
  }
}
}  // namespace

size_t RopeAnchorTableBytes(int head_dim, int64_t count) {
  return static_cast<size_t>(std::max<int64_t>(count, 0)) * (head_dim / 2) * sizeof(float2);
}

absl::Status LaunchRopeAnchorTable(const double* inv_freq, int head_dim, int64_t count, void* out,
                                   cudaStream_t stream) {
  if (head_dim < 2 || head_dim % 4 != 0 || count < 0 || inv_freq == nullptr ||
      (count > 0 && (out == nullptr || reinterpret_cast<uintptr_t>(out) % 8 != 0))) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchRopeAnchorTable: head_dim ", head_dim,
                                                   " (a multiple of 4), count ", count,
                                                   ", inv_freq and an 8-byte aligned output"));
  }
  if (count == 0) return absl::OkStatus();
  const int64_t n = count * (head_dim / 2);
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096));
  RopeAnchorTableKernel<<<blocks, 256, 0, stream>>>(inv_freq, head_dim / 2, count, static_cast<float2*>(out));
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchRopeStepTable(const double* inv_freq, int head_dim, void* out, cudaStream_t stream) {
  if (head_dim < 2 || head_dim % 4 != 0 || inv_freq == nullptr || out == nullptr ||
      reinterpret_cast<uintptr_t>(out) % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchRopeStepTable: head_dim ", head_dim,
                                                   " (a multiple of 4), inv_freq and a 16-byte aligned output"));
  }
  const int n = decode_attention_mma::kRopeStepSlots * (head_dim / 2);
  RopeStepTableKernel<<<(n + 255) / 256, 256, 0, stream>>>(inv_freq, head_dim / 2, static_cast<float2*>(out));
  KVQ_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

absl::Status LaunchDecodeAttention(const DecodeAttentionParams& p, cudaStream_t stream) {
  if (absl::Status s = Validate(p); !s.ok()) return s;
  if (p.batch == 0) return absl::OkStatus();
  const KvBlockGeometry& g = p.kv.geom;
  const DecodeAttentionDesc desc{g.head_dim, p.kv.codec, GroupBucket(p.n_heads / g.n_kv_heads)};
  // Tensor-core kernels: LUT codecs with or without fp16 sink tokens (decode_attention_lut_mma.cuh)
  // and fp16 without sinks (decode_attention_mma.cuh; fp16 formats have none). The CUDA-core
  // kernel (decode_attention.cuh) serves the rest.
  const bool quant = p.kv.codec != KvCodec::kFp16;
  const decode_attention_internal::DecodeAttentionMmaEntry* mma_entry =
      (quant || p.kv.sink_tokens == 0) ? FindMmaEntry(g.head_dim, p.kv.codec) : nullptr;
  const DecodeAttentionEntry* entry = mma_entry != nullptr ? nullptr : FindEntry(desc);
  if (entry == nullptr && mma_entry == nullptr) {
    return absl::UnimplementedError(absl::StrCat(
        "LaunchDecodeAttention: no kernel instance for ", desc.ToString(),
        " (head dims and bit widths are limited by KVQ_CUDA_HEAD_DIMS / KVQ_CUDA_BITS)"));
  }
  int splits = p.num_splits;
  if (splits <= 0) {
    int dev = 0, sms = 0;
    KVQ_RETURN_IF_CUDA_ERROR(cudaGetDevice(&dev));
    KVQ_RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    splits = ChooseDecodeSplits(p.batch, g.n_kv_heads, p.max_seq_len, p.kv.codec, sms, g.head_dim);
  }
  // Splits are whole tiles for the tensor-core kernels and whole blocks for the CUDA-core kernel.
  const int unit = mma_entry != nullptr ? kMmaSplitUnit : kKvBlockTokens;
  const int max_units = std::max(1, (p.max_seq_len + unit - 1) / unit);
  splits = std::clamp(splits, 1, std::min(max_units, 65535));
  const int units_per_split = (max_units + splits - 1) / splits;
  splits = (max_units + units_per_split - 1) / units_per_split;
  const int tokens_per_split = units_per_split * unit;

  float* part_o = nullptr;
  float* part_lse = nullptr;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.n_heads;
  if (splits > 1) {
    const size_t need = DecodeAttentionWorkspaceBytes(p.batch, p.n_heads, g.head_dim, splits);
    if (p.workspace == nullptr || p.workspace_bytes < need) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LaunchDecodeAttention: ", splits, " splits need a workspace of ", need,
          " bytes, got ", p.workspace_bytes));
    }
    part_o = static_cast<float*>(p.workspace);
    part_lse = part_o + rows * splits * g.head_dim;
  }
  if (mma_entry != nullptr) {
    const int warps = DecodeCtaWarps(g.n_kv_heads, p.kv.codec);
    const size_t smem = mma_entry->smem_bytes(warps);
    KVQ_RETURN_IF_CUDA_ERROR(cudaFuncSetAttribute(
        mma_entry->fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const dim3 grid((g.n_kv_heads + warps - 1) / warps, splits, p.batch);
    KVQ_RETURN_IF_CUDA_ERROR(internal::Launch(mma_entry->fn, grid, warps * 32, smem, stream, p, tokens_per_split, part_o, part_lse));
  } else {
    const dim3 grid(g.n_kv_heads, splits, p.batch);
    KVQ_RETURN_IF_CUDA_ERROR(internal::Launch(entry->fn, grid, kThreads, 0, stream, p, tokens_per_split, part_o, part_lse));
  }
  KVQ_RETURN_IF_LAUNCH_ERROR();
  const bool fold = p.self.q != nullptr || p.o_cast != nullptr;
  if (splits > 1 || fold) {
    MergeAttentionParams mp;
    mp.rows = static_cast<int>(rows);
    mp.n_parts = splits;
    mp.head_dim = g.head_dim;
    if (splits > 1) {
      mp.o_parts = part_o;
      mp.o_row_stride = static_cast<int64_t>(splits) * g.head_dim;
      mp.o_part_stride = g.head_dim;
      mp.lse_parts = part_lse;
      mp.lse_row_stride = splits;
      mp.lse_part_stride = 1;
    } else {  // the kernel wrote o and lse: merged in place (each row's one partial)
      mp.o_parts = p.o;
      mp.o_row_stride = g.head_dim;
      mp.o_part_stride = g.head_dim;
      mp.lse_parts = p.lse;
      mp.lse_row_stride = 1;
      mp.lse_part_stride = 1;
    }
    mp.o = p.o;
    mp.lse = p.lse;
    mp.o_cast = p.o_cast;
    mp.o_cast_dtype = p.o_cast_dtype;
    mp.self = p.self;
    if (mp.self.q != nullptr && !(mp.self.scale > 0.0f)) {
      mp.self.scale = p.scale > 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(g.head_dim));
    }
    return LaunchMergeAttention(mp, stream);
  }
  return absl::OkStatus();
}

}  // namespace kvq::kernels
