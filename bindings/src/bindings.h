// ringpool._core: one init_<area>() per binding file, all declared here.
#pragma once

#include <pybind11/pybind11.h>

#include "ringpool/log.hpp"

namespace ringpool::py_bindings {

// Releases the GIL for a scope. Unlike py::gil_scoped_release, the destructor is
// noexcept(false): while the interpreter finalizes, re-taking the GIL ends a daemon thread with
// pthread_exit, a forced unwind that must be allowed through (a noexcept destructor would turn it
// into std::terminate and abort the whole process at exit).
class ReleaseGil {
 public:
  ReleaseGil() : ts_(PyEval_SaveThread()) {}
  ~ReleaseGil() noexcept(false) { PyEval_RestoreThread(ts_); }
  ReleaseGil(const ReleaseGil&) = delete;
  ReleaseGil& operator=(const ReleaseGil&) = delete;

 private:
  PyThreadState* ts_;
};


void init_errors(pybind11::module_& m);
void init_channel(pybind11::module_& m);
void init_codec(pybind11::module_& m);
void init_process(pybind11::module_& m);
void init_pickle(pybind11::module_& m);
void init_task(pybind11::module_& m);
void init_scheduler(pybind11::module_& m);
void init_kernel(pybind11::module_& m);
void init_log(pybind11::module_& m);

// A LogHandler that queues the runtime's records, marked with tag, for _core.log_take()
// (log_bindings.cpp): it never takes the GIL.
LogHandler python_log_handler(int tag);

}  // namespace ringpool::py_bindings
