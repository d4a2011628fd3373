// What ringpool needs from the Linux kernel, probed without starting or changing anything.
//
// Each probe is one or two system calls that either succeed harmlessly or fail at once (a few
// microseconds in all): ringpool's Python package runs them at import and refuses to load, naming
// what is missing, instead of failing later in the middle of a start() with a bare errno.
// A seccomp filter (an old container profile) that answers ENOSYS counts as missing, which is what
// it is to ringpool: the spawner has no fallback.
#pragma once

#include <vector>

namespace ringpool {

struct KernelFeature {
  const char* name;   // the call as ringpool uses it, e.g. "clone3(CLONE_PIDFD)"
  const char* since;  // the first Linux release that has it, e.g. "5.3"
  const char* use;    // what ringpool does with it (one phrase)
  bool required;      // false: used where present (best effort), skipped otherwise
  int error;          // 0: present; else the errno the probe got
};

// Every feature the runtime relies on, required ones first. Any thread; no side effect (descriptors
// the probes open are closed before it returns).
std::vector<KernelFeature> probe_kernel();

}  // namespace ringpool
