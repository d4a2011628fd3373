// ringpool._core.ChildProcess: the launcher and pidfd handle of runtime/process.hpp.
#include <poll.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "ringpool/process.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

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
}

}  // namespace ringpool::py_bindings
