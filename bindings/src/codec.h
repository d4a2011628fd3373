// The object codec of ringpool channels, in C for the hot path: pickling with the thread's cached
// ForkingPickler (built by ringpool.reduction) under the handle collector, and unpickling.
#pragma once

#include <Python.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace ringpool::py_bindings {

struct Dumped {
  pybind11::object payload;  // bytes, or a list of buffers (FLAG_BUFFERS layout)
  std::uint8_t flags = 0;
  std::vector<int> fds;      // borrowed from the objects' reducers
};

// Pickles obj; throws error_already_set with the pickling error (nothing half-done remains).
// Plain data goes through encode_plain (plain_pickle.h), the rest through dump_general.
void dump_object(PyObject* obj, Dumped& out);

// dump_object's first step alone: true if obj is plain data encode_plain writes; false (out
// untouched, no Python error set) otherwise.
bool dump_plain(PyObject* obj, Dumped& out);

// The thread's ForkingPickler under the handle collector, for what encode_plain declined.
void dump_general(PyObject* obj, Dumped& out);

// Unpickles an item as Channel.get returns it (bytes, or (flags, payload, fds)). New reference,
// or nullptr with a Python error set.
PyObject* load_item(PyObject* item);

}  // namespace ringpool::py_bindings
