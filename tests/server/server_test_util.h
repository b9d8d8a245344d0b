// Helpers for the server tests: an in-process kvqd on loopback, stream collection, HTTP GET.
#pragma once

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "kvq/v1/kvq_service.grpc.pb.h"
#include "tests/test_util.h"

namespace kvq::testing {

// What one Generate stream returned.
struct StreamResult {
  grpc::Status status;
  uint64_t request_id = 0;
  std::string text;
  std::vector<int32_t> ids;
  std::vector<kvq::v1::TokenLogprobs> logprobs;  // when requested: one per id
  int progress_messages = 0;
  bool started_first = false;
  bool finished_last = false;
  kvq::v1::Finished finished;
};

inline StreamResult RunGenerate(kvq::v1::Kvq::Stub& stub, const kvq::v1::GenerateRequest& req,
                                grpc::ClientContext* ctx = nullptr) {
  grpc::ClientContext local;
  if (ctx == nullptr) ctx = &local;
  StreamResult r;
  auto reader = stub.Generate(ctx, req);
  kvq::v1::GenerateResponse msg;
  bool first = true;
  while (reader->Read(&msg)) {
    if (first) r.started_first = msg.has_started();
    first = false;
    r.finished_last = false;
    switch (msg.event_case()) {
      case kvq::v1::GenerateResponse::kStarted: r.request_id = msg.started().request_id(); break;
      case kvq::v1::GenerateResponse::kPrefillProgress: ++r.progress_messages; break;
      case kvq::v1::GenerateResponse::kDelta:
        r.text += msg.delta().text();
        r.ids.insert(r.ids.end(), msg.delta().token_ids().begin(), msg.delta().token_ids().end());
        r.logprobs.insert(r.logprobs.end(), msg.delta().logprobs().begin(), msg.delta().logprobs().end());
        break;
      case kvq::v1::GenerateResponse::kFinished:
        r.finished = msg.finished();
        r.finished_last = true;
        break;
      default: break;
    }
  }
  r.status = reader->Finish();
  return r;
}

inline kvq::v1::GenerateRequest TextRequest(const std::string& text, int max_tokens) {
  kvq::v1::GenerateRequest req;
  req.set_text(text);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  return req;
}

inline kvq::v1::GenerateRequest ChatRequest(const std::string& user, int max_tokens) {
  kvq::v1::GenerateRequest req;
  auto* m = req.mutable_chat()->add_messages();
  m->set_role("user");
  m->set_content(user);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  return req;
}

// The body of an HTTP GET (via curl), or "" on failure.
inline std::string HttpGet(const std::string& url) {
  const std::string cmd = "curl -sf --max-time 10 '" + url + "'";
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    if (pclose(p) != 0) return "";
  }
  return out;
}

}  // namespace kvq::testing
