// Spawner: how a worker process comes to exist. Two start modes behind one interface:
//  - exec (exec_spawner.cpp): a fresh interpreter per worker through ChildProcess::launch;
//  - zygote (zygote_spawner.cpp): one long-lived, preloaded zygote per context that forks each
//    worker on request (its side of the exchange is detail/zygote.hpp).
// A Spawner lives on a Supervisor's io thread (supervisor.hpp) and is only called there; it
// answers each request asynchronously, exactly once.
#pragma once

#include <sys/types.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ringpool/process.hpp"

namespace boost::asio {
class io_context;
}

namespace ringpool {

struct SpawnRequest {
  // Exec mode: the program (executable, argv, env, cwd). Its fds field is ignored: the worker's
  // descriptors are the ones below. The zygote ignores the whole program.
  LaunchOptions program;
  // Descriptors the worker gets as 0, 1, 2 (-1: exec mode inherits ours, a zygote worker the
  // zygote's). Passing the caller's current ones makes a redirected stderr reach the worker.
  std::array<int, 3> stdio{-1, -1, -1};
  // The worker's own descriptors, at fd_base + i in the worker (exec mode: fd_base = 3; a zygote
  // worker learns its fd_base from zygote_serve).
  std::vector<int> fds;
};

struct Spawned {
  ChildProcess process;     // our child (zygote workers too: they are forked as our children)
  std::uint64_t zygote = 0; // incarnation of the zygote that forked it; 0 in exec mode
};

using SpawnHandler = std::function<void(std::exception_ptr, Spawned)>;
using ReadyHandler = std::function<void(std::exception_ptr)>;

class Spawner {
 public:
  virtual ~Spawner() = default;
  virtual const char* mode() const noexcept = 0;
  // Starts a worker; done(nullptr, spawned) or done(error, {}).
  virtual void spawn(SpawnRequest req, SpawnHandler done) = 0;
  // Brings the spawner up (a zygote: started and preloaded); done(error) once ready or failed.
  virtual void start(ReadyHandler done) { done(nullptr); }
  // Orderly stop (a zygote: SHUTDOWN); requests after it start a new incarnation.
  virtual void stop() {}
  // Called once on the supervisor's thread before it ends: stop and reap every process of the
  // spawner's own (a zygote, its unused spares); running workers are the supervisor's business.
  virtual void finish() {}
  virtual pid_t zygote_pid() const noexcept { return -1; }
  // Called when a zygote incarnation has ended. orderly: it ended after stop() (its workers go
  // on); otherwise it died, and the supervisor kills the workers it forked. pid, code: the
  // zygote's, and its exit code (Python's convention); what: how it ended ("ringpool zygote (pid
  // N) exited with code 1", or why it was killed).
  std::function<void(std::uint64_t incarnation, bool orderly, pid_t pid, int code, const std::string& what)>
      on_zygote_exit;
  // Called when a zygote incarnation is ready, with what its READY said (the Python zygote: the
  // modules its automatic preload skipped, as JSON; empty when there is nothing to say).
  std::function<void(const std::string& note)> on_zygote_ready;
};

std::unique_ptr<Spawner> make_exec_spawner();

struct ZygoteOptions {
  // How to start the zygote; the supervisor appends its control socket as descriptor 3.
  LaunchOptions launch;
  // Sent as the HELLO payload (the Python zygote reads a pickle: sys.path, preload, ...).
  std::string config;
  std::chrono::milliseconds ready_timeout{300'000};  // preload may import torch from a cold disk
  std::chrono::milliseconds fork_timeout{30'000};
  // Workers the zygote forks ahead of time, each waiting for a request: start() then costs no
  // fork. They are our children too, and are reaped when they end unused.
  int spares = 4;
};

// The zygote's control descriptor number in the zygote.
inline constexpr int kZygoteControlFd = 3;

std::unique_ptr<Spawner> make_zygote_spawner(boost::asio::io_context& io, ZygoteOptions options);

}  // namespace ringpool
