// wait.hpp: deadlines, and block_until's rounds around a condition another thread makes true.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#include "ringpool/wait.hpp"

using namespace ringpool;

TEST_CASE("wait: deadlines saturate instead of overflowing") {
  constexpr std::int64_t kMs = 1'000'000;
  CHECK(deadline_after(-1) == INT64_MAX);
  CHECK(deadline_after(INT64_MAX) == INT64_MAX);
  const std::int64_t now = futex::now_ns();
  const std::int64_t d = deadline_after(1000 * kMs);
  CHECK(d >= now + 1000 * kMs);
  CHECK(d < now + 2000 * kMs);
}

TEST_CASE("wait: block_until polls, sleeps in slices, and returns once the condition holds") {
  constexpr std::int64_t kMs = 1'000'000;
  std::atomic<std::uint32_t> word{0};
  WaitPolicy policy;
  policy.spin_ns = 100'000;
  policy.slice_ns = 5 * kMs;
  int tries = 0, rounds = 0, sleeps = 0;
  std::thread setter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    word.store(1);
    futex::wake(&word, 1);
  });
  const bool ok = block_until(
      -1, [&] { ++tries; return word.load() != 0; }, [&] { cpu_relax(); return word.load() != 0; },
      [&](std::int64_t ns) {
        ++sleeps;
        CHECK(ns <= policy.slice_ns);
        futex::wait(&word, 0, ns);
      },
      [&](auto&& round) { ++rounds; round(); }, &policy);
  setter.join();
  CHECK(ok);
  CHECK(tries == rounds + 1);  // one try before the first round and one after each
  CHECK(sleeps >= 1);          // 50 ms is far beyond the 100 us poll
  // Nothing to wait for: a timeout of 0 is one try, a short one a few rounds and then false.
  word.store(0);
  tries = rounds = 0;
  CHECK_FALSE(block_until(0, [&] { ++tries; return false; }, [] { return false; }, [](std::int64_t) {}));
  CHECK(tries == 1);
  const std::int64_t t0 = futex::now_ns();
  CHECK_FALSE(block_until(
      20 * kMs, [] { return false; }, [] { return false; },
      [&](std::int64_t ns) { futex::wait(&word, 0, ns); }, NoWaitHook{}, &policy));
  CHECK(futex::now_ns() - t0 >= 20 * kMs);
}
