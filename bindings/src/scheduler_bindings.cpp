// ringpool._core.Scheduler: detail::Scheduler (runtime/include/ringpool/detail/scheduler.hpp), the
// scheduling rules ringpool::Pool uses, for ringpool.Executor.
//
// Called once per batch, never once per task (docs/design/pool.md, "The Executor"): the Executor's
// no-op path costs about 2.3 us of parent CPU per task, and a pybind11 call costs a third of that.
//   submit(group, n, run)   once per submit (n = 1) or map (n items, or n chunks)
//   assign()                once per dispatch round: every record to write, per worker
//   answers(records, start) once per batch of result records, read by task.hpp's field positions
// A call is a Ref {group, index}: the Executor's group (a submit, a map) and the item's position
// in it, so a map of n items is n 16-byte entries here and no Python object per item.
//
// Not thread-safe: the Executor calls it under its pool lock (and holds the GIL throughout).
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include "bindings.h"
#include "ringpool/detail/scheduler.hpp"
#include "ringpool/proto/task.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

namespace {

namespace task = proto::task;

struct Ref {
  std::uint64_t group = 0;
  std::uint32_t index = 0;
  bool run = false;  // may share a RUN record with the next item of its group
};

// Consecutive items of one map group share a RUN record (up to kMaxRunCalls); the Executor's runs
// are not bounded by bytes (a run's arguments are a slice of the map's list).
struct Rules {
  bool joins(const Ref& a, const Ref& b) const {
    return a.run && b.run && a.group == b.group && b.index == a.index + 1;
  }
  std::size_t bytes(const Ref&) const { return 0; }
};

using Sched = detail::Scheduler<Ref>;
using Clock = Sched::Clock;

double seconds(Clock::time_point t) { return std::chrono::duration<double>(t.time_since_epoch()).count(); }

py::object steal(PyObject* o) {
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

py::tuple ref_tuple(const Ref& r) { return py::make_tuple(r.group, r.index); }

py::list failures(std::vector<Sched::Failure>& fails) {
  py::list out;
  for (auto& f : fails)
    out.append(py::make_tuple(f.task.group, f.task.index, static_cast<int>(f.fate), py::str(f.why)));
  fails.clear();
  return out;
}

// A new tuple of the given new references (each may be null: an error is set, and it throws).
template <class... O>
PyObject* pack(O*... items) {
  PyObject* parts[] = {items...};
  PyObject* t = PyTuple_New(sizeof...(items));
  bool ok = t != nullptr;
  for (std::size_t i = 0; i < sizeof...(items); ++i) {
    if (!parts[i]) ok = false;
    if (t && parts[i])
      PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), parts[i]);
    else
      Py_XDECREF(parts[i]);
  }
  if (!ok) {
    Py_XDECREF(t);
    throw py::error_already_set();
  }
  return t;
}

// Appends a new reference to a list (and drops the reference).
void append(PyObject* list, PyObject* item) {
  const int rc = PyList_Append(list, item);
  Py_DECREF(item);
  if (rc != 0) throw py::error_already_set();
}

long long as_int(PyObject* o, const char* what) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::value_error(std::string("malformed result record: ") + what + " is not an int");
  }
  return v;
}

class PyScheduler {
  // Appends (wid, [(tid, group, first_index, count), ...]) for one assignment: each inner tuple
  // one record to write.
  void append_assignment(py::list& out, const Sched::Assignment& a) {
    auto& q = sched_.sent(a.wid);
    py::list recs;
    std::size_t start = a.first;
    for (std::size_t i = a.first; i < a.first + a.count; ++i) {
      if (!q[i].last_of_record) continue;
      const Ref& r = q[start].task;
      append(recs.ptr(), pack(PyLong_FromUnsignedLongLong(q[start].tid), PyLong_FromUnsignedLongLong(r.group),
                              PyLong_FromUnsignedLong(r.index), PyLong_FromSize_t(i + 1 - start)));
      start = i + 1;
    }
    append(out.ptr(), pack(PyLong_FromLong(a.wid), recs.release().ptr()));
  }

 public:
  PyScheduler(std::size_t workers, std::size_t max_tasks_per_child, std::optional<double> task_timeout,
              std::size_t min_depth, std::size_t max_depth, std::size_t max_requeues)
      : sched_(options(workers, max_tasks_per_child, task_timeout, min_depth, max_depth, max_requeues)) {}

  void add_worker(int wid) { sched_.add_worker(wid); }
  bool exited(int wid) { return sched_.exited(wid); }

  void submit(std::uint64_t group, std::uint32_t n, bool run) {
    for (std::uint32_t i = 0; i < n; ++i) sched_.submit(Ref{group, i, run});
  }

  // [(wid, [(tid, group, first_index, count), ...]), ...]: each inner tuple one record to write.
  // Built with the C API: this runs once per submit and once per batch of results.
  py::list assign() {
    py::list out;
    Rules rules;
    while (auto a = sched_.assign(rules)) append_assignment(out, *a);
    return out;
  }

  // submit(group, 1, false), then assign(), for a lone submit: (wid, tid) when its call went to a
  // worker as a record of its own and nothing else was assigned (the usual case, answered without
  // building the lists: about 0.3 us of a submit's latency); otherwise what assign() returns.
  py::object submit_one(std::uint64_t group) {
    sched_.submit(Ref{group, 0, false});
    Rules rules;
    auto a = sched_.assign(rules);
    if (!a) return py::list();
    const Sched::Entry& e = sched_.sent(a->wid)[a->first];
    const bool lone = a->count == 1 && e.task.group == group && e.last_of_record;
    const std::uint64_t tid = e.tid;  // (read now: a later assign may grow that queue)
    auto b = sched_.assign(rules);
    if (lone && !b)
      return py::reinterpret_steal<py::object>(pack(PyLong_FromLong(a->wid), PyLong_FromUnsignedLongLong(tid)));
    py::list out;
    append_assignment(out, *a);
    for (; b; b = sched_.assign(rules)) append_assignment(out, *b);
    return out;
  }

  std::size_t split(int wid, std::uint64_t tid) { return sched_.split(wid, tid); }

  py::object unsend(int wid, std::uint64_t tid) {
    auto r = sched_.unsend(wid, tid);
    if (!r) return py::none();
    return ref_tuple(*r);
  }

  // The calls of these groups still in the backlog: cancelled, returned as [(group, index)].
  py::list cancel(const std::vector<std::uint64_t>& groups) {
    std::unordered_set<std::uint64_t> gs(groups.begin(), groups.end());
    std::vector<Ref> out;
    sched_.cancel_if([&](const Ref& r) { return gs.count(r.group) != 0; }, out);
    py::list l;
    for (const Ref& r : out) l.append(ref_tuple(r));
    return l;
  }

  // Handles records[start:] in order, up to the first DIED or INIT_FAILED record (the owner's to
  // handle: they concern the process). Returns (stop, answered, failed, unread, started):
  //   stop: the position of that record, or len(records)
  //   answered: [(group, index, status, value)] for each OK or ERR record whose call was owed
  //   failed: [(group, index, fate, why)]: calls whose results were lost (fate LOST), or None
  //   unread: [(wid, group)], or None: records the worker could not unpickle (a single call: the error is
  //           its answer; a RUN: its calls go again alone, and none is answered)
  //   started: a STARTED record set a deadline (the owner's timer must look again)
  py::tuple answers(const py::list& records, std::size_t start) {
    PyObject* recs = records.ptr();
    const auto n = static_cast<std::size_t>(PyList_GET_SIZE(recs));
    py::list answered, unread;
    bool started = false, any = false;
    std::optional<Clock::time_point> now;
    std::size_t i = start;
    for (; i < n; ++i) {
      PyObject* rec = PyList_GET_ITEM(recs, static_cast<Py_ssize_t>(i));
      if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) != static_cast<Py_ssize_t>(task::result::kFields))
        throw py::value_error("malformed result record: not a tuple of task.RESULT_FIELDS");
      const int wid = static_cast<int>(as_int(PyTuple_GET_ITEM(rec, task::result::kWid), "wid"));
      PyObject* status_obj = PyTuple_GET_ITEM(rec, task::result::kStatus);
      const auto status = static_cast<task::Status>(as_int(status_obj, "status"));
      PyObject* tid_obj = PyTuple_GET_ITEM(rec, task::result::kTid);
      std::optional<std::uint64_t> tid;
      if (tid_obj != Py_None) tid = static_cast<std::uint64_t>(as_int(tid_obj, "tid"));
      if (status == task::Status::DIED || status == task::Status::INIT_FAILED) break;
      if (status == task::Status::OK || status == task::Status::ERR) {
        any = true;
        std::optional<double> elapsed;
        PyObject* e = PyTuple_GET_ITEM(rec, task::result::kElapsed);
        if (PyFloat_Check(e)) elapsed = PyFloat_AS_DOUBLE(e);
        if (!tid && sched_.has_worker(wid) && !sched_.sent(wid).empty() && sched_.sent(wid).front().tid != 0)
          unread.append(py::make_tuple(wid, sched_.sent(wid).front().task.group));  // the record it could not read
        auto r = sched_.answer(wid, tid, elapsed, fails_);
        if (!r) continue;
        PyObject* value = PyTuple_GET_ITEM(rec, task::result::kValue);
        Py_INCREF(status_obj);
        Py_INCREF(value);
        append(answered.ptr(), pack(PyLong_FromUnsignedLongLong(r->group), PyLong_FromUnsignedLong(r->index),
                                    status_obj, value));
      } else if (status == task::Status::STARTED) {
        if (!tid || sched_.options().task_timeout.count() <= 0) continue;
        if (!now) now = Clock::now();
        sched_.started(wid, *tid, *now);
        started = true;
      } else if (status == task::Status::PONG) {
        sched_.pong(wid, fails_);
      }
    }
    if (any) sched_.retune();
    // (failed and unread are rare: None when empty, one list fewer to make per batch)
    py::object failed = fails_.empty() ? py::object(py::none()) : py::object(failures(fails_));
    py::object unread_or_none = unread.empty() ? py::object(py::none()) : py::object(std::move(unread));
    PyObject* started_obj = started ? Py_True : Py_False;
    Py_INCREF(started_obj);
    return py::reinterpret_steal<py::tuple>(pack(PyLong_FromSize_t(i), answered.release().ptr(),
                                                 failed.release().ptr(), unread_or_none.release().ptr(), started_obj));
  }

  py::list result_gap(std::string why) {
    std::vector<int> ping;
    sched_.result_gap(std::move(why), ping);
    return py::cast(ping);
  }

  // (running, timed_out, retiring, failed [(group, index, fate, why)], requeued)
  py::tuple died(int wid, std::uint64_t consumed) {
    auto d = sched_.died(wid, consumed, fails_);
    return py::make_tuple(d.running, d.timed_out, d.retiring, failures(fails_), d.requeued);
  }

  // (workers to kill, the next deadline in time.monotonic() seconds or None)
  py::tuple expire() {
    std::vector<int> kill;
    const auto next = sched_.expire(Clock::now(), kill);
    py::object deadline = py::none();
    if (next != Clock::time_point::max()) deadline = py::float_(seconds(next));
    return py::make_tuple(py::cast(kill), deadline);
  }

  py::list drain() {
    std::vector<Ref> out;
    sched_.drain(out);
    py::list l;
    for (const Ref& r : out) l.append(ref_tuple(r));
    return l;
  }

  Sched& sched() { return sched_; }

 private:
  static detail::SchedulerOptions options(std::size_t workers, std::size_t max_tasks, std::optional<double> timeout,
                                          std::size_t min_depth, std::size_t max_depth, std::size_t max_requeues) {
    if (timeout && !(*timeout > 0)) throw py::value_error("task_timeout must be positive");
    if (workers == 0) throw py::value_error("workers must be > 0");
    if (min_depth == 0 || min_depth > max_depth) throw py::value_error("need 0 < min_depth <= max_depth");
    detail::SchedulerOptions o;
    o.min_depth = min_depth;
    o.max_depth = max_depth;
    o.resend_unreadable_runs = true;  // the Executor's rule: only the call at fault fails
    o.workers = workers;
    o.max_tasks_per_child = max_tasks;
    // 0 for ringpool.Executor: its workers are trusted, so a call goes back only if its worker had
    // truly not taken it, and a cap would fail calls for deaths that were not theirs.
    o.max_requeues = max_requeues;
    if (timeout)
      o.task_timeout = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::duration<double>(*timeout));
    return o;
  }

  Sched sched_;
  std::vector<Sched::Failure> fails_;
};

}  // namespace

void init_scheduler(py::module_& m) {
  py::class_<PyScheduler> c(m, "Scheduler",
                            "The task pools' scheduling rules (runtime/include/ringpool/detail/scheduler.hpp) for "
                            "ringpool.Executor: which worker gets which calls, in-flight bookkeeping, deaths, "
                            "timeouts, max_tasks_per_child. Bookkeeping only: the caller sends, kills and starts. "
                            "Called per batch; not thread-safe (the Executor holds its pool lock).");
  c.attr("LOST") = static_cast<int>(detail::Fate::kLost);
  c.attr("DIED") = static_cast<int>(detail::Fate::kDied);
  c.attr("TIMED_OUT") = static_cast<int>(detail::Fate::kTimedOut);
  c.def(py::init<std::size_t, std::size_t, std::optional<double>, std::size_t, std::size_t, std::size_t>(),
        py::arg("workers"), py::arg("max_tasks_per_child") = 0, py::arg("task_timeout") = py::none(),
        py::arg("min_depth") = task::kMinDepth, py::arg("max_depth") = task::kMaxDepth, py::arg("max_requeues") = 0);
  c.def("add_worker", &PyScheduler::add_worker, py::arg("wid"), "A started worker takes calls from now on.");
  c.def("exited", &PyScheduler::exited, py::arg("wid"),
        "The worker's process ended: no more calls go to it (its death is handled by died()).");
  c.def("submit", &PyScheduler::submit, py::arg("group"), py::arg("n"), py::arg("run"),
        "Queue calls (group, 0..n-1); run: consecutive ones may share a RUN record.");
  c.def("submit_one", &PyScheduler::submit_one, py::arg("group"),
        "submit(group, 1, False), then assign(): (wid, tid) if that call alone went to a worker as a record of its "
        "own, else what assign() returns.");
  c.def("assign", &PyScheduler::assign,
        "Move calls from the backlog to workers: [(wid, [(tid, group, first_index, count), ...]), ...], each "
        "inner tuple one record to write (count > 1: a RUN; item k has wire id tid + k).");
  c.def("split", &PyScheduler::split, py::arg("wid"), py::arg("tid"),
        "The record at tid was not sent (it did not pickle): its calls become records of their own, keeping "
        "their ids. Returns how many.");
  c.def("unsend", &PyScheduler::unsend, py::arg("wid"), py::arg("tid"),
        "The single-call record at tid was not sent after all: forget it. Returns its (group, index), or None.");
  c.def("cancel", &PyScheduler::cancel, py::arg("groups"),
        "Cancel these groups' calls still in the backlog; returns them as [(group, index)].");
  c.def("answers", &PyScheduler::answers, py::arg("records"), py::arg("start") = 0,
        "Handle result records[start:] up to the first DIED or INIT_FAILED: (stop, answered [(group, index, "
        "status, value)], failed [(group, index, fate, why)] or None, unread [(wid, group)] or None, started).");
  c.def("result_gap", &PyScheduler::result_gap, py::arg("why"),
        "A result record did not unpickle: the workers to send a PING to.");
  c.def("died", &PyScheduler::died, py::arg("wid"), py::arg("consumed"),
        "The worker is gone, every result it published handled: (running, timed_out, retiring, failed, "
        "requeued).");
  c.def("expire", &PyScheduler::expire,
        "Tasks past their deadline now: (workers to kill, next deadline in time.monotonic() seconds or None).");
  c.def("drain", &PyScheduler::drain, "Every call whose outcome is owed, as [(group, index)] (the pool broke).");
  c.def("forget_in_flight", [](PyScheduler& s) { s.sched().forget_in_flight(); });
  c.def("shortfall", [](PyScheduler& s) { return s.sched().shortfall(); },
        "Workers to start for the pool to be whole (deaths, retirements).");
  c.def("has_worker", [](PyScheduler& s, int wid) { return s.sched().has_worker(wid); }, py::arg("wid"));
  c.def("trim", [](PyScheduler& s) { s.sched().trim(); });
  c.def_property_readonly("outstanding", [](PyScheduler& s) { return s.sched().outstanding(); },
                          "Calls whose outcome is owed (backlog and in flight).");
  c.def_property_readonly("depth", [](PyScheduler& s) { return s.sched().depth(); });
  c.def_property_readonly("backlog", [](PyScheduler& s) { return s.sched().backlog_size(); });
  c.def_property_readonly("average_task_time", [](PyScheduler& s) { return s.sched().average_task_time(); });
  c.def_property_readonly("workers", [](PyScheduler& s) { return s.sched().worker_count(); });
}

}  // namespace ringpool::py_bindings
