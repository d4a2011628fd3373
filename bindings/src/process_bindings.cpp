// ringpool._core.ChildProcess, Supervisor and the zygote's fork loop (runtime/process.hpp,
// supervisor.hpp, detail/zygote.hpp).
#include <malloc.h>
#include <poll.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <climits>

#include "bindings.h"
#include "ringpool/detail/zygote.hpp"
#include "ringpool/process.hpp"
#include "ringpool/supervisor.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

namespace {

void before_fork() { PyOS_BeforeFork(); }
void after_fork_parent() { PyOS_AfterFork_Parent(); }
void after_fork_child() { PyOS_AfterFork_Child(); }

LaunchOptions program(const std::string& executable, const std::vector<std::string>& argv,
                      const std::vector<std::string>& env, const std::string& cwd) {
  LaunchOptions o;
  o.executable = executable;
  o.argv = argv;
  o.env = env;
  o.cwd = cwd;
  return o;
}

}  // namespace

void init_process(py::module_& m) {
  py::class_<ChildProcess>(m, "ChildProcess", R"doc(A child started with exactly the descriptors it is given.

Signals go through a pidfd (never to a recycled pid); `sentinel` is that pidfd, readable once the
child has exited. poll()/wait() return the exit code in Python's convention (-N: killed by N).)doc")
      .def_static(
          "launch",
          [](const std::string& executable, const std::vector<std::string>& argv, const std::vector<std::string>& env,
             const std::vector<std::pair<int, int>>& fds, const std::string& cwd, int parent_death_signal,
             bool new_session) {
            LaunchOptions o{executable, argv, env, fds, cwd, parent_death_signal, new_session};
            ReleaseGil nogil;  // clone + exec wait; touches no Python state
            return ChildProcess::launch(o);
          },
          py::arg("executable"), py::arg("argv"), py::arg("env"), py::arg("fds") = std::vector<std::pair<int, int>>{},
          py::arg("cwd") = "", py::arg("parent_death_signal") = 0, py::arg("new_session") = false)
      .def_property_readonly("pid", &ChildProcess::pid)
      .def_property_readonly("sentinel", &ChildProcess::sentinel)
      .def("poll", &ChildProcess::poll, "The exit code (reaping the child), or None while it runs.")
      .def(
          "wait",
          [](ChildProcess& c) {
            // Sleep on the pidfd in slices, so Python signal handlers run (Ctrl-C) whichever
            // thread the signal was delivered to.
            for (;;) {
              if (auto r = c.poll()) return *r;
              {
                ReleaseGil nogil;
                pollfd p{c.sentinel(), POLLIN, 0};
                ::poll(&p, 1, 20);
              }
              if (PyErr_CheckSignals() != 0) throw py::error_already_set();
            }
          },
          "Block until the child exits; returns its exit code.")
      .def("send_signal", &ChildProcess::send_signal, py::arg("sig"),
           "Signal through the pidfd; False if the child has already exited.");

  py::class_<Supervisor>(m, "Supervisor", R"doc(A context's process supervisor: a Boost.Asio thread that
starts every worker (exec mode: a fresh interpreter each; zygote mode: forked by a preloaded
zygote as a child of this process) and watches them through pidfds.)doc")
      .def_static("exec_mode", [] { return Supervisor::exec_mode(); })
      .def_static(
          "zygote_mode",
          [](const std::string& executable, const std::vector<std::string>& argv, const std::vector<std::string>& env,
             const std::string& cwd, py::bytes config, double ready_timeout, double fork_timeout, int spares) {
            ZygoteOptions o;
            o.launch = program(executable, argv, env, cwd);
            o.config = std::string(config);
            o.ready_timeout = std::chrono::milliseconds(static_cast<long long>(ready_timeout * 1000));
            o.fork_timeout = std::chrono::milliseconds(static_cast<long long>(fork_timeout * 1000));
            o.spares = spares;
            return Supervisor::zygote_mode(std::move(o));
          },
          py::arg("executable"), py::arg("argv"), py::arg("env"), py::arg("cwd"), py::arg("config"),
          py::arg("ready_timeout") = 300.0, py::arg("fork_timeout") = 30.0, py::arg("spares") = 4)
      .def(
          "spawn",
          [](Supervisor& s, const std::vector<int>& fds, std::array<int, 3> stdio, const std::string& executable,
             const std::vector<std::string>& argv, const std::vector<std::string>& env, const std::string& cwd) {
            SpawnRequest r;
            r.program = program(executable, argv, env, cwd);
            r.stdio = stdio;
            r.fds = fds;
            ReleaseGil nogil;
            return s.spawn(std::move(r));
          },
          py::arg("fds"), py::arg("stdio") = std::array<int, 3>{-1, -1, -1}, py::arg("executable") = "",
          py::arg("argv") = std::vector<std::string>{}, py::arg("env") = std::vector<std::string>{},
          py::arg("cwd") = "",
          "Start a worker with fds at fd_base.. (exec mode: the program given; 3..). Returns its ChildProcess.")
      .def(
          "start",
          [](Supervisor& s) {
            ReleaseGil nogil;
            s.start();
          },
          "Bring the zygote up now (preloaded); raises its error.")
      .def("start_async", &Supervisor::start_async)
      .def(
          "stop",
          [](Supervisor& s) {
            ReleaseGil nogil;
            s.stop();
          },
          "Orderly zygote stop; running workers go on.")
      .def_property_readonly("mode", [](Supervisor& s) { return std::string(s.mode()); })
      .def_property_readonly("zygote_pid", [](Supervisor& s) {
        ReleaseGil nogil;
        return s.zygote_pid();
      })
      .def("live_workers", [](Supervisor& s) {
        ReleaseGil nogil;
        return s.live_workers();
      })
      .def("exit_code", [](Supervisor& s, pid_t pid) {
        ReleaseGil nogil;
        return s.exit_code(pid);
      })
      .def(
          "log_to_python",
          [](Supervisor& s, int tag) {
            LogHandler h = python_log_handler(tag);
            ReleaseGil nogil;
            s.set_log(std::move(h));
          },
          py::arg("tag"),
          "Queue this supervisor's zygote events (started, died, restarted, stopped) for log_take(), marked "
          "with tag (ringpool._runtime_log routes them to logging).")
      .def_property_readonly("zygote_note", &Supervisor::zygote_note,
                             "What the latest ready zygote said in its READY (JSON from the Python zygote, or '').")
      .def_property_readonly("zygote_exits", [](Supervisor& s) {
        ReleaseGil nogil;
        return s.zygote_exits();
      });

  m.def(
      "zygote_receive_config",
      [](int control, double timeout) {
        std::string cfg;
        {
          ReleaseGil nogil;
          cfg = zygote_receive_config(control, timeout < 0 ? -1 : static_cast<int>(timeout * 1000));
        }
        return py::bytes(cfg);
      },
      py::arg("control"), py::arg("timeout") = -1.0);
  m.def("zygote_send_ready", &zygote_send_ready, py::arg("control"), py::arg("ok"), py::arg("message") = "");
  m.def(
      "zygote_serve",
      [](int control) -> py::object {
        // The GIL stays held: the zygote has no other thread, and PyOS_BeforeFork/AfterFork need it.
        ZygoteHooks hooks{&before_fork, &after_fork_parent, &after_fork_child};
        auto w = zygote_serve(control, hooks);
        if (!w) return py::none();
        return py::make_tuple(w->fd_base, w->nfds);
      },
      py::arg("control"),
      "The zygote's fork loop: None in the zygote when told to stop; (fd_base, nfds) in each worker.");
  m.def("zygote_use_huge_pages", &zygote_use_huge_pages,
        "Back the zygote's anonymous memory with transparent huge pages (THP mode madvise); returns "
        "the bytes advised, 0 if not applicable. Its workers clear the advice after fork.");
  m.def("die_with", &die_with, py::arg("root"),
        "A nested worker: outlive the parent (clear the parent-death signal) and die with root "
        "(a thread SIGKILLs this process when root exits).");
  m.def("thread_count", &thread_count, "Threads of this process (from /proc/self/task).");
  m.def(
      "retain_heap",
      [](std::size_t nbytes) {
#if defined(__GLIBC__)
        // glibc returns the free top of the heap to the kernel once it exceeds M_TRIM_THRESHOLD,
        // and serves blocks above M_MMAP_THRESHOLD with a fresh mmap each; either way the next
        // allocation touches fresh pages (~2.5 us per 4 KiB here). Both limits raised: freed
        // memory up to nbytes stays in the heap for reuse, and blocks up to half of it (at most
        // glibc's 32 MiB cap) come from the heap. Setting them also ends glibc's own adaptive
        // adjustment of both.
        const std::size_t trim = std::min<std::size_t>(nbytes, INT_MAX);
        const std::size_t mmap = std::min<std::size_t>(trim / 2, std::size_t{32} << 20);
        if (mmap < (std::size_t{128} << 10)) return false;  // below glibc's default: no gain
        return mallopt(M_MMAP_THRESHOLD, static_cast<int>(mmap)) == 1 &&
               mallopt(M_TRIM_THRESHOLD, static_cast<int>(trim)) == 1;
#else
        (void)nbytes;
        return false;
#endif
      },
      py::arg("nbytes"),
      "Keep up to nbytes of freed heap memory for reuse (glibc mallopt); False where not applied.");
}

}  // namespace ringpool::py_bindings
