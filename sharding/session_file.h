// The on-disk form of a saved session (Engine::SaveSession / LoadSession): the KV format name,
// the session's tokens, and the cache's own serialized image (kvstore's compressed bytes).
//   "KVQSESS1" | i64 n | format name | i64 n | n x i32 tokens | i64 n | KV image
// Written to <path>.tmp and renamed, so a crash never leaves a half-written session.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvq::sharding {

struct SessionImage {
  std::string kv_format;
  std::vector<int32_t> tokens;
  std::string kv;  // KvCache::Serialize()
};

absl::Status WriteSessionFile(const std::string& path, const SessionImage& image);
// NotFound when the file cannot be opened; DataLoss (naming the path) when it is not a session
// file or is truncated.
absl::StatusOr<SessionImage> ReadSessionFile(const std::string& path);

}  // namespace kvq::sharding
