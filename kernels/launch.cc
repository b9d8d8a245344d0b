#include <atomic>
#include <cstdlib>
#include <string>

#include "kernels/launch.h"

namespace kvq::kernels {
namespace {

std::atomic<bool>& Flag() {
  static std::atomic<bool> flag([] {
    const char* e = std::getenv("KVQ_PDL");
    return e != nullptr && std::string(e) == "1";
  }());
  return flag;
}

}  // namespace

bool ProgrammaticLaunch() { return Flag().load(std::memory_order_relaxed); }
void SetProgrammaticLaunch(bool on) { Flag().store(on, std::memory_order_relaxed); }

}  // namespace kvq::kernels
