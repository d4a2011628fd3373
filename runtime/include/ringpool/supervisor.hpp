// Supervisor: one Boost.Asio io_context thread per context that owns the spawner (and with it the
// zygote's control socket and pidfd), a pidfd per worker, and the timers.
//
// Every process is started from the supervisor's thread. PR_SET_PDEATHSIG fires when the *thread*
// that started a process ends, so launching from a caller's thread (a short-lived worker thread,
// a thread pool) could kill a worker early; the supervisor's thread lives until the Supervisor is
// destroyed, which for a Python context is the end of the process.
//
// Workers are our children in both modes, so their exit status is ours to reap: the supervisor
// only observes it (waitid with WNOWAIT) and leaves reaping to the owner of the ChildProcess (for
// Python, Popen.poll), as fork would. When a zygote incarnation ends, the workers it forked that
// still run are killed (SIGKILL through their pidfds): their Popen objects then report -9 and
// join() returns, and the next spawn starts a new zygote.
//
// Thread safety: every public member may be called from any thread except the supervisor's own.
// A Supervisor belongs to the process that created it; in a fork()ed child it refuses every call.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "ringpool/log.hpp"
#include "ringpool/spawner.hpp"

namespace ringpool {

class Supervisor {
 public:
  using SpawnerFactory = std::function<std::unique_ptr<Spawner>(boost::asio::io_context&)>;

  explicit Supervisor(SpawnerFactory make_spawner);
  ~Supervisor();
  Supervisor(const Supervisor&) = delete;
  Supervisor& operator=(const Supervisor&) = delete;

  static std::unique_ptr<Supervisor> exec_mode();
  static std::unique_ptr<Supervisor> zygote_mode(ZygoteOptions options);

  // Called on the supervisor's thread when a worker ends: (pid, exit code in Python's
  // convention). It must not block and must not call back into the Supervisor.
  using ExitHandler = std::function<void(pid_t, int)>;

  // Starts a worker and returns once it exists (its pid is final). Throws what the spawner threw.
  // on_exit, if given, is called once when the worker ends (not reaped: the caller reaps).
  ChildProcess spawn(SpawnRequest req, ExitHandler on_exit = {});
  // Brings the spawner up now (a zygote: started and preloaded); throws its error.
  void start();
  // The same without waiting.
  void start_async();
  // Orderly zygote stop; running workers are not affected.
  void stop();
  // Where the zygote's lifecycle events go (started, died, restarted, stopped; log.hpp): called on
  // the supervisor's thread, so it must not call back into this Supervisor. Empty: nowhere (the
  // default).
  void set_log(LogHandler handler);

  const char* mode() const noexcept;
  pid_t zygote_pid();
  // Pids of the workers started here that have not exited.
  std::vector<pid_t> live_workers();
  // The exit code (Python's convention) of a worker started here that has exited, as observed by
  // the supervisor; nullopt while it runs or when unknown.
  std::optional<int> exit_code(pid_t pid);
  // Number of zygote incarnations that have ended (crashes and orderly stops).
  std::uint64_t zygote_exits();
  // What the latest ready zygote incarnation said in its READY (empty if none has, or it said
  // nothing). Any thread; no round trip to the supervisor's thread (read at every start()).
  std::string zygote_note();

 private:
  struct Impl;
  Impl* impl_;  // not a unique_ptr: a forked child must leak it (its thread does not exist there)
  pid_t owner_;
};

}  // namespace ringpool
