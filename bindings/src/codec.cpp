#include "codec.h"

#include <optional>
#include <string>

#include "bindings.h"
#include "plain_pickle.h"

namespace py = pybind11;

namespace ringpool::py_bindings {

namespace {

// Module-level objects, looked up once (ringpool.reduction imports _core, so lazily). They live
// as long as the interpreter: never released.
struct Globals {
  PyObject* thread_dumper = nullptr;  // ringpool.reduction._thread_dumper
  PyObject* dumper_class = nullptr;   // ringpool.reduction._Dumper
  PyObject* with_buffers = nullptr;   // ringpool.reduction._with_buffers
  PyObject* loads_item = nullptr;     // ringpool.reduction.loads
  PyObject* explain = nullptr;        // ringpool.reduction._explain
  PyObject* pickle_loads = nullptr;   // _pickle.loads
  PyObject* mp_tls = nullptr;         // multiprocessing.context._tls
  PyObject* copyreg_table = nullptr;  // copyreg.dispatch_table
  PyObject* extra_reducers = nullptr; // ForkingPickler._extra_reducers
  PyObject* spawning_popen = nullptr; // interned "spawning_popen"
};

Globals& globals() {
  static Globals g = [] {
    Globals x;
    py::module_ red = py::module_::import("ringpool.reduction");
    x.thread_dumper = py::object(red.attr("_thread_dumper")).release().ptr();
    x.dumper_class = py::object(red.attr("_Dumper")).release().ptr();
    x.with_buffers = py::object(red.attr("_with_buffers")).release().ptr();
    x.loads_item = py::object(red.attr("loads")).release().ptr();
    x.explain = py::object(red.attr("_explain")).release().ptr();
    x.pickle_loads = py::object(py::module_::import("_pickle").attr("loads")).release().ptr();
    x.mp_tls = py::object(py::module_::import("multiprocessing.context").attr("_tls")).release().ptr();
    x.copyreg_table = py::object(py::module_::import("copyreg").attr("dispatch_table")).release().ptr();
    x.extra_reducers =
        py::object(py::module_::import("multiprocessing.reduction").attr("ForkingPickler").attr("_extra_reducers")).release().ptr();
    x.spawning_popen = PyUnicode_InternFromString("spawning_popen");
    return x;
  }();
  return g;
}

// The thread's dumper (owned by ringpool.reduction._tls, so borrowed here) and its parts. Valid
// while the Python thread state and the reducer tables are the ones it was fetched under: a new
// thread state (a C thread re-entering Python) or a newly registered reducer refetches it.
struct ThreadDumper {
  std::uint64_t tstate_id = ~std::uint64_t{0};
  Py_ssize_t epoch = -1;
  bool busy = false;              // a dump is running on this thread (re-entrancy guard)
  PyObject* dumper = nullptr;
  PyObject* dump = nullptr;
  PyObject* clear_memo = nullptr;
  PyObject* out = nullptr;        // list: the pickler's writes
  PyObject* collector = nullptr;  // the spawning popen stand-in
  PyObject* fds = nullptr;        // list: collector.fds
  PyObject* buffers = nullptr;    // list: out-of-band PickleBuffers
};
thread_local ThreadDumper tl;

Py_ssize_t reducer_epoch(const Globals& g) {
  // Must equal ringpool.reduction._reducer_epoch().
  return PyDict_GET_SIZE(g.copyreg_table) + (PyDict_GET_SIZE(g.extra_reducers) << 24);
}

PyObject* borrowed_attr(PyObject* o, const char* name) {
  PyObject* a = PyObject_GetAttrString(o, name);
  if (a == nullptr) throw py::error_already_set();
  Py_DECREF(a);  // the dumper keeps it alive
  return a;
}

void fill(ThreadDumper& t, PyObject* d) {
  t.dumper = d;
  t.dump = borrowed_attr(d, "dump");
  t.clear_memo = borrowed_attr(d, "clear_memo");
  t.out = borrowed_attr(d, "out");
  t.collector = borrowed_attr(d, "collector");
  t.fds = borrowed_attr(t.collector, "fds");
  t.buffers = borrowed_attr(d, "buffers");
}

ThreadDumper& thread_dumper(const Globals& g) {
  const std::uint64_t id = PyThreadState_GetID(PyThreadState_Get());
  const Py_ssize_t epoch = reducer_epoch(g);
  if (tl.tstate_id == id && tl.epoch == epoch) return tl;
  PyObject* d = PyObject_CallNoArgs(g.thread_dumper);
  if (d == nullptr) throw py::error_already_set();
  Py_DECREF(d);  // owned by the thread-local in ringpool.reduction
  fill(tl, d);
  tl.tstate_id = id;
  tl.epoch = epoch;
  return tl;
}

// Marks the thread's cached dumper busy for one dump.
class BusyScope {
 public:
  explicit BusyScope(bool& flag) : flag_(flag) { flag_ = true; }
  ~BusyScope() { flag_ = false; }
  BusyScope(const BusyScope&) = delete;
  BusyScope& operator=(const BusyScope&) = delete;

 private:
  bool& flag_;
};

// dump_object's encoding buffer is kept between calls up to this capacity.
constexpr std::size_t kKeepEncodeBuffer = 256 * 1024;

void clear_list(PyObject* l) { PyList_SetSlice(l, 0, PyList_GET_SIZE(l), nullptr); }

// Collects the pickler's output into one bytes object and empties the list.
PyObject* take_output(PyObject* out) {
  const Py_ssize_t n = PyList_GET_SIZE(out);
  PyObject* data;
  if (n == 1) {
    data = Py_NewRef(PyList_GET_ITEM(out, 0));
  } else {
    PyObject* empty = PyBytes_FromStringAndSize(nullptr, 0);
    data = _PyBytes_Join(empty, out);
    Py_DECREF(empty);
  }
  clear_list(out);
  return data;
}

// Replaces the pending pickling error of obj by one that names the attribute path of the part
// that failed (ringpool.reduction._explain), chained to the original. Leaves an error set.
void explain_pickling_error(const Globals& g, PyObject* obj) {
  PyObject *et, *ev, *tb;
  PyErr_Fetch(&et, &ev, &tb);
  PyErr_NormalizeException(&et, &ev, &tb);
  if (ev == nullptr || !PyErr_GivenExceptionMatches(et, PyExc_Exception)) {  // KeyboardInterrupt...
    PyErr_Restore(et, ev, tb);
    return;
  }
  if (tb != nullptr) PyException_SetTraceback(ev, tb);
  PyObject* better = PyObject_CallFunctionObjArgs(g.explain, obj, ev, nullptr);
  if (better == nullptr || better == ev) {
    Py_XDECREF(better);
    PyErr_Clear();
    PyErr_Restore(et, ev, tb);
    return;
  }
  PyException_SetCause(better, ev);  // steals our reference to ev
  Py_XDECREF(tb);
  Py_DECREF(et);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(better)), better);
  Py_DECREF(better);
}

}  // namespace

bool dump_plain(PyObject* obj, Dumped& out) {
  // Plain data pickles the same with any pickler (a reducer_override is never asked about it):
  // written here, with no pickler at all. The buffer never holds a Python reference and
  // encode_plain runs no Python code, so no re-entrant call can see it half-written.
  thread_local std::string buf;
  buf.clear();
  if (!encode_plain(obj, buf)) return false;
  PyObject* b = PyBytes_FromStringAndSize(buf.data(), static_cast<Py_ssize_t>(buf.size()));
  if (buf.capacity() > kKeepEncodeBuffer) std::string().swap(buf);
  if (b == nullptr) throw py::error_already_set();
  out.flags = 0;
  out.fds.clear();
  out.payload = py::reinterpret_steal<py::object>(b);
  return true;
}

void dump_object(PyObject* obj, Dumped& out) {
  if (!dump_plain(obj, out)) dump_general(obj, out);
}

void dump_general(PyObject* obj, Dumped& out) {
  const Globals& g = globals();
  // A reducer may pickle with ringpool again on this thread (or a finalizer run by the GC in the
  // middle of a dump may): a C pickler is not re-entrant, so a nested dump gets a fresh dumper.
  // Either way the dumper is held strongly for the whole dump, so a reducer registered meanwhile
  // (which makes the cached one stale) cannot free it under us.
  ThreadDumper nested;
  py::object hold;
  const bool reentered = tl.busy;
  if (reentered) {
    PyObject* fresh = PyObject_CallNoArgs(g.dumper_class);
    if (fresh == nullptr) throw py::error_already_set();
    hold = py::reinterpret_steal<py::object>(fresh);
    fill(nested, fresh);  // borrowed attributes of `fresh`, alive as long as `hold`
  }
  ThreadDumper& d = reentered ? nested : thread_dumper(g);
  if (!reentered) hold = py::reinterpret_borrow<py::object>(d.dumper);
  std::optional<BusyScope> busy;
  if (!reentered) busy.emplace(tl.busy);
  out.flags = 0;
  out.fds.clear();
  // Make multiprocessing.reduction.DupFd attach descriptors to our frame (see reduction.py).
  PyObject* prev = PyObject_GetAttr(g.mp_tls, g.spawning_popen);
  if (prev == nullptr) {
    PyErr_Clear();
    prev = Py_NewRef(Py_None);
  }
  if (PyObject_SetAttr(g.mp_tls, g.spawning_popen, d.collector) != 0) {
    Py_DECREF(prev);
    throw py::error_already_set();
  }
  PyObject* r = PyObject_CallOneArg(d.dump, obj);
  // Restore state whatever happened, keeping the pickling error (if any) in place.
  PyObject *et, *ev, *tb;
  PyErr_Fetch(&et, &ev, &tb);
  PyObject_SetAttr(g.mp_tls, g.spawning_popen, prev);
  Py_DECREF(prev);
  PyObject* cm = PyObject_CallNoArgs(d.clear_memo);
  Py_XDECREF(cm);
  PyErr_Clear();
  PyErr_Restore(et, ev, tb);
  if (r == nullptr) {
    clear_list(d.out);
    clear_list(d.fds);
    clear_list(d.buffers);
    busy.reset();  // the explanation pickles parts of obj with fresh picklers
    explain_pickling_error(g, obj);
    throw py::error_already_set();
  }
  Py_DECREF(r);
  PyObject* data = take_output(d.out);
  if (data == nullptr) throw py::error_already_set();
  out.payload = py::reinterpret_steal<py::object>(data);
  if (PyList_GET_SIZE(d.fds) != 0) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(d.fds); ++i)
      out.fds.push_back(static_cast<int>(PyLong_AsLong(PyList_GET_ITEM(d.fds, i))));
    clear_list(d.fds);
  }
  if (PyList_GET_SIZE(d.buffers) != 0) {
    PyObject* bufs = PyList_GetSlice(d.buffers, 0, PyList_GET_SIZE(d.buffers));
    clear_list(d.buffers);
    PyObject* pieces = PyObject_CallFunctionObjArgs(g.with_buffers, out.payload.ptr(), bufs, nullptr);
    Py_DECREF(bufs);
    if (pieces == nullptr) throw py::error_already_set();
    out.payload = py::reinterpret_steal<py::object>(pieces);
    out.flags = 2;  // proto::flag::kBuffers
  }
}

PyObject* load_item(PyObject* item) {
  const Globals& g = globals();
  if (PyBytes_CheckExact(item)) {
    if (PyObject* r = decode_plain(PyBytes_AS_STRING(item), static_cast<std::size_t>(PyBytes_GET_SIZE(item))))
      return r;
    return PyObject_CallOneArg(g.pickle_loads, item);
  }
  return PyObject_CallOneArg(g.loads_item, item);
}

void init_codec(py::module_& m) {
  // The plain-data fast path on its own, for tests: _plain_dumps gives None when it declines,
  // _plain_loads gives (accepted, object).
  m.def(
      "_plain_dumps",
      [](py::handle obj) -> py::object {
        std::string buf;
        if (!encode_plain(obj.ptr(), buf)) return py::none();
        return py::bytes(buf);
      },
      py::arg("obj"));
  m.def(
      "_plain_loads",
      [](const py::bytes& data) -> py::object {
        char* p = nullptr;
        Py_ssize_t n = 0;
        PyBytes_AsStringAndSize(data.ptr(), &p, &n);
        PyObject* r = decode_plain(p, static_cast<std::size_t>(n));
        if (r == nullptr) return py::make_tuple(false, py::none());
        return py::make_tuple(true, py::reinterpret_steal<py::object>(r));
      },
      py::arg("data"));
  m.def(
      "dumps",
      [](py::handle obj) {
        Dumped d;
        dump_object(obj.ptr(), d);
        py::object fds = py::none();
        if (!d.fds.empty()) {  // (a list built here: this file does not include pybind11/stl.h)
          py::list l(d.fds.size());
          for (std::size_t i = 0; i < d.fds.size(); ++i) l[i] = py::int_(d.fds[i]);
          fds = std::move(l);
        }
        return py::make_tuple(d.payload, d.flags, fds);
      },
      py::arg("obj"),
      "Pickle obj for a ringpool frame: (payload, flags, fds). See ringpool.reduction.dumps.");
}

}  // namespace ringpool::py_bindings
