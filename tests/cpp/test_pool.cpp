// ringpool::Pool: a C++ service running Python functions in worker processes.
#include <doctest/doctest.h>
#include <dirent.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>

#include <algorithm>
#include <chrono>
#include <iterator>
#include <future>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ringpool/error.hpp"
#include "ringpool/log.hpp"
#include "ringpool/pickle.hpp"
#include "ringpool/pool.hpp"
#include "fd_limit.hpp"
#include "pool_options.hpp"

using namespace ringpool;
using namespace std::chrono_literals;

namespace {

PoolOptions options(bool zygote, int workers = 2) { return testing::rp_tasks_pool(zygote, workers); }

template <class T>
T get(std::future<T>& f) {
  REQUIRE(f.wait_for(60s) == std::future_status::ready);
  return f.get();
}

bool alive(pid_t pid) { return ::kill(pid, 0) == 0; }

}  // namespace

TEST_CASE("Pool runs plain-data calls in both start modes" * doctest::timeout(120)) {
  for (bool zygote : {true, false}) {
    CAPTURE(zygote);
    Pool pool(options(zygote));
    auto a = pool.submit("rp_tasks:add", {Value(2), Value(3)}, {{"c", Value(10)}});
    CHECK(get(a) == Value(15));
    Value nested = Value::dict({{Value("k"), Value::list({Value(1.5), Value::bytes("\x00\xff"), Value()})},
                                {Value(7), Value::tuple({Value(true), Value("é")})}});
    auto e = pool.submit("rp_tasks:echo", {nested});
    CHECK(get(e) == nested);
    auto j = pool.submit("os.path:join", {Value("a"), Value("b")});
    CHECK(get(j) == Value("a/b"));
    auto r = pool.submit_raw("rp_tasks:upper", "abc");
    CHECK(get(r) == "ABC");
    auto d = pool.submit("rp_tasks:deferred");
    CHECK(get(d) == Value("rp_tasks.helpers"));
    CHECK(pool.worker_pids().size() == 2);
    CHECK((pool.zygote_pid() > 0) == zygote);
  }
}

TEST_CASE("Pool results of every shape arrive intact" * doctest::timeout(120)) {
  // The collector reads a result's own fields straight from the record and decodes only the
  // value (ints and None inline, other small values as a pickle of their own, large ones with
  // the whole record): every kind of value must come back equal, whichever way it is read.
  Pool pool(options(true, 1));
  Value::List many;
  for (int i = 0; i < 300; ++i) many.emplace_back(i * 1000);
  const std::int64_t lo = std::numeric_limits<std::int64_t>::min(), hi = std::numeric_limits<std::int64_t>::max();
  const std::vector<Value> values = {
      Value(), Value(true), Value(false), Value(0), Value(-1), Value(255), Value(256), Value(65535), Value(65536),
      Value(std::int64_t{-2147483648}), Value(std::int64_t{2147483648}), Value(lo), Value(hi), Value(1.5),
      Value(-0.0), Value(""), Value(std::string(300, 'x')), Value("ends like a record G12345678t."),
      Value::bytes(std::string(100'000, '\x07')),  // more than the value a record is split for
      Value::bytes(std::string(3 << 20, 'b')),      // out of band
      Value::list(), Value::tuple(), Value::dict(), Value::list(many),
      Value::dict({{Value("a"), Value::tuple({Value(1), Value::list({Value("b"), Value()})})}, {Value(2), Value(2.5)}}),
  };
  std::vector<std::future<Value>> fs;
  for (const Value& v : values) fs.push_back(pool.submit("rp_tasks:echo", {v}));
  for (std::size_t i = 0; i < values.size(); ++i) {
    CAPTURE(i);
    CHECK(get(fs[i]) == values[i]);
  }
}

TEST_CASE("Pool reports Python errors, refuses non-plain results, keeps going" * doctest::timeout(120)) {
  PoolOptions o = options(true);
  o.preload = {"rp_tasks"};  // a shipped package, preloaded by the zygote from memory
  Pool pool(o);
  auto b = pool.submit("rp_tasks:boom", {Value("nope")});
  try {
    get(b);
    FAIL("no error");
  } catch (const RemoteError& e) {
    CHECK(e.type_name() == "ValueError");
    CHECK(e.message() == "nope");
    CHECK(e.traceback().find("rp_tasks/__init__.py") != std::string::npos);
    CHECK(e.traceback().find("in boom") != std::string::npos);
  }
  auto np = pool.submit("rp_tasks:not_plain");
  CHECK_THROWS_AS(get(np), RemoteError);
  auto big = pool.submit("rp_tasks:add", {Value(std::int64_t{1} << 62), Value(std::int64_t{1} << 62)});  // 2**63
  try {
    get(big);
    FAIL("no error");
  } catch (const RemoteError& e) {
    CHECK(e.type_name() == "TypeError");
    CHECK(e.message().find("does not fit in 64 bits") != std::string::npos);
  }
  auto missing = pool.submit("rp_tasks:no_such_function");
  CHECK_THROWS_AS(get(missing), RemoteError);
  auto bad_name = pool.submit("no colon here");
  CHECK_THROWS_AS(get(bad_name), RemoteError);
  auto no_name = pool.submit("");  // still a whole record: the worker refuses the name, not the record
  CHECK_THROWS_AS(get(no_name), RemoteError);
  auto no_name_map = pool.map("", {{Value(1)}, {Value(2)}});
  CHECK_THROWS_AS(get(no_name_map), RemoteError);
  CHECK_THROWS_AS(pool.submit("rp_tasks:echo", {Value(std::string("\xff\xfe"))}), PickleError);
  auto ok = pool.submit("rp_tasks:add", {Value(1), Value(1)});
  CHECK(get(ok) == Value(2));
}

TEST_CASE("Pool: results the worker's fast encoder declines are made plain or refused with TypeError" *
          doctest::timeout(120)) {
  Pool pool(options(true, 1));
  auto shape = [&](const char* kind) {
    auto f = pool.submit("rp_tasks:shape", {Value(kind)});
    return get(f);
  };
  // Plain data, only beyond the encoder's reach (a shared list, deep or many containers): intact.
  const Value x = Value::list({Value(1), Value(2)});
  CHECK(shape("shared") == Value::list({x, x, Value::dict({{Value("k"), x}})}));
  Value deep(0);
  for (int i = 0; i < 20; ++i) deep = Value::list({deep});
  CHECK(shape("deep") == deep);
  CHECK(shape("many").as_list().size() == 200);
  // bytearray and memoryview arrive as bytes.
  CHECK(shape("bytearray") == Value::bytes("ab"));
  CHECK(shape("memoryview") == Value::bytes("cd"));
  // Not plain: a TypeError naming what, and the worker goes on.
  for (auto [kind, what] : {std::pair{"surrogate", "not valid UTF-8"}, std::pair{"nested-object", "type object"}}) {
    CAPTURE(kind);
    try {
      shape(kind);
      FAIL("no error");
    } catch (const RemoteError& e) {
      CHECK(e.type_name() == "TypeError");
      CHECK(e.message().find(what) != std::string::npos);
      CHECK(e.message().find("must return plain data") != std::string::npos);
    }
  }
  CHECK(shape("shared") == Value::list({x, x, Value::dict({{Value("k"), x}})}));
}

TEST_CASE("Pool: a malformed error record fails its task with ProtocolError; its worker is replaced" * doctest::timeout(120)) {
  Pool pool(options(true, 1));  // one worker: the records after the forged one meet the next tasks
  const std::vector<Value> payloads = {
      Value("not a tuple"), Value::tuple({Value("ValueError"), Value("two items")}),
      Value::tuple({Value("ValueError"), Value(7), Value("tb")}), Value()};
  std::uint64_t started = pool.workers_started();
  for (const Value& payload : payloads) {
    CAPTURE(payload.repr());
    const auto pids = pool.worker_pids();
    auto bad = pool.submit("rp_tasks:forge_error", {payload});
    try {
      get(bad);
      FAIL("no error");
    } catch (const ProtocolError& e) {
      CHECK(std::string(e.what()).find("malformed error record") != std::string::npos);
      CHECK(std::string(e.what()).find("the worker was killed") != std::string::npos);
    }
    // The worker that sent it is killed and replaced; the pool goes on.
    auto next = pool.submit("rp_tasks:pid");
    CHECK(get(next).as_int() != pids.at(0));
    CHECK(pool.workers_started() == ++started);
  }
}

// The kinds of protocol break a hostile worker can commit, each a task of rp_tasks.hostile: the
// call, and what the ProtocolError of that task says.
struct Hostile {
  const char* fn;
  std::vector<Value> args;
  const char* says;
};

TEST_CASE("Pool: a hostile worker is killed and replaced, and no other worker's task is touched" *
          doctest::timeout(300)) {
  PoolOptions o = options(true, 3);
  o.max_result_bytes = 1 << 20;
  Pool pool(o);
  const std::vector<Hostile> cases = {
      {"garbage", {}, "does not decode"},
      {"forge_tids", {Value(40)}, "which it is not running"},
      {"forge_wid", {Value(999)}, "names worker 999"},
      {"wid_out_of_range", {}, "not a worker id"},
      {"unsealed_block", {}, "is not sealed"},
      {"short_block", {Value(512 << 10)}, "too short"},
      {"oversized_block", {Value(2 << 20)}, "max_result_bytes"},
      {"many_handles", {Value(3)}, "3 handles"},
  };
  for (const Hostile& h : cases) {
    const std::string name = h.fn;
    CAPTURE(name);
    const std::uint64_t started = pool.workers_started();
    // Innocent calls first, spread over the three workers (the hostile one gets its share before
    // the hostile call, so nothing innocent waits behind it on its worker).
    std::vector<std::future<Value>> innocent;
    for (int i = 0; i < 6; ++i) innocent.push_back(pool.submit("rp_tasks.hostile:pid_after", {Value(0.2)}));
    auto bad = pool.submit(std::string("rp_tasks.hostile:") + h.fn, h.args);
    try {
      get(bad);
      FAIL("no error");
    } catch (const ProtocolError& e) {
      CAPTURE(e.what());
      CHECK(std::string(e.what()).find("broke the protocol") != std::string::npos);
      CHECK(std::string(e.what()).find(h.says) != std::string::npos);
    }
    // Every innocent call answered by the worker that ran it: a pid, never a forged value.
    for (auto& f : innocent) CHECK(get(f).is_int());
    // The hostile worker is gone and replaced; the service goes on with three workers.
    for (int i = 0; i < 1000 && pool.workers_started() == started; ++i) std::this_thread::sleep_for(10ms);
    CHECK(pool.workers_started() == started + 1);
    std::vector<std::future<Value>> after;
    for (int i = 0; i < 6; ++i) after.push_back(pool.submit("rp_tasks:add", {Value(i), Value(1)}));
    for (int i = 0; i < 6; ++i) CHECK(get(after[i]) == Value(i + 1));
    CHECK(pool.worker_pids().size() == 3);
  }
}

TEST_CASE("Pool: a result or an error over max_result_bytes fails its task, and its worker goes on" *
          doctest::timeout(120)) {
  for (bool zygote : {true, false}) {
    CAPTURE(zygote);
    PoolOptions o = options(zygote, 1);
    o.max_result_bytes = 256 << 10;
    Pool pool(o);
    const auto pids = pool.worker_pids();
    const std::uint64_t started = pool.workers_started();
    auto fits = pool.submit("rp_tasks:big_bytes", {Value(200 << 10)});
    CHECK(get(fits).as_bytes().size() == (200 << 10));
    for (const auto& [fn, arg] : {std::pair<const char*, Value>{"rp_tasks:big_bytes", Value(300 << 10)},
                                  {"rp_tasks:boom", Value(std::string(300 << 10, 'e'))}}) {
      CAPTURE(fn);
      auto big = pool.submit(fn, {arg});
      try {
        get(big);
        FAIL("no error");
      } catch (const RemoteError& e) {
        CHECK(e.type_name() == "OverflowError");
        CHECK(e.message().find("over the pool's max_result_bytes (262144)") != std::string::npos);
      }
    }
    // Not a protocol break: the same worker answers the next call.
    auto next = pool.submit("rp_tasks:pid");
    CHECK(get(next).as_int() == pids.at(0));
    CHECK(pool.workers_started() == started);
  }
}

TEST_CASE("Pool: a worker holding its call ring's lock is killed, not waited for" * doctest::timeout(120)) {
  // The pool is its workers' call rings' only producer: a worker that takes the producer lock
  // would, if the pool waited for it, stop dispatch (under the pool lock) for every worker.
  Pool pool(options(true, 1));  // one worker: the next dispatch is to it
  auto bad = pool.submit("rp_tasks.hostile:hold_call_lock", {Value(30.0)});
  std::this_thread::sleep_for(500ms);  // it has the lock by now (or the pool meets it on the first send)
  std::vector<std::future<Value>> after;
  for (int i = 0; i < 4; ++i) after.push_back(pool.submit("rp_tasks:add", {Value(i), Value(1)}));
  try {
    get(bad);
    FAIL("no error");
  } catch (const ProtocolError& e) {
    CAPTURE(e.what());
    CHECK(std::string(e.what()).find("broke the protocol: its call ring") != std::string::npos);
  }
  // The calls sent meanwhile never reached its ring: its replacement runs them.
  for (int i = 0; i < 4; ++i) CHECK(get(after[i]) == Value(i + 1));
  CHECK(pool.workers_started() == 2);
}

TEST_CASE("Pool: a worker cannot push its task timeout back by reporting STARTED again" * doctest::timeout(120)) {
  // A STARTED record starts the task timeout's clock; a hostile task that sent it again and again
  // would run for ever under a pool that restarted the clock each time (task_timeout 5 s, long
  // enough for a loaded machine; the task reports every 0.1 s for 30 s, then returns 0).
  PoolOptions o = options(true, 1);
  o.task_timeout = 5000ms;
  Pool pool(o);
  auto bad = pool.submit("rp_tasks.hostile:restart_clock", {Value(30.0), Value(0.1)});
  try {
    get(bad);
    FAIL("the task outlived its timeout");
  } catch (const ProtocolError& e) {
    CAPTURE(e.what());
    CHECK(std::string(e.what()).find("reported starting task") != std::string::npos);
    CHECK(std::string(e.what()).find("again") != std::string::npos);
  }
  auto after = pool.submit("rp_tasks:add", {Value(2), Value(3)});
  CHECK(get(after) == Value(5));
}

TEST_CASE("Pool: a timed-out task fails even if its worker rewrote its call ring's counter" * doctest::timeout(120)) {
  // The call ring's `consumed` counter is in memory the worker can write: a task that takes its
  // record back there and hangs must still fail with TaskTimeout, not be requeued (and hang the
  // next worker, for ever).
  PoolOptions o = options(true, 1);
  o.task_timeout = 2000ms;
  Pool pool(o);
  auto bad = pool.submit("rp_tasks.hostile:hide_and_hang", {Value(30.0)});
  auto after = pool.submit("rp_tasks:add", {Value(2), Value(3)});
  CHECK_THROWS_AS(get(bad), TaskTimeout);
  CHECK(get(after) == Value(5));
}

TEST_CASE("Pool: a task that kills its workers as if it never started is failed after max_requeues" *
          doctest::timeout(240)) {
  // The call ring's `consumed` counter is the worker's to write: a task that sets it back (as if
  // its record had never been taken) and exits was requeued at each death, killing one worker
  // after another for ever; and exiting with 1 before any worker had answered, it made the pool
  // take three such deaths for a broken interpreter and fail everything. Now the call fails after
  // max_requeues (2 here) returns, i.e. at the third death, and only that call; the pool goes on.
  for (bool zygote : {true, false}) {
    CAPTURE(zygote);
    PoolOptions o = options(zygote, 2);
    o.max_requeues = 2;
    Pool pool(o);
    for (int round = 0; round < 2; ++round) {  // first before any answer, then after some
      CAPTURE(round);
      const std::uint64_t started = pool.workers_started();
      auto bad = pool.submit("rp_tasks.hostile:hide_and_exit", {Value(1)});
      try {
        get(bad);
        FAIL("no error");
      } catch (const WorkerDied& e) {
        CAPTURE(e.what());
        CHECK(e.exit_code() == 1);
        CHECK(std::string(e.what()).find("the next task of 3 workers that died") != std::string::npos);
        CHECK(std::string(e.what()).find("max_requeues 2") != std::string::npos);
      }
      std::vector<std::future<Value>> after;
      for (int i = 0; i < 4; ++i) after.push_back(pool.submit("rp_tasks:add", {Value(i), Value(1)}));
      for (int i = 0; i < 4; ++i) CHECK(get(after[i]) == Value(i + 1));
      CHECK(pool.workers_started() == started + 3);  // three workers killed, three replacements
    }
  }
}

TEST_CASE("Pool: each worker holds its own channels only" * doctest::timeout(180)) {
  // What a worker can reach is what it holds: its call ring, and of its result ring the producer
  // side only. Two workers share no segment and no socket end, and a worker holds no socket end
  // of this process's but its call ring's two and its result ring's sending one (the receiving
  // end of its handle socket, through which the pool takes in result blocks, stays here).
  const auto inodes = [](const Value& table, const char* prefix) {
    std::vector<std::int64_t> out;
    for (const Value& e : table.as_list()) {
      const auto& f = e.as_tuple();
      if (f[0].as_int() > 2 && f[1].as_str().rfind(prefix, 0) == 0) out.push_back(f[2].as_int());
    }
    std::sort(out.begin(), out.end());
    return out;
  };
  const auto shared = [](const std::vector<std::int64_t>& a, const std::vector<std::int64_t>& b) {
    std::vector<std::int64_t> both;
    std::set_intersection(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(both));
    return both.size();
  };
  for (bool zygote : {true, false}) {
    CAPTURE(zygote);
    Pool pool(options(zygote, 2));
    auto a = pool.submit("rp_tasks.hostile:fd_table", {Value(0.5)});
    auto b = pool.submit("rp_tasks.hostile:fd_table", {Value(0.5)});
    const Value ta = get(a), tb = get(b);
    REQUIRE(ta.as_list()[0] != tb.as_list()[0]);  // two workers
    CAPTURE(ta.repr());
    const Value& fa = ta.as_list()[1];
    const Value& fb = tb.as_list()[1];
    CHECK(shared(inodes(fa, "socket:"), inodes(fb, "socket:")) == 0);
    CHECK(shared(inodes(fa, "/memfd:"), inodes(fb, "/memfd:")) == 0);
    std::vector<std::int64_t> mine;  // this process's socket ends
    if (DIR* d = ::opendir("/proc/self/fd")) {
      while (dirent* e = ::readdir(d)) {
        struct stat st {};
        const std::string path = std::string("/proc/self/fd/") + e->d_name;
        char link[256] = {};
        if (::readlink(path.c_str(), link, sizeof link - 1) > 0 && std::string(link).rfind("socket:", 0) == 0 &&
            ::stat(path.c_str(), &st) == 0)
          mine.push_back(static_cast<std::int64_t>(st.st_ino));
      }
      ::closedir(d);
    }
    std::sort(mine.begin(), mine.end());
    for (const Value* f : {&fa, &fb}) {
      // Beyond stdio: its two rings (a segment and an eventfd each), its call ring's socket ends
      // and its result ring's sending end; nothing else, and every socket end one of ours.
      std::size_t beyond_stdio = 0;
      for (const Value& e : f->as_list()) beyond_stdio += e.as_tuple()[0].as_int() > 2;
      CHECK(beyond_stdio == 7);
      CHECK(inodes(*f, "/memfd:ringpool-ring").size() == 2);
      CHECK(inodes(*f, "anon_inode:[eventfd]").size() == 2);
      CHECK(inodes(*f, "socket:").size() == 3);
      CHECK(shared(inodes(*f, "socket:"), mine) == 3);
    }
  }
}


TEST_CASE("Pool: a dead worker fails only its task and is replaced" * doctest::timeout(120)) {
  Pool pool(options(true));
  std::vector<std::future<Value>> before;
  for (int i = 0; i < 20; ++i) before.push_back(pool.submit("rp_tasks:add", {Value(i), Value(i)}));
  auto victim = pool.submit("rp_tasks:die", {Value("kill")});
  std::vector<std::future<Value>> after;
  for (int i = 0; i < 20; ++i) after.push_back(pool.submit("rp_tasks:sleep_pid", {Value(0.01)}));
  for (int i = 0; i < 20; ++i) CHECK(get(before[i]) == Value(2 * i));
  pid_t dead = -1;
  try {
    get(victim);
    FAIL("no error");
  } catch (const WorkerDied& e) {
    dead = e.pid();
    CHECK(e.exit_code() == -SIGKILL);
    CHECK(std::string(e.what()).find("SIGKILL") != std::string::npos);
  }
  for (auto& f : after) CHECK(get(f).as_int() != dead);
  auto exit3 = pool.submit("rp_tasks:die", {Value("exit")});
  try {
    get(exit3);
    FAIL("no error");
  } catch (const WorkerDied& e) {
    CHECK(e.exit_code() == 3);
  }
  auto ok = pool.submit("rp_tasks:add", {Value(20), Value(22)});
  CHECK(get(ok) == Value(42));
  // Both dead workers are replaced (the replacement starts after the failure is reported).
  for (int i = 0; i < 1000 && pool.workers_started() < 4; ++i) std::this_thread::sleep_for(10ms);
  CHECK(pool.workers_started() == 4);
  CHECK(pool.worker_pids().size() == 2);
}

TEST_CASE("Pool: calls travel in runs, and a death in a run fails only the call that was running" * doctest::timeout(120)) {
  // Consecutive calls of one function go to a worker as one RUN record; each is still a task of
  // its own: a SIGKILL while item 57 runs fails that item alone, and the items after it (taken
  // by the dead worker in the same record) run on the other worker or the replacement.
  // Runs form when calls wait in the backlog: slow calls first keep the depth bound small (about
  // 2 ms of work per worker), so the quick calls after them queue up and leave in runs.
  Pool pool(options(true));
  for (int round = 0; round < 2; ++round) {
    CAPTURE(round);
    std::vector<std::future<Value>> slow;
    for (int i = 0; i < 20; ++i) slow.push_back(pool.submit("rp_tasks:sleep_pid", {Value(0.005)}));
    const std::uint64_t started = pool.workers_started();
    std::vector<std::future<Value>> fs;
    for (int i = 0; i < 200; ++i) fs.push_back(pool.submit("rp_tasks:die_at", {Value(i), Value(57)}));
    for (auto& f : slow) get(f);
    for (int i = 0; i < 200; ++i) {
      CAPTURE(i);
      if (i == 57) {
        CHECK_THROWS_AS(get(fs[i]), WorkerDied);
      } else {
        CHECK(get(fs[i]) == Value(i));
      }
    }
    // One worker died (item 57 was not run again elsewhere), and it was replaced.
    for (int i = 0; i < 1000 && pool.workers_started() < started + 1; ++i) std::this_thread::sleep_for(10ms);
    std::this_thread::sleep_for(100ms);
    CHECK(pool.workers_started() == started + 1);
  }
  // Runs break where the function changes, keywords appear, or the argument count differs.
  std::vector<std::future<Value>> mixed;
  std::vector<Value> want;
  for (int i = 0; i < 300; ++i) {
    if (i % 7 == 0) {
      mixed.push_back(pool.submit("rp_tasks:add", {Value(i)}, {{"c", Value(1)}}));
      want.emplace_back(i + 1);
    } else if (i % 3 == 0) {
      mixed.push_back(pool.submit("rp_tasks:add", {Value(i), Value(i)}));
      want.emplace_back(2 * i);
    } else if (i % 2 == 0) {
      mixed.push_back(pool.submit("rp_tasks:add", {Value(i)}));
      want.emplace_back(i);
    } else {
      mixed.push_back(pool.submit("rp_tasks:echo", {Value::tuple({Value(i)})}));
      want.push_back(Value::tuple({Value(i)}));
    }
  }
  for (int i = 0; i < 300; ++i) {
    CAPTURE(i);
    CHECK(get(mixed[i]) == want[i]);
  }
}

TEST_CASE("Pool: task timeout, max tasks per child, and many service threads" * doctest::timeout(180)) {
  PoolOptions o = options(true);
  o.task_timeout = 1000ms;
  o.max_tasks_per_child = 50;
  Pool pool(o);
  auto slow = pool.submit("rp_tasks:sleep_pid", {Value(30)});
  auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_AS(get(slow), TaskTimeout);
  CHECK(std::chrono::steady_clock::now() - t0 < 10s);

  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int i = 0; i < 100; ++i) {
        auto f = pool.submit("rp_tasks:add", {Value(k), Value(i)});
        if (f.wait_for(60s) == std::future_status::ready && f.get() == Value(k + i)) ++good;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(good == 400);
  CHECK(pool.workers_started() >= 400 / 50);
}

TEST_CASE("Pool survives its zygote dying, and leaves nothing running" * doctest::timeout(120)) {
  std::vector<pid_t> pids;
  pid_t zygote = -1;
  {
    Pool pool(options(true));
    auto first = pool.submit("rp_tasks:pid");
    get(first);
    zygote = pool.zygote_pid();
    REQUIRE(zygote > 0);
    ::kill(zygote, SIGKILL);
    std::vector<std::future<Value>> fs;
    for (int i = 0; i < 10; ++i) fs.push_back(pool.submit("rp_tasks:sleep_pid", {Value(0.05)}));
    int ok = 0;
    for (auto& f : fs) {
      try {
        get(f);
        ++ok;
      } catch (const WorkerDied&) {
      }
    }
    CHECK(ok >= 8);
    CHECK(pool.zygote_pid() != zygote);
    pids = pool.worker_pids();
    pids.push_back(pool.zygote_pid());
  }
  std::this_thread::sleep_for(200ms);
  for (pid_t p : pids) CHECK_FALSE(alive(p));
}

TEST_CASE("Pool shutdown: wait finishes the work, no-wait fails it, submit after is refused" * doctest::timeout(120)) {
  Pool pool(options(true));
  std::vector<std::future<Value>> fs;
  for (int i = 0; i < 10; ++i) fs.push_back(pool.submit("rp_tasks:sleep_pid", {Value(0.02)}));
  pool.shutdown(true);
  for (auto& f : fs) CHECK(f.wait_for(0s) == std::future_status::ready);
  CHECK_THROWS_AS(pool.submit("rp_tasks:pid"), PoolClosed);

  Pool pool2(options(false, 1));
  auto slow = pool2.submit("rp_tasks:sleep_pid", {Value(5)});
  std::this_thread::sleep_for(100ms);
  pool2.shutdown(false);
  CHECK_THROWS_AS(get(slow), PoolClosed);
}

// A worker's death starts its replacement with the pool's lock released; a shutdown in that
// window once saw no worker left, stopped waiting, and joined a collector that went on serving the
// replacement, never asked to stop: a hang (1 run in 10 of a test that ended that way). Here the
// window is held open: the zygote, stopped, cannot answer the replacement's fork request until the
// shutdown has begun.
TEST_CASE("Pool shutdown while a dead worker's replacement is starting stops the replacement too" *
          doctest::timeout(120)) {
  std::mutex mu;
  std::vector<pid_t> replacements;
  PoolOptions o = options(true, 1);
  o.log = [&](const LogRecord& r) {
    if (r.event == LogEvent::worker_replaced) {
      std::lock_guard lk(mu);
      replacements.push_back(r.pid);
    }
  };
  auto pool = std::make_unique<Pool>(o);
  const pid_t zygote = pool->zygote_pid();
  REQUIRE(zygote > 0);
  REQUIRE(::kill(zygote, SIGSTOP) == 0);
  auto forged = pool->submit("rp_tasks:forge_error", {Value(7)});  // answered first, then its worker killed
  CHECK_THROWS_AS(get(forged), ProtocolError);
  // The dead worker leaves the pool's list in the round that starts its replacement, which then
  // releases the lock to wait for the zygote.
  for (int i = 0; i < 6000 && !pool->worker_pids().empty(); ++i) std::this_thread::sleep_for(10ms);
  REQUIRE(pool->worker_pids().empty());
  // (worker_pids() leaves a worker out once its exit is known, a little before the collector has
  // handled it; nothing can finish while the zygote is stopped, so a pause costs nothing.)
  std::this_thread::sleep_for(200ms);
  std::promise<void> done;
  auto finished = done.get_future();
  std::thread([&pool, &done] {
    pool.reset();  // the destructor shuts down, waiting
    done.set_value();
  }).detach();
  std::this_thread::sleep_for(300ms);  // the shutdown is in, waiting for the start
  ::kill(zygote, SIGCONT);
  if (finished.wait_for(60s) != std::future_status::ready) {
    FAIL_CHECK("the shutdown did not return");
    std::abort();  // its threads cannot be joined: end here rather than hang the suite
  }
  std::lock_guard lk(mu);
  CHECK(replacements.size() == 1);  // it did start, and was stopped
  for (pid_t p : replacements) CHECK_FALSE(alive(p));
  CHECK_FALSE(alive(zygote));
}

// Runs f on a thread of its own; false if it has not returned within `limit` (the test then ends
// the process: a pool's threads that hang cannot be joined).
template <class F>
void returns_within(std::chrono::seconds limit, const char* what, F f) {
  auto done = std::make_shared<std::promise<void>>();
  auto finished = done->get_future();
  std::thread([f = std::move(f), done]() mutable {
    f();
    done->set_value();
  }).detach();
  if (finished.wait_for(limit) != std::future_status::ready) {
    FAIL_CHECK(std::string(what) << " did not return");
    std::abort();
  }
}

TEST_CASE("Pool shutdown: a failed task's callback may call into the pool; shutdowns from several threads at once" *
          doctest::timeout(120)) {
  // shutdown(false) failed the pending tasks with the pool's lock held: a callback that called
  // into the pool (as a callback may: pool.hpp) deadlocked the shutdown.
  auto pool = std::make_unique<Pool>(options(false, 1));
  std::mutex mu;
  std::vector<std::string> seen;
  for (int i = 0; i < 3; ++i)
    pool->async_submit("rp_tasks:sleep_pid", {Value(2.0)}, {}, [&](std::exception_ptr e, Value) {
      std::string what = "no error";
      try {
        if (e) std::rethrow_exception(e);
      } catch (const PoolClosed&) {
        what = "PoolClosed";
      } catch (...) {
        what = "other";
      }
      pool->worker_pids();  // takes the pool's lock
      try {
        pool->async_submit("rp_tasks:pid", {}, {}, [](std::exception_ptr, Value) {});
        what += ", submitted";
      } catch (const PoolClosed&) {
        what += ", refused";
      }
      std::lock_guard lk(mu);
      seen.push_back(what);
    });
  std::this_thread::sleep_for(300ms);  // the first is running
  returns_within(60s, "shutdown(false)", [&] { pool->shutdown(false); });
  {
    std::lock_guard lk(mu);
    CHECK(seen.size() >= 2);  // the two that had not started at least (the running one too, or later)
    for (const auto& w : seen) CHECK(w == "PoolClosed, refused");
  }
  returns_within(60s, "the destructor", [&] { pool.reset(); });
  CHECK(seen.size() == 3);

  // Several threads shutting one pool down at once, waiting or not: each returns once the
  // workers are stopped, whoever stops them (they used to join the collector twice).
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    Pool p(options(true, 2));
    std::vector<std::future<Value>> fs;
    for (int i = 0; i < 6; ++i) fs.push_back(p.submit("rp_tasks:sleep_pid", {Value(0.1)}));
    returns_within(60s, "concurrent shutdowns", [&] {
      std::vector<std::thread> ts;
      for (int t = 0; t < 4; ++t) ts.emplace_back([&p, t, round] { p.shutdown((t + round) % 2 == 0); });
      for (auto& t : ts) t.join();
    });
    CHECK(p.worker_pids().empty());
    for (auto& f : fs) CHECK(f.wait_for(0s) == std::future_status::ready);  // answered, or failed by the shutdown(false)
  }
}

TEST_CASE("Pool takes a bundle file as the workers' environment" * doctest::timeout(120)) {
  const std::string bundle = "/tmp/ringpool-test-pool-" + std::to_string(::getpid()) + ".zip";
  const std::string make =
      "PYTHONPATH=" RINGPOOL_SOURCE_DIR "/bindings /usr/bin/python3 -c \""
      "import ringpool\n"
      "with ringpool.Bundle.writer('" + bundle + "', search_path=['" RINGPOOL_SOURCE_DIR "/tests/cpp/pytasks']) as w:\n"
      "    w.intern('rp_tasks.**')\n"
      "    w.save_module('rp_tasks')\n"
      "    w.save_module('rp_tasks.helpers')\n\"";
  REQUIRE(std::system(make.c_str()) == 0);
  for (bool zygote : {true, false}) {
    CAPTURE(zygote);
    PoolOptions o = options(zygote);
    o.packages.clear();  // the bundle alone provides rp_tasks
    o.bundle = bundle;
    if (zygote) o.preload = {"rp_tasks"};
    Pool pool(o);
    auto a = pool.submit("rp_tasks:add", {Value(40), Value(2)});
    CHECK(get(a) == Value(42));
    auto d = pool.submit("rp_tasks:deferred");
    CHECK(get(d) == Value("rp_tasks.helpers"));
  }
  ::unlink(bundle.c_str());
  PoolOptions bad = options(true);
  bad.bundle = "/nonexistent/bundle.zip";
  CHECK_THROWS_AS(Pool{bad}, std::invalid_argument);
}

TEST_CASE("Pool: a package folder that is missing or wrong is refused with a message naming the fix" *
          doctest::timeout(60)) {
  auto refusal = [](const std::string& folder) {
    PoolOptions o = options(true);
    o.packages = {{"rp_tasks", folder}};
    try {
      Pool pool(o);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string pytasks = RINGPOOL_SOURCE_DIR "/tests/cpp/pytasks";
  std::string why = refusal("/nonexistent/rp_tasks");
  CHECK(why.find("package rp_tasks") != std::string::npos);
  CHECK(why.find("'/nonexistent/rp_tasks'") != std::string::npos);
  CHECK(why.find("cannot be opened") != std::string::npos);
  why = refusal(pytasks + "/rp_tasks/__init__.py");  // the file, not its folder
  CHECK(why.find("is not a folder") != std::string::npos);
  why = refusal(pytasks);  // the folder above the package
  CHECK(why.find("no __init__.py in") != std::string::npos);
  CHECK(why.find("(its package folder is " + pytasks + "/rp_tasks)") != std::string::npos);
}

TEST_CASE("Pool callbacks run outside the pool's lock: a callback may submit the next step" * doctest::timeout(120)) {
  Pool pool(options(true));
  // A chain of 200 calls, each submitted from the callback of the one before (on the collector
  // thread), and a raw task whose result is not bytes.
  std::promise<Value> finished;
  std::function<void(std::exception_ptr, Value)> step = [&](std::exception_ptr err, Value v) {
    if (err) {
      finished.set_exception(err);
      return;
    }
    if (v.as_int() >= 200) {
      finished.set_value(v);
      return;
    }
    pool.async_submit("rp_tasks:add", {v, Value(1)}, {}, step);
  };
  pool.async_submit("rp_tasks:add", {Value(0), Value(1)}, {}, step);
  auto f = finished.get_future();
  CHECK(get(f) == Value(200));
  auto r = pool.submit_raw("rp_tasks:echo", "abc");
  REQUIRE(r.wait_for(60s) == std::future_status::ready);
  CHECK(get(r) == "abc");  // bytes in, the same bytes back
  auto bad = pool.submit_raw("builtins:len", "four");
  REQUIRE(bad.wait_for(60s) == std::future_status::ready);
  try {
    bad.get();
    FAIL("a raw task returning an int must fail");
  } catch (const RemoteError& e) {
    CHECK(std::string(e.what()).find("must return bytes") != std::string::npos);
  }
}

TEST_CASE("Pool: a collector out of descriptors keeps an out-of-band result and delivers it once it has them back" *
          doctest::timeout(120)) {
  Pool pool(options(true, 1));
  auto warm = pool.submit("rp_tasks:echo", {Value(1)});
  CHECK(get(warm) == Value(1));
  // Lower the limit to a little above what is open, then take every descriptor left.
  testing::FdLimit limit(64);
  REQUIRE(limit.take_the_rest());
  // The result (4 MiB) travels in a memfd the collector cannot receive now.
  auto f = pool.submit("rp_tasks:big_bytes", {Value(4 << 20)});
  std::this_thread::sleep_for(300ms);  // the collector meets EMFILE meanwhile (and retries)
  limit.give_back();
  const Value v = get(f);
  CHECK(v == Value::bytes(std::string(4 << 20, 'z')));
  // The pool goes on. (Other threads of the pool may meet EMFILE too: the supervisor then
  // replaces a worker, so the worker count is not checked here.)
  auto after = pool.submit("rp_tasks:add", {Value(2), Value(3)});
  CHECK(get(after) == Value(5));
}

TEST_CASE("Pool: a workers' interpreter that cannot run ringpool is named in the start error" * doctest::timeout(120)) {
  for (bool zygote : {true, false}) {
    CAPTURE(zygote);
    PoolOptions o = options(zygote, 1);
    o.packages.clear();
    o.python_path = {"/nonexistent/ringpool-path"};
    o.env = {"PATH=/usr/bin:/bin", "PYTHONNOUSERSITE=1"};  // no PYTHONPATH: ringpool is not importable
    std::string what;
    try {
      Pool pool(o);
      auto f = pool.submit("rp_tasks:echo", {Value(1)});  // exec mode: the workers die after the start
      REQUIRE(f.wait_for(60s) == std::future_status::ready);
      f.get();
    } catch (const std::exception& e) {
      what = e.what();
    }
    CAPTURE(what);
    CHECK(what.find("cannot import ringpool") != std::string::npos);
    CHECK(what.find("No module named 'ringpool'") != std::string::npos);
    CHECK(what.find("/nonexistent/ringpool-path") != std::string::npos);
    // ... and names the fixes.
    CHECK(what.find("cmake --install") != std::string::npos);
    CHECK(what.find("set PoolOptions::python_path to the folder holding the ringpool package") != std::string::npos);
  }
  PoolOptions o = options(true, 1);
  o.python = "/nonexistent/python3";
  std::string what;
  try {
    Pool pool(o);
  } catch (const std::exception& e) {
    what = e.what();
  }
  CHECK(what.find("no executable Python interpreter at '/nonexistent/python3'") != std::string::npos);
}

TEST_CASE("Pool::map: results in order, the first failure in order, nothing submitted on a bad argument" *
          doctest::timeout(120)) {
  Pool pool(options(true));
  // Many calls, in runs: every result in its place.
  std::vector<std::vector<Value>> calls;
  for (int i = 0; i < 5000; ++i) calls.push_back({Value(i), Value(i % 7)});
  auto all = pool.map("rp_tasks:add", calls);
  std::vector<Value> got = get(all);
  REQUIRE(got.size() == calls.size());
  for (int i = 0; i < 5000; ++i) {
    CAPTURE(i);
    CHECK(got[i] == Value(i + i % 7));
  }
  // Two maps of one function and single calls of it, in flight together: calls of different
  // batches may share a run (the same function), and every result still reaches its own batch.
  {
    std::vector<std::vector<Value>> a, b;
    for (int i = 0; i < 3000; ++i) {
      a.push_back({Value(i), Value(1)});
      b.push_back({Value(i), Value(2)});
    }
    auto fa = pool.map("rp_tasks:add", a);
    auto single = pool.submit("rp_tasks:add", {Value(40), Value(2)});
    auto fb = pool.map("rp_tasks:add", b);
    const std::vector<Value> ra = get(fa), rb = get(fb);
    for (int i = 0; i < 3000; ++i) {
      CAPTURE(i);
      CHECK(ra[i] == Value(i + 1));
      CHECK(rb[i] == Value(i + 2));
    }
    CHECK(get(single) == Value(42));
  }
  // Nothing to do: a ready, empty result.
  auto none = pool.map("rp_tasks:add", {});
  CHECK(none.wait_for(0s) == std::future_status::ready);
  CHECK(get(none).empty());
  // Two calls fail: the error is the first in the calls' order, whichever failed first (call 1
  // sleeps before it fails; call 3, on the other worker, may fail first).
  auto mixed = pool.map("rp_tasks:map_probe", {{Value(0)}, {Value("fail-slow")}, {Value(2)}, {Value("fail")}});
  try {
    get(mixed);
    FAIL("map with failing calls did not fail");
  } catch (const RemoteError& e) {
    CHECK(e.type_name() == "ValueError");
    CHECK(e.message() == "fail-slow");
  }
  // A worker death fails its call's batch with WorkerDied; the pool goes on.
  auto died = pool.map("rp_tasks:die_at", {{Value(0), Value(1)}, {Value(1), Value(1)}, {Value(2), Value(1)}});
  CHECK_THROWS_AS(get(died), WorkerDied);
  // An argument that cannot be pickled: PickleError at the call, and none of the calls runs.
  const std::uint64_t before = pool.workers_started();
  CHECK_THROWS_AS(pool.map("rp_tasks:die_at", {{Value(0), Value(0)}, {Value(std::string("\xff"))}}), PickleError);
  CHECK_THROWS_AS(pool.map(std::string("rp_tasks:\xff"), {{}}), PickleError);  // the function's name
  auto after = pool.map("rp_tasks:pid", {{}, {}});
  get(after);
  CHECK(pool.workers_started() == before);  // die_at(0, 0) never ran: no worker was killed
  pool.shutdown();
  CHECK_THROWS_AS(pool.map("rp_tasks:pid", {{}}), PoolClosed);
}

TEST_CASE("Pool::map: deep queues (the collector gathering) through maps of two functions, a worker's death and "
          "a shutdown without waiting" * doctest::timeout(120)) {
  Pool pool(options(true));
  // Short calls by the thousand keep every worker deep in queued calls: the collector gathers.
  // Maps of two functions in flight together: no run may mix them, every result goes home.
  std::vector<std::vector<Value>> adds, echoes, deaths;
  for (int i = 0; i < 20000; ++i) {
    adds.push_back({Value(i), Value(3)});
    echoes.push_back({Value("e" + std::to_string(i))});
    deaths.push_back({Value(i), Value(10000)});  // call 10000 kills its worker
  }
  auto fa = pool.map("rp_tasks:add", adds);
  auto fe = pool.map("rp_tasks:echo", echoes);
  auto fd = pool.map("rp_tasks:die_at", deaths);
  auto fa2 = pool.map("rp_tasks:add", adds);
  const std::vector<Value> ra = get(fa), re = get(fe), ra2 = get(fa2);
  for (int i = 0; i < 20000; ++i) {
    CAPTURE(i);
    REQUIRE(ra[i] == Value(i + 3));
    REQUIRE(ra2[i] == Value(i + 3));
    REQUIRE(re[i] == Value("e" + std::to_string(i)));
  }
  CHECK_THROWS_AS(get(fd), WorkerDied);  // the calls queued behind it went to a replacement
  // Deep queues when the pool is shut down without waiting: the pending batch fails, nothing hangs.
  auto pending = pool.map("rp_tasks:add", adds);
  pool.shutdown(false);
  REQUIRE(pending.wait_for(60s) == std::future_status::ready);
  try {
    pending.get();  // done before the shutdown, or failed by it
  } catch (const PoolClosed&) {
  }
}

TEST_CASE("Pool::map: a pool shut down without waiting fails a pending batch with PoolClosed" * doctest::timeout(120)) {
  Pool pool(options(true, 1));
  std::vector<std::vector<Value>> calls(50, std::vector<Value>{Value(0.05)});
  auto batch = pool.map("rp_tasks:sleep_pid", calls);
  std::this_thread::sleep_for(100ms);
  pool.shutdown(false);
  REQUIRE(batch.wait_for(60s) == std::future_status::ready);
  CHECK_THROWS_AS(batch.get(), PoolClosed);
}

TEST_CASE("Pool: a worker forked while the service has no descriptor free is reaped, and the zygote stays" *
          doctest::timeout(120)) {
  // The zygote answers a fork with the child's pid and pidfd; with no descriptor free here the
  // kernel drops the pidfd (MSG_CTRUNC). The child is still ours (CLONE_PARENT): it must be
  // killed and reaped by pid, not left a zombie, and the zygote is not to blame.
  {
    Pool pool(options(true, 1));
    auto warm = pool.submit("rp_tasks:pid");
    const pid_t worker = static_cast<pid_t>(get(warm).as_int());
    const pid_t zygote = pool.zygote_pid();
    const std::uint64_t started = pool.workers_started();
    {
      testing::FdLimit limit(64);
      REQUIRE(limit.take_the_rest());
      ::kill(worker, SIGKILL);  // its replacement is forked while nothing can be received
      std::this_thread::sleep_for(500ms);
    }
    auto after = pool.submit("rp_tasks:pid");
    const pid_t replacement = static_cast<pid_t>(get(after).as_int());
    CHECK(replacement != worker);
    CHECK(pool.workers_started() > started);
    CHECK(pool.zygote_pid() == zygote);
  }
  // The pool is gone and reaped everything it started: no child is left to reap.
  CHECK(::waitpid(-1, nullptr, WNOHANG | __WALL) <= 0);
}
