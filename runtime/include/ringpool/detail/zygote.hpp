// The zygote side of the spawner: the fork loop that runs inside the zygote process.
//
// The zygote is a Python process started once per context (see spawner.hpp for the parent side).
// After importing its preload modules it calls zygote_serve(), which forks one worker per PROCESS
// request and never returns in the zygote until the parent says SHUTDOWN or goes away. In each
// forked worker it returns, with the worker's descriptors in place, and the caller (Python) runs
// the worker. docs/design/spawner.md describes the whole exchange.
//
// Workers are forked as siblings of the zygote (clone3 with CLONE_PARENT): their parent is the
// zygote's parent, the user's process, exactly as if it had forked them itself. So SIGCHLD,
// waitid() and the exit status reach it directly (DataLoader's SIGCHLD handler sees a SIGKILLed
// worker at once), no subreaper is needed, and the zygote keeps no zombies.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>

#include "ringpool/fd.hpp"

namespace ringpool {

// fork(2) with CLONE_PARENT: the child becomes a child of the caller's parent. Returns the child's
// pid (and a pidfd for it in *pidfd) in the caller, 0 in the child.
//
// A raw clone3 bypasses glibc's fork(), so this redoes the part of it a child needs: the thread's
// cached tid is written by the kernel (CLONE_CHILD_SETTID at the address glibc registered,
// found with PR_GET_TID_ADDRESS) and the robust-futex list is registered again (robust mutexes in
// the rings stay recoverable when a worker dies holding one). pthread_atfork handlers do not run:
// the caller must be single-threaded (throws std::runtime_error otherwise), which is also what
// makes a fork safe at all. Signals are blocked across the clone.
pid_t fork_sibling(UniqueFd* pidfd);

// Number of threads of the calling process (from /proc/self/task).
int thread_count();

// Called around each fork with the Python runtime's before/after-fork protocol.
struct ZygoteHooks {
  void (*before_fork)() = nullptr;
  void (*after_fork_parent)() = nullptr;
  void (*after_fork_child)() = nullptr;
};

// What a forked worker got: its descriptors are at fd_base .. fd_base + nfds - 1 (and the
// parent's stdio at 0, 1, 2 when the request carried them).
struct WorkerStart {
  int fd_base;
  int nfds;
};

// The zygote's first exchange: receives the parent's HELLO (an opaque configuration, for the
// Python side a pickle) ...
std::string zygote_receive_config(int control, int timeout_ms);
// ... and answers once the preload is done: ok, or the error that made it fail.
void zygote_send_ready(int control, bool ok, const std::string& message);

// Backs the zygote's private anonymous memory with transparent huge pages, when the kernel's THP
// mode is "madvise" (with "always" it already is; with "never" it cannot be): each heap or
// anonymous private writable mapping, in its 2 MiB-aligned part, gets MADV_HUGEPAGE and then
// MADV_COLLAPSE (Linux 6.1+; before that khugepaged collapses it in its own time). A fork then
// copies one entry per 2 MiB instead of 512, and a worker's exit tears down as few; a worker's
// first write to such a page splits it and copies 4 KiB, as before. Children forked by
// zygote_serve mark the same ranges MADV_NOHUGEPAGE at once, so that nothing of theirs is
// collapsed or faulted in as huge pages. Call it once, after the preload and before
// zygote_serve. Returns the bytes of the ranges advised (0: not applicable).
std::size_t zygote_use_huge_pages();

// The fork loop. In the zygote: returns nullopt when the parent sends SHUTDOWN or closes the
// socket. In each worker: returns its WorkerStart. Runs with the caller's locks as they are (for
// Python: with the GIL held; the zygote has no other thread). SIGINT is ignored in the zygote
// while it serves (a terminal's Ctrl-C reaches the whole process group) and restored in workers.
std::optional<WorkerStart> zygote_serve(int control, const ZygoteHooks& hooks);

}  // namespace ringpool
