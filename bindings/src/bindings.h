// ringpool._core: one init_<area>() per binding file, all declared here.
#pragma once

#include <pybind11/pybind11.h>

namespace ringpool::py_bindings {

void init_errors(pybind11::module_& m);
void init_channel(pybind11::module_& m);
void init_codec(pybind11::module_& m);

}  // namespace ringpool::py_bindings
