// Waiting for a condition another process makes true: poll it briefly, then sleep on a futex.
//
//   try ──► fails ──► round: poll ready() (cpu_relax, then sched_yield) ──► sleep(slice) ──► try ...
//                     └──────────── inside around(): the caller's scope ────────────┘
//
// One home for the spin-then-sleep policy of every blocking call: Channel's receive side, the
// Python bindings' waits (put into a full ring, maxsize, join) and the C++ pool's collector.
// Nothing here holds a lock; callers re-check their condition after every round.
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "ringpool/detail/futex.hpp"

namespace ringpool {

// Tells the CPU we are in a spin loop: on x86 `pause` (eases the pipeline and the sibling
// hyperthread, ~40-140 cycles), on aarch64 `yield`; elsewhere only a compiler barrier, so the
// loop still re-reads memory.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  asm volatile("yield" ::: "memory");
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

// Defaults of WaitPolicy (see there for what each trades).
inline constexpr std::int64_t kDefaultSpinNs = 50'000;
inline constexpr std::int64_t kDefaultRelaxNs = 2'000;
inline constexpr std::int64_t kDefaultSliceNs = 20'000'000;

struct WaitPolicy {
  // How long a waiter polls before sleeping on the futex: longer keeps a round trip at a few
  // microseconds when the peer answers soon (waking a sleeper costs ~40 us on these VMs, an IPI
  // to an idle vCPU) but burns CPU a peer sharing our core may need; 0 sleeps at once.
  std::int64_t spin_ns = kDefaultSpinNs;
  // The first part of the poll uses cpu_relax(), the lowest latency when the peer runs on another
  // core; after it sched_yield(), which costs a syscall per poll but lets a peer on our core run.
  std::int64_t relax_ns = kDefaultRelaxNs;
  // The longest single futex sleep: the caller's around() gets control back at least this often
  // (Python runs signal handlers there), at the price of one wake-up per slice while idle.
  std::int64_t slice_ns = kDefaultSliceNs;

  // The defaults, with spin_ns from RINGPOOL_SPIN_NS if set (read once per process).
  // @concurrent thread safe
  static const WaitPolicy& standard();
};

// The CLOCK_MONOTONIC deadline timeout_ns from now; negative, or too far to count in int64
// nanoseconds, means none (INT64_MAX) rather than an overflowed, already expired one.
inline std::int64_t deadline_after(std::int64_t timeout_ns) noexcept {
  const std::int64_t now = futex::now_ns();
  if (timeout_ns < 0 || timeout_ns > std::numeric_limits<std::int64_t>::max() - now)
    return std::numeric_limits<std::int64_t>::max();
  return now + timeout_ns;
}

// around() for callers with nothing to do between rounds.
struct NoWaitHook {
  template <class Round>
  void operator()(Round&& round) const {
    round();
  }
};

// One round of waiting, without a lock: polls ready() for up to p.spin_ns, then, unless it holds,
// sleeps with sleep(ns) for at most the smaller of p.slice_ns and what is left until deadline.
// sleep() returns when the condition may hold, on timeout or on a signal (Ring::wait_data).
template <class Ready, class Sleep>
void wait_round(const WaitPolicy& p, std::int64_t deadline, Ready& ready, Sleep& sleep) {
  const std::int64_t t0 = futex::now_ns();
  const std::int64_t spin_end = t0 + p.spin_ns;
  const std::int64_t relax_end = t0 + std::min(p.relax_ns, p.spin_ns);
  for (std::int64_t t = t0; !ready() && t < spin_end; t = futex::now_ns()) {
    if (t < relax_end)
      cpu_relax();
    else
      ::sched_yield();
  }
  if (!ready()) {
    const std::int64_t left = deadline - futex::now_ns();
    if (left > 0) sleep(std::min(left, p.slice_ns));
  }
}

// Retries try_fn until it succeeds (true) or timeout_ns passes (false; negative: no limit, 0: one
// try). Between tries one wait_round runs as around(round): a caller may drop a lock for the
// round (the GIL) and act after it (run signal handlers, or throw to abandon the wait).
// policy nullptr: WaitPolicy::standard(), looked up only once the first try has failed.
template <class Try, class Ready, class Sleep, class Around = NoWaitHook>
bool block_until(std::int64_t timeout_ns, Try&& try_fn, Ready&& ready, Sleep&& sleep, Around&& around = {},
                 const WaitPolicy* policy = nullptr) {
  if (try_fn()) return true;
  if (timeout_ns == 0) return false;
  const WaitPolicy& p = policy ? *policy : WaitPolicy::standard();
  const std::int64_t deadline = deadline_after(timeout_ns);
  for (;;) {
    around([&] { wait_round(p, deadline, ready, sleep); });
    if (try_fn()) return true;
    if (futex::now_ns() >= deadline) return false;
  }
}

}  // namespace ringpool
