// kvqd's flags into DaemonConfig (server/config.h): what reaches the engine and the service, and the
// checks that refuse bad values with a message naming the flag.
#include "server/config.h"

#include <gtest/gtest.h>

#include <string>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, kv_format);
ABSL_DECLARE_FLAG(std::string, quantizer);
ABSL_DECLARE_FLAG(int, max_batch);

namespace kvq::server {
namespace {

class DaemonConfigTest : public ::testing::Test {
 protected:
  absl::FlagSaver saver_;  // every test starts from the defaults
};

TEST_F(DaemonConfigTest, DeviceReachesTheEngineAndGetModelInfo) {
  absl::SetFlag(&FLAGS_model, "m.gguf");
  absl::SetFlag(&FLAGS_device, "cuda");
  absl::SetFlag(&FLAGS_kv_format, "nuq3-1%");
  absl::SetFlag(&FLAGS_quantizer, "q.kvqq");
  absl::StatusOr<DaemonConfig> c = DaemonConfigFromFlags();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server.engine.device, "cuda");
  EXPECT_EQ(c->server.service.device, "cuda");  // GetModelInfo's rank 0
  EXPECT_EQ(c->server.service.quantizer, "q.kvqq");

  absl::SetFlag(&FLAGS_device, "cpu");
  c = DaemonConfigFromFlags();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->server.service.device, "cpu");
}

TEST_F(DaemonConfigTest, RefusesBadValuesNamingTheFlag) {
  absl::StatusOr<DaemonConfig> c = DaemonConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("--model"), std::string::npos) << c.status();

  absl::SetFlag(&FLAGS_model, "m.gguf");
  absl::SetFlag(&FLAGS_kv_format, "nuq3-1%");
  c = DaemonConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("needs --quantizer"), std::string::npos) << c.status();

  absl::SetFlag(&FLAGS_kv_format, "fp16");
  absl::SetFlag(&FLAGS_max_batch, 0);
  c = DaemonConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("--max_batch"), std::string::npos) << c.status();
}

}  // namespace
}  // namespace kvq::server
