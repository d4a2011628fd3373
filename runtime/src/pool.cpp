#include "ringpool/pool.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <sstream>
#include <thread>
#include <variant>

#include "ringpool/block.hpp"
#include "ringpool/channel.hpp"
#include "ringpool/detail/fifo.hpp"
#include "ringpool/detail/futex.hpp"
#include "ringpool/detail/scheduler.hpp"
#include "ringpool/error.hpp"
#include "ringpool/pickle.hpp"
#include "ringpool/ring.hpp"
#include "ringpool/supervisor.hpp"
#include "task_record.hpp"

extern char** environ;

namespace ringpool {

// -- errors ------------------------------------------------------------------------------------

namespace {

std::string describe_exit(int code) {
  if (code < 0) {
    const char* name = ::sigabbrev_np(-code);
    return name ? "killed by signal SIG" + std::string(name) : "killed by signal " + std::to_string(-code);
  }
  return "exit code " + std::to_string(code);
}

}  // namespace

RemoteError::RemoteError(std::string type_name, std::string message, std::string traceback)
    : std::runtime_error(type_name + ": " + message),
      type_(std::move(type_name)),
      message_(std::move(message)),
      traceback_(std::move(traceback)) {}

WorkerDied::WorkerDied(pid_t pid, int exit_code)
    : std::runtime_error("ringpool worker (pid " + std::to_string(pid) + ") died while running this task: " +
                         describe_exit(exit_code)),
      pid_(pid),
      exit_code_(exit_code) {}

WorkerDied::WorkerDied(pid_t pid, int exit_code, const std::string& detail)
    : std::runtime_error("ringpool worker (pid " + std::to_string(pid) + ") died (" + describe_exit(exit_code) +
                         ") with this task next: " + detail),
      pid_(pid),
      exit_code_(exit_code) {}

TaskTimeout::TaskTimeout(pid_t pid, std::chrono::milliseconds timeout)
    : std::runtime_error("task ran longer than " + std::to_string(timeout.count()) +
                         " ms; ringpool killed its worker (pid " + std::to_string(pid) + ")"),
      pid_(pid) {}

// -- the pool ----------------------------------------------------------------------------------

namespace {

// The records, their kinds and limits are proto/.../task.hpp's (shared with ringpool.executor
// through _core.task); their bytes are written and read by task_record.hpp.
namespace task = proto::task;
using detail::Fifo;
using task_record::Result;
using task_record::read_envelope;
using task_record::read_result;
using task_record::result_from;
constexpr std::int64_t kOk = static_cast<std::int64_t>(task::Status::OK);
constexpr std::int64_t kErr = static_cast<std::int64_t>(task::Status::ERR);
constexpr std::int64_t kStarted = static_cast<std::int64_t>(task::Status::STARTED);
constexpr std::int64_t kPong = static_cast<std::int64_t>(task::Status::PONG);
constexpr std::int64_t kInitFailed = static_cast<std::int64_t>(task::Status::INIT_FAILED);

constexpr auto kTrimAfter = std::chrono::seconds(1);  // idle time before queue memory goes back
constexpr std::size_t kCompleteGroup = 32;  // results fulfilled last to first (see collect())
constexpr std::size_t kMaxSourceBytes = std::size_t{64} << 20;
constexpr int kSpawnAttempts = 3;  // starts of one worker before giving up on it
constexpr int kEarlyDeaths = 3;    // workers dead before their first call, in a row, that break the pool
constexpr auto kFdRetry = std::chrono::milliseconds(10);  // the collector's retry when out of descriptors
// Gathering results (see collect()): a round that took fewer than kGatherBelow records, while every
// worker still has kGatherQueued calls or more unanswered, is followed by a plain sleep of
// kGatherWait (about 100 us with the kernel's default 50 us timer slack) instead of the next
// round at once.
constexpr std::size_t kGatherBelow = 64;
constexpr std::size_t kGatherQueued = 256;
constexpr auto kGatherWait = std::chrono::microseconds(50);

using Clock = std::chrono::steady_clock;

struct Taken {
  proto::FrameHeader header;
  std::size_t offset;  // of its payload in ResultSink::bytes
};

// The collector's: kept between rounds, so a round allocates nothing once they have grown (a
// vector of a few hundred records freed every round made glibc consolidate its free lists).
struct ResultSink final : Ring::Sink {
  std::vector<Taken> frames;
  std::string bytes;  // the payloads, back to back
  void take(const proto::FrameHeader& h, const std::uint8_t* p) override {
    frames.push_back({h, bytes.size()});
    bytes.append(reinterpret_cast<const char*>(p), h.payload_len);
  }
  std::string_view payload(const Taken& t) const { return std::string_view(bytes).substr(t.offset, t.header.payload_len); }
  void clear() {
    frames.clear();
    bytes.clear();
  }
};

// "import sys; sys.path[:0] = [...]; from ringpool.<module> import main; main()"
std::string bootstrap(const std::vector<std::string>& path, const char* module) {
  Value::List items;
  for (const auto& p : path) items.emplace_back(p);
  return "import sys; sys.path[:0] = " + Value::list(std::move(items)).repr() + "; from ringpool." + module +
         " import main; main()";
}

// Why the workers' interpreter cannot run ringpool ("" if it can): asked only after a start
// failed, whose own error ("zygote (pid N) exited with code 1") says nothing of the cause. Runs
// the interpreter once, as the workers would, importing ringpool's extension.
std::string diagnose_interpreter(const PoolOptions& o) {
  if (::access(o.python.c_str(), X_OK) != 0)
    return "no executable Python interpreter at '" + o.python + "' (PoolOptions::python)";
  Value::List items;
  for (const auto& p : o.python_path) items.emplace_back(p);
  const std::string path_repr = Value::list(std::move(items)).repr();
  const std::string code = "import sys; sys.path[:0] = " + path_repr + "; import ringpool._core";
  int err[2];
  if (::pipe2(err, O_CLOEXEC) != 0) return "";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, err[1], 2);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  std::vector<std::string> args = {o.python, "-c", code};
  std::vector<char*> argv, envp;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env = o.env;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, o.python.c_str(), &fa, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  ::close(err[1]);
  std::string out;
  if (rc == 0) {
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    char buf[4096];
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      pollfd p{err[0], POLLIN, 0};
      if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) {
        ::kill(pid, SIGKILL);
        break;
      }
      const ssize_t n = ::read(err[0], buf, sizeof buf);
      if (n <= 0) break;
      if (out.size() < (1u << 16)) out.append(buf, static_cast<std::size_t>(n));
    }
  }
  ::close(err[0]);
  int status = 0;
  if (rc == 0) ::waitpid(pid, &status, 0);
  if (rc != 0) return "could not run '" + o.python + "': " + std::strerror(rc);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  // The exception's line: the last non-empty line of the traceback.
  std::string last;
  std::istringstream lines(out);
  for (std::string line; std::getline(lines, line);)
    if (!line.empty()) last = line;
  return "the workers' interpreter '" + o.python + "' cannot import ringpool (" +
         (last.empty() ? std::string("no error output") : last) +
         "): install ringpool for that interpreter (pip install ringpool, or cmake --install, whose "
         "package config makes the installed folder python_path's default), or set PoolOptions::python_path "
         "to the folder holding the ringpool package (a checkout's bindings/ after ./run build); python_path is " +
         path_repr;
}

Value str_list(const std::vector<std::string>& v) {
  Value::List items;
  for (const auto& s : v) items.emplace_back(s);
  return Value::list(std::move(items));
}

// A package's .py sources, read here and installed in the workers from memory.
Value read_package(const std::string& name, const std::string& folder) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path root = fs::canonical(folder, ec);
  if (ec || !fs::is_directory(root))
    throw std::invalid_argument("ringpool::Pool: package " + name + ": PoolOptions::packages gives the folder '" +
                                folder + "', which " +
                                (ec ? "cannot be opened (" + ec.message() + ")" : std::string("is not a folder")) +
                                "; give the package's own folder, the one holding its __init__.py");
  if (!fs::exists(root / "__init__.py")) {
    const fs::path inside = root / name;
    throw std::invalid_argument("ringpool::Pool: package " + name + ": no __init__.py in " + root.string() +
                                (fs::exists(inside / "__init__.py") ? " (its package folder is " + inside.string() + ")"
                                                                    : std::string()) +
                                "; PoolOptions::packages maps a name to the folder holding that package's __init__.py");
  }
  Value::Dict files;
  std::size_t total = 0;
  for (auto it = fs::recursive_directory_iterator(root); it != fs::recursive_directory_iterator(); ++it) {
    const fs::path& p = it->path();
    const std::string leaf = p.filename().string();
    if (it->is_directory()) {
      // Only sub-packages: a folder without __init__.py is not part of the package.
      if (leaf == "__pycache__" || leaf.starts_with(".") || !fs::exists(p / "__init__.py"))
        it.disable_recursion_pending();
      continue;
    }
    if (p.extension() != ".py" || !it->is_regular_file()) continue;
    const fs::path real = fs::canonical(p);
    const auto rel = real.lexically_relative(root);
    if (rel.empty() || *rel.begin() == "..")
      throw std::invalid_argument("ringpool::Pool: package " + name + ": " + p.string() + " leads outside " +
                                  root.string());
    std::ifstream in(real, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    total += ss.str().size();
    if (total > kMaxSourceBytes) throw std::invalid_argument("ringpool::Pool: package " + name + " is too large");
    files.emplace_back(Value(p.lexically_relative(root).generic_string()), Value::bytes(ss.str()));
  }
  return Value::dict({{Value("name"), Value(name)}, {Value("root"), Value(root.string())},
                      {Value("files"), Value::dict(std::move(files))}});
}

}  // namespace

struct Pool::Impl {
  // The calls of one map(): their results in order, fulfilled as one future once the last call
  // is answered (or failed). Owned by its calls' Slots: the last one to complete delivers it and
  // frees it, so no call pays a promise of its own (a std::promise costs ~0.6 us here, most of it
  // set_value's futex wake, which glibc's pthread_once makes whether anyone waits or not).
  struct Batch {
    const std::string fn;  // the opcodes of the function every call of the batch calls
    std::promise<std::vector<Value>> done;
    std::vector<Value> values;
    std::atomic<std::size_t> remaining;
    std::mutex error_mu;  // the first failure in the calls' order; rare, so a lock
    std::size_t error_at = std::numeric_limits<std::size_t>::max();
    std::exception_ptr error;

    Batch(std::size_t n, std::string fn_ops) : fn(std::move(fn_ops)), values(n), remaining(n) {}
    // Call i's outcome; the last one delivers the batch and deletes it.
    void settle(std::size_t i, std::exception_ptr e, Value v) {
      if (e) {
        std::lock_guard lk(error_mu);
        if (i < error_at) {
          error_at = i;
          error = std::move(e);
        }
      } else {
        values[i] = std::move(v);
      }
      if (remaining.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      if (error)
        done.set_exception(error);
      else
        done.set_value(std::move(values));
      delete this;
    }
  };
  // Call `index` of a batch; one destroyed without an outcome (a task dropped unanswered) fails
  // it as a broken promise would.
  class Slot {
   public:
    Slot(Batch* b, std::size_t i) noexcept : batch_(b), index_(i) {}
    Slot(Slot&& o) noexcept : batch_(std::exchange(o.batch_, nullptr)), index_(o.index_) {}
    Slot& operator=(Slot&& o) noexcept {
      if (this != &o) {
        abandon();
        batch_ = std::exchange(o.batch_, nullptr);
        index_ = o.index_;
      }
      return *this;
    }
    ~Slot() { abandon(); }
    void settle(std::exception_ptr e, Value v) { std::exchange(batch_, nullptr)->settle(index_, std::move(e), std::move(v)); }
    // The batch, until this call's outcome is given (nullptr after).
    const Batch* batch() const noexcept { return batch_; }

   private:
    void abandon() noexcept {
      if (batch_)
        std::exchange(batch_, nullptr)
            ->settle(index_, std::make_exception_ptr(std::future_error(std::future_errc::broken_promise)), Value());
    }
    Batch* batch_;
    std::size_t index_;
  };

  // A task and where its outcome goes: a future's promise (submit), a promise of bytes
  // (submit_raw), a callback (async_submit) or its place in a batch (map). The scheduler (detail/scheduler.hpp) holds it in
  // its backlog until it is sent, then in its worker's queue of unanswered calls until answered,
  // and gives it its wire id when it is sent: ids run in the order calls are sent, whichever
  // thread submitted them, so that any calls sent together can share a RUN record.
  struct Task {
    // The opcodes of its function (except in a map's call), argument tuple and keyword dict (or
    // None), back to back: the record it travels in (a call of its own or a run) is written
    // around them when it is sent. A map's calls leave the function out: their Batch holds it
    // once for all (fn_ops()), so such a call's own bytes are few (a body of up to 15 bytes, say
    // one or two small ints, stays in std::string's inline buffer: no allocation) and two calls
    // of one map join a run without comparing names. (Not a reference-counted string shared by
    // the calls: the submitting thread would count up and the collector down, on one cache
    // line, per task.)
    std::string body;
    // The argument tuple's place in body (after the function, if there), its length, its item
    // count, and whether the call may join a run.
    std::uint32_t args_at = 0, args_len = 0, nargs = 0;
    bool runnable = false;        // no keyword arguments
    std::variant<std::monostate, std::promise<Value>, std::promise<std::string>, Callback, Slot> sink;

    // Read only before the task's outcome is given (a map's Batch is gone after its last).
    std::string_view fn_ops() const {
      const Slot* s = std::get_if<Slot>(&sink);
      return s ? std::string_view(s->batch()->fn) : std::string_view(body).substr(0, args_at);
    }
    std::string_view after_fn() const { return std::string_view(body).substr(args_at); }
    bool same_function(const Task& o) const {
      const Slot* a = std::get_if<Slot>(&sink);
      const Slot* b = std::get_if<Slot>(&o.sink);
      return (a && b && a->batch() == b->batch()) || fn_ops() == o.fn_ops();
    }

    void ok(Value v) {
      if (auto* p = std::get_if<std::promise<Value>>(&sink)) {
        p->set_value(std::move(v));
      } else if (auto* r = std::get_if<std::promise<std::string>>(&sink)) {
        if (v.is_bytes())
          r->set_value(v.as_bytes());
        else
          r->set_exception(std::make_exception_ptr(
              RemoteError("TypeError", "a raw task must return bytes, not " + std::string(v.type_name()), "")));
      } else if (auto* c = std::get_if<Callback>(&sink)) {
        (*c)(nullptr, std::move(v));
      } else if (auto* b = std::get_if<Slot>(&sink)) {
        b->settle(nullptr, std::move(v));
      }
    }
    void fail(std::exception_ptr e) {
      if (auto* p = std::get_if<std::promise<Value>>(&sink))
        p->set_exception(e);
      else if (auto* r = std::get_if<std::promise<std::string>>(&sink))
        r->set_exception(e);
      else if (auto* c = std::get_if<Callback>(&sink))
        (*c)(e, Value());
      else if (auto* b = std::get_if<Slot>(&sink))
        b->settle(e, Value());
    }
  };

  using Scheduler = detail::Scheduler<Task>;
  using Entry = Scheduler::Entry;

  // A worker's process and rings; its calls and their bookkeeping are the scheduler's.
  struct Worker {
    int wid = 0;
    ChildProcess proc;
    std::shared_ptr<Ring> ring;  // its calls (the pool their only producer; the worker not trusted)
    std::unique_ptr<Channel> calls;
    // Its answers: a ring of its own, which only the collector reads and which trusts nothing the
    // worker does (Ring::distrust_peers). The worker holds its producer side only.
    std::shared_ptr<Ring> results;
    std::deque<std::unique_ptr<Pending>> unpublished;
    std::optional<int> exit_code;     // from the supervisor
    // Why the pool killed it for breaking the protocol ("": it did not). Its rings are used no
    // more, and the call it was running fails with a ProtocolError saying this. Under mu.
    std::string violation;
    bool timed_out = false;           // killed by expire(): its death is logged as that
  };

  PoolOptions opts;
  std::unique_ptr<Supervisor> sup;
  // Rung to wake the collector from its wait on the workers' result rings (a worker's exit,
  // shutdown): a futex word private to this process, which no worker can reach.
  std::atomic<std::uint32_t> bell{0};
  Value packages;  // list of package dicts, sent to every worker

  std::mutex mu;
  std::condition_variable drained;
  std::map<int, std::unique_ptr<Worker>> workers;
  // Every scheduling decision: the backlog, each worker's unanswered calls, depth, deaths,
  // deadlines, budgets. Under mu, like everything here.
  Scheduler sched;
  std::vector<Scheduler::Failure> failures;  // the scheduler's, turned into completions at once
  std::vector<int> wids;                     // workers it names (pings to send, workers to kill)
  int next_wid = 1;
  std::uint64_t started = 0;
  // Results handled and not yet handed to their futures or callbacks: the collector hands them
  // over after releasing mu, so a callback may submit more work and submitters are not held up.
  struct Completion {
    Task task;
    Value value;
    std::exception_ptr error;
  };
  std::vector<Completion> completions;
  std::vector<Ring::Piece> dispatch_batch;  // dispatch()'s, kept between calls
  std::string dispatch_wire;                // dispatch()'s records, back to back
  std::vector<std::pair<std::size_t, std::size_t>> spans;  // and where each stands in it
  std::size_t completing = 0;    // being handed over (shutdown waits for them too)
  Clock::time_point idle_since = Clock::now();  // when the last task was answered
  std::map<int, int> early_exits;  // exits of workers not yet recorded
  bool shutting_down = false;
  std::string broken;            // why no worker can run, once that is so
  bool answered_any = false;     // a worker has answered something (died(): early deaths)
  int early_deaths = 0;          // workers dead before their first call, in a row
  bool stop = false;
  bool finished = false;         // shutdown is over: the workers and the collector are gone
  std::condition_variable closed;  // finished became true
  int spawning = 0;  // replenish() starting a worker with mu released (shutdown waits for it)
  std::thread collector;
  // Lifecycle events noted under mu and handed to opts.log once it is released (log.hpp): a
  // handler may then ask the pool for its pids without deadlocking.
  std::vector<LogRecord> logs;
  bool out_of_fds_logged = false;  // the collector's descriptor shortage is logged once per episode
  std::uint64_t fd_retries = 0;

  void note(LogEvent e, std::string message, pid_t pid = -1, int exit_code = 0, int wid = 0) {
    if (opts.log) logs.push_back({e, level_of(e), std::move(message), pid, exit_code, wid});
  }
  // Without mu.
  void emit_logs(std::vector<LogRecord>& v) {
    for (auto& r : v) emit_log(opts.log, r.event, std::move(r.message), r.pid, r.exit_code, r.worker);
    v.clear();
  }

  static detail::SchedulerOptions scheduler_options(const PoolOptions& o) {
    if (o.workers <= 0) throw std::invalid_argument("ringpool::Pool: workers must be > 0");
    detail::SchedulerOptions s;
    s.workers = static_cast<std::size_t>(o.workers);
    s.max_tasks_per_child = o.max_tasks_per_child;
    s.task_timeout = o.task_timeout;
    // Calls travel in RUN records unless max_tasks_per_child is set (a worker then counts exactly
    // the calls it was sent, one record each, as ringpool.Executor does).
    s.runs = o.max_tasks_per_child == 0;
    s.max_requeues = o.max_requeues;
    return s;
  }

  explicit Impl(PoolOptions o) : opts(std::move(o)), sched(scheduler_options(opts)) {
    if (opts.env.empty())
      for (char** e = environ; e && *e; ++e) opts.env.emplace_back(*e);
    if (!opts.bundle.empty() && !std::filesystem::is_regular_file(opts.bundle))
      throw std::invalid_argument("ringpool::Pool: no bundle file at " + opts.bundle);
    Value::List pk;
    for (const auto& [name, folder] : opts.packages) pk.push_back(read_package(name, folder));
    packages = Value::list(std::move(pk));
    if (opts.max_result_bytes == 0) throw std::invalid_argument("ringpool::Pool: max_result_bytes must be > 0");
    if (opts.zygote) {
      ZygoteOptions z;
      z.launch.executable = opts.python;
      z.launch.argv = {opts.python, "-c", bootstrap(opts.python_path, "_zygote")};
      z.launch.env = opts.env;
      // The packages go to the zygote too: preload may name them, and its workers inherit them.
      z.config = pickle_dumps(Value::dict({{Value("preload"), str_list(opts.preload)},
                                           {Value("main"), Value::dict()},
                                           {Value("packages"), packages},
                                           {Value("bundle_file"), bundle_file()},
                                           // Not dumpable once configured: workers are not trusted
                                           // and run as our user (security.md, "Same user").
                                           {Value("undumpable"), Value(true)}}));
      z.ready_timeout = opts.start_timeout;
      z.spares = std::min(opts.workers, 4);
      sup = Supervisor::zygote_mode(std::move(z));
    } else {
      if (!opts.preload.empty()) throw std::invalid_argument("ringpool::Pool: preload needs the zygote");
      sup = Supervisor::exec_mode();
    }
    if (opts.log) sup->set_log(opts.log);
  }

  // The bundle's absolute path (the workers read it), or None.
  Value bundle_file() const {
    if (opts.bundle.empty()) return Value();
    return Value(std::filesystem::absolute(opts.bundle).string());
  }

  // -- workers -------------------------------------------------------------------------------
  // Starts one worker (without mu: a spawn may wait for the zygote's preload).
  std::unique_ptr<Worker> launch(int wid) {
    auto w = std::make_unique<Worker>();
    w->wid = wid;
    w->ring = Ring::create(RingOptions{task::kCallCapacity, 0, false});
    w->ring->distrust_peers(0);  // its producer lock is ours alone: a worker holding it cannot wedge dispatch
    w->calls = std::make_unique<Channel>(w->ring);
    w->results = Ring::create(RingOptions{task::kResultCapacity, 0, false});
    w->results->distrust_peers(1);  // a result carries at most one handle: its out-of-band block
    Value max_tasks = opts.max_tasks_per_child ? Value(static_cast<std::int64_t>(opts.max_tasks_per_child)) : Value();
    const std::string config = pickle_dumps(Value::dict({{Value("ringpool_pool"), Value::dict({
        {Value("wid"), Value(wid)},
        {Value("max_tasks"), max_tasks},
        {Value("report_start"), Value(opts.task_timeout.count() > 0)},
        // The worker fails a call whose result is longer with OverflowError (a worker that sends
        // one anyway breaks the protocol: the collector checks too).
        {Value("max_result_bytes"), Value(static_cast<std::int64_t>(
                                        std::min<std::size_t>(opts.max_result_bytes, std::numeric_limits<std::int64_t>::max())))},
        {Value("sys_path_prepend"), str_list(opts.python_path)},
        {Value("packages"), packages},
        {Value("bundle_file"), bundle_file()},
    })}}));
    Ring::Piece piece{config.data(), config.size()};
    if (w->calls->put(proto::Kind::HELLO, 0, &piece, 1, nullptr, 0, 0))
      throw std::runtime_error("ringpool::Pool: the worker's configuration does not fit its ring");
    SpawnRequest req;
    if (!opts.zygote) {
      req.program.executable = opts.python;
      req.program.argv = {opts.python, "-c", bootstrap(opts.python_path, "_worker")};
      req.program.env = opts.env;
    }
    req.stdio = {0, 1, 2};
    // Its call ring whole (it is that ring's consumer), and of its result ring the producer side
    // only: the segment, the sending end of the handle socket and the eventfd, not the receiving
    // end (the collector's). ringpool._worker.run attaches them in this order.
    const RingHandles a = w->ring->handles(), b = w->results->handles();
    req.fds = {a.memfd, a.tx, a.rx, a.event, b.memfd, b.tx, b.event};
    Impl* self = this;
    w->proc = sup->spawn(std::move(req), [self, wid](pid_t, int code) { self->on_exit(wid, code); });
    return w;
  }

  // On the supervisor's thread: note the death and wake the collector.
  void on_exit(int wid, int code) {
    {
      std::lock_guard lk(mu);
      auto it = workers.find(wid);
      if (it != workers.end()) {
        it->second->exit_code = code;
        sched.exited(wid);
      } else {
        early_exits[wid] = code;  // it died before replenish() recorded it
      }
    }
    nudge();
  }

  void nudge() {
    // Release pairs with the collector's acquire load of the bell at the top of its round: a
    // change made under mu before the nudge is seen by the round the wake-up starts.
    bell.fetch_add(1, std::memory_order_release);
    futex::wake_private(&bell, 1);
  }

  // Starts workers until there are opts.workers open ones (mu held on entry and exit; released
  // while spawning).
  void replenish(std::unique_lock<std::mutex>& lk) {
    while (!stop && broken.empty() && sched.shortfall() > 0 && (!shutting_down || sched.outstanding() > 0)) {
      const int wid = next_wid++;
      ++spawning;
      lk.unlock();
      std::unique_ptr<Worker> w;
      std::string err;
      // A zygote killed while it serves the spawn fails it; the supervisor starts a new zygote
      // for the next request, so a few attempts ride that out (each with a fresh call ring).
      for (int attempt = 0; attempt < kSpawnAttempts && !w; ++attempt) {
        if (attempt > 0) {
          std::lock_guard relock(mu);
          if (stop) break;  // shut down meanwhile: no more attempts (shutdown waits for them)
        }
        try {
          w = launch(wid);
        } catch (const std::exception& e) {
          err = e.what();
          std::lock_guard relock(mu);
          note(LogEvent::spawn_failed, "could not start worker " + std::to_string(wid) + " (attempt " +
                                           std::to_string(attempt + 1) + " of " + std::to_string(kSpawnAttempts) +
                                           "): " + err, -1, 0, wid);
        }
      }
      lk.lock();
      --spawning;
      if (!w) {
        if (!stop && sched.open_workers() == 0) fail_everything("ringpool::Pool: could not start a worker: " + err);
        return;
      }
      ++started;
      if (started > static_cast<std::uint64_t>(opts.workers))
        note(LogEvent::worker_replaced, "worker " + std::to_string(wid) + " started (pid " +
                                            std::to_string(w->proc.pid()) + ") in place of one that ended",
             w->proc.pid(), 0, wid);
      else
        note(LogEvent::worker_started, "worker " + std::to_string(wid) + " started (pid " +
                                           std::to_string(w->proc.pid()) + ")", w->proc.pid(), 0, wid);
      sched.add_worker(wid, 1);  // its ring's first record is the start-up configuration
      if (auto e = early_exits.find(wid); e != early_exits.end()) {
        w->exit_code = e->second;
        sched.exited(wid);
        early_exits.erase(e);
      }
      Worker& added = *workers.emplace(wid, std::move(w)).first->second;
      // shutdown() asked the workers to stop while this one was starting: it is asked too (the
      // collector ends once every worker, this one included, has exited).
      if (stop) ask_to_stop(added);
      dispatch();
    }
  }

  void ask_to_stop(Worker& w) {
    try {
      if (w.violation.empty()) send(w, task_record::control_record(task::Op::STOP));
    } catch (const ProtocolError& e) {
      broke_call_ring(w, e);
    }
  }

  // The pool cannot run anything more: every task not yet answered fails with PoolClosed. Their
  // failures join the completions the collector hands over once it has released mu (a callback
  // may call into the pool); in the constructor there are none.
  void fail_everything(const std::string& why) {
    note(LogEvent::pool_broken, why);
    broken = why;
    const auto e = std::make_exception_ptr(PoolClosed(why));
    std::vector<Task> owed;
    sched.drain(owed);  // calls still out stay with the scheduler, their answers dropped
    for (Task& t : owed) completions.push_back({std::move(t), Value(), e});
    sched.forget_in_flight();
    drained.notify_all();
  }

  // -- dispatch (mu held) ------------------------------------------------------------------------
  // What the scheduler needs to know of a call to group calls into records.
  struct RecordRules {
    // b may follow a in one RUN record: both without keywords, calling the same function.
    bool joins(const Task& a, const Task& b) const {
      return a.runnable && b.runnable && a.same_function(b);
    }
    std::size_t bytes(const Task& t) const { return t.args_len; }
  };

  // Sends what the scheduler assigns: to the least busy workers, up to the depth bound.
  void dispatch() {
    std::vector<Ring::Piece>& batch = dispatch_batch;
    while (std::optional<Scheduler::Assignment> a = sched.assign(RecordRules{})) {
      Worker& w = *workers.at(a->wid);
      if (!w.violation.empty()) continue;  // its calls wait for its death, which requeues them
      const Fifo<Entry>& q = sched.sent(a->wid);
      // The new calls as records, written back to back into `wire`: consecutive calls of one
      // function travel as one RUN record (the worker decodes one record, not one per call, and
      // resolves the function once).
      std::string& wire = dispatch_wire;
      wire.clear();
      spans.clear();
      for (std::size_t i = a->first, end = a->first + a->count; i < end;) {
        std::size_t j = i;
        while (!q[j].last_of_record) ++j;
        ++j;
        const std::size_t at = wire.size();
        if (j - i == 1)
          task_record::write_call(wire, q[i].tid, q[i].task.fn_ops(), q[i].task.after_fn());
        else
          write_run(wire, q, i, j);
        spans.emplace_back(at, wire.size() - at);
        i = j;
      }
      batch.clear();
      for (const auto& [at, len] : spans) batch.push_back({wire.data() + at, len});
      // One ring critical section (and at most one wake-up) for the records that fit inline;
      // the rest (large, or the ring full) one at a time, in order.
      try {
        std::size_t done = 0;
        bool inline_only = w.unpublished.empty();
        for (const auto& p : batch) inline_only = inline_only && !w.calls->out_of_band(p.len);
        if (inline_only && !batch.empty())
          done = w.ring->try_put_many(proto::Kind::CALL, 0, batch.data(), batch.size(), 0);
        for (std::size_t i = done; i < batch.size(); ++i) send(w, batch[i]);
      } catch (const ProtocolError& e) {
        broke_call_ring(w, e);
      }
    }
  }

  // The worker's call ring refused a put (its producer lock held: only the worker can hold it).
  void broke_call_ring(Worker& w, const ProtocolError& e) {
    break_protocol(w, std::string("its call ring: ") + e.what());
    nudge();  // the collector handles its death (and requeues its calls) when the supervisor reports it
  }

  // (RUN, tid of the first, function, [args, ...], None or SINGLE) for calls[i, j), whose ids
  // follow each other.
  static void write_run(std::string& out, const Fifo<Entry>& calls, std::size_t i, std::size_t j) {
    bool single = true;
    for (std::size_t k = i; k < j; ++k) single = single && calls[k].task.nargs == 1;
    const Task& head = calls[i].task;
    task_record::begin_run(out, calls[i].tid, head.fn_ops());
    for (std::size_t k = i; k < j; ++k) {  // a 1-tuple is its item's opcodes and TUPLE1
      const Task& t = calls[k].task;
      out.append(t.body, t.args_at, t.args_len - (single ? 1 : 0));
    }
    task_record::end_run(out, single);
  }

  void send(Worker& w, const std::string& record) { send(w, Ring::Piece{record.data(), record.size()}); }
  void send(Worker& w, Ring::Piece piece) {
    if (!w.unpublished.empty()) {
      w.unpublished.push_back(w.calls->stage(proto::Kind::CALL, 0, &piece, 1, nullptr, 0));
      return;
    }
    if (auto p = w.calls->put(proto::Kind::CALL, 0, &piece, 1, nullptr, 0, 0)) w.unpublished.push_back(std::move(p));
  }

  void publish_pending() {
    for (auto& [_, w] : workers) {
      try {
        while (w->violation.empty() && !w->unpublished.empty() && w->calls->publish(*w->unpublished.front(), 0))
          w->unpublished.pop_front();
      } catch (const ProtocolError& e) {
        broke_call_ring(*w, e);
      }
    }
  }

  // -- results (collector thread, mu held) --------------------------------------------------------
  // What the collector made of one record of a worker's result ring (decoded without mu).
  struct Decoded {
    enum class Kind : std::uint8_t {
      kRecord,     // rec: a result record, to be checked against what its worker runs
      kLost,       // rec.{wid,tid,status}: a well-formed answer whose value this decoder refuses (why)
      kViolation,  // why: bytes no worker loop writes (the worker is killed)
    };
    Worker* worker;
    Kind kind;
    Result rec;
    std::string why;
  };

  // The worker broke the protocol: it is killed, its ring is read no more, and its death (once
  // the supervisor reports it) fails the call it was running with a ProtocolError saying why and
  // requeues the calls it had not started. No other worker's call is touched.
  void break_protocol(Worker& w, const std::string& why) {
    if (!w.violation.empty()) return;
    w.violation = "ringpool::Pool: worker " + std::to_string(w.wid) + " (pid " + std::to_string(w.proc.pid()) +
                  ") broke the protocol: " + why;
    w.proc.send_signal(SIGKILL);
    sched.exited(w.wid);  // no more calls go to it
    note(LogEvent::protocol_error, w.violation + "; killed" + (stop ? "" : ", replacing it"), w.proc.pid(), 0, w.wid);
  }

  // One record, checked against what its worker is running: an answer or a STARTED must name the
  // oldest call it has not answered (a worker answers in the order it was sent its calls), and
  // the record must name the worker whose ring it came through.
  void handle(Worker& w, Decoded& d) {
    Result& r = d.rec;
    if (r.wid != w.wid)
      return break_protocol(w, "a result record names worker " + std::to_string(r.wid));
    const std::optional<std::uint64_t> oldest = sched.oldest_unanswered(w.wid);
    const auto expected = [&] {
      return oldest ? "its oldest unanswered call is task " + std::to_string(*oldest) : std::string("it has no call");
    };
    if (r.status == kOk || r.status == kErr) {
      if (!oldest || (r.tid && *r.tid != *oldest))
        return break_protocol(w, "an answer for task " + (r.tid ? std::to_string(*r.tid) : std::string("None")) +
                                     ", which it is not running (" + expected() + ")");
      answered_any = true;
      std::optional<Task> t = sched.answer(w.wid, r.tid, r.elapsed, failures);
      std::exception_ptr error;
      bool malformed = false;
      if (d.kind == Decoded::Kind::kLost) {
        error = std::make_exception_ptr(PickleError("the task's result could not be decoded: " + d.why));
      } else if (r.status == kErr) {
        error = remote_error(w.wid, r.value, malformed);
      }
      if (t) completions.push_back({std::move(*t), error ? Value() : std::move(r.value), error});
      if (malformed) break_protocol(w, "a malformed error record (not (type, message, traceback) as three str)");
    } else if (r.status == kStarted) {
      if (!oldest || !r.tid || *r.tid != *oldest)
        return break_protocol(w, "reported starting task " + (r.tid ? std::to_string(*r.tid) : std::string("None")) +
                                     " (" + expected() + ")");
      if (!sched.started(w.wid, *r.tid, Clock::now()))
        return break_protocol(w, "reported starting task " + std::to_string(*r.tid) +
                                     " again (its task timeout runs from the first report)");
    } else if (r.status == kPong) {
      return break_protocol(w, "a PONG the pool never asked for");
    } else if (r.status == kInitFailed) {
      return break_protocol(w, "an initializer failure (a C++ Pool worker runs no initializer)");
    } else {
      return break_protocol(w, "a result record of unknown status " + std::to_string(r.status));
    }
    settle(-1, 0);
  }

  // The error an ERR record's value stands for: (type, message, traceback), three strs. Anything
  // else (a worker that breaks the protocol: `malformed` is set) fails the task with a
  // ProtocolError saying so.
  static std::exception_ptr remote_error(int wid, const Value& v, bool& malformed) {
    if (v.is_tuple()) {
      const auto& e = v.as_tuple();
      if (e.size() == task::error::kFields && e[task::error::kType].is_str() && e[task::error::kMessage].is_str() &&
          e[task::error::kTraceback].is_str())
        return std::make_exception_ptr(RemoteError(e[task::error::kType].as_str(), e[task::error::kMessage].as_str(),
                                                   e[task::error::kTraceback].as_str()));
    }
    malformed = true;
    const std::string got = v.is_tuple() ? "a tuple of " + std::to_string(v.as_tuple().size()) + " items"
                                         : "a " + std::string(v.type_name());
    return std::make_exception_ptr(ProtocolError("ringpool::Pool: worker " + std::to_string(wid) +
                                                 " answered this task with a malformed error record (expected "
                                                 "(type, message, traceback) as three str, got " + got +
                                                 "); the worker was killed"));
  }

  // The scheduler's failures as completions (their errors named here); pid and exit code: the
  // worker whose death they come from, and why the pool killed it if it broke the protocol.
  void settle(pid_t pid, int code, const std::string& violation = {}) {
    for (auto& f : failures) {
      std::exception_ptr e;
      switch (f.fate) {
        case detail::Fate::kLost:
          e = std::make_exception_ptr(PickleError("the task's result could not be decoded: " + f.why));
          break;
        case detail::Fate::kDied:
          if (!violation.empty())
            e = std::make_exception_ptr(ProtocolError(violation + "; it was killed while running this task"));
          else if (!f.why.empty())  // not requeued again (PoolOptions::max_requeues)
            e = std::make_exception_ptr(WorkerDied(pid, code, f.why));
          else
            e = std::make_exception_ptr(WorkerDied(pid, code));
          break;
        case detail::Fate::kTimedOut:
          e = std::make_exception_ptr(TaskTimeout(pid, opts.task_timeout));
          break;
      }
      completions.push_back({std::move(f.task), Value(), e});
    }
    failures.clear();
  }

  // The worker has exited and every result it published has been handled (or, if it broke the
  // protocol, dropped).
  // Workers exiting with an error while none has ever answered (an interpreter that cannot import
  // ringpool) break the pool instead of being replaced forever, in one of two ways:
  // - kEarlyDeaths in a row that had been sent no call. Only those count: the call ring's
  //   `consumed` is the worker's to write, so a task could exit(1) after setting it back and pass
  //   for a worker that never started (three times, and the pool was broken for everybody).
  // - A call failed at PoolOptions::max_requeues (exec workers die holding the calls sent to them
  //   at once) when the workers' interpreter, run once to import ringpool, names what is wrong. A
  //   task that kills its workers is not an interpreter fault: the diagnosis finds nothing and
  //   only that call fails.
  void died(Worker& w) {
    int code = w.exit_code.value_or(-1);
    if (auto reaped = w.proc.poll()) code = *reaped;
    const std::size_t failed_before = failures.size();
    const Scheduler::Death d = sched.died(w.wid, w.ring->consumed(), failures);
    // (With max_requeues 0 nothing else would stop exec workers dying with calls: the count is
    // taken as it was, foolable as it is.)
    const bool early =
        code > 0 && !answered_any && (!d.held_calls || (opts.max_requeues == 0 && w.ring->consumed() <= 1));
    log_end(w, code, failures.size() - failed_before);
    std::string diagnosis;
    if (d.given_up && code > 0 && !answered_any && broken.empty()) diagnosis = diagnose_interpreter(opts);
    if (!diagnosis.empty()) {
      // The calls it gave up on fail with the pool's reason, not as a task's fault.
      const std::string why = "ringpool::Pool: workers exited (the last: " + describe_exit(code) +
                              ") before any worker answered a task: " + diagnosis;
      const auto e = std::make_exception_ptr(PoolClosed(why));
      for (std::size_t i = failed_before; i < failures.size(); ++i)
        if (failures[i].fate == detail::Fate::kDied && !failures[i].why.empty())
          completions.push_back({std::move(failures[i].task), Value(), e});
      std::erase_if(failures, [](const Scheduler::Failure& f) { return f.fate == detail::Fate::kDied && !f.why.empty(); });
      settle(w.proc.pid(), code, w.violation);
      workers.erase(w.wid);
      fail_everything(why);
      return;
    }
    settle(w.proc.pid(), code, w.violation);
    workers.erase(w.wid);
    early_deaths = early ? early_deaths + 1 : 0;
    if (early_deaths >= kEarlyDeaths && broken.empty()) {
      std::string why = diagnose_interpreter(opts);
      if (why.empty()) why = "see their error output";
      fail_everything("ringpool::Pool: " + std::to_string(early_deaths) + " workers in a row exited (the last: " +
                      describe_exit(code) + ") before taking a task: " + why);
    }
  }

  // The log entry for a worker that has ended (died(); mu held). lost: its tasks that fail with it.
  void log_end(const Worker& w, int code, std::size_t lost) {
    const pid_t pid = w.proc.pid();
    const std::string who = "worker " + std::to_string(w.wid) + " (pid " + std::to_string(pid) + ")";
    if (w.timed_out || !w.violation.empty()) return;  // logged when it was killed
    if (stop && code == 0) {
      note(LogEvent::worker_stopped, who + " stopped", pid, code, w.wid);
    } else if (code == 0 && opts.max_tasks_per_child > 0) {
      note(LogEvent::worker_recycled, who + " exited after max_tasks_per_child=" +
                                          std::to_string(opts.max_tasks_per_child) + " tasks; replacing it",
           pid, code, w.wid);
    } else {
      std::string m = who + " died (" + describe_exit(code) + ")";
      if (lost) m += " while running " + std::to_string(lost) + " task(s), failed with WorkerDied";
      if (!stop) m += "; replacing it";
      note(LogEvent::worker_died, std::move(m), pid, code, w.wid);
    }
  }

  // One record's bytes (inline, or a private copy of its out-of-band block) as a result.
  static Decoded decode_record(Worker* w, std::string_view bytes, std::string& scratch) {
    try {
      if (std::optional<Result> r = read_result(bytes, scratch)) return {w, Decoded::Kind::kRecord, std::move(*r), {}};
      return {w, Decoded::Kind::kRecord, result_from(pickle_loads(bytes)), {}};
    } catch (const std::exception& e) {
      const std::string why = *e.what() ? e.what() : "unknown error";
      // A worker's answer whose value the codec refuses (PickleLimits: a result sharing one large
      // object many times) is that task's failure; anything else is no worker loop's record.
      if (std::optional<task_record::Envelope> env = read_envelope(bytes);
          env && (env->fields.status == kOk || env->fields.status == kErr))
        return {w, Decoded::Kind::kLost, std::move(env->fields), why};
      return {w, Decoded::Kind::kViolation, {}, "a result record that does not decode (" + why + ")"};
    }
  }

  // Takes what one worker's ring holds (up to a batch) and decodes it, appending to `out`; true
  // if the process is out of descriptors for a record's block (it stays queued). Without mu.
  bool take_results(Worker* w, ResultSink& sink, std::vector<UniqueFd>& fds, std::string& scratch, std::string& oob,
                    std::vector<Decoded>& out) {
    sink.clear();
    fds.clear();
    bool out_of_fds = false;
    std::string ring_error;
    try {
      w->results->try_get_many(sink, task::kResultBatch, fds);
    } catch (const SysError& e) {
      // This process has no descriptor free for a result's block: the record stays queued
      // (Channel peeks its handles before taking it); wait for descriptors, lose nothing.
      out_of_fds = e.code().value() == EMFILE || e.code().value() == ENFILE;
      if (!out_of_fds) ring_error = e.what();
    } catch (const std::exception& e) {
      ring_error = e.what();  // a corrupt record, its handles missing, the consumer lock taken
    }
    // The frames taken before any error come first: they are the worker's earlier answers.
    ReceivedFds received(fds);
    for (auto& fr : sink.frames) {
      try {
        const auto* payload = reinterpret_cast<const std::uint8_t*>(sink.payload(fr).data());
        if (fr.header.kind != static_cast<std::uint8_t>(proto::Kind::DATA))
          throw ProtocolError("a frame of kind " + std::to_string(fr.header.kind) + " on its result ring");
        if (fr.header.flags & ~proto::flag::kOutOfBand)
          throw ProtocolError("a result frame with unexpected flags");
        std::uint64_t length = 0;
        if (fr.header.flags & proto::flag::kOutOfBand) {
          length = Channel::oob_length(fr.header, payload);
          if (length > opts.max_result_bytes)
            throw ProtocolError("a result of " + std::to_string(length) + " bytes (PoolOptions::max_result_bytes: " +
                                std::to_string(opts.max_result_bytes) + ")");
        }
        FrameHandles handles = received.next(fr.header, length);  // a block unsealed or short: ProtocolError
        if (!handles.fds.empty()) throw ProtocolError("a result frame with descriptors");
        if (handles.oob) {
          // The worker can still write the block: decode a private copy (security.md, "Shared
          // memory from another process"). Copied, the block goes back to the worker at once.
          const std::string_view v = handles.oob->view();
          oob.assign(v.data(), v.size());
          handles.oob.reset();
          out.push_back(decode_record(w, oob, scratch));
        } else {
          out.push_back(decode_record(w, sink.payload(fr), scratch));
        }
      } catch (const std::exception& e) {
        out.push_back({w, Decoded::Kind::kViolation, {}, e.what()});
      }
      if (out.back().kind == Decoded::Kind::kViolation) return out_of_fds;  // the rest is not read
    }
    if (!ring_error.empty()) out.push_back({w, Decoded::Kind::kViolation, {}, "its result ring: " + ring_error});
    return out_of_fds;
  }

  void collect() {
    // The collector is the only consumer of every worker's result ring. A round takes up to a
    // batch from each ring (in wid order) and decodes without mu, then handles under mu; with
    // nothing taken it spins briefly over all rings, then sleeps on all of them at once
    // (Ring::wait_data_any) and on the bell; with a few taken while every worker is deep in
    // queued calls, it sleeps a little before the next round (gathering, below).
    std::vector<UniqueFd> fds;
    ResultSink sink;
    std::string scratch;
    std::string oob;  // an out-of-band result, copied out of the worker's block (kept: no realloc)
    std::vector<Decoded> decoded;
    std::vector<Completion> ready;
    std::vector<Worker*> inboxes;  // workers whose rings are read: mu's `workers`, collector-owned
    std::vector<Ring*> rings;      // and their rings, for the wait
    {
      std::lock_guard lk(mu);
      for (auto& [_, w] : workers) {
        inboxes.push_back(w.get());
        rings.push_back(w->results.get());
      }
    }
    const WaitPolicy& policy = WaitPolicy::standard();
    std::vector<LogRecord> log_ready;
    // Gives the answers of a round (`ready`, taken from `completions` under mu) to their futures,
    // callbacks and batches, with mu released.
    auto hand_over = [&] {
      if (ready.empty()) return;
      // In groups of kCompleteGroup, each fulfilled last to first: a service thread waiting on
      // these futures in order (the usual loop over a vector of futures) is then woken once per
      // group, by its first future, and finds the rest ready, instead of sleeping on every one
      // (a futex wait and wake, and a context switch, per task). A task waits at most a group's
      // completion time (~20 us) longer.
      for (std::size_t g = 0; g < ready.size(); g += kCompleteGroup) {
        for (std::size_t i = std::min(ready.size(), g + kCompleteGroup); i-- > g;) {
          Completion& c = ready[i];
          if (c.error)
            c.task.fail(c.error);
          else
            c.task.ok(std::move(c.value));
        }
      }
      ready.clear();
      std::lock_guard relock(mu);
      completing = 0;
      if (sched.outstanding() == 0) drained.notify_all();
    };
    for (;;) {
      // Acquire pairs with nudge()'s release: what was changed before a nudge is seen below.
      const std::uint32_t bell_seen = bell.load(std::memory_order_acquire);
      decoded.clear();
      bool out_of_fds = false;
      // Workers are added and erased by this thread only (replenish, died), so the pointers in
      // inboxes stay valid until it rebuilds the list, under mu, below.
      // (An empty ring is passed over without its consumer lock: two loads instead of a lock and
      // unlock on a line the worker also writes.)
      for (Worker* w : inboxes)
        if (w->results->readable()) out_of_fds |= take_results(w, sink, fds, scratch, oob, decoded);
      const std::size_t n = decoded.size();
      std::unique_lock lk(mu);
      if (out_of_fds) {
        if (!out_of_fds_logged)
          note(LogEvent::fd_exhausted, "no file descriptor free to receive a result (RLIMIT_NOFILE?); it stays "
                                       "queued and is taken again every " + std::to_string(kFdRetry.count()) + " ms");
        out_of_fds_logged = true;
        ++fd_retries;
      } else if (out_of_fds_logged && n > 0) {
        note(LogEvent::fd_recovered, "file descriptors are available again; results are received after " +
                                         std::to_string(fd_retries) + " retries");
        out_of_fds_logged = false;
        fd_retries = 0;
      }
      for (auto& d : decoded) {
        Worker& w = *d.worker;
        if (!w.violation.empty()) continue;  // killed for an earlier record: the rest is void
        if (d.kind == Decoded::Kind::kViolation)
          break_protocol(w, d.why);
        else
          handle(w, d);
      }
      // Deaths: handled once the worker's ring holds nothing more to read (or is not read).
      std::vector<Worker*> dead;
      for (auto& [_, w] : workers)
        if (w->exit_code && (!w->violation.empty() || !w->results->readable())) dead.push_back(w.get());
      for (Worker* w : dead) died(*w);
      // Timeouts.
      const auto now = Clock::now();
      wids.clear();
      const auto next_deadline = sched.expire(now, wids);
      for (int wid : wids) {
        Worker& w = *workers.at(wid);
        w.proc.send_signal(SIGKILL);
        w.timed_out = true;
        note(LogEvent::worker_timed_out, "worker " + std::to_string(wid) + " (pid " + std::to_string(w.proc.pid()) +
                                             ") killed: its task ran longer than task_timeout (" +
                                             std::to_string(opts.task_timeout.count()) + " ms); replacing it",
             w.proc.pid(), 0, wid);
      }
      // A pool idle for a second gives back the queue memory a burst of tasks grew (not at once:
      // back-to-back bursts would grow it again every time).
      if (sched.outstanding() > 0 || completing > 0) {
        idle_since = now;
      } else if (now - idle_since > kTrimAfter) {
        sched.trim();
        std::string().swap(oob);  // the copy of a large result (beyond the ring's inline limit)
      }
      sched.retune();
      if (sched.shortfall() > 0) replenish(lk);
      dispatch();
      publish_pending();
      ready.swap(completions);  // both empty before: completions keeps ready's old capacity
      completing = ready.size();
      if (sched.outstanding() == 0 && completing == 0) drained.notify_all();
      // Gather: with a few records taken and every worker deep in queued calls (short tasks, a
      // full backlog), the next round waits for a batch rather than taking results one or two at
      // a time. Rounds that small cost the collector a round's bookkeeping per result, and on a
      // machine with idle cores it polls the rings as fast as the workers fill them, taking CPU
      // the workers need. The workers do not run dry meanwhile (kGatherQueued calls at the
      // ~0.8 us a no-op call costs a worker take about twice the ~100 us the sleep lasts, and
      // the depth bound is that deep only for calls under ~5 us), and they publish without a
      // wake-up: the collector is not registered as a waiter on their rings. Latency is not at
      // stake: a call that waits behind hundreds of others waits longer for its turn than for
      // this. (n counts STARTED records too, which a task_timeout adds one per call.)
      const bool gather = n > 0 && n < kGatherBelow && !stop && sched.least_unanswered() >= kGatherQueued;
      log_ready.swap(logs);
      if (stop && workers.empty()) {
        lk.unlock();
        emit_logs(log_ready);
        hand_over();  // this round's answers and failures (the pool broke as it stopped)
        return;
      }
      bool retry_publish = false;
      inboxes.clear();
      rings.clear();
      for (auto& [_, w] : workers) {
        retry_publish |= !w->unpublished.empty();
        if (!w->violation.empty()) continue;
        inboxes.push_back(w.get());
        rings.push_back(w->results.get());
      }
      lk.unlock();
      emit_logs(log_ready);
      hand_over();
      if (out_of_fds) {
        std::this_thread::sleep_for(kFdRetry);  // the ring stays readable: no wait would block
      } else if (gather) {
        std::this_thread::sleep_for(kGatherWait);
      } else if (n == 0) {
        auto wait = std::chrono::nanoseconds(retry_publish ? 1'000'000 : 100'000'000);
        if (next_deadline != Clock::time_point::max())
          wait = std::min<std::chrono::nanoseconds>(wait, next_deadline - Clock::now());
        // Polls a little first (a futex wake-up costs tens of microseconds on these VMs), then
        // sleeps on every ring and the bell at once.
        const std::int64_t deadline = deadline_after(std::max<std::int64_t>(wait.count(), 0));
        auto any_ready = [&] {
          if (bell.load(std::memory_order_acquire) != bell_seen) return true;
          for (Ring* r : rings)
            if (r->readable()) return true;
          return false;
        };
        auto sleep = [&](std::int64_t ns) { Ring::wait_data_any(rings.data(), rings.size(), &bell, bell_seen, ns); };
        wait_round(policy, deadline, any_ready, sleep);
      }
    }
  }

  // -- the service's side ------------------------------------------------------------------------
  void submit_task(Task t) {
    std::lock_guard lk(mu);
    if (shutting_down) throw PoolClosed("ringpool::Pool: submit after shutdown");
    if (!broken.empty()) throw PoolClosed(broken);
    sched.submit(std::move(t));
    dispatch();
  }

  // map()'s calls, in order, under one lock (all or none are taken).
  void submit_tasks(std::vector<Task>& ts) {
    std::lock_guard lk(mu);
    if (shutting_down) throw PoolClosed("ringpool::Pool: submit after shutdown");
    if (!broken.empty()) throw PoolClosed(broken);
    sched.reserve(ts.size());
    for (Task& t : ts) sched.submit(std::move(t));
    dispatch();
  }

  // The opcodes of a function's name (a map's: once for all its calls).
  static std::string function_ops(std::string function) {
    std::string ops;
    pickle_dump_ops(ops, Value(std::move(function)));
    return ops;
  }

  // t.body: the opcodes of function (none for a map's call: its Batch has them), args and kwargs
  // (or None), written without building them into one Value; the rest of the record is written
  // around them when t is sent.
  static void encode_call(Task& t, std::optional<std::string> function, std::span<const Value> args,
                          std::vector<std::pair<std::string, Value>> kwargs) {
    std::string& out = t.body;
    // A map's call grows its body as needed: a short one stays in the inline buffer.
    if (function) out.reserve(16 + function->size() + 12 * args.size());
    if (function) pickle_dump_ops(out, Value(std::move(*function)));
    const std::size_t args_at = out.size();
    t.nargs = static_cast<std::uint32_t>(args.size());
    detail::pickle_dump_tuple_ops(out, args);
    const std::size_t args_end = out.size();
    if (kwargs.empty()) {
      out += 'N';
    } else {
      Value::Dict kw;
      for (auto& [k, v] : kwargs) kw.emplace_back(Value(std::move(k)), std::move(v));
      pickle_dump_ops(out, Value::dict(std::move(kw)));
    }
    // Offsets in 32 bits: a call too large for them is never part of a run.
    t.runnable = kwargs.empty() && out.size() <= std::numeric_limits<std::uint32_t>::max();
    t.args_at = static_cast<std::uint32_t>(args_at);
    t.args_len = static_cast<std::uint32_t>(args_end - args_at);
  }

  // Any thread, any number of times, concurrently too: the first call that gets past the wait for
  // the tasks stops the workers and joins the collector; the others (and later calls) return once
  // it has. A shutdown(false) during a shutdown(true)'s wait fails what is left, ending that wait.
  void shutdown(bool wait) {
    std::unique_lock lk(mu);
    shutting_down = true;
    if (!wait && !stop) {
      std::vector<Task> owed;
      sched.drain(owed);  // calls still out stay with the scheduler, their answers dropped
      lk.unlock();
      // Outside mu: a callback may call into the pool (and gets PoolClosed).
      const auto e = std::make_exception_ptr(PoolClosed("ringpool::Pool: shut down"));
      for (Task& t : owed) t.fail(e);
      lk.lock();
    }
    // Every answer handed over, including any still in `completions` (the collector releases mu
    // between handling answers and handing them over, to start a replacement worker).
    drained.wait(lk, [&] {
      return (sched.outstanding() == 0 && completing == 0 && completions.empty()) || !broken.empty();
    });
    if (stop) {
      closed.wait(lk, [&] { return finished; });
      return;
    }
    // Ask every worker to stop; the collector handles their exits and ends with the last. (One
    // being started now is asked by replenish() once it is in `workers`.)
    for (auto& [_, w] : workers) ask_to_stop(*w);
    stop = true;
    lk.unlock();
    nudge();
    // Workers that do not stop within kStopGrace seconds are killed.
    const auto deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(task::kStopGrace));
    for (;;) {
      {
        std::lock_guard g(mu);
        if (workers.empty() && spawning == 0) break;
        if (Clock::now() > deadline)
          for (auto& [_, w] : workers) w->proc.send_signal(SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (collector.joinable()) collector.join();
    sup->stop();
    lk.lock();
    finished = true;
    closed.notify_all();
  }
};

Pool::Pool(PoolOptions options) : impl_(std::make_shared<Impl>(std::move(options))) {
  Impl& im = *impl_;
  try {
    if (im.opts.zygote) im.sup->start();  // the preload's error surfaces here
    std::unique_lock lk(im.mu);
    im.replenish(lk);
    std::vector<LogRecord> started;
    started.swap(im.logs);
    lk.unlock();
    im.emit_logs(started);
    lk.lock();
    if (!im.broken.empty()) throw PoolClosed(im.broken);
  } catch (const std::exception& e) {
    // A start that failed because the interpreter cannot run ringpool at all gets an error that
    // says so (the failure itself only names an exit code).
    const std::string why = diagnose_interpreter(im.opts);
    if (!why.empty()) throw PoolClosed("ringpool::Pool: " + why + " (the start failed with: " + e.what() + ")");
    throw;
  }
  im.collector = std::thread([&im] { im.collect(); });
}

Pool::~Pool() {
  try {
    shutdown(true);
  } catch (...) {
  }
  impl_->sup.reset();  // joins the supervisor's thread before the rest goes
}

std::future<Value> Pool::submit(std::string function, std::vector<Value> args,
                                std::vector<std::pair<std::string, Value>> kwargs) {
  Impl::Task t;
  Impl::encode_call(t, std::move(function), args, std::move(kwargs));
  auto fut = t.sink.emplace<std::promise<Value>>().get_future();
  impl_->submit_task(std::move(t));
  return fut;
}

std::future<std::vector<Value>> Pool::map(std::string function, std::vector<std::vector<Value>> calls) {
  if (calls.empty()) {
    std::promise<std::vector<Value>> none;
    none.set_value({});
    return none.get_future();
  }
  // Encoded first (a PickleError leaves nothing submitted); the batch is made last, once every
  // call is encoded, and owned by the tasks from then on. `calls` is freed on return, once the
  // workers have their first calls.
  std::string fn = Impl::function_ops(std::move(function));
  std::vector<Impl::Task> ts(calls.size());
  for (std::size_t i = 0; i < calls.size(); ++i) Impl::encode_call(ts[i], std::nullopt, calls[i], {});
  auto* batch = new Impl::Batch(ts.size(), std::move(fn));
  auto fut = batch->done.get_future();
  for (std::size_t i = 0; i < ts.size(); ++i) ts[i].sink.emplace<Impl::Slot>(batch, i);
  impl_->submit_tasks(ts);  // on a throw the tasks' slots fail the batch (its future is dropped)
  return fut;
}

void Pool::async_submit(std::string function, std::vector<Value> args,
                        std::vector<std::pair<std::string, Value>> kwargs, Callback done) {
  Impl::Task t;
  Impl::encode_call(t, std::move(function), args, std::move(kwargs));
  t.sink = std::move(done);
  impl_->submit_task(std::move(t));
}

std::future<std::string> Pool::submit_raw(std::string function, std::string payload) {
  Impl::Task t;
  std::vector<Value> args;
  args.push_back(Value::bytes(std::move(payload)));
  Impl::encode_call(t, std::move(function), args, {});
  auto fut = t.sink.emplace<std::promise<std::string>>().get_future();
  impl_->submit_task(std::move(t));
  return fut;
}

void Pool::shutdown(bool wait) { impl_->shutdown(wait); }

std::vector<pid_t> Pool::worker_pids() {
  std::lock_guard lk(impl_->mu);
  std::vector<pid_t> v;
  for (auto& [_, w] : impl_->workers)
    if (!w->exit_code) v.push_back(w->proc.pid());
  return v;
}

pid_t Pool::zygote_pid() { return impl_->sup ? impl_->sup->zygote_pid() : -1; }

std::uint64_t Pool::workers_started() {
  std::lock_guard lk(impl_->mu);
  return impl_->started;
}

}  // namespace ringpool
