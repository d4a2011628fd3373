// ringpool._core._pickle_roundtrip: the C++ plain-data pickle codec (runtime/pickle.hpp) seen
// from Python, so that tests/python/test_pickle_codec.py can hold it against CPython's pickle.
#include <string>
#include <string_view>

#include "bindings.h"
#include "ringpool/pickle.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

void init_pickle(py::module_& m) {
  m.def(
      "_pickle_roundtrip",
      [](const py::bytes& data, int protocol) {
        char* buf = nullptr;
        Py_ssize_t len = 0;
        if (PyBytes_AsStringAndSize(data.ptr(), &buf, &len) != 0) throw py::error_already_set();
        std::string out;
        std::string error;
        {
          // Pure C++ on a buffer the bytes object keeps alive: other threads may run meanwhile.
          ReleaseGil nogil;
          try {
            out = pickle_dumps(pickle_loads(std::string_view(buf, static_cast<std::size_t>(len))), protocol);
          } catch (const PickleError& e) {
            error = e.what();
          }
        }
        if (!error.empty()) throw py::value_error(error);
        return py::bytes(out);
      },
      py::arg("data"), py::arg("protocol") = 5,
      "Decodes a pickle of plain data with the C++ codec and encodes the result again at `protocol` "
      "(2 to 5). Raises ValueError if the pickle is outside the plain-data subset or malformed.");
}

}  // namespace ringpool::py_bindings
