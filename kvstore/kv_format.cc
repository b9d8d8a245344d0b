#include "kvstore/kv_format.h"

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kvq::kvstore {

absl::Status KvShape::Validate() const {
  if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("invalid KV shape: ", n_layers, " layers, ",
                                                   n_kv_heads, " kv heads, head_dim ", head_dim));
  }
  if (head_dim % 32 != 0 || head_dim > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim must be a multiple of 32 and at most 256, got ", head_dim));
  }
  if (ElementsPerTokenPerLayer() > 65536) {
    return absl::InvalidArgumentError(absl::StrCat(
        "n_kv_heads * head_dim must be at most 65536, got ", ElementsPerTokenPerLayer()));
  }
  return absl::OkStatus();
}

namespace {
int DefaultSink(KvFormatKind kind) { return kind == KvFormatKind::kNuq ? 1 : 0; }
bool DefaultQNorm(KvFormatKind kind, int bits) { return kind == KvFormatKind::kNuq && bits == 2; }
}  // namespace

KvFormat KvFormat::Make(KvFormatKind kind, int bits, double outlier_fraction) {
  KvFormat f;
  f.kind = kind;
  f.bits = kind == KvFormatKind::kFp16 ? 16 : bits;
  f.outlier_fraction = outlier_fraction;
  f.sink_tokens = DefaultSink(kind);
  f.qnorm = DefaultQNorm(kind, bits);
  return f;
}

absl::Status KvFormat::Validate() const {
  if (kind == KvFormatKind::kFp16) {
    if (bits != 16 || outlier_fraction != 0.0 || sink_tokens != 0 || qnorm) {
      return absl::InvalidArgumentError("fp16 takes no bits, outliers, sink or qnorm");
    }
    return absl::OkStatus();
  }
  if (bits < 2 || bits > 4) {
    return absl::InvalidArgumentError(absl::StrCat("bit width must be 2, 3 or 4, got ", bits));
  }
  if (!(outlier_fraction >= 0.0) || outlier_fraction > kMaxOutlierFraction) {
    return absl::InvalidArgumentError(
        absl::StrCat("outlier fraction must be in [0, 0.1], got ", outlier_fraction));
  }
  if (outlier_fraction > 0.0 && kind == KvFormatKind::kIntPerToken) {
    return absl::InvalidArgumentError(
        "dense-and-sparse outliers need per-channel keys (use intB-pc-pre/-post or nuqB)");
  }
  if (sink_tokens < 0 || sink_tokens > kMaxSinkTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("sink length must be in [0, ", kMaxSinkTokens, "], got ", sink_tokens));
  }
  return absl::OkStatus();
}

std::string KvFormat::ToString() const {
  std::string s;
  switch (kind) {
    case KvFormatKind::kFp16: return "fp16";
    case KvFormatKind::kIntPerToken: s = absl::StrCat("int", bits); break;
    case KvFormatKind::kIntPerChannelPreRope: s = absl::StrCat("int", bits, "-pc-pre"); break;
    case KvFormatKind::kIntPerChannelPostRope: s = absl::StrCat("int", bits, "-pc-post"); break;
    case KvFormatKind::kNuq: s = absl::StrCat("nuq", bits); break;
  }
  if (outlier_fraction > 0.0) absl::StrAppend(&s, absl::StrFormat("-%g%%", outlier_fraction * 100.0));
  if (sink_tokens != DefaultSink(kind)) {
    absl::StrAppend(&s, sink_tokens == 0 ? std::string("-nosink") : absl::StrCat("-sink", sink_tokens));
  }
  if (qnorm != DefaultQNorm(kind, bits)) absl::StrAppend(&s, qnorm ? "-qnorm" : "-noqnorm");
  return s;
}

absl::StatusOr<KvFormat> KvFormat::Parse(std::string_view name_view) {
  // Debian's Abseil has its own string_view: work on std::string.
  const std::string name(name_view);
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("bad KV format \"", name, "\": ", why));
  };
  std::vector<std::string> parts;
  for (size_t start = 0;;) {
    const size_t dash = name.find('-', start);
    parts.push_back(name.substr(start, dash == std::string::npos ? std::string::npos : dash - start));
    if (dash == std::string::npos) break;
    start = dash + 1;
  }
  if (parts[0].empty()) return bad("empty");
  const std::string& base = parts[0];
  size_t next = 1;
  KvFormatKind kind;
  int bits = 16;
  if (base == "fp16") {
    kind = KvFormatKind::kFp16;
  } else if (base.size() == 4 && (base.compare(0, 3, "int") == 0 || base.compare(0, 3, "nuq") == 0)) {
    const char d = base[3];
    if (d < '2' || d > '4') return bad("bit width must be 2, 3 or 4");
    bits = d - '0';
    if (base[0] == 'n') {
      kind = KvFormatKind::kNuq;
    } else if (parts.size() >= 3 && parts[1] == "pc") {
      if (parts[2] == "pre") {
        kind = KvFormatKind::kIntPerChannelPreRope;
      } else if (parts[2] == "post") {
        kind = KvFormatKind::kIntPerChannelPostRope;
      } else {
        return bad("expected pc-pre or pc-post");
      }
      next = 3;
    } else {
      kind = KvFormatKind::kIntPerToken;
    }
  } else {
    return bad("expected fp16, int{2,3,4}[-pc-pre|-pc-post] or nuq{2,3,4}");
  }
  KvFormat f = Make(kind, bits);
  bool seen_outliers = false, seen_sink = false, seen_qnorm = false;
  for (size_t i = next; i < parts.size(); ++i) {
    const std::string& p = parts[i];
    if (!p.empty() && p.back() == '%') {
      double pct;
      if (seen_outliers || !absl::SimpleAtod(p.substr(0, p.size() - 1), &pct) || !(pct > 0.0)) {
        return bad(absl::StrCat("bad outlier percentage \"", p, "\""));
      }
      f.outlier_fraction = pct / 100.0;
      seen_outliers = true;
    } else if (p == "nosink" || (p.size() > 4 && p.compare(0, 4, "sink") == 0)) {
      int n = 0;
      if (seen_sink || (p != "nosink" && !absl::SimpleAtoi(p.substr(4), &n))) {
        return bad(absl::StrCat("bad sink modifier \"", p, "\""));
      }
      f.sink_tokens = n;
      seen_sink = true;
    } else if (p == "qnorm" || p == "noqnorm") {
      if (seen_qnorm) return bad("qnorm given twice");
      f.qnorm = p == "qnorm";
      seen_qnorm = true;
    } else {
      return bad(absl::StrCat("unknown modifier \"", p, "\""));
    }
  }
  if (absl::Status s = f.Validate(); !s.ok()) return bad(std::string(s.message()));
  return f;
}

int ValueOutliersPerToken(const KvFormat& format, const KvShape& shape) {
  if (!format.quantized() || format.outlier_fraction <= 0.0) return 0;
  return static_cast<int>(
      std::llround(format.outlier_fraction * static_cast<double>(shape.ElementsPerTokenPerLayer())));
}

}  // namespace kvq::kvstore
