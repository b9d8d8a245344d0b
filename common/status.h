// Status helpers used across kvq. Host APIs return absl::Status / absl::StatusOr<T>; no exceptions
// cross module boundaries.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

#define KVQ_STATUS_CONCAT_INNER_(a, b) a##b
#define KVQ_STATUS_CONCAT_(a, b) KVQ_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define KVQ_RETURN_IF_ERROR(expr)                   \
  do {                                              \
    ::absl::Status kvq_status_ = (expr);            \
    if (!kvq_status_.ok()) return kvq_status_;      \
  } while (0)

// `lhs = value of expr` where expr is an absl::StatusOr<T>; returns its status on error.
#define KVQ_ASSIGN_OR_RETURN(lhs, expr) \
  KVQ_ASSIGN_OR_RETURN_IMPL_(KVQ_STATUS_CONCAT_(kvq_statusor_, __LINE__), lhs, expr)
#define KVQ_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()

// Programmer invariants only (never user input): abort with a message.
#define KVQ_CHECK(cond)                                                              \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      ::kvq::internal::CheckFailed(#cond, __FILE__, __LINE__);                       \
    }                                                                                \
  } while (0)

namespace kvq::internal {
[[noreturn]] inline void CheckFailed(const char* cond, const char* file, int line) {
  std::fprintf(stderr, "KVQ_CHECK failed: %s at %s:%d\n", cond, file, line);
  std::abort();
}
}  // namespace kvq::internal
