// Thin wrappers over futex(2) on 32-bit words that live in shared memory (no FUTEX_PRIVATE_FLAG,
// since waiters and wakers are different processes).
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
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

inline void wake(std::atomic<std::uint32_t>* word, int count) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE, count, nullptr, nullptr, 0);
}

inline std::int64_t now_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

}  // namespace ringpool::futex
