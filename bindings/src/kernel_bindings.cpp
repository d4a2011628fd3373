// ringpool._core.kernel_features(): the kernel probes of runtime/kernel.hpp, for ringpool's
// import-time check (ringpool/_platform.py) and `python -m ringpool info`.
#include <cstring>

#include "bindings.h"
#include "ringpool/kernel.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

void init_kernel(py::module_& m) {
  m.def(
      "kernel_features",
      [] {
        py::list out;
        for (const KernelFeature& f : probe_kernel())
          out.append(py::make_tuple(f.name, f.since, f.use, f.required, f.error,
                                    f.error ? std::strerror(f.error) : ""));
        return out;
      },
      "[(name, since Linux version, what ringpool uses it for, required, errno or 0, strerror)], "
      "required features first. Probes without side effects (a few microseconds).");
}

}  // namespace ringpool::py_bindings
