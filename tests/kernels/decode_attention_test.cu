// Decode attention (fp16 and LUT codecs) and the partial merge, GPU vs reference:
//  - every format is compared with kvstore::QuantizedKvCache::AttendPast (double accumulation
//    over the same dequantized cache: the oracle of the fused dequant + RoPE + softmax);
//  - fp16 is also compared with kernels::DecodeAttentionReference on plain arrays;
//  - the merge kernel is compared with MergeAttentionReference, and exactly on integer inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/half.h"
#include "kernels/decode_attention.h"
#include "kernels/merge_attention.h"
#include "kernels/reference/attention.h"
#include "kernels/reference/rope.h"
#include "kvstore/kv_format.h"
#include "kvstore/quantized_kv_cache.h"
#include "kvstore/quantizer.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/kv_pool_test_util.h"

namespace kvq {
namespace {

using testing::DeviceBuffer;
using testing::MaxAbsError;

uint16_t HalfBits(float x) {
  const __half h = __float2half_rn(x);
  uint16_t u = 0;
  std::memcpy(&u, &h, 2);
  return u;
}

// Tolerances (worst element). The GPU accumulates in fp32 where the oracle uses double, over the
// same decoded values; scores are O(10), so fp32 rounding of the logits (~1e-6 relative) and of
// the RoPE recurrence (a few 1e-7 relative per angle, kernels/decode_attention.cuh) move
// softmax weights by ~1e-5 relative. o is a convex combination of values of magnitude <= ~4, and
// key outliers add corrections of up to ~10x the dense range; 2e-3 leaves 20x margin over the
// errors seen in fp32 simulations of this kernel and is still far below one fp16 ulp of the
// values involved (>= 2e-3 at |v| >= 2). lse is a log of a sum of O(1e3) terms: 1e-3.
constexpr double kOutTol = 2e-3;
constexpr double kLseTol = 1e-3;

struct Case {
  std::string format;
  int head_dim;
  int n_kv_heads;
  int group;
  std::vector<int> lens;
  int64_t first_position;  // of every sequence (a rank shard when > 0: no sink)
  int splits;              // 0: auto
  int value_skew_head = -1;  // >= 0: that head's values 8x larger (it takes every value outlier)
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  std::string f = absl::StrReplaceAll(c.format, {{"-", "_"}, {"%", "pct"}, {".", "p"}});
  return absl::StrCat(f, "_hd", c.head_dim, "_kv", c.n_kv_heads, "_g", c.group, "_n",
                      c.lens.size(), "_max", *std::max_element(c.lens.begin(), c.lens.end()),
                      "_pos", c.first_position, "_s", c.splits,
                      c.value_skew_head >= 0 ? absl::StrCat("_skew", c.value_skew_head) : "");
}

class DecodeAttentionTest : public ::testing::TestWithParam<Case> {};

TEST_P(DecodeAttentionTest, MatchesKvstoreOracle) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const Case& c = GetParam();
  auto fmt = kvstore::KvFormat::Parse(c.format);
  ASSERT_TRUE(fmt.ok()) << fmt.status();
  const kvstore::KvShape shape{2, c.n_kv_heads, c.head_dim};
  const int layer = 1;
  const int n_heads = c.n_kv_heads * c.group;
  std::mt19937 rng(1234 + c.head_dim + c.group);
  auto quant = testing::MakeRandomQuantizer(shape, *fmt, rng);
  kernels::RopeParams rope;
  rope.head_dim = c.head_dim;
  rope.theta = 500000.0;
  std::normal_distribution<float> nd(0.0f, 1.0f);

  std::vector<std::unique_ptr<kvstore::QuantizedKvCache>> caches;
  std::vector<const kvstore::QuantizedKvCache*> ptrs;
  testing::MakeRandomCaches(shape, *fmt, quant, rope, c.lens, c.first_position, rng, nd, &caches, &ptrs,
                            c.value_skew_head);
  if (HasFatalFailure()) return;
  auto dev = testing::UploadCaches(ptrs, quant.get(), rope);
  const int batch = static_cast<int>(c.lens.size());
  std::vector<float> q(static_cast<size_t>(batch) * n_heads * c.head_dim);
  for (float& x : q) x = nd(rng) * 0.6f;
  DeviceBuffer<float> dq(q), dout(q.size()), dlse(static_cast<size_t>(batch) * n_heads);

  kernels::DecodeAttentionParams p;
  p.kv = dev->view;
  p.layer = layer;
  p.batch = batch;
  p.n_heads = n_heads;
  p.q = dq.get();
  p.o = dout.get();
  p.lse = dlse.get();
  p.max_seq_len = dev->max_seq_len;
  p.num_splits = c.splits;
  int sms = 132;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int splits = c.splits > 0 ? c.splits
                                  : kernels::ChooseDecodeSplits(batch, c.n_kv_heads,
                                                                p.max_seq_len, p.kv.codec, sms, c.head_dim);
  DeviceBuffer<uint8_t> ws(kernels::DecodeAttentionWorkspaceBytes(batch, n_heads, c.head_dim,
                                                                   std::max(splits, 64)) + 16);
  p.workspace = ws.get();
  p.workspace_bytes = ws.size();
  const absl::Status st = kernels::LaunchDecodeAttention(p, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<float> o = dout.Download(), lse = dlse.Download();
  // The RoPE step tables and anchors computed per CTA instead of read from the pool's tables: the
  // same bits (positions up to 1e7 in the grid, inside the anchor table).
  ASSERT_NE(p.kv.rope_anchors, nullptr);
  {
    kernels::DecodeAttentionParams pc = p;
    pc.kv.rope_steps = nullptr;
    pc.kv.rope_anchors = nullptr;
    pc.kv.rope_anchor_count = 0;
    DeviceBuffer<float> o2(q.size()), l2(static_cast<size_t>(batch) * n_heads);
    pc.o = o2.get();
    pc.lse = l2.get();
    ASSERT_TRUE(kernels::LaunchDecodeAttention(pc, nullptr).ok());
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_EQ(o2.Download(), o) << "RoPE step tables computed per CTA";
    EXPECT_EQ(l2.Download(), lse) << "RoPE step tables computed per CTA";
  }
  // q is read as float2: a misaligned q is refused with a message, not read out of alignment.
  {
    kernels::DecodeAttentionParams pm = p;
    pm.q = dq.get() + 1;
    const absl::Status bad = kernels::LaunchDecodeAttention(pm, nullptr);
    EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(std::string(bad.message()).find("q must be 8-byte aligned"), std::string::npos) << bad;
    pm.q = p.q;
    pm.kv.rope_anchors = nullptr;  // a count without its table
    const absl::Status bad_anchors = kernels::LaunchDecodeAttention(pm, nullptr);
    EXPECT_EQ(bad_anchors.code(), absl::StatusCode::kInvalidArgument) << bad_anchors;
    EXPECT_NE(std::string(bad_anchors.message()).find("rope_anchors"), std::string::npos) << bad_anchors;
  }

  std::vector<float> want_o, want_lse;
  for (int s = 0; s < batch; ++s) {
    auto ref = caches[s]->AttendPast(layer, q.data() + static_cast<size_t>(s) * n_heads * c.head_dim,
                                     1, n_heads);
    ASSERT_TRUE(ref.ok()) << ref.status();
    want_o.insert(want_o.end(), ref->o.begin(), ref->o.end());
    want_lse.insert(want_lse.end(), ref->lse.begin(), ref->lse.end());
  }
  const auto eo = MaxAbsError(o, want_o);
  const auto el = MaxAbsError(lse, want_lse);
  EXPECT_LE(eo.err, kOutTol) << "o[" << eo.index << "] = " << o[eo.index] << ", want "
                             << want_o[eo.index];
  EXPECT_LE(el.err, kLseTol) << "lse[" << el.index << "] = " << lse[el.index] << ", want "
                             << want_lse[el.index];

  // The step's own new token folded into the merge (DecodeAttentionParams::self, with the f16
  // copy of o): the oracle merged on the host with that token's partial (lse = scale q . k in
  // double, o = v), whatever the split count (one split: merged in place).
  {
    const int nkv = c.n_kv_heads, hd = c.head_dim;
    std::vector<float> kn(static_cast<size_t>(batch) * nkv * hd), vn(kn.size());
    for (float& x : kn) x = nd(rng);
    for (float& x : vn) x = nd(rng);
    DeviceBuffer<float> dk(kn), dv(vn), dout2(q.size()), dlse2(static_cast<size_t>(batch) * n_heads);
    DeviceBuffer<uint16_t> dcast(q.size());
    kernels::DecodeAttentionParams ps = p;
    ps.o = dout2.get();
    ps.lse = dlse2.get();
    ps.self.q = dq.get();
    ps.self.k = dk.get();
    ps.self.v = dv.get();
    ps.self.k_seq_stride = ps.self.v_seq_stride = static_cast<int64_t>(nkv) * hd;
    ps.self.n_heads = n_heads;
    ps.self.n_kv_heads = nkv;
    ps.o_cast = dcast.get();
    ps.o_cast_dtype = kernels::DType::kF16;
    const absl::Status st2 = kernels::LaunchDecodeAttention(ps, nullptr);
    ASSERT_TRUE(st2.ok()) << st2;
    KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
    const std::vector<float> o2 = dout2.Download(), lse2 = dlse2.Download();
    const std::vector<uint16_t> cast = dcast.Download();
    std::vector<float> ref_o(o2.size()), ref_l(lse2.size());
    for (int s = 0; s < batch; ++s) {
      for (int h = 0; h < n_heads; ++h) {
        const size_t row = static_cast<size_t>(s) * n_heads + h;
        const float* kr = kn.data() + (static_cast<size_t>(s) * nkv + h / c.group) * hd;
        const float* vr = vn.data() + (static_cast<size_t>(s) * nkv + h / c.group) * hd;
        double dot = 0.0;
        for (int d = 0; d < hd; ++d) dot += static_cast<double>(q[row * hd + d]) * kr[d];
        const double sc = dot / std::sqrt(static_cast<double>(hd)), l0 = want_lse[row];
        const double mx = std::max(sc, l0);
        const double w0 = std::isinf(l0) ? 0.0 : std::exp(l0 - mx), w1 = std::exp(sc - mx);
        for (int d = 0; d < hd; ++d) {
          ref_o[row * hd + d] = static_cast<float>((w0 * want_o[row * hd + d] + w1 * vr[d]) / (w0 + w1));
        }
        ref_l[row] = static_cast<float>(mx + std::log(w0 + w1));
      }
    }
    EXPECT_LE(MaxAbsError(o2, ref_o).err, kOutTol) << "own token folded";
    EXPECT_LE(MaxAbsError(lse2, ref_l).err, kLseTol) << "own token folded";
    int bad_cast = 0;
    for (size_t i = 0; i < o2.size(); ++i) bad_cast += cast[i] != HalfBits(o2[i]);
    EXPECT_EQ(bad_cast, 0) << "f16 copy of o";
  }

  // fp16: the same inputs through the plain-array reference.
  if (!fmt->quantized()) {
    for (int s = 0; s < batch; ++s) {
      std::vector<float> kk, vv;
      ASSERT_TRUE(caches[s]->ReadBack(layer, 0, caches[s]->length(), &kk, &vv).ok());
      const auto inv = kernels::RopeInvFreq(rope);
      kernels::DecodeAttentionRefInput in;
      in.n_heads = n_heads;
      in.n_kv_heads = c.n_kv_heads;
      in.head_dim = c.head_dim;
      in.n_tokens = caches[s]->length();
      in.first_position = c.first_position;
      in.q = q.data() + static_cast<size_t>(s) * n_heads * c.head_dim;
      in.k = kk.data();
      in.v = vv.data();
      in.inv_freq = &inv;
      std::vector<float> ro(static_cast<size_t>(n_heads) * c.head_dim), rl(n_heads);
      kernels::DecodeAttentionReference(in, ro.data(), rl.data());
      std::vector<float> go(o.begin() + static_cast<size_t>(s) * ro.size(),
                            o.begin() + static_cast<size_t>(s + 1) * ro.size());
      std::vector<float> gl(lse.begin() + s * n_heads, lse.begin() + (s + 1) * n_heads);
      EXPECT_LE(MaxAbsError(go, ro).err, kOutTol) << "sequence " << s;
      EXPECT_LE(MaxAbsError(gl, rl).err, kLseTol) << "sequence " << s;
    }
  }
}

std::vector<Case> Cases() {
  std::vector<Case> cs;
  const std::vector<int> mixed = {1, 113, 256, 257, 700};
  for (int hd : {64, 128}) {
    for (const char* f : {"fp16", "nuq4-1%", "nuq3-1%", "nuq2-1%", "nuq3", "nuq4-0.1%-sink5",
                          "int3-pc-post-1%", "int4-pc-pre"}) {
      cs.push_back({f, hd, 2, 4, mixed, 0, 0});
    }
    cs.push_back({"fp16", hd, 3, 3, {1000}, 0, 3});
    cs.push_back({"nuq3-1%", hd, 1, 1, {513, 40}, 0, 0});
    cs.push_back({"nuq2-1%", hd, 2, 8, {300}, 0, 1});
    cs.push_back({"nuq3-1%-sink5", hd, 1, 2, {3, 5, 6, 260}, 0, 0});
    // A rank shard deep into a 10M-token sequence: positions near 1e7 (no sink).
    cs.push_back({"fp16", hd, 2, 4, {600, 77}, 9999000, 0});
    cs.push_back({"nuq3-1%", hd, 2, 4, {600, 77}, 9999000, 2});
    // One split over > 64 groups of 64 tokens: the fp32 RoPE anchor recurrence is re-anchored.
    cs.push_back({"nuq4-1%", hd, 1, 8, {4500}, 9990000, 1});
    cs.push_back({"fp16", hd, 9, 1, {4500}, 5000000, 1});
    // fp16 sink tokens on the tensor-core path: partial sink capacity (first_position 2 < sink
    // 5), sinks only in split 0 of several, the 64-token maximum (4 sink tiles), post-RoPE keys
    // with rotated sinks, mixed lengths shorter and longer than the sink.
    cs.push_back({"nuq3-1%-sink5", hd, 2, 4, {1, 3, 4, 300}, 2, 0});
    cs.push_back({"nuq4-1%-sink5", hd, 2, 8, {600, 2, 5, 517}, 0, 3});
    cs.push_back({"nuq2-1%-sink64", hd, 1, 4, {64, 65, 400, 30}, 0, 0});
    cs.push_back({"int3-pc-post-1%-sink3", hd, 2, 4, {1, 113, 256, 257, 700}, 0, 2});
    cs.push_back({"nuq3-1%", hd, 8, 4, {2048, 1, 777}, 0, 0});
    // Splits of whole 16-token tiles that start inside blocks and inside 64-token cos/sin groups
    // (700 tokens = 44 tiles, 5 splits of 9 tiles: splits begin at tokens 144, 288, 432, 576):
    // the key-outlier cursor is found mid-block, the group tables start off their groups.
    cs.push_back({"nuq3-1%", hd, 2, 4, {700, 450}, 0, 5});
    cs.push_back({"nuq4-1%-sink5", hd, 1, 8, {700}, 0, 7});
    cs.push_back({"fp16", hd, 2, 4, {700, 130}, 0, 9});
    // One tile per split (the short-context choice): 44 splits, sinks in split 0 only.
    cs.push_back({"nuq3-1%", hd, 2, 4, {700, 33}, 0, 44});
    cs.push_back({"nuq2-1%-sink5", hd, 3, 3, {700}, 0, 44});
    cs.push_back({"fp16", hd, 3, 3, {700, 17}, 0, 44});
    // Value outliers all in one head: that head's warp patches every entry of its tokens' rows
    // and the other warps none; a split that starts mid-block.
    cs.push_back({"nuq3-1%", hd, 8, 4, {700, 300}, 0, 0, 2});
    cs.push_back({"nuq4-1%-sink5", hd, 4, 2, {900}, 0, 3, 0});
    cs.push_back({"nuq2-1%", hd, 2, 8, {500}, 0, 2, 1});
    // Value-outlier head starts (k_v > n_kv heads; block_layout.h): 5% of 4 heads' elements,
    // every outlier in the last head (its range ends at k_v) or spread; splits mid-block.
    cs.push_back({"nuq3-5%", hd, 4, 2, {1, 113, 257, 700}, 0, 3, 3});
    cs.push_back({"nuq4-5%-sink5", hd, 4, 2, {900, 40}, 0, 5});
    // More KV heads than one CTA holds (LLaMA-2-7B's 32; 20: a last CTA with fewer warps), with
    // outliers, sinks and splits.
    cs.push_back({"nuq3-1%-sink5", hd, 32, 1, {300, 17}, 0, 3});
    cs.push_back({"fp16", hd, 20, 1, {260}, 0, 2});
    cs.push_back({"nuq2-1%", hd, 20, 2, {200, 1}, 0, 0});
  }
  return cs;
}

INSTANTIATE_TEST_SUITE_P(Grid, DecodeAttentionTest, ::testing::ValuesIn(Cases()), CaseName);

TEST(DecodeAttentionLauncher, RejectsUnsupportedKeys) {
  kernels::DecodeAttentionParams p;
  p.kv.geom.n_layers = 1;
  p.kv.geom.n_kv_heads = 1;
  p.kv.geom.head_dim = 96;
  p.kv.geom.bits = 16;
  p.kv.geom.key_words_per_token = p.kv.geom.value_words_per_token = 48;
  p.kv.keys_rotated = true;
  p.batch = 0;
  p.n_heads = 1;
  // batch 0 is a no-op even for an uninstantiated head_dim...
  EXPECT_TRUE(kernels::LaunchDecodeAttention(p, nullptr).ok());
  p.n_heads = 16;
  const absl::Status s = kernels::LaunchDecodeAttention(p, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;  // group 16 > 8
  EXPECT_NE(std::string(s.message()).find("group"), std::string::npos) << s;
  // A layer section the kernels' 32-bit offsets cannot address.
  p.n_heads = 1;
  p.kv.geom.layer_bytes = int64_t{1} << 31;
  const absl::Status big = kernels::LaunchDecodeAttention(p, nullptr);
  EXPECT_EQ(big.code(), absl::StatusCode::kInvalidArgument) << big;
  EXPECT_NE(std::string(big.message()).find("32-bit offsets"), std::string::npos) << big;
}

// The RoPE table launchers check their arguments before anything reaches the GPU.
TEST(RopeTables, RejectBadArguments) {
  const double inv_freq[4] = {1.0, 0.1, 0.01, 0.001};
  alignas(16) static float out[64];
  EXPECT_EQ(kernels::LaunchRopeAnchorTable(inv_freq, 6, 1, out, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kernels::LaunchRopeAnchorTable(inv_freq, 8, -1, out, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kernels::LaunchRopeAnchorTable(inv_freq, 8, 1, nullptr, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(kernels::LaunchRopeAnchorTable(inv_freq, 8, 1, reinterpret_cast<char*>(out) + 4, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(kernels::LaunchRopeAnchorTable(inv_freq, 8, 0, nullptr, nullptr).ok());  // nothing to write
  EXPECT_EQ(kernels::RopeAnchorTableBytes(128, 4096), size_t{4096} * 64 * 8);
  EXPECT_EQ(kernels::LaunchRopeStepTable(inv_freq, 6, out, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST(DecodeAttentionLauncher, UnknownInstanceNamesTheKey) {
  KVQ_REQUIRE_CUDA_DEVICE();
  kernels::DecodeAttentionParams p;
  p.kv.geom.n_layers = 1;
  p.kv.geom.n_kv_heads = 1;
  p.kv.geom.head_dim = 96;
  p.kv.geom.bits = 16;
  p.kv.geom.key_words_per_token = p.kv.geom.value_words_per_token = 48;
  p.kv.keys_rotated = true;
  DeviceBuffer<float> buf(1024);
  DeviceBuffer<int32_t> ibuf(16);
  DeviceBuffer<int64_t> lbuf(16);
  p.batch = 1;
  p.n_heads = 1;
  p.q = p.o = p.lse = buf.get();
  p.kv.seq_lens = ibuf.get();
  p.kv.first_positions = lbuf.get();
  const absl::Status s = kernels::LaunchDecodeAttention(p, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  EXPECT_NE(std::string(s.message()).find("head_dim=96"), std::string::npos) << s;
}

// ---- Merge ----

// cast (optional): o_cast in cast_dtype, downloaded as raw 32-bit words (2-byte types packed).
// self (optional): the own-key partial (device pointers).
void RunMerge(int rows, int parts, int hd, const std::vector<float>& o_parts,
              const std::vector<float>& lse_parts, std::vector<float>* o, std::vector<float>* lse,
              kernels::DType cast_dtype = kernels::DType::kF32, std::vector<float>* cast = nullptr,
              const kernels::SelfKeyPartial* self = nullptr) {
  DeviceBuffer<float> dop(o_parts), dlp(lse_parts), dout(static_cast<size_t>(rows) * hd),
      dlse(rows), dcast(static_cast<size_t>(rows) * hd);
  kernels::MergeAttentionParams p;
  p.rows = rows;
  p.n_parts = parts;
  p.head_dim = hd;
  p.o_parts = dop.get();
  p.o_row_stride = static_cast<int64_t>(parts) * hd;
  p.o_part_stride = hd;
  p.lse_parts = dlp.get();
  p.lse_row_stride = parts;
  p.lse_part_stride = 1;
  p.o = dout.get();
  p.lse = dlse.get();
  if (cast != nullptr) {
    p.o_cast = dcast.get();
    p.o_cast_dtype = cast_dtype;
  }
  if (self != nullptr) p.self = *self;
  ASSERT_TRUE(kernels::LaunchMergeAttention(p, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  *o = dout.Download();
  *lse = dlse.Download();
  if (cast != nullptr) *cast = dcast.Download();
}

class MergeTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(MergeTest, MatchesReference) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const auto [parts, hd] = GetParam();
  const int rows = 37;
  std::mt19937 rng(parts * 31 + hd);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> op(static_cast<size_t>(rows) * parts * hd), lp(static_cast<size_t>(rows) * parts);
  for (float& x : op) x = nd(rng);
  for (size_t i = 0; i < lp.size(); ++i) lp[i] = (i % 7 == 3) ? -INFINITY : 5.0f * nd(rng);
  for (int d = 0; d < parts; ++d) lp[d] = -INFINITY;  // row 0: every partial empty
  std::vector<float> o, lse, ro(static_cast<size_t>(rows) * hd), rl(rows);
  RunMerge(rows, parts, hd, op, lp, &o, &lse);
  kernels::MergeAttentionReference(rows, parts, hd, op.data(), lp.data(), ro.data(), rl.data());
  // fp32 vs double of a convex combination of N(0,1) values: 1e-5, or for thousands of partials
  // (> 8192 take the kernel that sums them in one sequential chain) the fp32 bound of a chain
  // of `parts` additions of terms up to ~4: parts * 2^-24 * 4.
  const double tol = std::max(1e-5, parts * 4.0 * std::ldexp(1.0, -24));
  EXPECT_LE(MaxAbsError(o, ro).err, tol);
  EXPECT_LE(MaxAbsError(lse, rl).err, tol);
  EXPECT_TRUE(std::isinf(lse[0]) && lse[0] < 0);
}

INSTANTIATE_TEST_SUITE_P(Grid, MergeTest,
                         ::testing::Combine(::testing::Values(1, 2, 7, 64, 256, 9000),
                                            ::testing::Values(64, 128, 66)));

// The reference merge of partials in the layout [n_parts][rows][hd] (through a row-major copy).
void PartsMajorReference(int rows, int parts, int hd, const std::vector<float>& op, const std::vector<float>& lp,
                         std::vector<float>* ro, std::vector<float>* rl) {
  std::vector<float> rop(op.size()), rlp(lp.size());
  for (int r = 0; r < parts; ++r) {
    for (int i = 0; i < rows; ++i) {
      rlp[static_cast<size_t>(i) * parts + r] = lp[static_cast<size_t>(r) * rows + i];
      for (int d = 0; d < hd; ++d) {
        rop[(static_cast<size_t>(i) * parts + r) * hd + d] = op[(static_cast<size_t>(r) * rows + i) * hd + d];
      }
    }
  }
  ro->assign(static_cast<size_t>(rows) * hd, 0.0f);
  rl->assign(rows, 0.0f);
  kernels::MergeAttentionReference(rows, parts, hd, rop.data(), rlp.data(), ro->data(), rl->data());
}

// A merge of partials in the layout [n_parts][rows][hd] into partial 0 (o and lse alias it).
kernels::MergeAttentionParams PartsMajorInPlace(int rows, int parts, int hd, float* o_parts, float* lse_parts) {
  kernels::MergeAttentionParams p;
  p.rows = rows;
  p.n_parts = parts;
  p.head_dim = hd;
  p.o_parts = o_parts;
  p.o_row_stride = hd;
  p.o_part_stride = static_cast<int64_t>(rows) * hd;
  p.lse_parts = lse_parts;
  p.lse_row_stride = 1;
  p.lse_part_stride = rows;
  p.o = o_parts;
  p.lse = lse_parts;
  return p;
}

// The sharded layout [n_parts][rows][hd] merged in place into partial 0 (o and lse alias it), with
// as many partials as a batch-1 decode at long context has splits.
TEST(MergeInPlace, PartsMajorLayoutIntoPartialZero) {
  KVQ_REQUIRE_CUDA_DEVICE();
  const int rows = 32, parts = 256, hd = 128;
  std::mt19937 rng(77);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> op(static_cast<size_t>(parts) * rows * hd), lp(static_cast<size_t>(parts) * rows);
  for (float& x : op) x = nd(rng);
  for (size_t i = 0; i < lp.size(); ++i) lp[i] = (i % 5 == 1) ? -INFINITY : 3.0f * nd(rng);
  std::vector<float> ro, rl;
  PartsMajorReference(rows, parts, hd, op, lp, &ro, &rl);
  DeviceBuffer<float> dop(op), dlp(lp);
  kernels::MergeAttentionParams p = PartsMajorInPlace(rows, parts, hd, dop.get(), dlp.get());
  ASSERT_TRUE(kernels::LaunchMergeAttention(p, nullptr).ok());
  KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<float> all_o = dop.Download(), all_l = dlp.Download();
  const std::vector<float> o(all_o.begin(), all_o.begin() + static_cast<size_t>(rows) * hd);
  const std::vector<float> lse(all_l.begin(), all_l.begin() + rows);
  EXPECT_LE(MaxAbsError(o, ro).err, 1e-5);
  EXPECT_LE(MaxAbsError(lse, rl).err, 1e-5);
}

// Many rows of few partials in the prefill layout [n_parts][rows][hd] (the warp-per-row kernel:
// >= 2,048 rows, <= 8 partials, head dim 64 or 128), out of place with an f16 copy of o, and in
// place into partial 0; rows whose partials are all empty give o = 0, lse = -inf.
TEST(MergeManyRows, PartsMajorLayoutMatchesTheReference) {
  KVQ_REQUIRE_CUDA_DEVICE();
  for (const int hd : {64, 128}) {
    for (const int parts : {1, 3, 8}) {
      for (const bool in_place : {false, true}) {
        const int rows = 4099;
        std::mt19937 rng(hd * 13 + parts * 7 + in_place);
        std::normal_distribution<float> nd(0.0f, 1.0f);
        std::vector<float> op(static_cast<size_t>(parts) * rows * hd), lp(static_cast<size_t>(parts) * rows);
        for (float& x : op) x = nd(rng);
        for (size_t i = 0; i < lp.size(); ++i) lp[i] = (i % 5 == 1) ? -INFINITY : 3.0f * nd(rng);
        for (int r = 0; r < parts; ++r) lp[static_cast<size_t>(r) * rows + 17] = -INFINITY;  // row 17: empty
        std::vector<float> ro, rl;
        PartsMajorReference(rows, parts, hd, op, lp, &ro, &rl);
        DeviceBuffer<float> dop(op), dlp(lp), dout(static_cast<size_t>(rows) * hd), dlse(rows);
        DeviceBuffer<uint16_t> dcast(static_cast<size_t>(rows) * hd);
        kernels::MergeAttentionParams p = PartsMajorInPlace(rows, parts, hd, dop.get(), dlp.get());
        if (!in_place) {
          p.o = dout.get();
          p.lse = dlse.get();
        }
        p.o_cast = dcast.get();
        p.o_cast_dtype = kernels::DType::kF16;
        ASSERT_TRUE(kernels::LaunchMergeAttention(p, nullptr).ok());
        KVQ_ASSERT_CUDA(cudaDeviceSynchronize());
        std::vector<float> o = in_place ? dop.Download() : dout.Download();
        std::vector<float> lse = in_place ? dlp.Download() : dlse.Download();
        o.resize(static_cast<size_t>(rows) * hd);
        lse.resize(rows);
        const std::string what = absl::StrCat("hd ", hd, ", parts ", parts, in_place ? ", in place" : "");
        EXPECT_LE(MaxAbsError(o, ro).err, 1e-5) << what;
        EXPECT_LE(MaxAbsError(lse, rl).err, 1e-5) << what;
        EXPECT_TRUE(std::isinf(lse[17]) && lse[17] < 0) << what;
        EXPECT_EQ(o[17 * hd], 0.0f) << what;
        const std::vector<uint16_t> cast = dcast.Download();
        int bad = 0;
        for (size_t i = 0; i < o.size(); ++i) bad += cast[i] != __half_as_ushort(__float2half_rn(o[i]));
        EXPECT_EQ(bad, 0) << what << ": o_cast is not fp16(o)";
      }
    }
  }
}

// o_cast: the merge also writes o converted to the GEMM input type (f16, bf16, f32), exactly
// the conversion of the f32 o it writes, for both merge kernels (<= 8192 partials and more) and
// for rows whose partials are all empty.
TEST(MergeCast, WritesConvertedOutput) {
  KVQ_REQUIRE_CUDA_DEVICE();
  for (const int parts : {3, 9000}) {
    for (const kernels::DType dt : {kernels::DType::kF16, kernels::DType::kBF16, kernels::DType::kF32}) {
      const int rows = 6, hd = 64;
      std::mt19937 rng(parts);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::vector<float> op(static_cast<size_t>(rows) * parts * hd), lp(static_cast<size_t>(rows) * parts);
      for (float& x : op) x = nd(rng);
      for (size_t i = 0; i < lp.size(); ++i) lp[i] = i / parts == 2 ? -INFINITY : 2.0f * nd(rng);
      std::vector<float> o, lse, cast;
      RunMerge(rows, parts, hd, op, lp, &o, &lse, dt, &cast);
      const auto* h = reinterpret_cast<const uint16_t*>(cast.data());
      int bad = 0;
      for (size_t i = 0; i < o.size(); ++i) {
        uint32_t want = 0, got = 0;
        if (dt == kernels::DType::kF32) {
          std::memcpy(&want, &o[i], 4);
          std::memcpy(&got, &cast[i], 4);
        } else {
          uint16_t w16 = 0;
          if (dt == kernels::DType::kF16) {
            const __half x = __float2half_rn(o[i]);
            std::memcpy(&w16, &x, 2);
          } else {
            const __nv_bfloat16 x = __float2bfloat16_rn(o[i]);
            std::memcpy(&w16, &x, 2);
          }
          want = w16;
          got = h[i];
        }
        bad += want != got;
      }
      EXPECT_EQ(bad, 0) << parts << " partials, " << kernels::DTypeName(dt);
      for (int d = 0; d < hd; ++d) EXPECT_EQ(o[2 * hd + d], 0.0f);  // row 2: all partials empty
    }
  }
}

// MergeAttentionParams::self: each row's own-key partial (lse = scale q . k, o = v of its KV
// head) merged with the stored partials, for both merge kernels (<= 8192 partials and more),
// GQA rows, and a row whose stored partials are all empty (o = v, lse = the score).
TEST(MergeSelf, OwnKeyPartialMatchesExplicitPartial) {
  KVQ_REQUIRE_CUDA_DEVICE();
  for (const int parts : {1, 5, 9000}) {
    for (const int hd : {64, 128}) {
      const int seqs = 3, n_heads = 6, nkv = 2, group = n_heads / nkv, rows = seqs * n_heads;
      std::mt19937 rng(parts + hd);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::vector<float> op(static_cast<size_t>(rows) * parts * hd), lp(static_cast<size_t>(rows) * parts);
      for (float& x : op) x = nd(rng);
      for (size_t i = 0; i < lp.size(); ++i) lp[i] = i / parts == 4 ? -INFINITY : 3.0f * nd(rng);
      std::vector<float> q(static_cast<size_t>(rows) * hd), k(static_cast<size_t>(seqs) * nkv * hd), v(k.size());
      for (float& x : q) x = nd(rng);
      for (float& x : k) x = nd(rng);
      for (float& x : v) x = nd(rng);
      const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
      // Reference: the explicit partial appended to each row's partials.
      std::vector<float> rop(static_cast<size_t>(rows) * (parts + 1) * hd), rlp(static_cast<size_t>(rows) * (parts + 1));
      for (int i = 0; i < rows; ++i) {
        const int kvh = (i % n_heads) / group, sq = i / n_heads;
        const float* kr = k.data() + (static_cast<size_t>(sq) * nkv + kvh) * hd;
        const float* vr = v.data() + (static_cast<size_t>(sq) * nkv + kvh) * hd;
        double dot = 0.0;
        for (int d = 0; d < hd; ++d) dot += static_cast<double>(q[static_cast<size_t>(i) * hd + d]) * kr[d];
        for (int r = 0; r <= parts; ++r) {
          const size_t at = static_cast<size_t>(i) * (parts + 1) + r;
          rlp[at] = r < parts ? lp[static_cast<size_t>(i) * parts + r] : static_cast<float>(dot * scale);
          for (int d = 0; d < hd; ++d) {
            rop[at * hd + d] = r < parts ? op[(static_cast<size_t>(i) * parts + r) * hd + d] : vr[d];
          }
        }
      }
      std::vector<float> ro(static_cast<size_t>(rows) * hd), rl(rows);
      kernels::MergeAttentionReference(rows, parts + 1, hd, rop.data(), rlp.data(), ro.data(), rl.data());
      DeviceBuffer<float> dq(q), dk(k), dv(v);
      kernels::SelfKeyPartial self;
      self.q = dq.get();
      self.k = dk.get();
      self.v = dv.get();
      self.k_seq_stride = self.v_seq_stride = static_cast<int64_t>(nkv) * hd;
      self.n_heads = n_heads;
      self.n_kv_heads = nkv;
      self.scale = scale;
      std::vector<float> o, lse;
      RunMerge(rows, parts, hd, op, lp, &o, &lse, kernels::DType::kF32, nullptr, &self);
      if (HasFatalFailure()) return;
      const double tol = std::max(1e-5, parts * 4.0 * std::ldexp(1.0, -24));
      EXPECT_LE(MaxAbsError(o, ro).err, tol) << parts << " partials, hd " << hd;
      EXPECT_LE(MaxAbsError(lse, rl).err, tol) << parts << " partials, hd " << hd;
      // Row 4: every stored partial empty, so o is its own value row.
      const float* v4 = v.data() + (static_cast<size_t>(4 / n_heads) * nkv + (4 % n_heads) / group) * hd;
      for (int d = 0; d < hd; ++d) EXPECT_NEAR(o[4 * hd + d], v4[d], 1e-6);
      kernels::MergeAttentionParams p;  // n_kv_heads 4 does not divide n_heads 6: refused
      p.rows = rows;
      p.n_parts = parts;
      p.head_dim = hd;
      p.o_parts = p.lse_parts = p.o = p.lse = dq.get();
      p.self = self;
      p.self.n_kv_heads = 4;
      const absl::Status bad = kernels::LaunchMergeAttention(p, nullptr);
      EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
      EXPECT_NE(std::string(bad.message()).find("n_kv_heads (4)"), std::string::npos) << bad;
    }
  }
}

// Split choice (host only): whole waves of resident CTAs, no second wave of a few CTAs.
TEST(ChooseDecodeSplits, FillsWholeWaves) {
  const int sms = 132;  // H200
  constexpr kernels::KvCodec kFp16 = kernels::KvCodec::kFp16, kLut3 = kernels::KvCodec::kLut3;
  // LUT codecs: CTAs of up to 16 warps (one per SM); with <= 8 KV heads the same as fp16.
  EXPECT_EQ(kernels::DecodeCtaWarps(32, kLut3), 16);
  EXPECT_EQ(kernels::DecodeCtaWarps(32, kFp16), 8);
  EXPECT_EQ(kernels::DecodeCtaWarps(3, kLut3), 3);
  EXPECT_EQ(kernels::DecodeCtasPerSm(32, 128, kLut3), 1);
  EXPECT_EQ(kernels::DecodeCtasPerSm(8, 128, kLut3), 2);
  EXPECT_EQ(kernels::DecodeCtasPerSm(3, 64, kLut3), 5);
  for (int batch : {1, 8, 32}) {
    for (int ctx : {1024, 131072, 1048576}) {
      for (int n_kv : {3, 8}) {
        EXPECT_EQ(kernels::ChooseDecodeSplits(batch, n_kv, ctx, kLut3, sms),
                  kernels::ChooseDecodeSplits(batch, n_kv, ctx, kFp16, sms));
      }
    }
  }
  // LLaMA-2-7B with a LUT codec: 2 CTAs of 16 warps per sequence and split, 132 slots.
  EXPECT_EQ(kernels::ChooseDecodeSplits(32, 32, 131072, kLut3, sms), 2);
  EXPECT_EQ(kernels::ChooseDecodeSplits(1, 32, 1048576, kLut3, sms), 66);  // 132 CTAs
  EXPECT_EQ(kernels::ChooseDecodeSplits(8, 32, 131072, kLut3, sms), 8);    // 128 CTAs
  // Llama-3-8B (8 KV heads: one CTA per sequence and split) at 128K.
  EXPECT_EQ(kernels::ChooseDecodeSplits(1, 8, 131072, kFp16, sms), 256);
  EXPECT_EQ(kernels::ChooseDecodeSplits(8, 8, 131072, kFp16, sms), 33);
  EXPECT_EQ(kernels::ChooseDecodeSplits(32, 8, 131072, kFp16, sms), 8);  // 9 gave 288 CTAs
  // LLaMA-2-7B (32 KV heads: 4 CTAs per sequence and split), batch 32: one split per sequence
  // already makes 128 CTAs; two fill one wave.
  EXPECT_EQ(kernels::ChooseDecodeSplits(32, 32, 131072, kFp16, sms), 2);
  // 3 KV heads of head dim 128: 3-warp CTAs, three per SM (shared memory): batch 32 at 128K
  // fills 396 slots. SmolLM2 (head dim 64): five per SM (registers), 660 slots.
  EXPECT_EQ(kernels::DecodeCtasPerSm(3, 128, kFp16), 3);
  EXPECT_EQ(kernels::DecodeCtasPerSm(3, 64, kFp16), 5);
  EXPECT_EQ(kernels::DecodeCtasPerSm(8, 128, kFp16), 2);
  EXPECT_EQ(kernels::ChooseDecodeSplits(32, 3, 131072, kFp16, sms), 12);
  // 20 splits fill one wave (640 CTAs); 41 fill two (1,312 of 1,320) with half the tokens per CTA.
  EXPECT_EQ(kernels::ChooseDecodeSplits(32, 3, 131072, kFp16, sms, 64), 41);
  // Short contexts: one 64-token group per split, then (no more CTAs than SMs) down to one
  // 16-token tile per split, up to one wave of CTAs.
  EXPECT_EQ(kernels::ChooseDecodeSplits(1, 8, 1024, kFp16, sms), 64);
  EXPECT_EQ(kernels::ChooseDecodeSplits(8, 8, 1024, kFp16, sms), 33);   // 264 slots / 8
  EXPECT_EQ(kernels::ChooseDecodeSplits(1, 8, 4096, kFp16, sms), 256);
  EXPECT_EQ(kernels::ChooseDecodeSplits(1, 3, 4096, kFp16, sms, 64), 256);
  EXPECT_EQ(kernels::ChooseDecodeSplits(8, 3, 4096, kFp16, sms, 64), 64);  // 512 CTAs: groups kept
  EXPECT_EQ(kernels::ChooseDecodeSplits(1, 8, 131072, kFp16, sms), 256);   // long: unchanged
  EXPECT_EQ(kernels::ChooseDecodeSplits(1, 8, 1, kFp16, sms), 1);
  // More CTAs than a wave without splitting: no splits.
  EXPECT_EQ(kernels::ChooseDecodeSplits(512, 8, 131072, kFp16, sms), 1);
  for (int batch : {1, 3, 8, 17, 32, 64}) {
    for (int ctx : {4096, 65536, 1048576}) {
      const int s = kernels::ChooseDecodeSplits(batch, 8, ctx, kFp16, sms);
      EXPECT_GE(s, 1);
      EXPECT_LE(s, (ctx + 15) / 16);
      // Never a last wave under a quarter full when the splits could have avoided it.
      const int64_t ctas = static_cast<int64_t>(batch) * s, slots = 2 * sms;
      if (ctas > slots) EXPECT_GE(ctas % slots == 0 ? slots : ctas % slots, slots / 4) << batch << " " << ctx;
    }
  }
}

TEST(MergeExact, EqualLseIntegerOutputs) {
  KVQ_REQUIRE_CUDA_DEVICE();
  // Four partials with equal lse: weights are exactly 1/4, integer multiples of 4 merge exactly,
  // and lse = l + log 4.
  const int rows = 3, parts = 4, hd = 128;
  std::vector<float> op(static_cast<size_t>(rows) * parts * hd), lp(rows * parts, 2.0f);
  for (size_t i = 0; i < op.size(); ++i) op[i] = static_cast<float>(4 * (static_cast<int>(i % 11) - 5));
  std::vector<float> o, lse;
  RunMerge(rows, parts, hd, op, lp, &o, &lse);
  for (int r = 0; r < rows; ++r) {
    for (int d = 0; d < hd; ++d) {
      double want = 0;
      for (int k = 0; k < parts; ++k) want += op[(static_cast<size_t>(r) * parts + k) * hd + d] / 4.0;
      ASSERT_EQ(o[static_cast<size_t>(r) * hd + d], static_cast<float>(want)) << r << "," << d;
    }
    EXPECT_NEAR(lse[r], 2.0 + std::log(4.0), 1e-6);
  }
}

}  // namespace
}  // namespace kvq
