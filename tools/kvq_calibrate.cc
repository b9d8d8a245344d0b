// `kvq calibrate`: offline KVQuant calibration of a model's quantizers.
//
//   1. kvq calibrate --model M --text a.txt,b.txt --dump_ids ids.bin
//        picks --samples windows of --context tokens, evenly spaced through each training text
//        (half of the samples from each), and writes their ids;
//   2. python3 tools/fisher.py M ids.bin fisher.bin       (optional: sensitivity weights)
//   3. kvq calibrate --model M --calib_ids ids.bin [--fisher fisher.bin] --formats nuq3-1%,nuq4-1%
//        --out_dir DIR
//        runs kvq's forward pass over the windows, collects every layer's pre-RoPE keys and values,
//        and fits one quantizer file per format (DIR/<format>.kvqq).
// scripts/calibrate.sh runs the three steps.
#include <cstdio>
#include <fstream>
#include <map>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "kvstore/calibration.h"
#include "kvstore/kv_format.h"
#include "model/fingerprint.h"
#include "model/forward.h"
#include "model/tokenizer.h"
#include "model/weights.h"
#include "tools/kvq_commands.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, text);
ABSL_DECLARE_FLAG(int, context);
ABSL_FLAG(int, samples, 16, "calibrate: number of calibration windows");
ABSL_FLAG(std::string, dump_ids, "", "calibrate: write the calibration windows' ids here and stop");
ABSL_FLAG(std::string, calib_ids, "", "calibrate: calibration windows written by --dump_ids");
ABSL_FLAG(std::string, fisher, "", "calibrate: Fisher weights from tools/fisher.py (empty: unweighted)");
ABSL_FLAG(std::string, formats, "nuq4-1%,nuq3-1%,nuq2-1%", "calibrate: comma-separated KV formats");
ABSL_FLAG(std::string, out_dir, ".", "calibrate: where <format>.kvqq files go");

namespace kvq::tools {
namespace {

absl::Status DumpIds(const model::Tokenizer& tok) {
  const int ctx = absl::GetFlag(FLAGS_context);
  const std::vector<std::string> files = absl::StrSplit(absl::GetFlag(FLAGS_text), ',', absl::SkipEmpty());
  if (files.empty()) return absl::InvalidArgumentError("--text needs at least one training file");
  const int samples = absl::GetFlag(FLAGS_samples);
  std::vector<int32_t> out = {0, ctx};
  int written = 0;
  for (size_t f = 0; f < files.size(); ++f) {
    std::ifstream in(files[f], std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", files[f]));
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::vector<int32_t> ids = tok.Encode(text, false, false);
    const int n = samples / static_cast<int>(files.size()) + (static_cast<int>(f) < samples % static_cast<int>(files.size()) ? 1 : 0);
    if (static_cast<int64_t>(ids.size()) < static_cast<int64_t>(n) * ctx) {
      return absl::InvalidArgumentError(absl::StrCat(files[f], " has ", ids.size(), " tokens, fewer than ",
                                                     n, " windows of ", ctx));
    }
    const int64_t step = (static_cast<int64_t>(ids.size()) - ctx) / std::max(1, n - 1);
    for (int w = 0; w < n; ++w) {
      out.insert(out.end(), ids.begin() + w * step, ids.begin() + w * step + ctx);
      ++written;
    }
  }
  out[0] = written;
  std::ofstream o(absl::GetFlag(FLAGS_dump_ids), std::ios::binary);
  o.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * 4));
  if (!o) return absl::InternalError("failed writing --dump_ids");
  std::fprintf(stderr, "[kvq] wrote %d windows of %d tokens to %s\n", written, ctx,
               absl::GetFlag(FLAGS_dump_ids).c_str());
  return absl::OkStatus();
}

absl::Status Fit(const model::LlamaWeights& w) {
  const model::ModelConfig& c = w.config;
  std::ifstream in(absl::GetFlag(FLAGS_calib_ids), std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open --calib_ids ", absl::GetFlag(FLAGS_calib_ids)));
  int32_t hdr[2];
  in.read(reinterpret_cast<char*>(hdr), 8);
  const int n_win = hdr[0], win = hdr[1];
  if (!in || n_win <= 0 || win <= 1) return absl::DataLossError("bad --calib_ids file header");
  std::vector<int32_t> ids(static_cast<size_t>(n_win) * win);
  in.read(reinterpret_cast<char*>(ids.data()), static_cast<std::streamsize>(ids.size() * 4));
  if (!in) return absl::DataLossError("--calib_ids file is truncated");
  const int64_t T = static_cast<int64_t>(n_win) * win;
  const int64_t kvd = c.kv_dim();
  // Collect pre-RoPE keys and values of every layer with the fp32 forward pass.
  std::vector<std::vector<float>> keys(c.n_layers, std::vector<float>(T * kvd));
  std::vector<std::vector<float>> values(c.n_layers, std::vector<float>(T * kvd));
  std::vector<std::vector<int64_t>> positions(c.n_layers);
  model::Forward fwd(w);
  for (int wi = 0; wi < n_win; ++wi) {
    model::DenseKvCache cache(c, /*fp32_storage=*/true);
    model::ForwardItem item{&cache, absl::Span<const int32_t>(ids.data() + static_cast<int64_t>(wi) * win, win), false};
    std::vector<float> logits;
    KVQ_RETURN_IF_ERROR(fwd.Run(absl::MakeSpan(&item, 1), {}, &logits));
    std::vector<float> k, v;
    for (int l = 0; l < c.n_layers; ++l) {
      cache.Read(l, 0, win, &k, &v);
      std::copy(k.begin(), k.end(), keys[l].begin() + static_cast<int64_t>(wi) * win * kvd);
      std::copy(v.begin(), v.end(), values[l].begin() + static_cast<int64_t>(wi) * win * kvd);
    }
    std::fprintf(stderr, "\r[kvq] collected window %d/%d", wi + 1, n_win);
  }
  std::fprintf(stderr, "\n");
  // Optional sensitivity weights.
  std::vector<std::vector<float>> fk, fv;
  const std::string fisher_path = absl::GetFlag(FLAGS_fisher);
  if (!fisher_path.empty()) {
    std::ifstream f(fisher_path, std::ios::binary);
    if (!f) return absl::NotFoundError(absl::StrCat("cannot open --fisher ", fisher_path));
    char magic[8];
    int64_t h[3];
    f.read(magic, 8);
    f.read(reinterpret_cast<char*>(h), sizeof(h));
    if (!f || std::string(magic, 8) != "KVQFISH1") return absl::DataLossError("--fisher: not a KVQFISH1 file");
    if (h[0] != c.n_layers || h[1] != T || h[2] != kvd) {
      return absl::FailedPreconditionError(absl::StrCat("--fisher is for ", h[0], " layers x ", h[1], " tokens x ",
                                                        h[2], "; expected ", c.n_layers, " x ", T, " x ", kvd,
                                                        " (same --calib_ids file?)"));
    }
    fk.assign(c.n_layers, std::vector<float>(T * kvd));
    fv.assign(c.n_layers, std::vector<float>(T * kvd));
    for (int l = 0; l < c.n_layers; ++l) {
      f.read(reinterpret_cast<char*>(fk[l].data()), static_cast<std::streamsize>(T * kvd * 4));
      f.read(reinterpret_cast<char*>(fv[l].data()), static_cast<std::streamsize>(T * kvd * 4));
    }
    if (!f) return absl::DataLossError("--fisher file is truncated");
  }
  // Tokens a format keeps in fp16 (the attention sink: the first positions of every window) are
  // never quantized, so they must not shape the thresholds or the LUTs: their keys and values and
  // their gradients are unlike the rest (the sink draws most of the attention). Calibration data
  // per sink length, built once per distinct length.
  struct Filtered {
    std::vector<std::vector<float>> k, v, fk, fv;
    std::vector<int64_t> pos;
  };
  std::map<int, Filtered> by_sink;
  auto data_for = [&](int sink) -> std::vector<kvstore::LayerCalibrationData> {
    auto [it, inserted] = by_sink.try_emplace(sink);
    Filtered& f = it->second;
    const int keep = win - std::min(sink, win - 1);
    const int64_t Tk = static_cast<int64_t>(n_win) * keep;
    if (inserted) {
      auto take = [&](const std::vector<float>& src, std::vector<float>* dst) {
        dst->resize(Tk * kvd);
        for (int wi = 0; wi < n_win; ++wi) {
          std::copy(src.begin() + (static_cast<int64_t>(wi) * win + (win - keep)) * kvd,
                    src.begin() + (static_cast<int64_t>(wi) + 1) * win * kvd,
                    dst->begin() + static_cast<int64_t>(wi) * keep * kvd);
        }
      };
      f.k.resize(c.n_layers);
      f.v.resize(c.n_layers);
      f.fk.resize(fk.empty() ? 0 : c.n_layers);
      f.fv.resize(fv.empty() ? 0 : c.n_layers);
      for (int l = 0; l < c.n_layers; ++l) {
        take(keys[l], &f.k[l]);
        take(values[l], &f.v[l]);
        if (!fk.empty()) {
          take(fk[l], &f.fk[l]);
          take(fv[l], &f.fv[l]);
        }
      }
      for (int wi = 0; wi < n_win; ++wi) {
        for (int t = 0; t < keep; ++t) f.pos.push_back(win - keep + t);
      }
    }
    std::vector<kvstore::LayerCalibrationData> layers(c.n_layers);
    for (int l = 0; l < c.n_layers; ++l) {
      layers[l].n_tokens = Tk;
      layers[l].keys = f.k[l].data();
      layers[l].values = f.v[l].data();
      layers[l].key_weights = f.fk.empty() ? nullptr : f.fk[l].data();
      layers[l].value_weights = f.fv.empty() ? nullptr : f.fv[l].data();
      layers[l].positions = f.pos.data();
    }
    return layers;
  };
  const kvstore::KvShape shape{c.n_layers, c.n_kv_heads, c.head_dim};
  kvstore::CalibrationOptions co;
  co.rope = model::RopeParamsFor(c);
  const std::string fingerprint = model::ModelFingerprint(w);
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_formats), ',', absl::SkipEmpty())) {
    KVQ_ASSIGN_OR_RETURN(kvstore::KvFormat fmt, kvstore::KvFormat::Parse(std::string(name)));
    const std::vector<kvstore::LayerCalibrationData> layers = data_for(fmt.sink_tokens);
    KVQ_ASSIGN_OR_RETURN(kvstore::Quantizer q, kvstore::Calibrate(shape, fmt, fingerprint, layers, co));
    const std::string path = absl::StrCat(absl::GetFlag(FLAGS_out_dir), "/", fmt.ToString(), ".kvqq");
    KVQ_RETURN_IF_ERROR(q.Save(path));
    std::fprintf(stderr, "[kvq] %s -> %s (%s)\n", fmt.ToString().c_str(), path.c_str(),
                 fk.empty() ? "unweighted k-means" : "Fisher-weighted k-means");
  }
  return absl::OkStatus();
}

}  // namespace

int Calibrate() {
  const std::string spec = absl::GetFlag(FLAGS_model);
  auto w = model::LoadWeights(spec);
  if (!w.ok()) return FailStatus(w.status());
  absl::Status s;
  if (!absl::GetFlag(FLAGS_dump_ids).empty()) {
    auto tok = model::Tokenizer::FromGgufPath(spec);
    if (!tok.ok()) return FailStatus(tok.status());
    s = DumpIds(**tok);
  } else {
    s = Fit(*w);
  }
  return s.ok() ? 0 : FailStatus(s);
}

}  // namespace kvq::tools
