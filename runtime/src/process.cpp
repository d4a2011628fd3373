#include "ringpool/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <linux/close_range.h>
#include <linux/sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "ringpool/error.hpp"

namespace ringpool {

namespace {

// In the child between clone and exec only async-signal-safe calls are allowed (the parent may
// have other threads holding malloc or other locks): raw syscalls, no allocation.
[[noreturn]] void child_fail(int err_fd, int err) {
  ssize_t r;
  do r = ::write(err_fd, &err, sizeof err);
  while (r < 0 && errno == EINTR);
  ::_exit(127);
}

[[noreturn]] void run_child(const LaunchOptions& opts, char* const* argv, char* const* envp, pid_t parent,
                            int err_fd, int max_dst) {
  if (opts.parent_death_signal != 0) {
    if (::prctl(PR_SET_PDEATHSIG, opts.parent_death_signal) != 0) child_fail(err_fd, errno);
    // The parent may have died before the signal was armed: then nobody will send it.
    if (::getppid() != parent) ::_exit(127);
  }
  if (opts.new_session && ::setsid() < 0) child_fail(err_fd, errno);
  // Move every source out of the way first (a source may sit on another mapping's target):
  // anywhere above the highest target will do. No higher floor: F_DUPFD fails with EINVAL at or
  // above RLIMIT_NOFILE, and a worker must start under a limit as low as its descriptors allow.
  const int high = max_dst + 1;
  int moved[256];
  const std::size_t n = opts.fds.size();
  if (n > 256) child_fail(err_fd, EMFILE);
  for (std::size_t i = 0; i < n; ++i) {
    moved[i] = ::fcntl(opts.fds[i].first, F_DUPFD_CLOEXEC, high);
    if (moved[i] < 0) child_fail(err_fd, errno);
  }
  for (std::size_t i = 0; i < n; ++i)
    if (::dup2(moved[i], opts.fds[i].second) < 0) child_fail(err_fd, errno);  // dup2 clears CLOEXEC
  // Everything else closes at exec: 3..max_dst that are not targets, and all above.
  for (int fd = 3; fd <= max_dst; ++fd) {
    bool keep = false;
    for (std::size_t i = 0; i < n; ++i) keep |= opts.fds[i].second == fd;
    if (!keep) ::fcntl(fd, F_SETFD, FD_CLOEXEC);  // EBADF for closed numbers is fine
  }
  if (::syscall(SYS_close_range, static_cast<unsigned>(max_dst + 1), ~0u, CLOSE_RANGE_CLOEXEC) != 0)
    child_fail(err_fd, errno);
  // err_fd is above max_dst, so it is now CLOEXEC: it closes on a successful exec.
  // Signals: default dispositions, nothing blocked (the parent's handlers and mask are not ours).
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  for (int s = 1; s < NSIG; ++s)
    if (s != SIGKILL && s != SIGSTOP) ::sigaction(s, &dfl, nullptr);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  if (!opts.cwd.empty() && ::chdir(opts.cwd.c_str()) != 0) child_fail(err_fd, errno);
  ::execve(opts.executable.c_str(), argv, envp);
  child_fail(err_fd, errno);
}

int exit_code_of(const siginfo_t& si) {
  if (si.si_code == CLD_EXITED) return si.si_status;
  return -si.si_status;  // CLD_KILLED / CLD_DUMPED: the signal number
}

}  // namespace

UniqueFd open_pidfd(pid_t pid) {
  UniqueFd fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!fd) throw_errno("pidfd_open");
  ::fcntl(fd.get(), F_SETFD, FD_CLOEXEC);
  return fd;
}

bool pidfd_signal(int pidfd, int sig) {
  if (::syscall(SYS_pidfd_send_signal, pidfd, sig, nullptr, 0) == 0) return true;
  if (errno == ESRCH) return false;
  throw_errno("pidfd_send_signal");
}

ChildProcess ChildProcess::launch(const LaunchOptions& opts) {
  if (opts.executable.empty() || opts.argv.empty()) throw SysError(EINVAL, "launch: no executable or argv");
  int max_dst = 2;
  for (auto& [src, dst] : opts.fds) {
    if (dst < 3 || src < 0) throw SysError(EBADF, "launch: child descriptors must be >= 3");
    max_dst = std::max(max_dst, dst);
  }
  // Everything the child needs is built here: it may not allocate.
  std::vector<char*> argv, envp;
  for (auto& a : opts.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (auto& e : opts.env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  int errpipe[2];
  if (::pipe2(errpipe, O_CLOEXEC) != 0) throw_errno("pipe2");
  UniqueFd err_r(errpipe[0]);
  UniqueFd err_w(errpipe[1]);
  // Keep the error pipe above every target so the child's descriptor shuffle cannot clobber it.
  if (err_w.get() <= max_dst) err_w = UniqueFd(::fcntl(err_w.get(), F_DUPFD_CLOEXEC, max_dst + 1));
  if (!err_w) throw_errno("fcntl(F_DUPFD_CLOEXEC)");
  const pid_t parent = ::getpid();
  int pidfd = -1;
  clone_args args{};
  args.flags = CLONE_PIDFD;
  args.pidfd = reinterpret_cast<std::uint64_t>(&pidfd);
  args.exit_signal = SIGCHLD;
  // Block every signal across the clone: the child must not run our handlers (a Python handler
  // would write to our wakeup fd) before it has reset them to their defaults.
  sigset_t all, old;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &old);
  const long r = ::syscall(SYS_clone3, &args, sizeof args);
  if (r == 0) run_child(opts, argv.data(), envp.data(), parent, err_w.get(), max_dst);
  const int clone_errno = errno;
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (r < 0) throw SysError(clone_errno, "clone3");
  const pid_t pid = static_cast<pid_t>(r);
  ChildProcess child(pid, UniqueFd(pidfd));
  ::fcntl(pidfd, F_SETFD, FD_CLOEXEC);
  err_w.reset();
  int child_errno = 0;
  ssize_t got;
  do got = ::read(err_r.get(), &child_errno, sizeof child_errno);
  while (got < 0 && errno == EINTR);
  if (got == static_cast<ssize_t>(sizeof child_errno)) {
    child.wait();
    throw SysError(child_errno, "launch " + opts.executable);
  }
  return child;
}

std::optional<int> ChildProcess::reap(int options) {
  if (exit_code_) return exit_code_;
  if (!pidfd_) return std::nullopt;
  siginfo_t si{};
  if (::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd_.get()), &si, WEXITED | options) != 0) {
    if (errno == EINTR) return std::nullopt;
    if (errno == EAGAIN) {
      // A non-blocking pidfd (someone set O_NONBLOCK on its file description): wait for it to
      // become readable, then ask again.
      if (options & WNOHANG) return std::nullopt;
      pollfd p{pidfd_.get(), POLLIN, 0};
      if (::poll(&p, 1, -1) < 0 && errno != EINTR) throw_errno("poll(pidfd)");
      return reap(options);
    }
    if (errno == ECHILD) {
      // Someone else reaped it (e.g. a SIGCHLD handler calling waitpid(-1)): exited, code lost.
      exit_code_ = 255;
      return exit_code_;
    }
    throw_errno("waitid(P_PIDFD)");
  }
  if (si.si_pid == 0) return std::nullopt;  // WNOHANG, still running
  exit_code_ = exit_code_of(si);
  return exit_code_;
}

std::optional<int> ChildProcess::poll() { return reap(WNOHANG); }

std::optional<int> ChildProcess::wait() { return reap(0); }

bool ChildProcess::send_signal(int sig) {
  if (exit_code_ || !pidfd_) return false;
  return pidfd_signal(pidfd_.get(), sig);
}

void die_with(pid_t root) {
  // Watch first, then disarm: there is no moment in which neither would take this process down.
  const int fd = open_pidfd(root).release();  // O_CLOEXEC: exec'd children do not keep it
  struct stat ours {};
  if (::fstat(fd, &ours) != 0) throw_errno("fstat(pidfd)");
  std::thread([fd, ours] {
    // Signals are for the application's threads.
    sigset_t all;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, nullptr);
    pollfd p{fd, POLLIN, 0};
    while (::poll(&p, 1, -1) < 0 && errno == EINTR) {
    }
    // Readable: the root exited (a pidfd is readable from its exit on, reaped or not), if fd is
    // still our pidfd. The process's own code may have closed it (POLLNVAL), or closed it and
    // opened something else readable at that number (another inode). Either ends the watch
    // without killing: this process then outlives the root, as a spawn child does.
    struct stat now {};
    if ((p.revents & POLLIN) && ::fstat(fd, &now) == 0 && now.st_dev == ours.st_dev && now.st_ino == ours.st_ino)
      ::kill(::getpid(), SIGKILL);
  }).detach();
  if (::prctl(PR_SET_PDEATHSIG, 0) != 0) throw_errno("prctl(PR_SET_PDEATHSIG)");
}

}  // namespace ringpool
