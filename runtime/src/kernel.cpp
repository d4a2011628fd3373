#include "ringpool/kernel.hpp"

#include <fcntl.h>
#include <linux/close_range.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include "ringpool/fd.hpp"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

namespace ringpool {

namespace {

int error_of(long r) { return r < 0 ? errno : 0; }

// madvise checks the advice before anything else, and a zero-length range at a page-aligned
// address (0) is then a no-op: EINVAL here means this kernel does not know the advice.
int probe_advice(int advice) { return error_of(::madvise(nullptr, 0, advice)); }

}  // namespace

std::vector<KernelFeature> probe_kernel() {
  std::vector<KernelFeature> out;
  out.reserve(10);

  UniqueFd memfd(::memfd_create("ringpool-probe", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  int err = memfd ? 0 : errno;
  out.push_back({"memfd_create(MFD_ALLOW_SEALING)", "3.17", "unnamed shared-memory segments", true, err});
  if (memfd) err = error_of(::fcntl(memfd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW));
  out.push_back({"fcntl(F_ADD_SEALS)", "3.17", "segments whose size a peer cannot change", true, err});

  // clone3 with a size below its smallest struct fails with EINVAL before doing anything.
  err = error_of(::syscall(SYS_clone3, nullptr, 0));
  out.push_back({"clone3(CLONE_PIDFD)", "5.3", "starting workers with a pidfd", true, err == EINVAL ? 0 : err});

  UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0)));
  err = pidfd ? 0 : errno;
  out.push_back({"pidfd_open", "5.3", "watching processes without recycled pids", true, err});
  int send_err = err, wait_err = err;
  if (pidfd) {
    send_err = error_of(::syscall(SYS_pidfd_send_signal, pidfd.get(), 0, nullptr, 0));  // signal 0: a check
    // This process is not its own child: ECHILD where P_PIDFD is known, EINVAL where it is not.
    siginfo_t si{};
    wait_err = error_of(::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd.get()), &si,
                                 WEXITED | WNOHANG));
    if (wait_err == ECHILD) wait_err = 0;
  }
  out.push_back({"pidfd_send_signal", "5.1", "signalling workers", true, send_err});
  out.push_back({"waitid(P_PIDFD)", "5.4", "reaping workers", true, wait_err});

  // An empty range: nothing is marked, but the flag is validated.
  err = error_of(::syscall(SYS_close_range, ~0u, ~0u, CLOSE_RANGE_CLOEXEC));
  out.push_back({"close_range(CLOSE_RANGE_CLOEXEC)", "5.11", "giving a worker only its own descriptors", true, err});

  out.push_back({"madvise(MADV_POPULATE_WRITE)", "5.14", "ring pages made ahead of use", false,
                 probe_advice(MADV_POPULATE_WRITE)});
  out.push_back({"madvise(MADV_HUGEPAGE)", "2.6.38", "the zygote's memory in transparent huge pages", false,
                 probe_advice(MADV_HUGEPAGE)});
  out.push_back({"madvise(MADV_COLLAPSE)", "6.1", "the zygote's heap collapsed into huge pages at once", false,
                 probe_advice(MADV_COLLAPSE)});
  return out;
}

}  // namespace ringpool
