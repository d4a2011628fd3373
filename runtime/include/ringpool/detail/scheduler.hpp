// ringpool::detail::Scheduler: the task pool's scheduling decisions, as bookkeeping only.
//
//   owner (ringpool::Pool)                          Scheduler<T> (this file)
//   ──────────────────────                          ────────────────────────
//   submit ───────────────── submit(task) ────────► backlog (Fifo of entries)
//   dispatch loop ◄───────── assign(rules) ◄──────── least busy open worker, depth bound,
//     writes records around                           budget, record boundaries, wire ids
//     sent(wid)[first, +count)                      per worker: sent (unanswered calls, in order)
//   result records ────────► answer / started / pong ► gaps, deadlines, moving average of task times
//   undecodable record ────► result_gap(why) ──────► pings to send
//   worker exits ──────────► exited(wid), died(wid, consumed) ► fails the running call, requeues the rest
//   timer ─────────────────► expire(now) ──────────► workers to kill, next deadline
//
// No processes, rings, threads, clocks or locks: the owner holds its own lock around every call,
// sends the records and pings it is told to, kills the workers it is told to, and passes the time
// in (`now`), so tests drive every case with a fake clock and fake workers (tests/cpp/
// test_scheduler.cpp). T is the owner's payload for one call (the C++ Pool: the call's pickled body
// and its promise); default-constructible and movable.
//
// The rules (docs/design/pool.md, "Crashes, timeouts, recycling"):
// - A worker answers its calls in the order it was sent them, each before starting the next; a
//   RUN record's items are answered one by one. So an answer is for the oldest unanswered call of
//   its worker, and no lookup by id is needed.
// - A worker's call ring counts the records it took (`consumed`); `answered` counts records whose
//   last call was answered. At a death, consumed > answered means the oldest unanswered call was
//   running: it fails (WorkerDied, or TaskTimeout if the pool killed the worker for it); the
//   others never started and go back to the front of the backlog. With max_requeues, a call that
//   goes back this way from in front of that many dead workers fails at the next such death:
//   `consumed` is the worker's own word, and a task could make its worker die as if it had never
//   taken the call, again on each worker it is sent to.
// - A result record that does not decode names no task: every worker with calls out is pinged; it
//   answers the ping after its earlier answers, so the call left unanswered in front of the ping
//   is the one whose result was lost. An answer whose id is past the oldest call reveals the same.
//
// Internal to the runtime (ringpool::Pool uses it; ringpool.Executor does too, through
// _core.Scheduler, bindings/src/scheduler_bindings.cpp): not public API.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ringpool/detail/fifo.hpp"
#include "ringpool/proto/task.hpp"

namespace ringpool::detail {

struct SchedulerOptions {
  std::size_t workers = 1;                    // open (non-retiring) workers the pool keeps
  std::size_t max_tasks_per_child = 0;        // calls a worker is sent before it retires (0: no limit)
  std::chrono::nanoseconds task_timeout{0};   // a call running longer is killed (0: no limit)
  // Consecutive calls may share a RUN record. Off with max_tasks_per_child, so that a worker's
  // count of calls (it exits after max_tasks) is exactly its count of records.
  bool runs = true;
  // The depth bound's limits (the bound itself follows the reported task times: depth_for).
  std::size_t min_depth = proto::task::kMinDepth;
  std::size_t max_depth = proto::task::kMaxDepth;
  // A RUN record the worker could not unpickle: false, its first call takes the error and the
  // others go again alone (ringpool::Pool); true, all its calls go again alone and none fails
  // here, so that only a call at fault fails, as its own record (ringpool.Executor).
  bool resend_unreadable_runs = false;
  // A call in front of a worker that dies without it counting as running (its worker's
  // `consumed` says the record was not taken, and no STARTED came) goes back to the backlog; after
  // this many such returns, the next such death fails it (kDied, `why` says so) instead. Deaths
  // the pool caused for another call's timeout do not count. 0: no limit (ringpool.Executor,
  // whose workers' counts are trusted); ringpool::Pool: PoolOptions::max_requeues.
  std::size_t max_requeues = 0;
};

// How a call left the pool other than by its answer.
enum class Fate : std::uint8_t {
  kLost,      // its result record did not decode (why: the decoder's error)
  kDied,      // its worker died while running it (or, why non-empty: in front of max_requeues + 1 deaths)
  kTimedOut,  // it ran past task_timeout and the pool killed its worker
};

template <class T>
class Scheduler {
 public:
  using Clock = std::chrono::steady_clock;
  using TimePoint = Clock::time_point;

  // One call (or a ping) as the scheduler tracks it.
  struct Entry {
    T task{};
    std::uint64_t tid = 0;        // wire id, given when sent; 0 in the backlog and for a ping
    bool live = false;            // its outcome is still owed (false: a ping, or a call dropped by drain)
    bool last_of_record = true;   // the last call of the record that carried it
    bool alone = false;           // to be sent as a record of its own (its run did not unpickle)
    std::uint32_t requeues = 0;   // times it went back to the backlog from in front of a dead worker
  };

  struct Failure {
    T task;
    Fate fate;
    std::string why;  // kLost: why the result did not decode; kDied: why it was not requeued again ("": it was running)
  };

  // Where assign() put calls: sent(wid)[first, first + count), fresh wire ids in order; a record
  // ends at each entry with last_of_record (a record of more than one call is a RUN).
  struct Assignment {
    int wid;
    std::size_t first, count;
  };

  // What a worker's death did.
  struct Death {
    bool running = false;    // it had taken a call it did not answer
    bool timed_out = false;  // the pool killed it for a task past its deadline
    bool retiring = false;   // its max_tasks_per_child budget was spent
    bool held_calls = false; // it had been sent calls it did not answer (a ping alone does not count)
    std::size_t requeued = 0;
    std::size_t given_up = 0;  // calls failed rather than requeued again (max_requeues)
  };

  explicit Scheduler(SchedulerOptions o) : opts_(o) {
    if (opts_.workers == 0) throw std::invalid_argument("ringpool scheduler: workers must be > 0");
    if (opts_.max_tasks_per_child) opts_.runs = false;
    if (opts_.min_depth == 0 || opts_.min_depth > opts_.max_depth)
      throw std::invalid_argument("ringpool scheduler: need 0 < min_depth <= max_depth");
    depth_ = opts_.min_depth;
  }

  // -- workers ----------------------------------------------------------------------------------
  // A started worker. records_before: records already in its call ring that are not calls (the
  // C++ pool's start-up configuration), which its `consumed` count includes.
  void add_worker(int wid, std::uint64_t records_before = 0) {
    WorkerState w;
    w.answered = records_before;
    if (opts_.max_tasks_per_child) w.budget = opts_.max_tasks_per_child;
    if (!workers_.emplace(wid, std::move(w)).second) throw std::logic_error("ringpool scheduler: worker added twice");
  }

  // The worker's process ended; no more calls go to it. Its death is handled by died() once every
  // result it published has been handled. False if the worker is not known (yet).
  bool exited(int wid) {
    auto it = workers_.find(wid);
    if (it == workers_.end()) return false;
    it->second.exited = true;
    return true;
  }

  // Workers that count toward the pool's size: all but the retiring. An exited worker still counts
  // until died() has handled it (every result it published read), so its replacement is started
  // after that, not when the exit is first known; assign() sends it nothing meanwhile.
  std::size_t open_workers() const {
    std::size_t n = 0;
    for (const auto& [_, w] : workers_) n += !w.retiring;
    return n;
  }
  // Workers to start for the pool to be whole again (a death, a retirement).
  std::size_t shortfall() const {
    const std::size_t open = open_workers();
    return open < opts_.workers ? opts_.workers - open : 0;
  }
  // The fewest unanswered calls (pings included) of any worker still sent calls (open and not
  // exited); 0 if there is none. "Unanswered" includes answers published but not yet read, so
  // this bounds the calls every worker still has queued from above; just after the owner has
  // read every result ring, it is close to them.
  std::size_t least_unanswered() const {
    std::size_t least = 0;
    bool any = false;
    for (const auto& [_, w] : workers_) {
      if (w.retiring || w.exited) continue;
      least = any ? std::min(least, w.sent.size()) : w.sent.size();
      any = true;
    }
    return least;
  }
  bool has_worker(int wid) const { return workers_.count(wid) != 0; }
  std::size_t worker_count() const { return workers_.size(); }
  template <class F>
  void for_each_worker(F&& f) const {
    for (const auto& [wid, _] : workers_) f(wid);
  }

  // The worker's unanswered calls, oldest first (pings included: tid 0).
  Fifo<Entry>& sent(int wid) { return workers_.at(wid).sent; }
  // The wire id of the oldest call the worker has not answered (0: a ping), nullopt if it has
  // none or is not known: a worker that keeps the protocol answers, or reports started, only that
  // one (an owner that trusts no worker refuses any other id: the C++ Pool).
  std::optional<std::uint64_t> oldest_unanswered(int wid) const {
    auto it = workers_.find(wid);
    if (it == workers_.end() || it->second.sent.empty()) return std::nullopt;
    return it->second.sent[0].tid;
  }

  // -- submission and dispatch --------------------------------------------------------------------
  // Room in the backlog for n more calls (a batch about to be submitted), allocated at once.
  void reserve(std::size_t n) { backlog_.reserve(n); }
  void submit(const T& task) { submit(T(task)); }
  void submit(T&& task) {
    Entry& e = backlog_.append();  // filled in place: a task is moved once on its way in
    e.task = std::move(task);
    e.tid = 0;
    e.live = true;
    e.last_of_record = true;
    e.alone = false;
    e.requeues = 0;
    ++outstanding_;
  }

  // Moves calls from the backlog to the least busy open worker: as many as keep it within the
  // depth bound (and its max_tasks_per_child budget), grouped into records. nullopt when nothing
  // moves (an empty backlog, no open worker, or every worker at its bound). The owner writes and
  // sends the records, then calls again.
  //
  // rules.joins(a, b): b's call may follow a's in one RUN record (the same function, no keyword
  // arguments); rules.bytes(t): what t's arguments add to a record (a run stops at kMaxRunBytes).
  template <class Rules>
  std::optional<Assignment> assign(const Rules& rules) {
    if (backlog_.empty()) return std::nullopt;
    int wid = 0;
    WorkerState* w = nullptr;
    for (auto& [id, s] : workers_)
      if (!s.retiring && !s.exited && (!w || s.sent.size() < w->sent.size())) {
        w = &s;
        wid = id;
      }
    if (!w || w->sent.size() >= depth_) return std::nullopt;
    std::size_t room = depth_ - w->sent.size();
    if (w->budget) room = std::min(room, *w->budget);
    const std::size_t first = w->sent.size();
    while (room > 0 && !backlog_.empty()) {
      if (!backlog_.front().live) {  // cancelled while it waited: never sent
        backlog_.drop_front();
        continue;
      }
      --room;
      w->sent.push_back(backlog_.take_front());
      if (w->budget && --*w->budget == 0) {
        w->retiring = true;  // the owner sees shortfall() grow and starts its replacement
        break;
      }
    }
    Fifo<Entry>& q = w->sent;
    if (q.size() == first) return std::nullopt;  // the backlog held only cancelled calls
    for (std::size_t i = first; i < q.size();) {
      std::size_t j = i + 1, bytes = rules.bytes(q[i].task);
      while (j < q.size() && j - i < proto::task::kMaxRunCalls && joins(rules, q[j - 1], q[j]) &&
             bytes + rules.bytes(q[j].task) <= proto::task::kMaxRunBytes)
        bytes += rules.bytes(q[j++].task);
      for (std::size_t k = i; k < j; ++k) {
        q[k].tid = next_tid_++;
        q[k].last_of_record = k + 1 == j;
      }
      i = j;
    }
    return Assignment{wid, first, q.size() - first};
  }

  // -- corrections before sending (the owner could not write what assign() gave it) ---------------
  // Calls still in the backlog for which pred(task) holds are cancelled: they will never be sent,
  // and their tasks are appended to `out` (the owner settles them). Returns how many.
  template <class Pred>
  std::size_t cancel_if(Pred&& pred, std::vector<T>& out) {
    std::size_t n = 0;
    for (std::size_t i = 0; i < backlog_.size(); ++i) {
      Entry& e = backlog_[i];
      if (!e.live || !pred(static_cast<const T&>(e.task))) continue;
      e.live = false;
      out.push_back(std::move(e.task));
      --outstanding_;
      ++n;
    }
    return n;
  }

  // The record that assign() put at tid on wid's queue was not sent (it did not encode): each of
  // its calls becomes a record of its own, keeping its wire id, so that the owner can send them
  // one by one and only a call at fault fails. Returns the calls in it (0: no such record).
  std::size_t split(int wid, std::uint64_t tid) {
    auto it = workers_.find(wid);
    if (it == workers_.end()) return 0;
    Fifo<Entry>& q = it->second.sent;
    std::size_t i = find(q, tid);
    if (i == q.size()) return 0;
    std::size_t n = 0;
    for (; i < q.size(); ++i) {
      ++n;
      q[i].alone = true;
      if (q[i].last_of_record) break;
      q[i].last_of_record = true;
    }
    return n;
  }

  // The single-call record at tid on wid's queue was not sent after all (it did not encode, or the
  // owner's task was cancelled at the last moment): it leaves the queue, its budget is given back,
  // and its task is returned for the owner to settle. Only for a record not yet sent, written
  // after assign() and before the worker could take anything behind it.
  std::optional<T> unsend(int wid, std::uint64_t tid) {
    auto it = workers_.find(wid);
    if (it == workers_.end()) return std::nullopt;
    WorkerState& w = it->second;
    std::size_t i = find(w.sent, tid);
    if (i == w.sent.size() || !w.sent[i].last_of_record || (i > 0 && !w.sent[i - 1].last_of_record))
      return std::nullopt;  // not a record of its own
    std::optional<T> out;
    if (w.sent[i].live) {
      out.emplace(std::move(w.sent[i].task));
      --outstanding_;
    }
    w.sent.erase(i);
    if (w.budget) {
      if (*w.budget == 0) w.retiring = false;  // it will not reach max_tasks_per_child on this one
      ++*w.budget;
    }
    return out;
  }

  // -- answers (the owner decoded a result record of its worker) ----------------------------------
  // An OK or ERR record for tid (nullopt: the worker could not unpickle the record in front, and
  // the error is that call's). Returns the call it answers, if its outcome is still owed. Calls in
  // front of tid whose answers never came lost them to an undecodable record: they go to `failed`
  // (kLost). An answer for no call this worker holds (a stale or forged id) changes nothing.
  std::optional<T> answer(int wid, std::optional<std::uint64_t> tid, std::optional<double> elapsed,
                          std::vector<Failure>& failed) {
    auto it = workers_.find(wid);
    if (it == workers_.end()) return std::nullopt;
    WorkerState& w = it->second;
    for (;;) {
      if (w.sent.empty()) return std::nullopt;
      const std::uint64_t front = w.sent.front().tid;
      if (front == 0) {
        pop_answered(w);  // a ping whose pong went missing
      } else if (tid && front != *tid) {
        if (!holds(w, *tid)) return std::nullopt;
        lose_front(w, failed);
      } else {
        break;
      }
    }
    if (!tid && !w.sent.front().last_of_record) {
      if (opts_.resend_unreadable_runs) {
        resend_front_record(w);
        return std::nullopt;
      }
      unpickle_failed(w);
    }
    w.running.reset();
    Entry& e = w.sent.front();  // moved from in place: its slot is reused
    if (e.last_of_record) ++w.answered;
    std::optional<T> out;
    if (e.live) {
      out.emplace(std::move(e.task));
      --outstanding_;
      if (elapsed) avg_ += (*elapsed - avg_) * proto::task::kTaskTimeWeight;
    }
    w.sent.drop_front();
    return out;
  }

  // A STARTED record: with a task timeout, the call's deadline runs from now. False if its worker
  // had already reported starting this call: the deadline stands (a worker reporting again and
  // again would otherwise push it back for ever; the owner treats it as a protocol break).
  bool started(int wid, std::uint64_t tid, TimePoint now) {
    if (opts_.task_timeout.count() <= 0) return true;
    auto it = workers_.find(wid);
    if (it == workers_.end()) return true;
    if (it->second.running && it->second.running->tid == tid) return false;
    it->second.running = Running{tid, now + opts_.task_timeout};
    return true;
  }

  // A PONG: every call still unanswered in front of the ping lost its result.
  void pong(int wid, std::vector<Failure>& failed) {
    auto it = workers_.find(wid);
    if (it == workers_.end()) return;
    WorkerState& w = it->second;
    while (!w.sent.empty() && w.sent.front().tid != 0) lose_front(w, failed);
    if (!w.sent.empty())
      pop_answered(w);  // the ping
    else
      ++w.answered;
  }

  // A result record did not decode: it names no task. Appends to `ping` the workers the owner
  // must send a PING record to (each with calls out; a ping entry now stands behind them).
  void result_gap(std::string why, std::vector<int>& ping) {
    lost_reasons_.push_back(std::move(why));
    for (auto& [wid, w] : workers_) {
      if (w.sent.empty()) continue;
      w.sent.push_back(Entry{});
      ping.push_back(wid);
    }
  }

  // -- deaths and deadlines ------------------------------------------------------------------------
  // The worker has exited and every result it published has been handled; consumed: the records
  // its call ring says it took. The call it was running goes to `failed`; the ones it had not
  // started go back to the front of the backlog, in order. The worker is forgotten.
  //
  // If the pool killed it for a call past its deadline but that call's answer came first (the
  // timeout raced the result), the call it had started since is not at fault: it is requeued.
  Death died(int wid, std::uint64_t consumed, std::vector<Failure>& failed) {
    auto it = workers_.find(wid);
    if (it == workers_.end()) return {};
    WorkerState& w = it->second;
    Death d;
    // `consumed` is the worker's own count, in memory it can write: a call it reported STARTED
    // was running whatever the count says (else a task could take its record back there and be
    // requeued at its timeout's kill, hanging one worker after another).
    d.running = consumed > w.answered || (w.running && !w.sent.empty() && w.running->tid == w.sent[0].tid);
    d.timed_out = w.timed_out != 0;
    d.retiring = w.retiring;
    std::vector<Entry> retry;
    for (std::size_t i = 0; i < w.sent.size(); ++i) {
      Entry& e = w.sent[i];
      if (e.tid != 0) d.held_calls = true;
      if (!e.live) continue;
      if (i == 0 && d.running && (w.timed_out == 0 || w.timed_out == e.tid)) {
        failed.push_back({std::move(e.task), w.timed_out == e.tid ? Fate::kTimedOut : Fate::kDied, {}});
        --outstanding_;
      } else if (i == 0 && w.timed_out == 0 && opts_.max_requeues && e.requeues >= opts_.max_requeues) {
        // The one call its worker could have been running, in front of a death again: whatever
        // the worker's count says, it is not sent to another worker.
        failed.push_back({std::move(e.task), Fate::kDied,
                          "the next task of " + std::to_string(e.requeues + 1) +
                              " workers that died without it counting as running; not requeued again (max_requeues " +
                              std::to_string(opts_.max_requeues) + ")"});
        --outstanding_;
        ++d.given_up;
      } else {
        if (i == 0 && w.timed_out == 0) ++e.requeues;
        e.tid = 0;
        retry.push_back(std::move(e));
      }
    }
    d.requeued = retry.size();
    for (auto r = retry.rbegin(); r != retry.rend(); ++r) backlog_.push_front(std::move(*r));
    workers_.erase(it);
    return d;
  }

  // Calls past their deadline at `now`: appends their workers to `kill` (once each). Returns the
  // earliest deadline still ahead (TimePoint::max() if none).
  TimePoint expire(TimePoint now, std::vector<int>& kill) {
    TimePoint next = TimePoint::max();
    for (auto& [wid, w] : workers_) {
      if (!w.running || w.timed_out == w.running->tid) continue;
      if (w.running->deadline <= now) {
        w.timed_out = w.running->tid;
        kill.push_back(wid);
      } else {
        next = std::min(next, w.running->deadline);
      }
    }
    return next;
  }

  // -- the pool as a whole ----------------------------------------------------------------------
  // Every call whose outcome is owed, backlog and in flight, moved to `out`; calls still out stay
  // in their workers' queues (their answers are taken and dropped).
  void drain(std::vector<T>& out) {
    while (!backlog_.empty()) {
      Entry e = backlog_.take_front();
      if (e.live) out.push_back(std::move(e.task));
    }
    for (auto& [_, w] : workers_)
      for (std::size_t i = 0; i < w.sent.size(); ++i)
        if (w.sent[i].live) {
          out.push_back(std::move(w.sent[i].task));
          w.sent[i].live = false;
        }
    outstanding_ = 0;
  }
  // Forgets every call out (the pool is broken: nothing will be answered).
  void forget_in_flight() {
    for (auto& [_, w] : workers_) w.sent.clear();
  }

  // The depth bound from the task times reported so far (once per batch of answers).
  void retune() { depth_ = std::clamp(proto::task::depth_for(avg_), opts_.min_depth, opts_.max_depth); }
  // Gives back the queues' memory after a burst (the owner calls it when idle a while).
  void trim() {
    backlog_.trim();
    for (auto& [_, w] : workers_) w.sent.trim();
  }

  std::size_t outstanding() const noexcept { return outstanding_; }  // calls whose outcome is owed
  std::size_t backlog_size() const noexcept { return backlog_.size(); }
  std::size_t depth() const noexcept { return depth_; }
  double average_task_time() const noexcept { return avg_; }
  const SchedulerOptions& options() const noexcept { return opts_; }
  // Undecodable records not yet matched to their call.
  std::size_t unmatched_gaps() const noexcept { return lost_reasons_.size(); }

 private:
  struct Running {
    std::uint64_t tid;
    TimePoint deadline;
  };
  struct WorkerState {
    Fifo<Entry> sent;                 // unanswered calls in the order sent (tid 0: a ping)
    std::uint64_t answered = 0;       // records answered (compared with its ring's `consumed`)
    std::optional<std::size_t> budget;  // calls it may still be sent (max_tasks_per_child)
    bool retiring = false;            // budget spent: it answers what it has, then exits
    bool exited = false;              // its process ended; its death is not handled yet
    std::optional<Running> running;   // the call it reported STARTED (with a task timeout)
    std::uint64_t timed_out = 0;      // the call it is being killed for (0: none)
  };

  template <class Rules>
  bool joins(const Rules& rules, const Entry& a, const Entry& b) const {
    return opts_.runs && !a.alone && !b.alone && rules.joins(a.task, b.task);
  }

  // Index of the call with wire id tid in q (q.size() if none): searched from the back, where the
  // calls just assigned are.
  static std::size_t find(const Fifo<Entry>& q, std::uint64_t tid) {
    for (std::size_t i = q.size(); i-- > 0;)
      if (q[i].tid == tid) return i;
    return q.size();
  }

  static bool holds(const WorkerState& w, std::uint64_t tid) {
    for (std::size_t i = 0; i < w.sent.size(); ++i)
      if (w.sent[i].tid == tid) return true;
    return false;
  }

  // The oldest unanswered call of w, now answered (a record is answered with its last call).
  static Entry pop_answered(WorkerState& w) {
    Entry e = w.sent.take_front();
    if (e.last_of_record) ++w.answered;
    return e;
  }

  void lose_front(WorkerState& w, std::vector<Failure>& failed) {
    Entry e = pop_answered(w);
    if (!e.live) return;
    std::string why = "unknown error";
    if (!lost_reasons_.empty()) {
      why = std::move(lost_reasons_.front());
      lost_reasons_.pop_front();
    }
    failed.push_back({std::move(e.task), Fate::kLost, std::move(why)});
    --outstanding_;
  }

  // The worker could not unpickle the record in front (its answer names no task): the record's
  // first call takes the error; the other calls of a RUN record go back to the backlog, each to be
  // sent alone, so that only a call at fault fails.
  void unpickle_failed(WorkerState& w) {
    Entry head = w.sent.take_front();
    std::vector<Entry> rest;
    while (!head.last_of_record && !w.sent.empty()) {
      rest.push_back(w.sent.take_front());
      head.last_of_record = rest.back().last_of_record;
    }
    for (auto it = rest.rbegin(); it != rest.rend(); ++it) {
      it->alone = true;
      it->last_of_record = true;
      it->tid = 0;
      if (it->live) backlog_.push_front(std::move(*it));
    }
    head.last_of_record = true;
    w.sent.push_front(std::move(head));
  }

  // The record in front (a RUN the worker could not unpickle; its one answer came): every call of
  // it goes back to the front of the backlog, each to be sent alone.
  void resend_front_record(WorkerState& w) {
    std::vector<Entry> calls;
    for (bool last = false; !last && !w.sent.empty();) {
      calls.push_back(w.sent.take_front());
      last = calls.back().last_of_record;
    }
    ++w.answered;
    w.running.reset();
    for (auto it = calls.rbegin(); it != calls.rend(); ++it) {
      it->alone = true;
      it->last_of_record = true;
      it->tid = 0;
      if (it->live) backlog_.push_front(std::move(*it));
    }
  }

  SchedulerOptions opts_;
  std::map<int, WorkerState> workers_;
  Fifo<Entry> backlog_;                 // submitted, not yet sent (or sent back)
  std::size_t outstanding_ = 0;
  std::uint64_t next_tid_ = 1;
  double avg_ = proto::task::kInitialTaskTime;  // moving average of the task times reported
  std::size_t depth_ = proto::task::kMinDepth;
  std::deque<std::string> lost_reasons_;  // undecodable records not yet matched to their call
};

}  // namespace ringpool::detail
