// BlockingHook: how a consumer blocks in the middle of a take (ring.hpp, fdpass.hpp).
//
// A take can block where no timeout of the caller applies: for the ring's consumer lock, held by
// another thread or process, and for a frame's handles on the side socket (sent before the frame
// was committed, so normally queued already; a hostile or dying producer can make a reader wait
// up to FdChannel's timeout). A caller that holds a lock of its own while it takes frames (the
// Python bindings hold the GIL) passes a hook that drops that lock around the blocking call and
// takes it back after; callers with nothing to drop pass none.
#pragma once

#include <type_traits>
#include <utility>

namespace ringpool {

class BlockingHook {
 public:
  // Calls fn() once, as fn would be called without the hook; may run it with a caller's lock
  // released. fn does not throw.
  template <class F>
  void run(F&& fn) {
    invoke(+[](void* f) { (*static_cast<std::remove_reference_t<F>*>(f))(); }, &fn);
  }

 protected:
  ~BlockingHook() = default;
  virtual void invoke(void (*fn)(void*), void* arg) = 0;
};

// Runs fn through hook, or directly without one.
template <class F>
void run_blocking(BlockingHook* hook, F&& fn) {
  if (hook != nullptr)
    hook->run(std::forward<F>(fn));
  else
    fn();
}

}  // namespace ringpool
