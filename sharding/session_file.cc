#include "sharding/session_file.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace kvq::sharding {

absl::Status WriteSessionFile(const std::string& path, const SessionImage& image) {
  std::string out = "KVQSESS1";
  auto put = [&](int64_t v) { out.append(reinterpret_cast<const char*>(&v), 8); };
  put(static_cast<int64_t>(image.kv_format.size()));
  out += image.kv_format;
  put(static_cast<int64_t>(image.tokens.size()));
  out.append(reinterpret_cast<const char*>(image.tokens.data()), image.tokens.size() * 4);
  put(static_cast<int64_t>(image.kv.size()));
  out += image.kv;
  const std::string tmp = path + ".tmp";
  std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
  if (!f) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
  f.write(out.data(), static_cast<std::streamsize>(out.size()));
  f.close();
  if (!f || std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("failed writing ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<SessionImage> ReadSessionFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot open session file ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string data = ss.str();
  size_t p = 8;
  auto get = [&](int64_t* v) {
    if (p + 8 > data.size()) return false;
    std::memcpy(v, data.data() + p, 8);
    p += 8;
    return true;
  };
  int64_t n = 0;
  if (data.compare(0, 8, "KVQSESS1") != 0 || !get(&n) || n < 0 || p + n > data.size()) {
    return absl::DataLossError(absl::StrCat(path, " is not a kvq session file"));
  }
  SessionImage image;
  image.kv_format = data.substr(p, n);
  p += n;
  if (!get(&n) || n < 0 || p + n * 4 > data.size()) return absl::DataLossError(absl::StrCat(path, ": truncated token list"));
  image.tokens.resize(n);
  std::memcpy(image.tokens.data(), data.data() + p, n * 4);
  p += n * 4;
  if (!get(&n) || n < 0 || p + n != data.size()) return absl::DataLossError(absl::StrCat(path, ": truncated KV image"));
  image.kv = data.substr(p, n);
  return image;
}

}  // namespace kvq::sharding
