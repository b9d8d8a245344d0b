// kvqd's /metrics endpoint (server/metrics_http.h) on loopback: a free port from port 0, the
// registry's families in Prometheus text format, 404 elsewhere, 405 for other methods, HEAD
// without a body, and a busy port refused with a clear error.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "gtest/gtest.h"
#include "prometheus/counter.h"
#include "prometheus/registry.h"
#include "server/metrics_http.h"

namespace kvq::server {
namespace {

std::string Request(int port, const std::string& req) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return "";
  }
  (void)!::send(fd, req.data(), req.size(), 0);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

TEST(MetricsHttpTest, ServesTheRegistryAndRefusesEverythingElse) {
  auto reg = std::make_shared<prometheus::Registry>();
  prometheus::BuildCounter().Name("kvq_test_total").Help("a test counter").Register(*reg).Add({}).Increment(3);
  auto s = MetricsHttpServer::Start("127.0.0.1:0", reg);
  ASSERT_TRUE(s.ok()) << s.status();
  const int port = (*s)->port();
  ASSERT_GT(port, 0);
  const std::string ok = Request(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
  EXPECT_EQ(ok.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << ok;
  EXPECT_NE(ok.find("Content-Type: text/plain; version=0.0.4"), std::string::npos);
  EXPECT_NE(ok.find("# TYPE kvq_test_total counter\nkvq_test_total 3"), std::string::npos) << ok;
  const std::string with_query = Request(port, "GET /metrics?x=1 HTTP/1.1\r\n\r\n");
  EXPECT_EQ(with_query.rfind("HTTP/1.1 200 OK", 0), 0u);
  EXPECT_EQ(Request(port, "GET / HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(Request(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").rfind("HTTP/1.1 405", 0), 0u);
  const std::string head = Request(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_EQ(head.rfind("HTTP/1.1 200 OK", 0), 0u);
  EXPECT_EQ(head.substr(head.find("\r\n\r\n") + 4), "");
  EXPECT_EQ((*s)->scrapes(), 3);
  // The same port again: refused, and the message names the address.
  auto busy = MetricsHttpServer::Start("127.0.0.1:" + std::to_string(port), reg);
  ASSERT_FALSE(busy.ok());
  EXPECT_NE(std::string(busy.status().message()).find(std::to_string(port)), std::string::npos) << busy.status();
}

}  // namespace
}  // namespace kvq::server
