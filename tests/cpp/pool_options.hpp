// The C++ Pool as the tests make it: /usr/bin/python3 workers that import ringpool from this
// checkout and run the test tasks of tests/cpp/pytasks/rp_tasks.
#pragma once

#include "ringpool/pool.hpp"

namespace ringpool::testing {

inline PoolOptions rp_tasks_pool(bool zygote, int workers = 2) {
  PoolOptions o;
  o.workers = workers;
  o.python = "/usr/bin/python3";
  o.python_path = {RINGPOOL_SOURCE_DIR "/bindings"};
  o.packages = {{"rp_tasks", RINGPOOL_SOURCE_DIR "/tests/cpp/pytasks/rp_tasks"}};
  o.zygote = zygote;
  return o;
}

}  // namespace ringpool::testing
