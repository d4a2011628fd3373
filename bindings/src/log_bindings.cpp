// The runtime's lifecycle events (ringpool/log.hpp) on their way to Python's logging.
//
//   supervisor io thread ── LogHandler ──► queue (a mutex, no GIL) ──► eventfd
//                                                                         │
//   "ringpool-log" Python thread: os.read(log_fd()) ── log_take() ──► logging.getLogger(...)
//
// The handler runs on the runtime's threads and never takes the GIL: a Python thread may hold
// the GIL while it waits on the supervisor (a Supervisor's destructor joins its thread), and a
// handler waiting for the GIL there would deadlock. It only queues and signals; the Python side
// (ringpool/_runtime_log.py) reads the eventfd in a thread of its own, so an event is logged even
// while the thread that caused it is blocked, and a failing Python handler is that thread's
// business, never the runtime's.
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <mutex>
#include <utility>

#include "bindings.h"
#include "ringpool/error.hpp"
#include "ringpool/log.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

namespace {

constexpr std::size_t kMaxQueued = 10'000;  // beyond: dropped and counted (nobody drains them)

struct LogQueue {
  std::mutex mu;
  std::deque<std::pair<int, LogRecord>> items;  // (the owner's tag, the record)
  std::uint64_t dropped = 0;
  int efd = -1;
};

// Leaked on purpose, and replaced (not destroyed) in a forked child: a runtime thread of the
// parent may have held its mutex at the fork.
std::atomic<LogQueue*> g_queue{new LogQueue};

LogQueue& queue() { return *g_queue.load(std::memory_order_acquire); }  // pairs with the reset's store

int queue_fd() {
  LogQueue& q = queue();
  std::lock_guard lk(q.mu);
  if (q.efd < 0) {
    q.efd = ::eventfd(0, EFD_CLOEXEC);
    if (q.efd < 0) throw_errno("eventfd");
  }
  return q.efd;
}

void push(int tag, const LogRecord& r) {
  LogQueue& q = queue();
  int fd;
  {
    std::lock_guard lk(q.mu);
    if (q.items.size() >= kMaxQueued) {
      ++q.dropped;
      return;
    }
    q.items.emplace_back(tag, r);
    fd = q.efd;
  }
  if (fd >= 0) {
    const std::uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(fd, &one, sizeof one);  // only fails on overflow: already awake
  }
}

}  // namespace

LogHandler python_log_handler(int tag) {
  queue_fd();  // exists before the first record, so that no wake-up is lost
  return [tag](const LogRecord& r) { push(tag, r); };
}

void init_log(py::module_& m) {
  m.def("log_fd", &queue_fd,
        "An eventfd that becomes readable when runtime log records are queued (read it to reset it).");
  m.def(
      "log_take",
      [] {
        std::deque<std::pair<int, LogRecord>> items;
        std::uint64_t dropped;
        {
          LogQueue& q = queue();
          std::lock_guard lk(q.mu);
          items.swap(q.items);
          dropped = std::exchange(q.dropped, 0);
        }
        py::list out;
        for (auto& [tag, r] : items) {
          // A message quotes what a process said (an exception's text): never fail on its bytes.
          py::str message = py::reinterpret_steal<py::str>(
              PyUnicode_DecodeUTF8(r.message.data(), static_cast<Py_ssize_t>(r.message.size()), "replace"));
          out.append(py::make_tuple(tag, to_string(r.event), static_cast<int>(r.level), message, r.pid, r.exit_code,
                                    r.worker));
        }
        return py::make_tuple(out, dropped);
      },
      "The queued runtime log records, oldest first, as (tag, event, level, message, pid, exit_code, worker), "
      "and how many were dropped because the queue was full.");
  m.def(
      "log_reset_after_fork",
      [] {
        LogQueue* old = g_queue.exchange(new LogQueue, std::memory_order_acq_rel);  // old: left allocated
        if (old->efd >= 0) ::close(old->efd);  // the child's copy only
      },
      "In a forked child: forget the parent's queued records and eventfd.");
}

}  // namespace ringpool::py_bindings
