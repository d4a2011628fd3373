// The plain-data fast path of ringpool's object codec: Python objects made only of None, bool,
// int, float, str, bytes, tuple, list and dict are pickled and unpickled here, without a Pickler
// or Unpickler object, a memo table or an intermediate bytes object. What is written is an
// ordinary protocol-5 pickle that any unpickler reads; what is read is the subset of pickle that
// CPython writes for such data. Everything else is declined, and the caller uses the pickle
// module, which then builds the same object or raises the error. See docs/design/queues.md.
#pragma once

#include <Python.h>

#include <cstddef>
#include <string>

namespace ringpool::py_bindings {

// Appends a pickle of obj to out and returns true if obj is plain data; otherwise leaves out as
// it was and returns false. Never leaves a Python error set. (GIL held.)
bool encode_plain(PyObject* obj, std::string& out);

// Unpickles p[0, n) if it uses only the opcodes of plain data (new reference); otherwise returns
// nullptr with no Python error set, and pickle.loads must be asked. Never reads outside the
// range, whatever the bytes. (GIL held.)
PyObject* decode_plain(const char* p, std::size_t n);

}  // namespace ringpool::py_bindings
