#include "ringpool/detail/zygote.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <linux/futex.h>
#include <linux/sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <map>
#include <vector>

#include "ringpool/block.hpp"
#include "ringpool/detail/control.hpp"
#include "ringpool/error.hpp"

namespace ringpool {

namespace {

using proto::Kind;

// Open descriptors of this process, from /proc/self/fd (the directory's own fd excluded).
std::vector<int> open_fds() {
  std::vector<int> fds;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) throw_errno("opendir(/proc/self/fd)");
  const int self = ::dirfd(d);
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    const int fd = std::atoi(e->d_name);
    if (fd != self) fds.push_back(fd);
  }
  ::closedir(d);
  return fds;
}

// The PROCESS request's payload (docs/design/spawner.md).
struct ForkRequest {
  std::uint32_t stdio_mask;  // bit k: the next attached fd becomes descriptor k (k = 0, 1, 2)
  std::uint32_t flags;       // kForkSpare
  std::uint32_t spare_pid;   // nonzero: give the descriptors to this spare instead of forking
  std::uint32_t reserved;
};
constexpr std::uint32_t kForkSpare = 1;  // fork a spare that waits for a later request

struct sigaction g_saved_sigint {};

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

// The zygote's ranges given MADV_HUGEPAGE (zygote_use_huge_pages): a forked child clears them.
std::vector<std::pair<std::uintptr_t, std::size_t>> g_huge_ranges;

}  // namespace

std::size_t zygote_use_huge_pages() {
  {
    std::ifstream mode("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string line;
    if (!std::getline(mode, line) || line.find("[madvise]") == std::string::npos) return 0;
  }
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  std::vector<std::pair<std::uintptr_t, std::size_t>> ranges;
  {
    std::ifstream maps("/proc/self/maps");
    std::string line;
    while (std::getline(maps, line)) {
      // start-end perms offset dev inode [path]
      std::istringstream in(line);
      std::string span, perms, offset, dev, inode, path;
      in >> span >> perms >> offset >> dev >> inode >> path;
      if (perms.size() < 4 || perms[1] != 'w' || perms[3] != 'p') continue;  // private, writable
      if (!path.empty() && path != "[heap]") continue;  // anonymous (not the stack, not a file)
      const auto dash = span.find('-');
      if (dash == std::string::npos) continue;
      char* end = nullptr;
      const std::uintptr_t lo = std::strtoull(span.c_str(), &end, 16);
      if (end != span.c_str() + dash) continue;
      const std::uintptr_t hi = std::strtoull(span.c_str() + dash + 1, &end, 16);
      if (*end != '\0' || hi <= lo) continue;
      const std::uintptr_t a = (lo + kHuge - 1) & ~(kHuge - 1), b = hi & ~(kHuge - 1);
      if (b > a) ranges.emplace_back(a, b - a);
    }
  }
  std::size_t bytes = 0;
  for (const auto& [a, n] : ranges) {
    void* p = reinterpret_cast<void*>(a);
    if (::madvise(p, n, MADV_HUGEPAGE) != 0) continue;
    g_huge_ranges.emplace_back(a, n);
    bytes += n;
    ::madvise(p, n, MADV_COLLAPSE);  // best effort: EINVAL before Linux 6.1, EAGAIN if no memory
  }
  return bytes;
}

int thread_count() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/task");
  if (d == nullptr) throw_errno("opendir(/proc/self/task)");
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') ++n;
  ::closedir(d);
  return n;
}

pid_t fork_sibling(UniqueFd* pidfd_out) {
  if (const int n = thread_count(); n != 1)
    throw std::runtime_error("refusing to fork a process with " + std::to_string(n) +
                             " threads (a zygote must be single-threaded)");
  int* tid_address = nullptr;
  if (::prctl(PR_GET_TID_ADDRESS, &tid_address) != 0 || tid_address == nullptr)
    throw_errno("prctl(PR_GET_TID_ADDRESS)");
  robust_list_head* robust = nullptr;
  std::size_t robust_len = 0;
  if (::syscall(SYS_get_robust_list, 0, &robust, &robust_len) != 0) throw_errno("get_robust_list");
  int pidfd = -1;
  clone_args args{};
  args.flags = CLONE_PARENT | CLONE_PIDFD | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID;
  args.pidfd = reinterpret_cast<std::uint64_t>(&pidfd);
  args.child_tid = reinterpret_cast<std::uint64_t>(tid_address);
  args.exit_signal = 0;  // with CLONE_PARENT the child inherits our exit signal (SIGCHLD)
  sigset_t all, old;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &old);
  const long r = ::syscall(SYS_clone3, &args, sizeof args);
  const int err = errno;
  if (r == 0) {
    // The child: what glibc's fork does for its one thread. The list is empty here (the caller
    // holds no robust mutex: it is single-threaded and between operations).
    if (robust != nullptr) {
      robust->list.next = &robust->list;
      robust->list_op_pending = nullptr;
      ::syscall(SYS_set_robust_list, robust, robust_len);
    }
    note_fork_child();
    ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return 0;
  }
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (r < 0) throw SysError(err, "clone3(CLONE_PARENT)");
  ::fcntl(pidfd, F_SETFD, FD_CLOEXEC);
  if (pidfd_out != nullptr) *pidfd_out = UniqueFd(pidfd);
  else ::close(pidfd);
  return static_cast<pid_t>(r);
}

std::string zygote_receive_config(int control, int timeout_ms) {
  auto m = recv_control(control, timeout_ms);
  if (!m) throw ProtocolError("the parent closed the control socket before sending HELLO");
  if (m->kind() != Kind::HELLO) throw ProtocolError("expected HELLO from the parent");
  return std::move(m->payload);
}

void zygote_send_ready(int control, bool ok, const std::string& message) {
  send_control(control, Kind::HELLO, 0, ok ? 0 : 1, message);
}

namespace {

// In a new worker or spare, right after the fork: die with the parent (the user's process,
// whose supervisor thread started the zygote), also if it is already gone; SIGINT as Python set it.
void after_fork_basics(pid_t parent) {
  if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) ::_exit(1);
  ::sigaction(SIGINT, &g_saved_sigint, nullptr);
}

// Puts the received descriptors in place: stdio per mask, the rest at base.. where base is above
// every descriptor this process keeps; closes everything above them. Runs in the worker.
WorkerStart place_fds(std::vector<UniqueFd>& received, std::uint32_t stdio_mask) {
  int max_keep = 2;
  for (int fd : open_fds()) {
    const bool transient =
        std::any_of(received.begin(), received.end(), [fd](const UniqueFd& f) { return f.get() == fd; });
    if (!transient) max_keep = std::max(max_keep, fd);
  }
  std::size_t nstdio = 0;
  for (int k = 0; k < 3; ++k) nstdio += (stdio_mask >> k) & 1u;
  const int nworker = static_cast<int>(received.size() - nstdio);
  const int base = std::max(3, max_keep + 1);
  // The temporaries only have to miss the targets (stdio and base..base+nworker); F_DUPFD takes
  // the lowest free number from there. No floor above every open descriptor: under a low
  // RLIMIT_NOFILE that would fail with EINVAL although free numbers exist.
  const int high = base + nworker;
  std::vector<int> tmp(received.size());
  for (std::size_t i = 0; i < received.size(); ++i) {
    tmp[i] = ::fcntl(received[i].get(), F_DUPFD_CLOEXEC, high);
    if (tmp[i] < 0) ::_exit(1);
  }
  for (auto& fd : received) fd.reset();
  std::size_t i = 0;
  for (int k = 0; k < 3; ++k)
    if ((stdio_mask >> k) & 1u)
      if (::dup2(tmp[i++], k) < 0) ::_exit(1);
  for (int j = 0; j < nworker; ++j)
    if (::dup2(tmp[i++], base + j) < 0) ::_exit(1);
  // Everything above the worker's descriptors (the temporaries included) closes now: no exec
  // follows, so close-on-exec would not do it.
  if (::syscall(SYS_close_range, static_cast<unsigned>(base + nworker), ~0u, 0u) != 0) ::_exit(1);
  return WorkerStart{base, nworker};
}

struct Zygote {
  int control;
  pid_t parent;
  const ZygoteHooks& hooks;
  std::map<pid_t, UniqueFd> spares;  // a spare's pid -> our end of its assignment socket

  // Forks; in the child closes what only the zygote may hold (the control socket, the spares'
  // sockets) and returns 0 there. In the zygote returns the pid and its pidfd.
  pid_t fork_child(UniqueFd* pidfd) {
    if (hooks.before_fork) hooks.before_fork();
    pid_t pid;
    try {
      pid = fork_sibling(pidfd);
    } catch (...) {
      if (hooks.after_fork_parent) hooks.after_fork_parent();
      throw;
    }
    if (pid == 0) {
      after_fork_basics(parent);
      for (const auto& [a, n] : g_huge_ranges) ::madvise(reinterpret_cast<void*>(a), n, MADV_NOHUGEPAGE);
      ::close(control);
      for (auto& [spid, sock] : spares) ::close(sock.release());
      return 0;
    }
    if (hooks.after_fork_parent) hooks.after_fork_parent();
    return pid;
  }

  // A new worker for this request, forked now. Child: its WorkerStart.
  std::optional<WorkerStart> fork_now(std::uint64_t seq, std::vector<UniqueFd>& fds, std::uint32_t mask) {
    UniqueFd pidfd;
    const pid_t pid = fork_child(&pidfd);
    if (pid == 0) {
      WorkerStart w = place_fds(fds, mask);
      if (hooks.after_fork_child) hooks.after_fork_child();
      return w;
    }
    const int fd = pidfd.get();
    send_control(control, Kind::PROCESS, seq, static_cast<std::uint32_t>(pid), {}, std::span<const int>(&fd, 1));
    return std::nullopt;
  }

  // A spare: forked now, waiting for its assignment on a socket of its own. Child: blocks until
  // assigned (then its WorkerStart) or until the zygote goes away (then it exits).
  std::optional<WorkerStart> fork_spare(std::uint64_t seq) {
    auto [ours, theirs] = control_socketpair();
    UniqueFd pidfd;
    const pid_t pid = fork_child(&pidfd);
    if (pid == 0) {
      ours.reset();
      if (hooks.after_fork_child) hooks.after_fork_child();
      std::optional<ControlMessage> m;
      try {
        m = recv_control(theirs.get());
      } catch (...) {
        ::_exit(0);
      }
      if (!m || m->kind() != Kind::PROCESS) ::_exit(0);  // the zygote stopped or died: not needed
      std::uint32_t mask = 0;
      if (m->payload.size() >= sizeof mask) std::memcpy(&mask, m->payload.data(), sizeof mask);
      theirs.reset();
      return place_fds(m->fds, mask);
    }
    theirs.reset();
    spares.emplace(pid, std::move(ours));
    const int fd = pidfd.get();
    send_control(control, Kind::PROCESS, seq, static_cast<std::uint32_t>(pid), {}, std::span<const int>(&fd, 1));
    return std::nullopt;
  }

  // Hands the request's descriptors to spare `pid`; answers with its pid and no descriptor. A
  // spare that is gone is replaced by a fresh fork (answered with its pidfd, as fork_now does).
  std::optional<WorkerStart> assign(std::uint64_t seq, pid_t pid, std::vector<UniqueFd>& fds, std::uint32_t mask) {
    auto it = spares.find(pid);
    if (it != spares.end()) {
      UniqueFd sock = std::move(it->second);
      spares.erase(it);
      std::vector<int> raw;
      for (auto& f : fds) raw.push_back(f.get());
      const std::uint32_t payload[2] = {mask, 0};
      try {
        send_control(sock.get(), Kind::PROCESS, seq, 0,
                     std::string_view(reinterpret_cast<const char*>(payload), sizeof payload), raw);
        send_control(control, Kind::PROCESS, seq, static_cast<std::uint32_t>(pid), {});
        return std::nullopt;
      } catch (const std::system_error&) {
        // The spare died (EPIPE): fork the worker now instead.
      }
    }
    return fork_now(seq, fds, mask);
  }
};

}  // namespace

std::optional<WorkerStart> zygote_serve(int control, const ZygoteHooks& hooks) {
  Zygote z{control, ::getppid(), hooks, {}};
  struct sigaction ign {};
  ign.sa_handler = SIG_IGN;
  ::sigaction(SIGINT, &ign, &g_saved_sigint);
  for (;;) {
    auto m = recv_control(control);
    if (!m || m->kind() == Kind::SHUTDOWN) {
      ::sigaction(SIGINT, &g_saved_sigint, nullptr);
      z.spares.clear();  // closing their sockets ends the spares
      return std::nullopt;
    }
    const std::uint64_t seq = m->header.seq;
    try {
      if (m->kind() != Kind::PROCESS) throw ProtocolError("the zygote accepts PROCESS and SHUTDOWN messages only");
      ForkRequest req{};
      if (m->payload.size() != sizeof req) throw ProtocolError("malformed PROCESS request");
      std::memcpy(&req, m->payload.data(), sizeof req);
      if ((req.stdio_mask & ~7u) != 0 || static_cast<std::size_t>(__builtin_popcount(req.stdio_mask)) > m->fds.size())
        throw ProtocolError("malformed PROCESS request (stdio mask)");
      std::optional<WorkerStart> w;
      if (req.flags & kForkSpare) {
        if (!m->fds.empty()) throw ProtocolError("a spare request carries no descriptors");
        w = z.fork_spare(seq);
      } else if (req.spare_pid != 0) {
        w = z.assign(seq, static_cast<pid_t>(req.spare_pid), m->fds, req.stdio_mask);
      } else {
        w = z.fork_now(seq, m->fds, req.stdio_mask);
      }
      if (w) return w;  // in the worker
    } catch (const std::system_error& e) {
      send_control(control, Kind::ERROR, seq, static_cast<std::uint32_t>(e.code().value()), e.what());
    } catch (const std::exception& e) {
      send_control(control, Kind::ERROR, seq, 0, e.what());
    }
  }
}

}  // namespace ringpool
