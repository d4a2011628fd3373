// ringpool/log.hpp: the runtime's lifecycle events, as a Pool's LogHandler sees them.
#include <doctest/doctest.h>
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <future>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ringpool/error.hpp"
#include "ringpool/log.hpp"
#include "ringpool/pool.hpp"
#include "fd_limit.hpp"
#include "pool_options.hpp"

using namespace ringpool;
using namespace std::chrono_literals;

namespace {

// Records every event, then throws: the pool must not notice the handler's failure.
struct Recorder {
  std::mutex mu;
  std::vector<LogRecord> got;

  LogHandler handler() {
    return [this](const LogRecord& r) {
      {
        std::lock_guard lk(mu);
        got.push_back(r);
      }
      throw std::runtime_error("a handler that fails");
    };
  }
  std::vector<LogRecord> of(LogEvent e) {
    std::lock_guard lk(mu);
    std::vector<LogRecord> v;
    for (const auto& r : got)
      if (r.event == e) v.push_back(r);
    return v;
  }
  // Waits (up to 60 s: a deadline, not a timing claim) for an event matching pred.
  bool wait_for(LogEvent e, const std::function<bool(const LogRecord&)>& pred = {}) {
    for (int i = 0; i < 6000; ++i) {
      for (const auto& r : of(e))
        if (!pred || pred(r)) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }
};

PoolOptions options(bool zygote, int workers, Recorder& rec) {
  PoolOptions o = testing::rp_tasks_pool(zygote, workers);
  o.log = rec.handler();
  return o;
}

template <class T>
T get(std::future<T>& f) {
  REQUIRE(f.wait_for(60s) == std::future_status::ready);
  return f.get();
}

}  // namespace

TEST_CASE("log: every event has its own name and a level") {
  std::set<std::string> names;
  for (int e = static_cast<int>(LogEvent::worker_started); e <= static_cast<int>(LogEvent::pool_broken); ++e) {
    const std::string name = to_string(static_cast<LogEvent>(e));
    CHECK(name != "unknown");
    names.insert(name);
    const int level = static_cast<int>(level_of(static_cast<LogEvent>(e)));
    CHECK((level == 10 || level == 20 || level == 30 || level == 40));
  }
  CHECK(names.size() == static_cast<std::size_t>(LogEvent::pool_broken) + 1);
  CHECK(level_of(LogEvent::worker_died) == LogLevel::warning);
  CHECK(level_of(LogEvent::pool_broken) == LogLevel::error);
  // No handler: nothing happens; a handler that throws: swallowed.
  emit_log(LogHandler{}, LogEvent::worker_died, "nobody listens");
  int calls = 0;
  emit_log([&](const LogRecord& r) { ++calls; CHECK(r.level == LogLevel::warning); throw 42; },
           LogEvent::worker_died, "thrown away");
  CHECK(calls == 1);
}

TEST_CASE("log: a Pool reports its workers' starts, a death with pid and status, the replacement, "
          "its zygote's death and restart, and the stops" * doctest::timeout(180)) {
  Recorder rec;
  pid_t zygote = -1;
  {
    Pool pool(options(true, 2, rec));
    CHECK(rec.of(LogEvent::worker_started).size() == 2);  // logged before the constructor returns
    CHECK(rec.wait_for(LogEvent::zygote_started));
    zygote = pool.zygote_pid();
    CHECK(rec.of(LogEvent::zygote_started).at(0).pid == zygote);

    auto victim = pool.submit("rp_tasks:die", {Value("kill")});
    pid_t dead = -1;
    try {
      get(victim);
      FAIL("no error");
    } catch (const WorkerDied& e) {
      dead = e.pid();
    }
    REQUIRE(rec.wait_for(LogEvent::worker_died, [&](const LogRecord& r) { return r.pid == dead; }));
    const LogRecord died = rec.of(LogEvent::worker_died).at(0);
    CHECK(died.exit_code == -SIGKILL);
    CHECK(died.level == LogLevel::warning);
    CHECK(died.worker > 0);
    CHECK(died.message.find("(pid " + std::to_string(dead) + ") died (killed by signal SIGKILL)") != std::string::npos);
    CHECK(died.message.find("1 task(s)") != std::string::npos);
    CHECK(rec.wait_for(LogEvent::worker_replaced, [&](const LogRecord& r) { return r.pid > 0 && r.pid != dead; }));

    ::kill(zygote, SIGKILL);
    REQUIRE(rec.wait_for(LogEvent::zygote_died, [&](const LogRecord& r) { return r.pid == zygote; }));
    CHECK(rec.of(LogEvent::zygote_died).at(0).message.find("(pid " + std::to_string(zygote) + ")") != std::string::npos);
    CHECK(rec.of(LogEvent::zygote_died).at(0).exit_code == -SIGKILL);
    // Its workers were killed with it; the pool starts them again from a new zygote.
    for (int i = 0; i < 4; ++i) {
      auto f = pool.submit("rp_tasks:add", {Value(i), Value(1)});
      try {
        CHECK(get(f) == Value(i + 1));
      } catch (const WorkerDied&) {  // a task sent to a worker the zygote's death took along
      }
    }
    REQUIRE(rec.wait_for(LogEvent::zygote_restarted));
    const LogRecord again = rec.of(LogEvent::zygote_restarted).at(0);
    CHECK(again.pid != zygote);
    CHECK(again.message.find("(pid " + std::to_string(zygote) + ") died") != std::string::npos);
    pool.shutdown(true);
  }
  CHECK(rec.of(LogEvent::worker_stopped).size() == 2);
  CHECK(rec.wait_for(LogEvent::zygote_stopped));
  CHECK(rec.of(LogEvent::pool_broken).empty());
  CHECK(rec.of(LogEvent::protocol_error).empty());  // results and deaths are no protocol error
}

TEST_CASE("log: a malformed error record is a protocol error naming its worker" * doctest::timeout(120)) {
  Recorder rec;
  Pool pool(options(true, 1, rec));
  auto ok = pool.submit("rp_tasks:add", {Value(1), Value(2)});
  CHECK(get(ok) == Value(3));
  auto raised = pool.submit("rp_tasks:boom", {Value("a proper error")});
  CHECK_THROWS_AS(get(raised), RemoteError);
  CHECK(rec.of(LogEvent::protocol_error).empty());  // an answer, and a well-formed error, are none
  const pid_t victim = pool.worker_pids().at(0);  // killed for it, and replaced
  auto forged = pool.submit("rp_tasks:forge_error", {Value(7)});
  CHECK_THROWS_AS(get(forged), ProtocolError);
  REQUIRE(rec.wait_for(LogEvent::protocol_error));
  const LogRecord r = rec.of(LogEvent::protocol_error).at(0);
  CHECK(r.worker == 1);
  CHECK(r.pid == victim);
  CHECK(r.message.find("malformed error record") != std::string::npos);
}

TEST_CASE("log: a task past its timeout and a worker recycled after max_tasks_per_child" * doctest::timeout(180)) {
  Recorder rec;
  PoolOptions o = options(false, 1, rec);
  o.task_timeout = 1000ms;
  o.max_tasks_per_child = 2;
  Pool pool(o);
  auto slow = pool.submit("rp_tasks:sleep_pid", {Value(30)});
  CHECK_THROWS_AS(get(slow), TaskTimeout);
  REQUIRE(rec.wait_for(LogEvent::worker_timed_out));
  const pid_t killed = rec.of(LogEvent::worker_timed_out).at(0).pid;
  for (int i = 0; i < 4; ++i) {
    auto f = pool.submit("rp_tasks:add", {Value(i), Value(i)});
    CHECK(get(f) == Value(2 * i));
  }
  CHECK(rec.wait_for(LogEvent::worker_recycled));
  pool.shutdown(true);
  // The timed-out worker's death is its timeout's entry, not a second one as a death.
  for (const auto& r : rec.of(LogEvent::worker_died)) CHECK(r.pid != killed);
  CHECK(rec.of(LogEvent::zygote_started).empty());  // exec mode: no zygote
}

TEST_CASE("log: a collector out of descriptors is logged once, and again when they are back" * doctest::timeout(120)) {
  Recorder rec;
  Pool pool(options(true, 1, rec));
  auto warm = pool.submit("rp_tasks:echo", {Value(1)});
  CHECK(get(warm) == Value(1));
  // As test_pool's case: a limit a little above what is open, every descriptor left taken.
  testing::FdLimit limit(64);
  REQUIRE(limit.take_the_rest());
  auto f = pool.submit("rp_tasks:big_bytes", {Value(4 << 20)});  // its memfd cannot be received now
  const bool exhausted = rec.wait_for(LogEvent::fd_exhausted);
  limit.give_back();
  REQUIRE(exhausted);
  CHECK(get(f) == Value::bytes(std::string(4 << 20, 'z')));
  REQUIRE(rec.wait_for(LogEvent::fd_recovered));
  CHECK(rec.of(LogEvent::fd_exhausted).size() == 1);  // once per episode, not per 10 ms retry
  CHECK(rec.of(LogEvent::fd_recovered).at(0).message.find("retries") != std::string::npos);
}
