// detail::Scheduler driven without processes: fake workers (a count of the records each took from
// its call ring) and a fake clock, for the cases that are hard to hit with real workers.
#include <doctest/doctest.h>

#include <chrono>
#include <deque>
#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "ringpool/detail/scheduler.hpp"
#include "ringpool/proto/task.hpp"

using ringpool::detail::Fate;
using ringpool::detail::Scheduler;
using ringpool::detail::SchedulerOptions;
namespace task = ringpool::proto::task;
using namespace std::chrono_literals;

namespace {

// A call is an int: calls of the same parity share a function (they may form a run).
struct Rules {
  std::size_t size = 10;  // argument bytes per call
  bool joins(int a, int b) const { return a % 2 == b % 2; }
  std::size_t bytes(int) const { return size; }
};

using Sched = Scheduler<int>;

// Fake workers: what each was sent, as records (lists of (tid, call)), and how many records it
// took from its ring (the ring's `consumed`).
struct Fakes {
  struct Worker {
    std::vector<std::vector<std::pair<std::uint64_t, int>>> records;
    std::uint64_t consumed = 0;
  };
  std::map<int, Worker> w;

  // Sends everything the scheduler assigns; returns the number of assignments.
  int dispatch(Sched& s, Rules rules = {}) {
    int n = 0;
    while (auto a = s.assign(rules)) {
      auto& q = s.sent(a->wid);
      std::vector<std::pair<std::uint64_t, int>> rec;
      for (std::size_t i = a->first; i < a->first + a->count; ++i) {
        rec.emplace_back(q[i].tid, q[i].task);
        if (q[i].last_of_record) {
          w[a->wid].records.push_back(rec);
          rec.clear();
        }
      }
      REQUIRE(rec.empty());  // an assignment ends with a whole record
      ++n;
    }
    return n;
  }
  // The worker takes its next k records.
  void take(int wid, std::uint64_t k) { w[wid].consumed += k; }
  std::uint64_t tid_of(int wid, std::size_t record, std::size_t item = 0) { return w[wid].records.at(record).at(item).first; }
};

SchedulerOptions opts(std::size_t workers) {
  SchedulerOptions o;
  o.workers = workers;
  return o;
}

// A reported task time that makes the depth bound `depth` (between kMinDepth and kMaxDepth).
double time_for_depth(std::size_t depth) { return task::kQueuedWork / (static_cast<double>(depth) + 0.5) - task::kResultCost; }

}  // namespace

TEST_CASE("scheduler: the depth bound follows the reported task times") {
  CHECK(task::depth_for(task::kInitialTaskTime) == static_cast<std::size_t>(task::kQueuedWork / (task::kInitialTaskTime + task::kResultCost)));
  CHECK(task::depth_for(0.0) == static_cast<std::size_t>(task::kQueuedWork / task::kResultCost));
  CHECK(task::depth_for(10.0) == task::kMinDepth);
  CHECK(task::depth_for(-1.0) == task::kMinDepth);  // nonsense from a worker: the floor, not a huge cast
  CHECK(task::depth_for(1e-9) <= task::kMaxDepth);

  Sched s(opts(1));
  s.add_worker(1);
  CHECK(s.depth() == task::kMinDepth);  // before any report
  std::vector<Sched::Failure> failed;
  Fakes f;
  for (int i = 0; i < 2000; ++i) s.submit(0);
  f.dispatch(s);
  CHECK(s.sent(1).size() == task::kMinDepth);
  // Many fast answers: the moving average falls, the bound rises.
  for (int i = 0; i < 400; ++i) {
    auto& q = s.sent(1);
    const std::uint64_t tid = q.front().tid;
    REQUIRE(s.answer(1, tid, time_for_depth(50), failed).has_value());
    s.retune();
    f.dispatch(s);
  }
  CHECK(s.depth() == 50);
  CHECK(s.sent(1).size() == 50);
  CHECK(failed.empty());
}

TEST_CASE("scheduler: calls go to the least busy worker, in runs of one function") {
  Sched s(opts(2));
  s.add_worker(1);
  s.add_worker(2);
  std::vector<Sched::Failure> failed;
  // Raise the bound to 8 first.
  for (int i = 0; i < 200; ++i) {
    s.submit(0);
    Fakes f;
    f.dispatch(s);
    for (int wid : {1, 2})
      while (!s.sent(wid).empty()) REQUIRE(s.answer(wid, s.sent(wid).front().tid, time_for_depth(8), failed).has_value());
    s.retune();
  }
  REQUIRE(s.depth() == 8);
  Fakes f;
  for (int c : {0, 2, 4, 1, 3, 6, 8, 10, 12, 14, 16, 18}) s.submit(c);
  CHECK(f.dispatch(s) == 2);
  // Worker 1 (first of the least busy) takes 8: a run of three even calls, a run of two odd
  // ones, a run of three even ones; worker 2 the other four as one run.
  REQUIRE(f.w[1].records.size() == 3);
  CHECK(f.w[1].records[0].size() == 3);
  CHECK(f.w[1].records[1].size() == 2);
  CHECK(f.w[1].records[2].size() == 3);
  REQUIRE(f.w[2].records.size() == 1);
  CHECK(f.w[2].records[0].size() == 4);
  // Wire ids follow the order calls are sent, consecutive within a run.
  CHECK(f.tid_of(1, 0, 1) == f.tid_of(1, 0, 0) + 1);
  CHECK(f.tid_of(2, 0, 0) == f.tid_of(1, 2, 2) + 1);
  // Worker 2 has room for four more; then both are at the bound and nothing moves until an answer.
  for (int c : {20, 22, 24, 26, 28}) s.submit(c);
  CHECK(f.dispatch(s) == 1);
  CHECK(f.w[2].records.back().size() == 4);
  CHECK(f.dispatch(s) == 0);
  CHECK(s.backlog_size() == 1);
  CHECK(s.answer(2, f.tid_of(2, 0, 0), 1e-3, failed) == 12);
  CHECK(f.dispatch(s) == 1);
  CHECK(f.w[2].records.back().at(0).second == 28);
  CHECK(s.outstanding() == 16);
}

TEST_CASE("scheduler: a run stops at kMaxRunBytes of arguments") {
  Sched s(opts(1));
  s.add_worker(1);
  std::vector<Sched::Failure> failed;
  const std::size_t top = task::depth_for(0.0);
  for (int i = 0; i < 2000 && s.depth() < top; ++i) {  // instant tasks: the bound climbs to its top
    s.submit(0);
    Fakes f;
    f.dispatch(s);
    while (!s.sent(1).empty()) REQUIRE(s.answer(1, s.sent(1).front().tid, 0.0, failed).has_value());
    s.retune();
  }
  REQUIRE(s.depth() == top);
  CHECK(top <= task::kMaxRunCalls);  // so a run is cut by its bytes before its count
  Fakes f;
  for (std::size_t i = 0; i < top; ++i) s.submit(0);
  Rules big;
  big.size = 200;
  f.dispatch(s, big);
  const std::size_t per_run = task::kMaxRunBytes / big.size;
  REQUIRE(f.w[1].records.size() == (top + per_run - 1) / per_run);
  CHECK(f.w[1].records[0].size() == per_run);
  std::size_t total = 0;
  for (auto& r : f.w[1].records) total += r.size();
  CHECK(total == top);
}

TEST_CASE("scheduler: a death during a run fails the running item and requeues the rest in order") {
  Sched s(opts(2));
  s.add_worker(1, 1);  // one record (a start-up configuration) ahead of the calls
  Fakes f;
  f.take(1, 1);
  std::vector<Sched::Failure> failed;
  for (int c : {0, 2}) s.submit(c);  // kMinDepth = 2: one run of two
  f.dispatch(s);
  for (int c : {4, 6, 8}) s.submit(c);  // waiting in the backlog
  REQUIRE(f.w[1].records.size() == 1);
  REQUIRE(f.w[1].records[0].size() == 2);
  f.take(1, 1);  // it took the run
  CHECK(s.answer(1, f.tid_of(1, 0, 0), 1e-3, failed) == 0);
  CHECK(s.exited(1));
  CHECK(f.dispatch(s) == 0);  // no open worker: nothing moves
  auto d = s.died(1, f.w[1].consumed, failed);
  CHECK(d.running);
  CHECK_FALSE(d.timed_out);
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].task == 2);
  CHECK(failed[0].fate == Fate::kDied);
  CHECK(s.shortfall() == 2);
  CHECK_FALSE(s.has_worker(1));
  CHECK(s.outstanding() == 3);
  // The replacement gets the backlog in its order.
  s.add_worker(2);
  f.dispatch(s);
  CHECK(f.w[2].records.at(0).at(0).second == 4);
  CHECK(f.w[2].records.at(0).at(1).second == 6);
}

TEST_CASE("scheduler: a death before taking the rest of a batch fails nothing it did not take") {
  Sched s(opts(1));
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  s.submit(0);
  s.submit(1);  // a different function: two records
  f.dispatch(s);
  REQUIRE(f.w[1].records.size() == 2);
  f.take(1, 1);
  CHECK(s.answer(1, f.tid_of(1, 0), 1e-3, failed) == 0);
  // It dies having answered all it took: nothing was running.
  auto d = s.died(1, f.w[1].consumed, failed);
  CHECK_FALSE(d.running);
  CHECK(d.requeued == 1);
  CHECK(failed.empty());
  CHECK(s.backlog_size() == 1);
  CHECK(s.outstanding() == 1);
}

TEST_CASE("scheduler: calls a dead worker never took go back in front of the backlog, in their order") {
  Sched s(opts(1));
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  for (int c : {0, 1, 2}) s.submit(c);  // 0 and 1 sent (two records), 2 waits
  f.dispatch(s);
  auto d = s.died(1, 0, failed);
  CHECK_FALSE(d.running);
  CHECK(d.requeued == 2);
  s.add_worker(2);
  for (int c : {4, 5}) s.submit(c);
  for (int round = 0; round < 3; ++round) {
    f.dispatch(s);
    while (!s.sent(2).empty()) REQUIRE(s.answer(2, s.sent(2).front().tid, 1e-3, failed).has_value());
  }
  std::vector<int> order;
  for (auto& rec : f.w[2].records)
    for (auto& [tid, c] : rec) order.push_back(c);
  CHECK(order == std::vector<int>{0, 1, 2, 4, 5});
  CHECK(failed.empty());
}

TEST_CASE("scheduler: max_requeues fails a call in front of that many + 1 deaths that say it was not taken") {
  // A worker's `consumed` count is its own to write: a task that sets it back and kills its worker
  // looks like a call never taken. Without a cap it goes to the next worker, for ever.
  for (std::size_t cap : {0u, 1u, 3u}) {
    CAPTURE(cap);
    SchedulerOptions o = opts(1);
    o.max_requeues = cap;
    Sched s(o);
    Fakes f;
    std::vector<Sched::Failure> failed;
    s.submit(0);  // the killer
    s.submit(1);  // behind it on the same worker: never in front of a death, never charged
    int wid = 0;
    const int deaths = cap ? static_cast<int>(cap) + 1 : 20;
    for (int death = 1; death <= deaths; ++death) {
      CAPTURE(death);
      s.add_worker(++wid);
      f.dispatch(s);
      REQUIRE(s.sent(wid).size() == 2);
      REQUIRE(s.sent(wid)[0].task == 0);
      f.take(wid, 1);  // it took the record ...
      auto d = s.died(wid, 0, failed);  // ... and says it did not
      CHECK_FALSE(d.running);
      CHECK(d.held_calls);
      if (cap && death == deaths) {
        CHECK(d.given_up == 1);
        CHECK(d.requeued == 1);
        REQUIRE(failed.size() == 1);
        CHECK(failed[0].task == 0);
        CHECK(failed[0].fate == Fate::kDied);
        CHECK(failed[0].why.find("the next task of " + std::to_string(cap + 1) + " workers") != std::string::npos);
      } else {
        CHECK(d.given_up == 0);
        CHECK(d.requeued == 2);
        CHECK(failed.empty());
      }
    }
    if (!cap) {
      CHECK(s.backlog_size() == 2);  // no limit: still there after 20 deaths
      continue;
    }
    // The call behind it runs on the next worker; its count starts at 0 when it is in front.
    s.add_worker(++wid);
    f.dispatch(s);
    REQUIRE(s.sent(wid).size() == 1);
    CHECK(s.sent(wid)[0].task == 1);
    CHECK(s.answer(wid, s.sent(wid)[0].tid, 1e-3, failed) == std::optional<int>(1));
    CHECK(s.outstanding() == 0);
  }
}

TEST_CASE("scheduler: a death the pool caused for another call's timeout does not count toward max_requeues") {
  SchedulerOptions o = opts(1);
  o.max_requeues = 1;
  o.task_timeout = 100ms;
  Sched s(o);
  Fakes f;
  std::vector<Sched::Failure> failed;
  std::vector<int> kill;
  const Sched::TimePoint t0{};
  s.submit(0);
  s.submit(1);
  s.add_worker(1);
  f.dispatch(s);
  // Call 0 times out; its answer races the kill, and call 1 is in front when the worker dies.
  REQUIRE(s.started(1, f.tid_of(1, 0), t0));
  s.expire(t0 + 100ms, kill);
  REQUIRE(kill == std::vector<int>{1});
  REQUIRE(s.answer(1, f.tid_of(1, 0), 0.1, failed) == std::optional<int>(0));
  auto d = s.died(1, 1, failed);
  CHECK(d.timed_out);
  CHECK(d.given_up == 0);
  // Call 1 is charged nothing for that death: it gets max_requeues (1) returns of its own.
  for (int wid = 2; wid <= 3; ++wid) {
    s.add_worker(wid);
    f.dispatch(s);
    REQUIRE(s.sent(wid)[0].task == 1);
    d = s.died(wid, 0, failed);
    CHECK(d.given_up == (wid == 3 ? 1u : 0u));
  }
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].task == 1);
  CHECK(failed[0].fate == Fate::kDied);
}

TEST_CASE("scheduler: held_calls tells a death with calls sent from one without (pings do not count)") {
  Sched s(opts(1));
  std::vector<Sched::Failure> failed;
  std::vector<int> ping;
  s.add_worker(1);
  CHECK_FALSE(s.died(1, 1, failed).held_calls);
  s.add_worker(2);
  s.submit(0);
  Fakes f;
  f.dispatch(s);
  REQUIRE(s.answer(2, s.sent(2)[0].tid, 1e-3, failed));
  CHECK_FALSE(s.died(2, 1, failed).held_calls);  // it answered everything it was sent
  s.add_worker(3);
  s.submit(1);
  f.dispatch(s);
  CHECK(s.died(3, 0, failed).held_calls);
}

TEST_CASE("scheduler: a task past its deadline kills its worker and fails with kTimedOut") {
  SchedulerOptions o = opts(1);
  o.task_timeout = 100ms;
  Sched s(o);
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  std::vector<int> kill;
  const Sched::TimePoint t0{};  // the fake clock
  s.submit(0);
  s.submit(1);
  f.dispatch(s);
  f.take(1, 2);
  const auto tid = f.tid_of(1, 0);
  CHECK(s.expire(t0, kill) == Sched::TimePoint::max());  // nothing started
  CHECK(s.started(1, tid, t0));
  CHECK_FALSE(s.started(1, tid, t0 + 90ms));  // reported again: refused, the deadline stands
  CHECK(s.expire(t0 + 99ms, kill) == t0 + 100ms);
  CHECK(kill.empty());
  CHECK(s.expire(t0 + 100ms, kill) == Sched::TimePoint::max());
  CHECK(kill == std::vector<int>{1});
  kill.clear();
  s.expire(t0 + 200ms, kill);
  CHECK(kill.empty());  // asked once
  auto d = s.died(1, f.w[1].consumed, failed);
  CHECK(d.timed_out);
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].task == 0);
  CHECK(failed[0].fate == Fate::kTimedOut);
  CHECK(s.backlog_size() == 1);  // the call it had not started
}

TEST_CASE("scheduler: a call reported STARTED fails at its worker's death whatever its consumed count says") {
  // The count comes from the worker's call ring, which the worker can write: a worker claiming it
  // never took the record it reported starting must not get that call requeued.
  SchedulerOptions o = opts(1);
  o.task_timeout = 100ms;
  Sched s(o);
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  std::vector<int> kill;
  const Sched::TimePoint t0{};
  s.submit(0);
  s.submit(1);
  f.dispatch(s);
  f.take(1, 2);
  CHECK(s.started(1, f.tid_of(1, 0), t0));
  s.expire(t0 + 100ms, kill);
  REQUIRE(kill == std::vector<int>{1});
  auto d = s.died(1, /*consumed, as the worker rewrote it:*/ 0, failed);
  CHECK(d.running);
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].task == 0);
  CHECK(failed[0].fate == Fate::kTimedOut);
  CHECK(s.backlog_size() == 1);  // the call it had not started
}

TEST_CASE("scheduler: a timeout racing its result: the result wins, the next call is not at fault") {
  SchedulerOptions o = opts(1);
  o.task_timeout = 100ms;
  Sched s(o);
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  std::vector<int> kill;
  const Sched::TimePoint t0{};
  s.submit(0);
  s.submit(1);
  f.dispatch(s);
  f.take(1, 2);
  s.started(1, f.tid_of(1, 0), t0);
  s.expire(t0 + 150ms, kill);
  REQUIRE(kill == std::vector<int>{1});
  // The answer was already in the result ring when the pool killed the worker, which had
  // started its next call.
  CHECK(s.answer(1, f.tid_of(1, 0), 0.15, failed) == 0);
  s.started(1, f.tid_of(1, 1), t0 + 150ms);
  auto d = s.died(1, f.w[1].consumed, failed);
  CHECK(d.running);
  CHECK(d.timed_out);
  CHECK(failed.empty());  // the call killed with it goes to another worker instead
  CHECK(s.backlog_size() == 1);
  CHECK(s.outstanding() == 1);
}

TEST_CASE("scheduler: max_tasks_per_child retires workers under load and asks for replacements") {
  SchedulerOptions o = opts(2);
  o.max_tasks_per_child = 3;
  Sched s(o);
  CHECK_FALSE(s.options().runs);  // a worker's count of calls is its count of records
  s.add_worker(1);
  s.add_worker(2);
  Fakes f;
  std::vector<Sched::Failure> failed;
  for (int i = 0; i < 10; ++i) s.submit(0);
  int next_wid = 3;
  int answered = 0;
  std::map<int, int> calls_per_worker;
  // Run the pool to the end: answer everything sent, retire and replace as the scheduler says.
  for (int round = 0; round < 100 && s.outstanding() > 0; ++round) {
    f.dispatch(s);
    while (s.shortfall() > 0) s.add_worker(next_wid++);
    std::vector<int> ids;
    s.for_each_worker([&](int wid) { ids.push_back(wid); });
    for (int wid : ids) {
      auto& q = s.sent(wid);
      if (q.empty()) continue;
      f.take(wid, 1);
      REQUIRE(s.answer(wid, q.front().tid, 1e-3, failed).has_value());
      ++answered;
      ++calls_per_worker[wid];
      // A retiring worker exits once it answered its budget.
      if (calls_per_worker[wid] == 3) {
        s.exited(wid);
        auto d = s.died(wid, f.w[wid].consumed, failed);
        CHECK(d.retiring);
        CHECK_FALSE(d.running);
      }
    }
  }
  CHECK(answered == 10);
  CHECK(failed.empty());
  for (auto& [wid, n] : calls_per_worker) CHECK(n <= 3);
  for (auto& [wid, fw] : f.w)
    for (auto& rec : fw.records) CHECK(rec.size() == 1);
  CHECK(s.open_workers() == 2);
}

TEST_CASE("scheduler: a result that does not decode is found by pinging") {
  Sched s(opts(2));
  s.add_worker(1);
  s.add_worker(2);
  Fakes f;
  std::vector<Sched::Failure> failed;
  for (int c : {0, 1, 2, 3}) s.submit(c);
  f.dispatch(s);
  REQUIRE(s.sent(1).size() == 2);
  REQUIRE(s.sent(2).size() == 2);
  const auto a = s.sent(1)[0].tid, b = s.sent(1)[1].tid;
  // Worker 1's first result does not decode.
  std::vector<int> ping;
  s.result_gap("no module named 'gone'", ping);
  CHECK(ping == std::vector<int>{1, 2});
  CHECK(s.unmatched_gaps() == 1);
  // Worker 2 answers both its calls, then its pong: nothing lost there.
  CHECK(s.answer(2, s.sent(2)[0].tid, 1e-3, failed) == 2);
  CHECK(s.answer(2, s.sent(2)[0].tid, 1e-3, failed) == 3);
  s.pong(2, failed);
  CHECK(failed.empty());
  // Worker 1's second answer comes: the one before it is the lost one.
  CHECK(s.answer(1, b, 1e-3, failed) == 1);
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].task == 0);
  CHECK(failed[0].fate == Fate::kLost);
  CHECK(failed[0].why == "no module named 'gone'");
  s.pong(1, failed);
  CHECK(failed.size() == 1);
  CHECK(s.sent(1).empty());
  CHECK(s.unmatched_gaps() == 0);
  CHECK(s.outstanding() == 0);
  CHECK(a + 1 == b);
}

TEST_CASE("scheduler: a pong reveals a lost last result") {
  Sched s(opts(1));
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  s.submit(5);
  f.dispatch(s);
  std::vector<int> ping;
  s.result_gap("bad class", ping);
  CHECK(ping == std::vector<int>{1});
  s.pong(1, failed);
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].task == 5);
  CHECK(failed[0].why == "bad class");
  CHECK(s.outstanding() == 0);
}

TEST_CASE("scheduler: a run the worker could not unpickle fails its first call, and the rest go alone") {
  Sched s(opts(1));
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  s.submit(0);
  s.submit(2);
  f.dispatch(s);
  REQUIRE(f.w[1].records.size() == 1);
  f.take(1, 1);
  // (None tid: the record in front did not unpickle.) The owner fails this call with the error.
  CHECK(s.answer(1, std::nullopt, 1e-3, failed) == 0);
  CHECK(failed.empty());
  CHECK(s.backlog_size() == 1);
  s.submit(4);  // joins nothing: the requeued call goes alone
  f.dispatch(s);
  REQUIRE(f.w[1].records.size() == 3);
  CHECK(f.w[1].records[1].size() == 1);
  CHECK(f.w[1].records[1][0].second == 2);
  CHECK(f.w[1].records[2][0].second == 4);
}

TEST_CASE("scheduler: an answer for no call of its worker changes nothing") {
  Sched s(opts(1));
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  s.submit(0);
  f.dispatch(s);
  const auto tid = s.sent(1).front().tid;
  CHECK_FALSE(s.answer(1, tid + 1000, 1e-3, failed).has_value());
  CHECK_FALSE(s.answer(7, tid, 1e-3, failed).has_value());  // an unknown worker
  CHECK(failed.empty());
  CHECK(s.answer(1, tid, 1e-3, failed) == 0);
}

TEST_CASE("scheduler: drain hands back every owed call, and later answers are dropped") {
  Sched s(opts(1));
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  for (int c : {0, 1, 2}) s.submit(c);
  f.dispatch(s);
  const auto tid = s.sent(1).front().tid;
  std::vector<int> owed;
  s.drain(owed);
  CHECK(owed.size() == 3);
  CHECK(s.outstanding() == 0);
  CHECK_FALSE(s.answer(1, tid, 1e-3, failed).has_value());
  auto d = s.died(1, 1, failed);
  CHECK(failed.empty());
  CHECK(d.requeued == 0);
}

// -- a simulated pool: random submits, workers that take and answer records in order, deaths,
// timeouts, lost results and retirements, checked against what the workers really did ----------

namespace {

struct SimWorker {
  struct Record {
    bool ping = false;
    std::vector<std::pair<std::uint64_t, int>> calls;  // (tid, task)
  };
  std::vector<Record> records;  // as sent, in order
  std::uint64_t consumed = 0;   // records taken
  std::size_t pos = 0, item = 0;  // the next call to run: records[pos].calls[item]
  bool started = false;         // it reported STARTED for that call
  Sched::TimePoint done_at{};   // when that call finishes
  std::size_t lost_pending = 0;  // its results lost and not yet revealed
  int answered_calls = 0;
};

struct Sim {
  std::mt19937 rng;
  Sched s;
  std::map<int, SimWorker> w;
  Sched::TimePoint now{};
  int next_wid = 1, next_task = 0;
  std::vector<int> outcomes;  // per task: times completed (answered or failed)
  std::vector<Sched::Failure> failed;
  std::size_t max_tasks;
  std::map<Fate, int>& fates;  // what happened, over every seed: the cases were all hit
  int& retirements;

  Sim(unsigned seed, SchedulerOptions o, std::map<Fate, int>& f, int& r)
      : rng(seed), s(o), max_tasks(o.max_tasks_per_child), fates(f), retirements(r) {
    replenish();
  }

  bool chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; }

  void replenish() {
    while (s.shortfall() > 0) {
      s.add_worker(next_wid);
      w[next_wid];
      ++next_wid;
    }
  }
  void complete(int task) { ++outcomes.at(static_cast<std::size_t>(task)); }
  void take_failures(Fate expected_fate, std::optional<int> expected_task) {
    for (auto& f : failed) {
      complete(f.task);
      ++fates[f.fate];
      if (expected_task) {
        CHECK(f.fate == expected_fate);
        CHECK(f.task == *expected_task);
      }
    }
    failed.clear();
  }
  void dispatch() {
    while (auto a = s.assign(Rules{})) {
      auto& q = s.sent(a->wid);
      SimWorker::Record rec;
      for (std::size_t i = a->first; i < a->first + a->count; ++i) {
        rec.calls.emplace_back(q[i].tid, q[i].task);
        if (q[i].last_of_record) {
          w.at(a->wid).records.push_back(std::move(rec));
          rec = {};
        }
      }
    }
    replenish();  // workers whose budget was just spent are replaced at once
  }
  // The worker's process ends (killed, or retired after its budget).
  void die(int wid, bool timed_out) {
    SimWorker& x = w.at(wid);
    // The call it was running: in a record it took and had not finished.
    std::optional<int> running;
    if (x.pos < x.consumed && !x.records[x.pos].ping) running = x.records[x.pos].calls[x.item].second;
    s.exited(wid);
    auto d = s.died(wid, x.consumed, failed);
    // (With a result lost and not yet revealed, the scheduler takes that call for the running
    // one: it fails in its place, and the running one goes to another worker. Still once each.)
    if (x.lost_pending == 0) {
      CHECK(d.running == (x.pos < x.consumed));
      CHECK(d.timed_out == timed_out);
      if (running) {
        REQUIRE(failed.size() == 1);
        take_failures(timed_out ? Fate::kTimedOut : Fate::kDied, running);
      } else {
        CHECK(failed.empty());
      }
    }
    take_failures(Fate::kDied, std::nullopt);
    w.erase(wid);
    replenish();
  }
  // One step of one worker: take a record, start a call, or finish it.
  void step(int wid) {
    SimWorker& x = w.at(wid);
    if (x.pos == x.consumed) {
      if (x.consumed < x.records.size()) ++x.consumed;
      return;
    }
    SimWorker::Record& r = x.records[x.pos];
    if (r.ping) {
      s.pong(wid, failed);
      x.lost_pending = 0;
      take_failures(Fate::kLost, std::nullopt);
      ++x.pos;
      return;
    }
    auto [tid, task] = r.calls[x.item];
    if (!x.started) {
      s.started(wid, tid, now);
      x.started = true;
      x.done_at = now + std::chrono::milliseconds(chance(0.02) ? 200 : 1);
      return;
    }
    if (now < x.done_at) return;
    x.started = false;
    if (++x.item == r.calls.size()) {
      ++x.pos;
      x.item = 0;
    }
    ++x.answered_calls;
    if (chance(0.03)) {  // its result does not decode in the parent
      std::vector<int> ping;
      s.result_gap("undecodable", ping);
      for (int p : ping) {
        SimWorker::Record pr;
        pr.ping = true;
        w.at(p).records.push_back(std::move(pr));
      }
      ++x.lost_pending;
    } else {
      const std::size_t before = failed.size();
      auto t = s.answer(wid, tid, 1e-3, failed);
      REQUIRE(t.has_value());
      CHECK(*t == task);
      complete(*t);
      if (failed.size() > before) x.lost_pending = 0;
      take_failures(Fate::kLost, std::nullopt);
    }
    // A worker whose budget is spent exits once it has answered it.
    if (max_tasks && static_cast<std::size_t>(x.answered_calls) == max_tasks) {
      ++retirements;
      die(wid, false);
    }
  }
  void run(int steps, bool faults) {
    for (int i = 0; i < steps; ++i) {
      now += 1ms;
      if (chance(0.1)) {
        const int n = std::uniform_int_distribution<int>(1, 8)(rng);
        for (int k = 0; k < n; ++k) {
          outcomes.push_back(0);
          s.submit(next_task++);
        }
      }
      dispatch();
      std::vector<int> ids;
      for (auto& [wid, _] : w) ids.push_back(wid);
      for (int wid : ids)
        if (w.count(wid) && chance(0.7)) step(wid);
      if (faults && chance(0.01) && !w.empty()) {
        auto it = w.begin();
        std::advance(it, std::uniform_int_distribution<std::size_t>(0, w.size() - 1)(rng));
        die(it->first, false);
      }
      std::vector<int> kill;
      s.expire(now, kill);
      for (int wid : kill) die(wid, true);
      s.retune();
    }
  }
};

}  // namespace

TEST_CASE("scheduler: a simulated pool ends every task exactly once, through deaths, timeouts, lost results, recycling") {
  std::map<Fate, int> fates;
  int retirements = 0;
  for (unsigned seed = 1; seed <= 60; ++seed) {
    CAPTURE(seed);
    SchedulerOptions o = opts(3);
    o.task_timeout = 100ms;
    if (seed % 3 == 0) o.max_tasks_per_child = 7;
    Sim sim(seed, o, fates, retirements);
    sim.run(1500, true);
    sim.run(2000, false);  // no more random kills (slow calls still time out)
    for (int k = 0; k < 100000 && sim.s.outstanding() > 0; ++k) {
      sim.now += 1ms;
      sim.dispatch();
      std::vector<int> ids;
      for (auto& [wid, _] : sim.w) ids.push_back(wid);
      for (int wid : ids)
        if (sim.w.count(wid)) sim.step(wid);
      std::vector<int> kill;
      sim.s.expire(sim.now, kill);
      for (int wid : kill) sim.die(wid, true);
    }
    CHECK(sim.s.outstanding() == 0);
    CHECK(sim.s.backlog_size() == 0);
    std::size_t once = 0;
    for (int n : sim.outcomes) once += n == 1;
    CHECK(once == sim.outcomes.size());
    CHECK(sim.outcomes.size() > 500);
  }
  MESSAGE("lost " << fates[Fate::kLost] << ", died " << fates[Fate::kDied] << ", timed out " << fates[Fate::kTimedOut]
                  << ", retired " << retirements);
  CHECK(fates[Fate::kLost] > 10);
  CHECK(fates[Fate::kDied] > 10);
  CHECK(fates[Fate::kTimedOut] > 10);
  CHECK(retirements > 10);
}

// -- corrections before sending: cancel_if, split, unsend (ringpool.Executor's cases) -------------

TEST_CASE("scheduler: calls cancelled in the backlog are never sent, and no longer owed") {
  Sched s(opts(1));
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  for (int c : {0, 2, 4, 6, 8, 10}) s.submit(c);  // kMinDepth = 2: two go out, four wait
  f.dispatch(s);
  REQUIRE(s.backlog_size() == 4);
  std::vector<int> cancelled;
  // 4 and 8 cancelled in the backlog; 0 is in flight: cancel_if does not reach it.
  CHECK(s.cancel_if([](int c) { return c == 4 || c == 8 || c == 0; }, cancelled) == 2);
  CHECK(cancelled == std::vector<int>{4, 8});
  CHECK(s.outstanding() == 4);
  // Answers make room: the next calls sent skip the cancelled ones.
  CHECK(s.answer(1, f.tid_of(1, 0, 0), 1e-3, failed) == 0);
  CHECK(s.answer(1, f.tid_of(1, 0, 1), 1e-3, failed) == 2);
  f.dispatch(s);
  REQUIRE(f.w[1].records.size() == 2);
  REQUIRE(f.w[1].records[1].size() == 2);
  CHECK(f.w[1].records[1][0].second == 6);
  CHECK(f.w[1].records[1][1].second == 10);
  CHECK(s.backlog_size() == 0);
  // drain does not hand cancelled calls back again.
  for (int c : {12, 14, 16}) s.submit(c);
  s.cancel_if([](int c) { return c >= 12; }, cancelled);
  std::vector<int> rest;
  s.drain(rest);
  CHECK(rest == std::vector<int>{6, 10});
  CHECK(s.outstanding() == 0);
  // A backlog of only cancelled calls assigns nothing, and is emptied.
  Sched t(opts(1));
  t.add_worker(1);
  for (int c : {1, 3}) t.submit(c);
  t.cancel_if([](int) { return true; }, cancelled);
  CHECK_FALSE(t.assign(Rules{}).has_value());
  CHECK(t.backlog_size() == 0);
  CHECK(t.sent(1).empty());
}

TEST_CASE("scheduler: split makes a run that did not encode into records of one call, same ids") {
  Sched s(opts(1));
  s.add_worker(1);
  std::vector<Sched::Failure> failed;
  for (int c : {0, 2}) s.submit(c);
  auto a = s.assign(Rules{});
  REQUIRE(a);
  auto& q = s.sent(1);
  REQUIRE(q.size() == 2);
  CHECK_FALSE(q[0].last_of_record);  // one RUN record of two
  const auto tid = q[0].tid;
  CHECK(s.split(1, tid) == 2);
  CHECK(q[0].last_of_record);
  CHECK(q[1].last_of_record);
  CHECK(q[0].alone);
  CHECK(q[1].tid == tid + 1);
  CHECK(s.split(1, 999) == 0);  // no such record
  // The worker takes the two records; each answers its own call; `answered` counts both records.
  CHECK(s.answer(1, tid, 1e-3, failed) == 0);
  CHECK(s.answer(1, tid + 1, 1e-3, failed) == 2);
  auto d = s.died(1, 2, failed);
  CHECK_FALSE(d.running);  // consumed 2 == answered 2
  CHECK(failed.empty());
}

TEST_CASE("scheduler: unsend takes back a record that was not sent, budget included") {
  SchedulerOptions o = opts(1);
  o.max_tasks_per_child = 2;
  Sched s(o);
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  for (int c : {0, 2, 4}) s.submit(c);
  auto a = s.assign(Rules{});
  REQUIRE(a);
  REQUIRE(a->count == 2);
  CHECK(s.shortfall() == 1);  // its budget is spent: retiring
  auto& q = s.sent(1);
  const auto second = q[1].tid;
  // The second call did not encode: it leaves, and the worker may take one more.
  CHECK(s.unsend(1, second) == 2);
  CHECK(s.outstanding() == 2);
  CHECK(s.shortfall() == 0);
  CHECK_FALSE(s.unsend(1, second).has_value());  // once
  auto b = s.assign(Rules{});
  REQUIRE(b);
  CHECK(s.sent(1).size() == 2);
  CHECK(s.sent(1)[1].task == 4);
  CHECK(s.sent(1)[1].tid > second);
  CHECK(s.shortfall() == 1);
  // Answers find their calls in order despite the gap in the ids.
  CHECK(s.answer(1, s.sent(1)[0].tid, 1e-3, failed) == 0);
  CHECK(s.answer(1, s.sent(1)[0].tid, 1e-3, failed) == 4);
  CHECK(failed.empty());
  // A call inside a RUN record cannot be taken back alone.
  Sched r(opts(1));
  r.add_worker(1);
  for (int c : {0, 2}) r.submit(c);
  REQUIRE(r.assign(Rules{}));
  CHECK_FALSE(r.unsend(1, r.sent(1)[1].tid).has_value());
  CHECK(r.sent(1).size() == 2);
}

TEST_CASE("scheduler: a death in the middle of a batch of answers, then a split record requeued") {
  // The Executor hands a whole batch of result records at once; a death posted behind them is
  // handled after them (ring order). Records split before sending are requeued like any other.
  Sched s(opts(2));
  s.add_worker(1);
  s.add_worker(2);
  Fakes f;
  std::vector<Sched::Failure> failed;
  for (int c : {0, 2, 4, 6}) s.submit(c);
  f.dispatch(s);  // two runs of two
  auto& q1 = s.sent(1);
  const auto t1 = q1[0].tid;
  REQUIRE(s.split(1, t1) == 2);  // worker 1's run went as two single calls
  f.take(1, 2);
  CHECK(s.answer(1, t1, 1e-3, failed) == 0);   // the batch: one answer of worker 1,
  CHECK(s.answer(2, f.tid_of(2, 0, 0), 1e-3, failed) == 4);  // one of worker 2
  auto d = s.died(1, f.w[1].consumed, failed);   // then worker 1's death
  CHECK(d.running);
  REQUIRE(failed.size() == 1);
  CHECK(failed[0].task == 2);
  CHECK(failed[0].fate == Fate::kDied);
  CHECK(s.outstanding() == 1);  // 6, on worker 2
}

TEST_CASE("scheduler: resend_unreadable_runs sends an unreadable run's calls again alone, none failed") {
  SchedulerOptions o = opts(1);
  o.resend_unreadable_runs = true;
  Sched s(o);
  s.add_worker(1);
  Fakes f;
  std::vector<Sched::Failure> failed;
  for (int c : {0, 2}) s.submit(c);
  f.dispatch(s);
  REQUIRE(f.w[1].records.at(0).size() == 2);
  f.take(1, 1);
  CHECK_FALSE(s.answer(1, std::nullopt, std::nullopt, failed).has_value());
  CHECK(s.outstanding() == 2);
  f.dispatch(s);
  REQUIRE(f.w[1].records.size() == 3);  // each call alone now
  CHECK(f.w[1].records[1].size() == 1);
  CHECK(f.w[1].records[2].size() == 1);
  f.take(1, 2);
  CHECK(s.answer(1, std::nullopt, std::nullopt, failed) == 0);  // alone, the unreadable one is the call at fault
  CHECK(s.answer(1, f.tid_of(1, 2), 1e-3, failed) == 2);
  auto d = s.died(1, f.w[1].consumed, failed);
  CHECK_FALSE(d.running);
  CHECK(failed.empty());
}

TEST_CASE("scheduler: oldest_unanswered names the one call an answer of that worker may be for") {
  Sched s(opts(2));
  s.add_worker(1);
  s.add_worker(2);
  Fakes f;
  std::vector<Sched::Failure> failed;
  CHECK_FALSE(s.oldest_unanswered(1).has_value());  // nothing sent
  CHECK_FALSE(s.oldest_unanswered(7).has_value());  // no such worker
  for (int c : {0, 2, 1, 3}) s.submit(c);  // two runs of two, one per worker
  f.dispatch(s);
  REQUIRE(f.w[1].records.size() == 1);
  REQUIRE(f.w[2].records.size() == 1);
  const std::uint64_t a0 = f.tid_of(1, 0, 0), a1 = f.tid_of(1, 0, 1), b0 = f.tid_of(2, 0, 0);
  CHECK(s.oldest_unanswered(1) == a0);
  CHECK(s.oldest_unanswered(2) == b0);
  // Answered in order, a run's items one by one: the next is the run's next item.
  CHECK(s.answer(1, a0, 1e-3, failed) == 0);
  CHECK(s.oldest_unanswered(1) == a1);
  CHECK(s.oldest_unanswered(2) == b0);  // the other worker's calls are not its
  CHECK(s.answer(1, a1, 1e-3, failed) == 2);
  CHECK_FALSE(s.oldest_unanswered(1).has_value());
  CHECK(failed.empty());
}

TEST_CASE("scheduler: least_unanswered is the fewest unanswered calls of the workers still sent calls") {
  Sched s(opts(2));
  Fakes f;
  std::vector<Sched::Failure> failed;
  CHECK(s.least_unanswered() == 0);  // no worker
  s.add_worker(1);
  s.add_worker(2);
  CHECK(s.least_unanswered() == 0);  // nothing sent
  for (int c : {0, 2, 1, 3}) s.submit(c);  // a run of two to each worker (the depth bound starts at 2)
  f.dispatch(s);
  CHECK(s.least_unanswered() == 2);
  CHECK(s.answer(1, f.tid_of(1, 0, 0), 1e-3, failed) == 0);
  CHECK(s.least_unanswered() == 1);
  // An exited worker is sent nothing more: it no longer bounds the others' queues.
  CHECK(s.exited(1));
  CHECK(s.least_unanswered() == 2);
  CHECK(s.exited(2));
  CHECK(s.least_unanswered() == 0);
  CHECK(failed.empty());
}

TEST_CASE("scheduler: least_unanswered leaves out a retiring worker, whose queue only shrinks") {
  SchedulerOptions o = opts(2);
  o.max_tasks_per_child = 3;
  Sched s(o);
  Fakes f;
  std::vector<Sched::Failure> failed;
  s.add_worker(1);
  s.add_worker(2);
  for (int i = 0; i < 4; ++i) {  // one at a time: each to the least busy worker
    s.submit(i);
    f.dispatch(s);
  }
  REQUIRE(s.sent(1).size() == 2);
  REQUIRE(s.sent(2).size() == 2);
  CHECK(s.least_unanswered() == 2);
  for (std::size_t r = 0; r < 2; ++r) {
    f.take(1, 1);
    CHECK(s.answer(1, f.tid_of(1, r), 1e-3, failed).has_value());
  }
  CHECK(s.least_unanswered() == 0);  // worker 1 drained, still open
  s.submit(4);
  f.dispatch(s);  // worker 1's third and last call: it retires with one call queued
  REQUIRE(s.sent(1).size() == 1);
  CHECK(s.shortfall() == 1);
  CHECK(s.least_unanswered() == 2);  // worker 2's two; worker 1's one does not count
  s.add_worker(3);                   // its replacement, sent nothing yet
  CHECK(s.least_unanswered() == 0);
  CHECK(failed.empty());
}

TEST_CASE("Fifo: order kept through wrap-around, growth, reserve, erase and push_front") {
  ringpool::detail::Fifo<int> q;
  std::deque<int> want;
  std::mt19937 rng(7);
  int next = 0;
  for (int step = 0; step < 20000; ++step) {
    const int op = static_cast<int>(rng() % 10);
    if (op < 4) {
      q.push_back(int{next});
      want.push_back(next++);
    } else if (op < 7 && !want.empty()) {
      CHECK(q.take_front() == want.front());
      want.pop_front();
    } else if (op == 7) {
      q.reserve(rng() % 300);  // may reallocate while the queue wraps
    } else if (op == 8 && !want.empty()) {
      const std::size_t i = rng() % want.size();
      q.erase(i);
      want.erase(want.begin() + static_cast<long>(i));
    } else {
      q.push_front(int{next});
      want.push_front(next++);
    }
    REQUIRE(q.size() == want.size());
  }
  for (std::size_t i = 0; i < want.size(); ++i) CHECK(q[i] == want[i]);
}
