#include "ringpool/pool.hpp"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <variant>

#include "ringpool/block.hpp"
#include "ringpool/channel.hpp"
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

TaskTimeout::TaskTimeout(pid_t pid, std::chrono::milliseconds timeout)
    : std::runtime_error("task ran longer than " + std::to_string(timeout.count()) +
                         " ms; ringpool killed its worker (pid " + std::to_string(pid) + ")"),
      pid_(pid) {}

// -- the pool ----------------------------------------------------------------------------------

namespace {

// The records, their kinds and limits are proto/.../task.hpp's (shared with ringpool.executor
// through _core.task); their bytes are written and read by task_record.hpp.
namespace task = proto::task;
using task_record::Result;
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

// A first-in first-out queue in one circular buffer that doubles when full. Tasks pass through
// the backlog and a worker's queue at hundreds of thousands a second; std::deque allocates and
// frees a node every few of them, and those frees (from another thread than the allocations)
// kept glibc consolidating its free lists. This allocates only to grow; trim() gives a large
// buffer back once a burst is over. T is default-constructible and movable; a slot keeps its
// moved-from element until it is reused or cleared.
template <class T>
class Fifo {
 public:
  bool empty() const noexcept { return size_ == 0; }
  std::size_t size() const noexcept { return size_; }
  T& operator[](std::size_t i) noexcept { return slots_[(head_ + i) & (slots_.size() - 1)]; }
  const T& operator[](std::size_t i) const noexcept { return slots_[(head_ + i) & (slots_.size() - 1)]; }
  T& front() noexcept { return (*this)[0]; }
  T& back() noexcept { return (*this)[size_ - 1]; }
  void push_back(T&& v) {
    if (size_ == slots_.size()) grow();
    (*this)[size_] = std::move(v);
    ++size_;
  }
  void push_front(T&& v) {
    if (size_ == slots_.size()) grow();
    head_ = (head_ + slots_.size() - 1) & (slots_.size() - 1);
    slots_[head_] = std::move(v);
    ++size_;
  }
  T take_front() {
    T v = std::move(front());
    head_ = (head_ + 1) & (slots_.size() - 1);
    --size_;
    return v;
  }
  void clear() {
    for (std::size_t i = 0; i < size_; ++i) (*this)[i] = T();
    head_ = size_ = 0;
  }
  // Gives the buffer back if the queue is empty and holds more than kKeep slots (after a burst).
  void trim() {
    if (size_ == 0 && slots_.size() > kKeep) std::vector<T>().swap(slots_);
    head_ = 0;
  }

 private:
  static constexpr std::size_t kKeep = std::size_t{1} << 16;
  void grow() {
    std::vector<T> bigger(std::max<std::size_t>(16, slots_.size() * 2));
    for (std::size_t i = 0; i < size_; ++i) bigger[i] = std::move((*this)[i]);
    slots_.swap(bigger);
    head_ = 0;
  }
  std::vector<T> slots_;  // a power of two in size
  std::size_t head_ = 0, size_ = 0;
};

// "import sys; sys.path[:0] = [...]; from ringpool.<module> import main; main()"
std::string bootstrap(const std::vector<std::string>& path, const char* module) {
  Value::List items;
  for (const auto& p : path) items.emplace_back(p);
  return "import sys; sys.path[:0] = " + Value::list(std::move(items)).repr() + "; from ringpool." + module +
         " import main; main()";
}

Value str_list(const std::vector<std::string>& v) {
  Value::List items;
  for (const auto& s : v) items.emplace_back(s);
  return Value::list(std::move(items));
}

// A package's .py sources, read here and installed in the workers from memory.
Value read_package(const std::string& name, const std::string& folder) {
  namespace fs = std::filesystem;
  const fs::path root = fs::canonical(folder);
  if (!fs::exists(root / "__init__.py"))
    throw std::invalid_argument("ringpool::Pool: package " + name + ": no __init__.py in " + root.string());
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
  // A task and where its outcome goes: a future's promise (submit), a promise of bytes
  // (submit_raw) or a callback (async_submit). A task lives in the backlog until it is sent, then
  // in its worker's `sent` queue until answered, so an answer finds it at the front of that queue
  // (no lookup by id). Nothing (monostate): a ping, or a task already failed while its call is
  // still out (shutdown without waiting): its answer is taken and dropped.
  struct Task {
    // Its id on the wire, given when it is sent (0: a ping, or not sent yet): ids run in the
    // order calls are sent, whichever thread submitted them, so that any calls sent together
    // can share a RUN record.
    std::uint64_t tid = 0;
    // The opcodes of its function, argument tuple and keyword dict (or None), back to back: the
    // record it travels in (a call of its own or a run) is written around them when it is sent.
    std::string body;
    // The argument tuple's place in body (the function comes first), its length, and whether
    // the call may join a run.
    std::uint32_t args_at = 0, args_len = 0, nargs = 0;
    bool runnable = false;        // no keyword arguments
    bool alone = false;           // sent as a call of its own (its run did not unpickle)
    bool last_of_record = true;   // the last call of the record that carried it
    std::variant<std::monostate, std::promise<Value>, std::promise<std::string>, Callback> sink;

    bool pending() const noexcept { return sink.index() != 0; }

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
      }
    }
    void fail(std::exception_ptr e) {
      if (auto* p = std::get_if<std::promise<Value>>(&sink))
        p->set_exception(e);
      else if (auto* r = std::get_if<std::promise<std::string>>(&sink))
        r->set_exception(e);
      else if (auto* c = std::get_if<Callback>(&sink))
        (*c)(e, Value());
    }
  };

  struct Worker {
    int wid = 0;
    ChildProcess proc;
    std::shared_ptr<Ring> ring;
    std::unique_ptr<Channel> calls;
    Fifo<Task> sent;                  // unanswered calls, in order (tid 0: a ping)
    std::uint64_t answered = 1;       // records answered; the start-up config counts as one
    std::optional<std::size_t> budget;
    bool retiring = false;
    std::deque<std::unique_ptr<Pending>> unpublished;
    std::optional<std::pair<std::uint64_t, Clock::time_point>> running;
    std::uint64_t timed_out = 0;
    std::optional<int> exit_code;     // from the supervisor
    std::optional<std::uint64_t> death_barrier;  // result records to take before handling the death
  };

  PoolOptions opts;
  std::unique_ptr<Supervisor> sup;
  std::shared_ptr<Ring> results;
  Value packages;  // list of package dicts, sent to every worker

  std::mutex mu;
  std::condition_variable drained;
  std::map<int, std::unique_ptr<Worker>> workers;
  Fifo<Task> backlog;             // submitted, not yet sent to a worker
  std::size_t outstanding = 0;   // tasks not yet answered or failed (backlog and in flight)
  std::uint64_t next_tid = 1;
  int next_wid = 1;
  std::uint64_t started = 0;
  double avg = 1e-4;
  std::size_t depth = task::kMinDepth;
  std::deque<std::string> lost;  // decode errors not yet matched to their task
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
  // Calls travel in RUN records unless max_tasks_per_child is set (a worker then counts exactly
  // the calls it was sent, one record each, as ringpool.Executor does).
  bool runs_allowed = true;
  std::size_t completing = 0;    // being handed over (shutdown waits for them too)
  Clock::time_point idle_since = Clock::now();  // when the last task was answered
  std::map<int, int> early_exits;  // exits of workers not yet recorded
  bool shutting_down = false;
  std::string broken;            // why no worker can run, once that is so
  bool stop = false;
  std::thread collector;

  explicit Impl(PoolOptions o) : opts(std::move(o)) {
    if (opts.workers <= 0) throw std::invalid_argument("ringpool::Pool: workers must be > 0");
    runs_allowed = opts.max_tasks_per_child == 0;
    if (opts.env.empty())
      for (char** e = environ; e && *e; ++e) opts.env.emplace_back(*e);
    if (!opts.bundle.empty() && !std::filesystem::is_regular_file(opts.bundle))
      throw std::invalid_argument("ringpool::Pool: no bundle file at " + opts.bundle);
    Value::List pk;
    for (const auto& [name, folder] : opts.packages) pk.push_back(read_package(name, folder));
    packages = Value::list(std::move(pk));
    results = Ring::create(RingOptions{task::kResultCapacity, 0, false});
    if (opts.zygote) {
      ZygoteOptions z;
      z.launch.executable = opts.python;
      z.launch.argv = {opts.python, "-c", bootstrap(opts.python_path, "_zygote")};
      z.launch.env = opts.env;
      // The packages go to the zygote too: preload may name them, and its workers inherit them.
      z.config = pickle_dumps(Value::dict({{Value("preload"), str_list(opts.preload)},
                                           {Value("main"), Value::dict()},
                                           {Value("packages"), packages},
                                           {Value("bundle_file"), bundle_file()}}));
      z.ready_timeout = opts.start_timeout;
      z.spares = std::min(opts.workers, 4);
      sup = Supervisor::zygote_mode(std::move(z));
    } else {
      if (!opts.preload.empty()) throw std::invalid_argument("ringpool::Pool: preload needs the zygote");
      sup = Supervisor::exec_mode();
    }
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
    w->calls = std::make_unique<Channel>(w->ring);
    if (opts.max_tasks_per_child) w->budget = opts.max_tasks_per_child;
    Value max_tasks = opts.max_tasks_per_child ? Value(static_cast<std::int64_t>(opts.max_tasks_per_child)) : Value();
    const std::string config = pickle_dumps(Value::dict({{Value("ringpool_pool"), Value::dict({
        {Value("wid"), Value(wid)},
        {Value("max_tasks"), max_tasks},
        {Value("report_start"), Value(opts.task_timeout.count() > 0)},
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
    const RingHandles a = w->ring->handles(), b = results->handles();
    req.fds = {a.memfd, a.tx, a.rx, a.event, b.memfd, b.tx, b.rx, b.event};
    Impl* self = this;
    w->proc = sup->spawn(std::move(req), [self, wid](pid_t, int code) { self->on_exit(wid, code); });
    return w;
  }

  // On the supervisor's thread: note the death and wake the collector.
  void on_exit(int wid, int code) {
    {
      std::lock_guard lk(mu);
      auto it = workers.find(wid);
      if (it != workers.end())
        it->second->exit_code = code;
      else
        early_exits[wid] = code;  // it died before replenish() recorded it
    }
    nudge();
  }

  void nudge() {
    // An empty HEARTBEAT frame wakes the collector; if the ring is full it is awake anyway.
    static const char nothing = 0;
    Ring::Piece none{&nothing, 0};
    results->try_put(proto::Kind::HEARTBEAT, 0, &none, 1, nullptr, 0, 0);
  }

  std::size_t open_workers() const {
    std::size_t n = 0;
    for (auto& [_, w] : workers) n += !w->retiring;
    return n;
  }

  // Starts workers until there are opts.workers open ones (mu held on entry and exit; released
  // while spawning).
  void replenish(std::unique_lock<std::mutex>& lk) {
    while (!stop && broken.empty() && open_workers() < static_cast<std::size_t>(opts.workers) &&
           (!shutting_down || outstanding > 0)) {
      const int wid = next_wid++;
      lk.unlock();
      std::unique_ptr<Worker> w;
      std::string err;
      // A zygote killed while it serves the spawn fails it; the supervisor starts a new zygote
      // for the next request, so a few attempts ride that out (each with a fresh call ring).
      for (int attempt = 0; attempt < kSpawnAttempts && !w; ++attempt) {
        try {
          w = launch(wid);
        } catch (const std::exception& e) {
          err = e.what();
        }
      }
      lk.lock();
      if (!w) {
        if (open_workers() == 0) fail_everything("ringpool::Pool: could not start a worker: " + err);
        return;
      }
      ++started;
      if (auto e = early_exits.find(wid); e != early_exits.end()) {
        w->exit_code = e->second;
        early_exits.erase(e);
      }
      workers.emplace(wid, std::move(w));
      dispatch();
    }
  }

  void fail_everything(const std::string& why) {
    broken = why;
    fail_all(std::make_exception_ptr(PoolClosed(why)));
    for (auto& [_, w] : workers) w->sent.clear();
    drained.notify_all();
  }

  // Fails every task not yet answered; calls still out stay in `sent`, answered by nothing.
  void fail_all(std::exception_ptr e) {
    for (std::size_t i = 0; i < backlog.size(); ++i) backlog[i].fail(e);
    backlog.clear();
    for (auto& [_, w] : workers)
      for (std::size_t i = 0; i < w->sent.size(); ++i) {
        w->sent[i].fail(e);
        w->sent[i].sink = std::monostate{};
      }
    outstanding = 0;
  }

  // -- dispatch (mu held) ------------------------------------------------------------------------
  Worker* least_busy() {
    Worker* best = nullptr;
    for (auto& [_, w] : workers)
      if (!w->retiring && !w->exit_code && (!best || w->sent.size() < best->sent.size())) best = w.get();
    return best;
  }

  void dispatch() {
    std::vector<Ring::Piece>& batch = dispatch_batch;
    while (!backlog.empty()) {
      Worker* w = least_busy();
      if (!w || w->sent.size() >= depth) return;
      std::size_t room = depth - w->sent.size();
      if (w->budget) room = std::min(room, *w->budget);
      const std::size_t first = w->sent.size();
      while (room-- > 0 && !backlog.empty()) {
        w->sent.push_back(backlog.take_front());
        if (w->budget && --*w->budget == 0) {
          w->retiring = true;
          break;
        }
      }
      // The new calls as records, written back to back into `wire`: consecutive calls of one
      // function travel as one RUN record (the worker decodes one record, not one per call, and
      // resolves the function once).
      std::string& wire = dispatch_wire;
      wire.clear();
      spans.clear();
      for (std::size_t i = first; i < w->sent.size();) {
        std::size_t j = i + 1, bytes = w->sent[i].args_len;
        while (j < w->sent.size() && j - i < task::kMaxRunCalls && joins_run(w->sent[j - 1], w->sent[j]) &&
               bytes + w->sent[j].args_len <= task::kMaxRunBytes)
          bytes += w->sent[j++].args_len;
        const std::size_t at = wire.size();
        for (std::size_t k = i; k < j; ++k) {
          w->sent[k].tid = next_tid++;
          w->sent[k].last_of_record = k + 1 == j;
        }
        if (j - i == 1)
          write_call(wire, w->sent[i]);
        else
          write_run(wire, w->sent, i, j);
        spans.emplace_back(at, wire.size() - at);
        i = j;
      }
      batch.clear();
      for (const auto& [at, len] : spans) batch.push_back({wire.data() + at, len});
      // One ring critical section (and at most one wake-up) for the records that fit inline;
      // the rest (large, or the ring full) one at a time, in order.
      std::size_t done = 0;
      bool inline_only = w->unpublished.empty();
      for (const auto& p : batch) inline_only = inline_only && !w->calls->out_of_band(p.len);
      if (inline_only && !batch.empty())
        done = w->ring->try_put_many(proto::Kind::CALL, 0, batch.data(), batch.size(), 0);
      for (std::size_t i = done; i < batch.size(); ++i) send(*w, batch[i]);
    }
  }

  // b may follow a in one RUN record.
  bool joins_run(const Task& a, const Task& b) const {
    return runs_allowed && a.runnable && b.runnable && !a.alone && !b.alone &&
           std::string_view(a.body).substr(0, a.args_at) == std::string_view(b.body).substr(0, b.args_at);
  }

  // (CALL, tid, function, args, kwargs or None)
  static void write_call(std::string& out, const Task& t) { task_record::write_call(out, t.tid, t.body); }

  // (RUN, tid of the first, function, [args, ...], None or SINGLE) for calls[i, j), whose ids
  // follow each other.
  static void write_run(std::string& out, const Fifo<Task>& calls, std::size_t i, std::size_t j) {
    bool single = true;
    for (std::size_t k = i; k < j; ++k) single = single && calls[k].nargs == 1;
    const Task& head = calls[i];
    task_record::begin_run(out, head.tid, std::string_view(head.body).substr(0, head.args_at));
    for (std::size_t k = i; k < j; ++k)  // a 1-tuple is its item's opcodes and TUPLE1
      out.append(calls[k].body, calls[k].args_at, calls[k].args_len - (single ? 1 : 0));
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
    for (auto& [_, w] : workers)
      while (!w->unpublished.empty() && w->calls->publish(*w->unpublished.front(), 0)) w->unpublished.pop_front();
  }

  // -- results (collector thread, mu held) --------------------------------------------------------
  void handle(Result&& r) {
    auto wit = workers.find(r.wid);
    if (wit == workers.end()) return;
    Worker& w = *wit->second;
    if (r.status == kOk || r.status == kErr) {
      if (r.tid) {
        while (!w.sent.empty() && w.sent.front().tid != 0 && w.sent.front().tid != *r.tid) lost_result(w);
      }
      while (!w.sent.empty() && w.sent.front().tid == 0) pop_answered(w);  // pings: answered by pongs
      if (w.sent.empty()) return;
      if (!r.tid && !w.sent.front().last_of_record) unpickle_failed(w);
      Task t = pop_answered(w);
      w.running.reset();
      if (!t.pending()) return;
      --outstanding;
      if (r.elapsed) avg += (*r.elapsed - avg) * 0.05;
      if (r.status == kOk) {
        completions.push_back({std::move(t), std::move(r.value), nullptr});
      } else {
        const auto& e = r.value.as_tuple();
        completions.push_back(
            {std::move(t), Value(),
             std::make_exception_ptr(RemoteError(e.at(task::error::kType).as_str(), e.at(task::error::kMessage).as_str(),
                                                 e.at(task::error::kTraceback).as_str()))});
      }
    } else if (r.status == kStarted) {
      if (opts.task_timeout.count() > 0 && r.tid) w.running = {*r.tid, Clock::now() + opts.task_timeout};
    } else if (r.status == kPong) {
      while (!w.sent.empty() && w.sent.front().tid != 0) lost_result(w);
      if (!w.sent.empty())
        pop_answered(w);  // the ping
      else
        ++w.answered;
    } else if (r.status == kInitFailed) {
      // The C++ pool has no initializer; a worker that says so is broken: let it be replaced.
      w.proc.send_signal(SIGKILL);
    }
  }

  // The oldest unanswered call of w, now answered (a record is answered with its last call).
  static Task pop_answered(Worker& w) {
    Task t = w.sent.take_front();
    if (t.last_of_record) ++w.answered;
    return t;
  }

  // The worker could not unpickle the record in front (its answer names no task): that call
  // fails with the worker's error; the other calls of a RUN record go back to the backlog, each
  // to be sent alone, so that only a call at fault fails.
  void unpickle_failed(Worker& w) {
    Task head = w.sent.take_front();
    std::vector<Task> rest;
    while (!head.last_of_record && !w.sent.empty()) {
      rest.push_back(w.sent.take_front());
      head.last_of_record = rest.back().last_of_record;
    }
    for (auto it = rest.rbegin(); it != rest.rend(); ++it) {
      it->alone = true;
      it->last_of_record = true;
      backlog.push_front(std::move(*it));
    }
    head.last_of_record = true;
    w.sent.push_front(std::move(head));
  }

  void lost_result(Worker& w) {
    Task t = pop_answered(w);
    if (!t.pending()) return;
    std::string why = lost.empty() ? "unknown error" : lost.front();
    if (!lost.empty()) lost.pop_front();
    t.fail(std::make_exception_ptr(PickleError("the task's result could not be decoded: " + why)));
    --outstanding;
  }

  // A record that does not decode names no task: ask each worker with calls in flight to answer
  // a ping after its earlier results; the call left unanswered in front of it is the one.
  void undecodable(const std::string& why) {
    lost.push_back(why);
    const std::string ping = task_record::control_record(task::Op::PING);
    for (auto& [_, w] : workers) {
      if (w->sent.empty()) continue;
      send(*w, ping);
      w->sent.push_back(Task());
    }
  }

  // The worker has exited and every result it published has been handled.
  void died(Worker& w) {
    int code = w.exit_code.value_or(-1);
    if (auto reaped = w.proc.poll()) code = *reaped;
    // It takes a few records at a time and answers each call (a run's items one by one) before
    // starting the next; `answered` counts a record once its last call is answered. If it took
    // a record it did not answer in full, its oldest unanswered call was running; the rest never
    // started and go to other workers.
    const bool running = w.ring->consumed() > w.answered;
    std::vector<Task> retry;
    bool first = true;
    for (std::size_t i = 0; i < w.sent.size(); ++i) {
      Task& t = w.sent[i];
      if (t.pending()) {
        if (first && running) {
          if (w.timed_out == t.tid)
            t.fail(std::make_exception_ptr(TaskTimeout(w.proc.pid(), opts.task_timeout)));
          else
            t.fail(std::make_exception_ptr(WorkerDied(w.proc.pid(), code)));
          --outstanding;
        } else {
          retry.push_back(std::move(t));
        }
      }
      first = false;
    }
    for (auto it = retry.rbegin(); it != retry.rend(); ++it) backlog.push_front(std::move(*it));
    workers.erase(w.wid);
  }

  void collect() {
    // The collector is the result ring's only consumer; Channel gives it the receive side the
    // Python queues use (batched takes, handles in record order, out-of-band blocks, waits).
    Channel inbox(results);
    std::vector<UniqueFd> fds;
    ResultSink sink;
    struct Decoded {
      Result rec;
      std::string error;  // why it did not decode, if it did not
    };
    std::string scratch;
    std::string oob;  // an out-of-band result, copied out of the worker's block (kept: no realloc)
    std::vector<Decoded> decoded;
    std::vector<Completion> ready;
    for (;;) {
      sink.clear();
      decoded.clear();
      fds.clear();
      std::size_t n = 0;
      try {
        n = inbox.try_get_many(sink, 256, fds);
      } catch (const std::exception& e) {
        std::lock_guard lk(mu);
        undecodable(e.what());
      }
      // Decode without mu (submitters keep going meanwhile); handle in ring order under it.
      ReceivedFds received(fds);
      for (auto& fr : sink.frames) {
        try {
          // Handles are matched to frames in ring order, nudges' (none) included.
          const auto* payload = reinterpret_cast<const std::uint8_t*>(sink.payload(fr).data());
          const bool out_of_band = fr.header.flags & proto::flag::kOutOfBand;
          FrameHandles handles = received.next(fr.header, out_of_band ? Channel::oob_length(fr.header, payload) : 0);
          if (fr.header.kind != static_cast<std::uint8_t>(proto::Kind::DATA)) continue;  // a nudge
          if (handles.oob) {
            // The worker can still write the block: decode a private copy (security.md, "Shared
            // memory from another process"). Copied, the block goes back to the worker at once.
            const std::string_view v = handles.oob->view();
            oob.assign(v.data(), v.size());
            handles.oob.reset();
            decoded.push_back({result_from(pickle_loads(oob)), {}});
          } else if (fr.header.flags != 0) {
            throw PickleError("result frame with unexpected flags");
          } else if (std::optional<Result> r = read_result(sink.payload(fr), scratch)) {
            decoded.push_back({std::move(*r), {}});
          } else {
            decoded.push_back({result_from(pickle_loads(sink.payload(fr))), {}});
          }
        } catch (const std::exception& e) {
          decoded.push_back({Result(), e.what()});
          if (decoded.back().error.empty()) decoded.back().error = "unknown error";
        }
      }
      std::unique_lock lk(mu);
      for (auto& d : decoded) {
        try {
          if (!d.error.empty()) throw PickleError(d.error);
          handle(std::move(d.rec));
        } catch (const std::exception& e) {
          undecodable(e.what());
        }
      }
      // Deaths: handled once every record committed before the death was seen has been taken.
      std::vector<Worker*> dead;
      for (auto& [_, w] : workers) {
        if (!w->exit_code) continue;
        if (!w->death_barrier) w->death_barrier = results->committed();
        if (results->consumed() >= *w->death_barrier) dead.push_back(w.get());
      }
      for (Worker* w : dead) died(*w);
      // Timeouts.
      auto next_deadline = Clock::time_point::max();
      const auto now = Clock::now();
      for (auto& [_, w] : workers) {
        if (!w->running || w->timed_out == w->running->first) continue;
        if (w->running->second <= now) {
          w->timed_out = w->running->first;
          w->proc.send_signal(SIGKILL);
        } else {
          next_deadline = std::min(next_deadline, w->running->second);
        }
      }
      // A pool idle for a second gives back the queue memory a burst of tasks grew (not at once:
      // back-to-back bursts would grow it again every time).
      if (outstanding > 0 || completing > 0) {
        idle_since = now;
      } else if (now - idle_since > kTrimAfter) {
        backlog.trim();
        for (auto& [_, w] : workers) w->sent.trim();
        std::string().swap(oob);  // the copy of a large result (beyond the ring's inline limit)
      }
      depth = std::clamp<std::size_t>(static_cast<std::size_t>(task::kQueuedWork / (avg + 2e-6)), task::kMinDepth, task::kMaxDepth);
      if (open_workers() < static_cast<std::size_t>(opts.workers)) replenish(lk);
      dispatch();
      publish_pending();
      ready.swap(completions);  // both empty before: completions keeps ready's old capacity
      completing = ready.size();
      if (outstanding == 0 && completing == 0) drained.notify_all();
      if (stop && workers.empty()) return;
      bool retry_publish = false;
      for (auto& [_, w] : workers) retry_publish |= !w->unpublished.empty();
      lk.unlock();
      if (!ready.empty()) {
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
        lk.lock();
        completing = 0;
        if (outstanding == 0) drained.notify_all();
        lk.unlock();
      }
      if (n == 0) {
        auto wait = std::chrono::nanoseconds(retry_publish ? 1'000'000 : 100'000'000);
        if (next_deadline != Clock::time_point::max())
          wait = std::min<std::chrono::nanoseconds>(wait, next_deadline - Clock::now());
        // Polls a little first (a futex wake-up costs tens of microseconds on these VMs), then sleeps.
        inbox.wait_readable(std::max<std::int64_t>(wait.count(), 0));
      }
    }
  }

  // -- the service's side ------------------------------------------------------------------------
  void submit_task(Task t) {
    std::lock_guard lk(mu);
    if (shutting_down) throw PoolClosed("ringpool::Pool: submit after shutdown");
    if (!broken.empty()) throw PoolClosed(broken);
    ++outstanding;
    backlog.push_back(std::move(t));
    dispatch();
  }

  // t.body: the opcodes of function, args and kwargs (or None), written without building them
  // into one Value; the rest of the record is written when t is sent.
  static void encode_call(Task& t, std::string function, std::vector<Value> args,
                          std::vector<std::pair<std::string, Value>> kwargs) {
    std::string& out = t.body;
    out.reserve(16 + function.size() + 12 * args.size());
    pickle_dump_ops(out, Value(std::move(function)));
    const std::size_t args_at = out.size();
    t.nargs = static_cast<std::uint32_t>(args.size());
    pickle_dump_ops(out, Value::tuple(std::move(args)));
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

  void shutdown(bool wait) {
    {
      std::unique_lock lk(mu);
      if (stop) return;
      shutting_down = true;
      if (!wait) fail_all(std::make_exception_ptr(PoolClosed("ringpool::Pool: shut down")));
      drained.wait(lk, [&] { return (outstanding == 0 && completing == 0) || !broken.empty(); });
      // Ask every worker to stop; the collector handles their exits and ends with the last.
      const std::string stop_rec = task_record::control_record(task::Op::STOP);
      for (auto& [_, w] : workers) send(*w, stop_rec);
      stop = true;
    }
    nudge();
    // Workers that do not stop within 5 s are killed.
    const auto deadline = Clock::now() + std::chrono::seconds(5);
    for (;;) {
      {
        std::lock_guard lk(mu);
        if (workers.empty()) break;
        if (Clock::now() > deadline)
          for (auto& [_, w] : workers) w->proc.send_signal(SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (collector.joinable()) collector.join();
    sup->stop();
  }
};

Pool::Pool(PoolOptions options) : impl_(std::make_shared<Impl>(std::move(options))) {
  Impl& im = *impl_;
  if (im.opts.zygote) im.sup->start();  // the preload's error surfaces here
  {
    std::unique_lock lk(im.mu);
    im.replenish(lk);
    if (!im.broken.empty()) throw PoolClosed(im.broken);
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
  Impl::encode_call(t, std::move(function), std::move(args), std::move(kwargs));
  auto fut = t.sink.emplace<std::promise<Value>>().get_future();
  impl_->submit_task(std::move(t));
  return fut;
}

void Pool::async_submit(std::string function, std::vector<Value> args,
                        std::vector<std::pair<std::string, Value>> kwargs, Callback done) {
  Impl::Task t;
  Impl::encode_call(t, std::move(function), std::move(args), std::move(kwargs));
  t.sink = std::move(done);
  impl_->submit_task(std::move(t));
}

std::future<std::string> Pool::submit_raw(std::string function, std::string payload) {
  Impl::Task t;
  std::vector<Value> args;
  args.push_back(Value::bytes(std::move(payload)));
  Impl::encode_call(t, std::move(function), std::move(args), {});
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
