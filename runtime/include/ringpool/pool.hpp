// Pool: run Python functions in a pool of worker processes from a C++ service, with no Python
// linked into the service.
//
//   service threads ── submit("pkg.mod:fn", args) ──► per-worker call ring ──► Python worker
//          ▲                                                                        │
//          └── std::future<Value> ◄── collector thread ◄── per-worker result ring ◄─┘
//
// Workers are the same as ringpool.Executor's (docs/design/pool.md): started by a Supervisor
// (a preloaded zygote that forks them, or a fresh interpreter each), each with a call ring and a
// result ring of its own. Calls and results are pickles of plain data written and read by the
// C++ codec (pickle.hpp), which refuses anything that would import or call: a worker can never
// make the service run code. A task's function is named "module:qualname" and imported in the
// worker.
//
// No worker is trusted (docs/design/security.md): each holds only its own rings' descriptors,
// and a result is accepted only for the call its worker is running. A worker that breaks the
// protocol (a record that does not decode, a result for another task or worker, an unsealed or
// oversized block, a malformed error) is killed and replaced; the call it was running fails with
// ProtocolError, its calls not yet started go to other workers, and no other task is touched.
//
// Failures stay local: a Python exception fails its future with RemoteError (type, message,
// traceback); a worker that dies fails only the task it was running (WorkerDied), the tasks
// queued behind it go to other workers, and a replacement starts; a task past its deadline
// (task_timeout) kills its worker and fails with TaskTimeout. If the zygote dies, its workers
// are killed and replaced by the next zygote. Nothing outlives the service (PR_SET_PDEATHSIG).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ringpool/log.hpp"
#include "ringpool/value.hpp"

namespace ringpool {

namespace detail {
// Where cmake --install put ringpool's Python package, for a program built against that install:
// its package config defines RINGPOOL_INSTALLED_PYTHONPATH for users of ringpool::runtime. (The
// library itself never default-constructs PoolOptions, so its own translation units, built
// without the macro, do not define PoolOptions() differently from the program's.)
inline std::vector<std::string> installed_python_path() {
#ifdef RINGPOOL_INSTALLED_PYTHONPATH
  return {RINGPOOL_INSTALLED_PYTHONPATH};
#else
  return {};
#endif
}
}  // namespace detail

struct PoolOptions {
  int workers = 2;
  // The interpreter the workers run; it must be able to import ringpool (installed, or found
  // through python_path).
  std::string python = "/usr/bin/python3";
  // Prepended to sys.path in the zygote and every worker. Built against an installed ringpool
  // (find_package(ringpool) after cmake --install --prefix P), it starts as the folder holding the
  // ringpool package installed with the library (P/lib/python3.11/dist-packages by default), so
  // the workers import the Python side that matches it; otherwise empty.
  std::vector<std::string> python_path = detail::installed_python_path();
  // Modules the zygote imports once before forking workers (zygote mode only).
  std::vector<std::string> preload;
  // Packages to ship to the workers: (import name, folder holding its __init__.py). Their .py
  // sources are read here at start and installed in each worker from memory (ringpool.modules),
  // so workers import them without the folder being on their sys.path.
  std::vector<std::pair<std::string, std::string>> packages;
  // A bundle file (ringpool.Bundle: interned packages, mocks, resources) that becomes the workers'
  // environment: its packages import under their real names in the zygote and every worker.
  std::string bundle;
  // true: a preloaded zygote forks the workers; false: a fresh interpreter per worker.
  bool zygote = true;
  // The workers' environment ("KEY=value"); empty: this process's environment.
  std::vector<std::string> env;
  // A worker exits after this many tasks and a fresh one replaces it (0: never).
  std::size_t max_tasks_per_child = 0;
  // A task running longer fails with TaskTimeout and its worker is killed (0: no limit).
  std::chrono::milliseconds task_timeout{0};
  // A task whose worker dies before it counts as running (the worker had not taken its record,
  // by the worker's own count) goes to another worker; after this many such returns the next one
  // fails it with WorkerDied instead. The count is the worker's to write (security.md): without
  // this cap a task that makes its worker die as if it never started it would be requeued, and
  // kill a worker, for ever. 0: no limit.
  std::size_t max_requeues = 3;
  // How long the zygote's preload (and a worker's start) may take.
  std::chrono::milliseconds start_timeout{120'000};
  // The largest result (its pickle's bytes) a worker may send. A worker fails a call whose
  // result (or error) is longer with a RemoteError of type OverflowError, nothing sent; a worker
  // that sends one anyway breaks the protocol (it is killed, the task fails with ProtocolError).
  // Bounds what one worker can make the service allocate for a result's copy (and, by
  // PickleLimits, for its decoded Value).
  std::size_t max_result_bytes = std::size_t{1} << 30;
  // Where lifecycle events go (workers started, died, replaced, recycled, timed out; the zygote
  // started, died, restarted; protocol errors; descriptor exhaustion): log.hpp says from which
  // threads it is called and what it must not do. Empty (the default): nowhere, the pool is silent.
  LogHandler log;
};

// A Python exception raised by the task.
class RemoteError : public std::runtime_error {
 public:
  RemoteError(std::string type_name, std::string message, std::string traceback);
  const std::string& type_name() const noexcept { return type_; }
  const std::string& message() const noexcept { return message_; }
  const std::string& traceback() const noexcept { return traceback_; }

 private:
  std::string type_, message_, traceback_;
};

// The worker running the task died (a signal, or an exit) before answering; or the task was next
// in the queue of more than PoolOptions::max_requeues workers that died (detail says so).
class WorkerDied : public std::runtime_error {
 public:
  WorkerDied(pid_t pid, int exit_code);
  WorkerDied(pid_t pid, int exit_code, const std::string& detail);
  pid_t pid() const noexcept { return pid_; }
  // Python's convention: the exit status, or -N when killed by signal N.
  int exit_code() const noexcept { return exit_code_; }

 private:
  pid_t pid_;
  int exit_code_;
};

// The task ran longer than PoolOptions::task_timeout; its worker was killed.
class TaskTimeout : public std::runtime_error {
 public:
  TaskTimeout(pid_t pid, std::chrono::milliseconds timeout);
  pid_t pid() const noexcept { return pid_; }

 private:
  pid_t pid_;
};

// submit() after shutdown(), or the pool could not keep any worker running.
class PoolClosed : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Pool {
 public:
  // Starts the workers (and the zygote) and returns once they run; throws what failed.
  explicit Pool(PoolOptions options);
  // shutdown(true).
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // Calls function(*args, **kwargs) in a worker. function reads "package.module:qualname".
  // Thread-safe. Throws PoolClosed after shutdown, PickleError for an argument that cannot be
  // pickled (a str that is not UTF-8, ...); everything else arrives through the future:
  // RemoteError, WorkerDied, TaskTimeout, PickleError (a result that is not plain data is
  // refused in the worker and arrives as a RemoteError of type TypeError; a result that does not
  // decode here), ProtocolError (the worker broke the protocol and was killed: a malformed error
  // record, a forged answer, an unsealed or oversized result block, ...).
  std::future<Value> submit(std::string function, std::vector<Value> args = {},
                            std::vector<std::pair<std::string, Value>> kwargs = {});

  // The callback form, for event-driven services (an Asio server posts the answer back to its
  // io_context): done(nullptr, result) or done(error, {}) runs once on the pool's collector
  // thread, outside the pool's lock: it may submit more tasks (async_submit, or submit without
  // waiting on the future), but must not block, and must not call shutdown. Throws as submit.
  using Callback = std::function<void(std::exception_ptr error, Value result)>;
  void async_submit(std::string function, std::vector<Value> args, std::vector<std::pair<std::string, Value>> kwargs,
                    Callback done);

  // The batch form: function(*args) for each args in calls, as submit() of each in order (the
  // calls travel in runs), with one future for all the results, in the order of calls. If any
  // call fails, the future holds the error of the first failing call in that order (the others
  // still run to their end). Cheaper per call than submit(), which pays a std::promise per call.
  // Throws as submit, before any call is submitted.
  std::future<std::vector<Value>> map(std::string function, std::vector<std::vector<Value>> calls);

  // The raw form, for services that bring their own serialization: function(payload: bytes)
  // must return bytes (or bytearray/memoryview), which arrive as a std::string.
  std::future<std::string> submit_raw(std::string function, std::string payload);

  // Stops taking tasks. wait: let every submitted task finish, then stop the workers; otherwise
  // fail the tasks not yet answered with PoolClosed (their callbacks run on the calling thread,
  // outside the pool's lock) and stop the workers now. Thread-safe, and may be called again:
  // every call returns once the workers are stopped (the destructor calls shutdown(true)).
  void shutdown(bool wait = true);

  // Pids of the running workers, and of the zygote (-1 in exec mode or when not running).
  std::vector<pid_t> worker_pids();
  pid_t zygote_pid();
  // Workers started since the pool began (replacements included).
  std::uint64_t workers_started();

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace ringpool
