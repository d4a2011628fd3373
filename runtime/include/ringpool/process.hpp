// ChildProcess: start a program with an exact set of descriptors, and watch it through a pidfd.
//
// The low-level launcher under both start modes of the spawner (the zygote itself is started this
// way, and so is every worker in exec mode). What it guarantees, and plain posix_spawn does not:
//  - the child gets exactly stdin/stdout/stderr plus the descriptors it is given, at the numbers
//    it is given them (every other inherited descriptor is closed at exec);
//  - with parent_death_signal, the child dies when the process that launched it dies (also when
//    the parent died before the child could arm the signal);
//  - a pidfd comes back atomically with the pid (clone3 CLONE_PIDFD): signals go through it, so a
//    recycled pid can never be hit, and it is a pollable sentinel (readable once the child exited,
//    and it stays readable);
//  - a failed exec is reported to the caller as an error (errno), with the child reaped.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ringpool/fd.hpp"

namespace ringpool {

struct LaunchOptions {
  std::string executable;             // path; not searched in PATH
  std::vector<std::string> argv;      // argv[0] included
  std::vector<std::string> env;       // "KEY=value"; empty: an empty environment
  std::vector<std::pair<int, int>> fds;  // (descriptor here, number in the child); child numbers >= 3
  std::string cwd;                    // empty: inherit
  int parent_death_signal = 0;        // e.g. SIGKILL; 0: none
  bool new_session = false;           // setsid(): no terminal signals from our process group
};

class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(pid_t pid, UniqueFd pidfd) : pid_(pid), pidfd_(std::move(pidfd)) {}
  ChildProcess(ChildProcess&&) noexcept = default;
  ChildProcess& operator=(ChildProcess&&) noexcept = default;

  // Starts a child; throws SysError (with the child's errno if its exec failed).
  static ChildProcess launch(const LaunchOptions& opts);

  pid_t pid() const noexcept { return pid_; }
  // Readable (POLLIN) once the child has exited, and from then on.
  int sentinel() const noexcept { return pidfd_.get(); }

  // The exit code once the child has exited (reaping it), in Python's convention: the exit
  // status, or -N when killed by signal N. nullopt while it runs. Idempotent after exit.
  std::optional<int> poll();
  // Blocks until exit (EINTR is the caller's to retry: returns nullopt then).
  std::optional<int> wait();
  // Sends sig through the pidfd. False (not an error) if the child has already exited.
  bool send_signal(int sig);

 private:
  std::optional<int> reap(int options);
  pid_t pid_ = -1;
  UniqueFd pidfd_;
  std::optional<int> exit_code_;
};

// A pidfd for a process that is not our child (it can signal it and poll for its exit, not reap it).
UniqueFd open_pidfd(pid_t pid);
// Sends sig via a pidfd; false if the process is gone.
bool pidfd_signal(int pidfd, int sig);

// For a nested worker (started by a worker, not by the root process): from now on this process
// outlives its parent, as a spawn child does (its parent-death signal is cleared, so it can notice
// its parent's death through parent_process()), and dies with `root` instead: a thread of its own
// waits on a pidfd of root and SIGKILLs this process when root exits. Throws SysError (ESRCH)
// when root is already gone.
void die_with(pid_t root);

}  // namespace ringpool
