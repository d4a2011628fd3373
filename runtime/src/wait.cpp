#include "ringpool/wait.hpp"

#include <cstdlib>

namespace ringpool {

const WaitPolicy& WaitPolicy::standard() {
  // RINGPOOL_SPIN_NS: measure a workload with more or less polling (0: sleep at once) without a
  // rebuild. A magic static: initialized once, thread-safely.
  static const WaitPolicy p = [] {
    WaitPolicy w;
    if (const char* e = std::getenv("RINGPOOL_SPIN_NS")) w.spin_ns = std::max<long long>(0, std::atoll(e));
    return w;
  }();
  return p;
}

}  // namespace ringpool
