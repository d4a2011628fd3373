// Thin wrappers over futex(2) on 32-bit words that live in shared memory (no FUTEX_PRIVATE_FLAG,
// since waiters and wakers are different processes).
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>

namespace ringpool::futex {

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t) &&
                  std::atomic<std::uint32_t>::is_always_lock_free,
              "futex words are plain 32-bit atomics in shared memory");

enum class WaitResult { woken, timed_out, interrupted };

// Sleeps while *word == expected, at most timeout_ns (negative: no limit). Spurious wakeups and
// a changed value both return woken; callers re-check their condition.
inline WaitResult wait(std::atomic<std::uint32_t>* word, std::uint32_t expected, std::int64_t timeout_ns) {
  timespec ts{};
  timespec* tsp = nullptr;
  if (timeout_ns >= 0) {
    ts.tv_sec = static_cast<time_t>(timeout_ns / 1000000000);
    ts.tv_nsec = static_cast<long>(timeout_ns % 1000000000);
    tsp = &ts;
  }
  long r = ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT, expected, tsp, nullptr, 0);
  if (r == 0) return WaitResult::woken;
  if (errno == ETIMEDOUT) return WaitResult::timed_out;
  if (errno == EINTR) return WaitResult::interrupted;
  return WaitResult::woken;  // EAGAIN: the value already changed
}

// Sleeps until any waiter's word differs from its val or is woken, at most timeout_ns (negative:
// no limit): futex_waitv(2), Linux 5.16+. Each waiter's flags say its size (FUTEX_32) and whether
// it is private. Without the syscall (ENOSYS) it sleeps min(timeout, 1 ms) on the last waiter
// alone, so that callers that loop still make progress.
inline WaitResult wait_any(futex_waitv* waiters, std::size_t n, std::int64_t timeout_ns) {
  timespec ts{};
  timespec* tsp = nullptr;
  if (timeout_ns >= 0) {
    // An absolute CLOCK_MONOTONIC deadline (futex_waitv takes no relative timeout).
    ::clock_gettime(CLOCK_MONOTONIC, &ts);
    const std::int64_t at = static_cast<std::int64_t>(ts.tv_nsec) + timeout_ns % 1000000000;
    ts.tv_sec += static_cast<time_t>(timeout_ns / 1000000000 + at / 1000000000);
    ts.tv_nsec = static_cast<long>(at % 1000000000);
    tsp = &ts;
  }
  long r = ::syscall(SYS_futex_waitv, waiters, static_cast<unsigned>(n), 0u, tsp, CLOCK_MONOTONIC);
  if (r >= 0) return WaitResult::woken;
  if (errno == ETIMEDOUT) return WaitResult::timed_out;
  if (errno == EINTR) return WaitResult::interrupted;
  if (errno == ENOSYS && n > 0) {
    const std::int64_t slice = timeout_ns < 0 ? 1000000 : std::min<std::int64_t>(timeout_ns, 1000000);
    timespec s{0, static_cast<long>(slice)};
    const int op = (waiters[n - 1].flags & FUTEX_PRIVATE_FLAG) ? FUTEX_WAIT_PRIVATE : FUTEX_WAIT;
    ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(static_cast<std::uintptr_t>(waiters[n - 1].uaddr)), op,
              static_cast<std::uint32_t>(waiters[n - 1].val), &s, nullptr, 0);
    return WaitResult::woken;
  }
  return WaitResult::woken;  // EAGAIN: a value already changed
}

// Wakes waiters on a word private to this process (FUTEX_PRIVATE_FLAG: cheaper, and only this
// process can reach it).
inline void wake_private(std::atomic<std::uint32_t>* word, int count) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE_PRIVATE, count, nullptr, nullptr, 0);
}

inline void wake(std::atomic<std::uint32_t>* word, int count) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE, count, nullptr, nullptr, 0);
}

inline std::int64_t now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

}  // namespace ringpool::futex
