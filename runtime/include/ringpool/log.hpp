// Log: how the runtime tells its owner about lifecycle events (a worker started, died, replaced,
// recycled; a zygote started, died, restarted; a protocol error; running out of descriptors).
//
// The runtime writes nothing to stderr itself: an event goes to the LogHandler its owner set
// (PoolOptions::log, Supervisor::set_log), and nowhere when none is set. The Python bindings set
// one that queues the events for a Python thread, which passes them to the `logging` loggers
// "ringpool.pool" and "ringpool.spawner" (docs/design/logging.md).
//
// A handler is called from the runtime's own threads (the pool's collector, the supervisor's io
// thread, the thread constructing a Pool), possibly from two at once, never under the pool's lock.
// It must be thread-safe, return quickly, and not call back into the Pool or Supervisor that
// called it. An exception it throws is caught and dropped: logging never fails the runtime.
#pragma once

#include <sys/types.h>

#include <functional>
#include <string>

namespace ringpool {

// Python logging's numeric levels, so that a binding passes them on unchanged.
enum class LogLevel : int { debug = 10, info = 20, warning = 30, error = 40 };

// What happened; the level each event is reported at is in the comment (and log.cpp).
enum class LogEvent : int {
  worker_started,    // DEBUG    a worker of the pool's first set runs
  worker_replaced,   // INFO     a worker started in place of one that ended
  worker_died,       // WARNING  a worker ended without being asked (a signal, an exit)
  worker_recycled,   // DEBUG    a worker ended after max_tasks_per_child tasks, as asked
  worker_timed_out,  // WARNING  a worker was killed: its task ran past task_timeout
  worker_stopped,    // DEBUG    a worker ended at shutdown
  spawn_failed,      // WARNING  an attempt to start a worker failed (the pool tries again)
  zygote_started,    // INFO     a zygote finished its preload and forks workers
  zygote_restarted,  // INFO     the same, after the previous zygote died
  zygote_died,       // WARNING  a zygote ended without being asked (its workers are killed)
  zygote_stopped,    // DEBUG    a zygote ended after being asked to stop
  protocol_error,    // WARNING  a worker sent a record that does not decode or a malformed error
  fd_exhausted,      // WARNING  no descriptor free to receive a result; retried (once per episode)
  fd_recovered,      // INFO     descriptors are back after fd_exhausted
  pool_broken,       // ERROR    no worker can run: every task fails with PoolClosed
};

struct LogRecord {
  LogEvent event;
  LogLevel level;
  std::string message;  // one complete sentence, without the logger's prefix
  pid_t pid = -1;       // the worker or zygote it is about; -1: none
  int exit_code = 0;    // for an end: Python's convention (-N: killed by signal N); else 0
  int worker = 0;       // the Pool's worker id; 0: none
};

using LogHandler = std::function<void(const LogRecord&)>;

// "worker_died", ... (the names the Python side reports as the record's `event`).
const char* to_string(LogEvent event) noexcept;
// The level an event is reported at (the table above).
LogLevel level_of(LogEvent event) noexcept;

// Calls handler (if set) with a record of event at its level. Swallows whatever the handler throws.
void emit_log(const LogHandler& handler, LogEvent event, std::string message, pid_t pid = -1, int exit_code = 0,
              int worker = 0) noexcept;

}  // namespace ringpool
