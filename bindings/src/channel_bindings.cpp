// ringpool._core.Channel: the Python face of ringpool::Channel.
//
// GIL rules (they keep a cross-process lock and the GIL from ever deadlocking):
// - the producer lock is taken only while holding the GIL, and the GIL is never released inside
//   it, so its holder never waits for the GIL;
// - the consumer lock is lock-or-release (PyBlockingHook): tried with the GIL held; if another
//   thread or process holds it, waited for with the GIL released, and the GIL taken back once it
//   is ours. Inside it, a wait for a frame's handles (a producer that sent them late, or never)
//   also runs without the GIL. A thread holding the consumer lock may so wait for the GIL, which
//   is safe because no thread ever waits for the consumer lock while holding the GIL;
// - payload objects are allocated under the consumer lock (with the GIL), nothing else that needs
//   the GIL runs there;
// - waits (spin, futex) run with the GIL released and no ring lock held;
// - large copies into out-of-band blocks run with the GIL released.
// Receiving, opening out-of-band blocks and the wait policy are ringpool::Channel's (channel.hpp,
// wait.hpp); this file converts Python objects, handles the GIL and runs signal handlers.
#include <Python.h>
#include <pybind11/stl.h>

#include <cxxabi.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <deque>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bindings.h"
#include "codec.h"
#include "plain_pickle.h"
#include "ringpool/channel.hpp"
#include "ringpool/error.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

namespace {

// A put that finds the ring full waits while consumers keep taking frames (backpressure: the
// producer sleeps, the consumer gets the CPU), and buffers the frame locally once they have taken
// nothing for this long, so a process that fills its own queue before reading never deadlocks.
constexpr std::int64_t kStallNs = 5'000'000;

// An accounting bit of the Python API only: never wait on a full ring, buffer at once.
constexpr unsigned kNoBackpressure = 1u << 8;

// A Python timeout in seconds (None arrives as -1) as the runtime's nanoseconds: negative, or too
// long to count in int64 nanoseconds (inf, 1e12 s), waits forever (converting it would overflow:
// undefined, on x86 INT64_MIN, an expired deadline and Empty at once); NaN is a ValueError.
std::int64_t timeout_ns(double timeout) {
  if (std::isnan(timeout)) throw py::value_error("timeout must be a number, not NaN");
  if (timeout < 0 || !(timeout < 9.2e9)) return -1;  // 9.2e9 s: just under INT64_MAX ns
  const auto ns = static_cast<std::int64_t>(timeout * 1e9);
  return ns == 0 && timeout > 0 ? 1 : ns;  // a positive timeout still waits one round
}

// Each wait round of a blocking call (ringpool::block_until's around): run without the GIL, then
// Python's signal handlers, whose exception (KeyboardInterrupt) ends the wait. Rounds last at
// most WaitPolicy::slice_ns, so a signal delivered to another thread is seen promptly too.
struct PyWaitHook {
  template <class Round>
  void operator()(Round&& round) const {
    {
      ReleaseGil nogil;
      round();
    }
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
};

// Where a take blocks inside the consumer lock, or for it (Ring::try_get_many): without the GIL.
// Every take from Python passes it; a take without it would wait for the consumer lock holding the
// GIL, while the lock's holder may be waiting for the GIL (see the rules above).
struct PyBlockingHook final : BlockingHook {
  void invoke(void (*fn)(void*), void* arg) override {
    ReleaseGil nogil;
    fn(arg);
  }
};
PyBlockingHook g_blocking;

// The runtime's spin-then-sleep wait for conditions other than a frame (room, an item slot, join).
template <class Try, class Ready, class Sleep>
bool block_until(double timeout, Try&& try_fn, Ready&& ready, Sleep&& sleep) {
  return ringpool::block_until(timeout_ns(timeout), try_fn, ready, sleep, PyWaitHook{});
}

// Borrowed views of the payload pieces for the duration of one put.
class Pieces {
 public:
  explicit Pieces(py::handle payload) {
    if (PyBytes_CheckExact(payload.ptr())) {
      add_bytes(payload.ptr());
      return;
    }
    if (!PyList_Check(payload.ptr()) && !PyTuple_Check(payload.ptr())) {
      add_buffer(payload.ptr());
      return;
    }
    py::sequence seq = py::reinterpret_borrow<py::sequence>(payload);
    views_.reserve(seq.size());
    for (py::handle item : seq) {
      if (PyBytes_CheckExact(item.ptr()))
        add_bytes(item.ptr());
      else
        add_buffer(item.ptr());
    }
  }
  ~Pieces() {
    for (auto& v : views_) PyBuffer_Release(&v);
  }
  Pieces(const Pieces&) = delete;
  Pieces& operator=(const Pieces&) = delete;
  const Ring::Piece* data() const { return pieces_.data(); }
  std::size_t size() const { return pieces_.size(); }
  std::size_t total() const { return total_; }

 private:
  void add_bytes(PyObject* b) {
    pieces_.push_back({PyBytes_AS_STRING(b), static_cast<std::size_t>(PyBytes_GET_SIZE(b))});
    total_ += pieces_.back().len;
  }
  void add_buffer(PyObject* o) {
    Py_buffer v;
    if (PyObject_GetBuffer(o, &v, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
    views_.push_back(v);
    pieces_.push_back({v.buf, static_cast<std::size_t>(v.len)});
    total_ += pieces_.back().len;
  }
  std::vector<Ring::Piece> pieces_;
  std::vector<Py_buffer> views_;
  std::size_t total_ = 0;
};

std::vector<int> to_fds(const py::object& fds) {
  std::vector<int> out;
  if (fds.is_none()) return out;
  for (py::handle h : fds) out.push_back(h.cast<int>());
  return out;
}

// Collects frames taken under the consumer lock as Python objects (GIL held by the caller).
struct Frame {
  py::object payload;  // bytes / bytearray, or None for OOB (descriptor below)
  std::uint8_t flags;
  std::uint32_t nhandles;
  std::uint64_t oob_len;
};

Frame make_frame(const proto::FrameHeader& h, const std::uint8_t* p) {
    Frame f{py::none(), h.flags, h.nhandles, 0};
    if (h.flags & proto::flag::kOutOfBand) {
      f.oob_len = Channel::oob_length(h, p);
    } else {
      PyObject* o = (h.flags & proto::flag::kBuffers)
                        ? PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(p), static_cast<Py_ssize_t>(h.payload_len))
                        : PyBytes_FromStringAndSize(reinterpret_cast<const char*>(p), static_cast<Py_ssize_t>(h.payload_len));
      if (o == nullptr) throw py::error_already_set();
      f.payload = py::reinterpret_steal<py::object>(o);
    }
    return f;
}

struct PySink final : Ring::Sink {
  std::vector<Frame> frames;
  void take(const proto::FrameHeader& h, const std::uint8_t* p) override { frames.push_back(make_frame(h, p)); }
};

// get() takes exactly one frame: no vector.
struct OneSink final : Ring::Sink {
  Frame frame;
  void take(const proto::FrameHeader& h, const std::uint8_t* p) override { frame = make_frame(h, p); }
};

// A worker's code-shipping hook (ringpool._worker): its boot ring carries new versions of
// registered packages, and an object-level get installs them after taking its frames and before
// unpickling them. The parent publishes an update before anything that may refer to it, so a
// frame taken here is never unpickled against an older version than the one sent before it.
struct ModulesHook {
  std::shared_ptr<Ring> ring;
  py::object install;  // called with no arguments; never raises (it reports its own errors)
};
ModulesHook& modules_hook() {
  static ModulesHook* h = new ModulesHook;  // leaked: called from pickling paths until the end
  return *h;
}
thread_local bool tl_in_modules_hook = false;

inline void install_pending_modules() {
  ModulesHook& h = modules_hook();
  if (!h.ring || tl_in_modules_hook || !h.ring->readable()) return;
  tl_in_modules_hook = true;
  PyObject* r = PyObject_CallNoArgs(h.install.ptr());
  tl_in_modules_hook = false;
  if (r == nullptr) {
    PyErr_WriteUnraisable(h.install.ptr());  // never lose the frames this get has taken
  } else {
    Py_DECREF(r);
  }
}

class PyChannel {
 public:
  explicit PyChannel(std::shared_ptr<Ring> ring) : ch_(std::move(ring)) {}

  static PyChannel create(const py::int_& capacity, std::size_t inline_max, bool count_items) {
    // Any Python int may arrive: a negative or huge one is a ValueError like a zero (Ring::create),
    // not pybind11's TypeError or OverflowError.
    const unsigned long long cap = PyLong_AsUnsignedLongLong(capacity.ptr());
    if (cap == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      throw py::value_error("ring capacity must be 1 to " + std::to_string(kMaxRingCapacity) + " bytes, not " +
                            py::str(py::handle(capacity)).cast<std::string>());
    }
    return PyChannel(Ring::create({static_cast<std::size_t>(cap), inline_max, count_items}));
  }
  static PyChannel attach(int memfd, int tx, int rx, int event) {
    return PyChannel(Ring::attach(UniqueFd(memfd), UniqueFd(tx), UniqueFd(rx), UniqueFd(event)));
  }

  py::tuple handles() const {
    RingHandles h = ring().handles();
    return py::make_tuple(h.memfd, h.tx, h.rx, h.event);
  }

  // Publishes; returns None, or a Pending when the ring is full (accepted and counted).
  py::object put(py::handle payload, std::uint8_t flags, const py::object& fds_obj, unsigned accounting) {
    if (PyBytes_CheckExact(payload.ptr()) && fds_obj.is_none()) {
      // The hot path: one small pickle, no handles, no heap allocation.
      const std::size_t n = static_cast<std::size_t>(PyBytes_GET_SIZE(payload.ptr()));
      if (!ch_.out_of_band(n)) {
        Ring::Piece piece{PyBytes_AS_STRING(payload.ptr()), n};
        Ring::PutStatus st = ring().try_put(proto::Kind::DATA, flags, &piece, 1, nullptr, 0, accounting);
        if (st == Ring::PutStatus::ok) return py::none();
      }
    }
    std::vector<int> fds = to_fds(fds_obj);
    Pieces pieces(payload);
    std::unique_ptr<Pending> p;
    if (ch_.out_of_band(pieces.total())) {
      ReleaseGil nogil;  // a big copy; the Py_buffers stay held
      p = ch_.put(proto::Kind::DATA, flags, pieces.data(), pieces.size(), fds.data(), fds.size(), accounting);
    } else {
      p = ch_.put(proto::Kind::DATA, flags, pieces.data(), pieces.size(), fds.data(), fds.size(), accounting);
    }
    if (!p) return py::none();
    return py::cast(std::move(p));
  }

  // A Pending that is not tried now (an earlier one of this producer still waits); accounting is
  // applied at once, as for an accepted put.
  std::unique_ptr<Pending> stage(py::handle payload, std::uint8_t flags, const py::object& fds_obj, unsigned accounting) {
    std::vector<int> fds = to_fds(fds_obj);
    Pieces pieces(payload);
    std::unique_ptr<Pending> p;
    {
      ReleaseGil nogil;
      p = ch_.stage(proto::Kind::DATA, flags, pieces.data(), pieces.size(), fds.data(), fds.size());
    }
    if (accounting & Ring::kCountItem) {
      ring().accept_pending();
      p->counted = true;
    }
    if (accounting & Ring::kCountTask) ring().add_unfinished(1);
    return p;
  }

  bool publish(Pending& p) { return ch_.publish(p, 0); }

  bool wait_writable(std::size_t record_bytes, double timeout) {
    return block_until(
        timeout, [&] { return ring().writable(record_bytes); }, [&] { return ring().writable(record_bytes); },
        [&](std::int64_t ns) { ring().wait_space(record_bytes, ns); });
  }

  // None on timeout; bytes for a plain frame; (flags, payload, fds) otherwise.
  py::object get(double timeout) {
    if (!leftover_.empty()) return raise_if_error(pop_leftover());
    OneSink sink;
    std::vector<UniqueFd> fds;
    if (!ch_.get(sink, fds, timeout_ns(timeout), PyWaitHook{}, nullptr, &g_blocking)) return py::none();
    // Raw frames (send_bytes) come back as bare bytes too: recv_bytes returns the bytes either way,
    // and recv unpickles them, exactly what the stdlib's Connection does with the same bytes.
    if ((sink.frame.flags & ~proto::flag::kRaw) == 0 && sink.frame.nhandles == 0) return std::move(sink.frame.payload);
    ReceivedFds rx(fds);
    return assemble(sink.frame, rx);
  }

  // Up to max frames (at least one unless the timeout passes: then an empty list).
  py::list get_many(std::size_t max, double timeout) {
    PySink sink;
    std::vector<UniqueFd> fds;
    py::list out;
    if (max == 0) return out;
    if (!leftover_.empty()) {
      while (!leftover_.empty() && out.size() < max) {
        if (is_error(leftover_.front()) && out.size() != 0) return out;  // it raises on the next get
        out.append(raise_if_error(pop_leftover()));
      }
      return out;
    }
    if (ch_.get_many(sink, max, fds, timeout_ns(timeout), PyWaitHook{}, nullptr, &g_blocking) == 0) return out;
    ReceivedFds rx(fds);
    for (std::size_t i = 0; i < sink.frames.size(); ++i) {
      py::object item = assemble_or_error(sink.frames[i], rx);
      if (is_error(item)) {
        // A refused frame raises for itself, once: now if nothing came before it, else next time.
        leftover_.push_back(std::move(item));
        keep_rest(sink.frames, i + 1, rx);
        if (out.size() == 0) return raise_if_error(pop_leftover());
        return out;
      }
      out.append(std::move(item));
    }
    return out;
  }

  bool poll(double timeout) { return ch_.wait_readable(timeout_ns(timeout), PyWaitHook{}); }

  bool acquire_item(std::int64_t maxsize, double timeout) {
    return block_until(
        timeout, [&] { return ring().try_acquire_item(maxsize); }, [&] { return ring().items() < maxsize; },
        [&](std::int64_t ns) { ring().wait_item_slot(maxsize, ns); });
  }

  bool join(double timeout) {
    return block_until(
        timeout, [&] { return ring().unfinished() <= 0; }, [&] { return ring().unfinished() <= 0; },
        [&](std::int64_t ns) { ring().wait_all_done(ns); });
  }

  // -- object level: pickling and unpickling in C (the Queue hot path) -------------------------

  // Pickles and publishes obj; returns None, or a Pending (accepted, counted) if the ring is full.
  py::object put_obj(py::handle obj, unsigned accounting) {
    Dumped d;
    dump_object(obj.ptr(), d);
    check_length(d);
    return put_dumped(d, accounting);
  }

  // put_obj of plain data only (dump_plain): a C++ Pool worker's answer, which the service's
  // codec must read. NotImplemented, nothing published, for anything the plain encoder declines.
  py::object put_plain(py::handle obj, unsigned accounting) {
    Dumped d;
    if (!dump_plain(obj.ptr(), d)) return py::reinterpret_borrow<py::object>(Py_NotImplemented);
    check_length(d);
    return put_dumped(d, accounting);
  }

  // put_obj and put_plain of a pickle longer than n bytes raise OverflowError, nothing published
  // (0: no limit). A C++ Pool worker's limit, its pool's max_result_bytes: a result over it fails
  // its task instead of making the pool kill the worker. Set once, not passed per put: an
  // argument more on the worker's hottest call measured ~0.06 us per task.
  void limit_puts(std::size_t n) { put_limit_ = n; }

  void check_length(Dumped& d) const {
    if (put_limit_ == 0) return;
    const std::size_t n = PyBytes_CheckExact(d.payload.ptr()) ? static_cast<std::size_t>(PyBytes_GET_SIZE(d.payload.ptr()))
                                                              : Pieces(d.payload).total();
    if (n <= put_limit_) return;
    PyErr_Format(PyExc_OverflowError, "the result is %zu bytes pickled, over the pool's max_result_bytes (%zu)", n,
                 put_limit_);
    throw py::error_already_set();
  }

  // Publishes already pickled data (ringpool.reduction.dumps output), with backpressure.
  py::object put_payload(py::handle payload, std::uint8_t flags, const py::object& fds_obj, unsigned accounting) {
    Dumped d;
    d.payload = py::reinterpret_borrow<py::object>(payload);
    d.flags = flags;
    d.fds = to_fds(fds_obj);
    return put_dumped(d, accounting);
  }

  // Pickles objs[start:] and publishes the plain ones (no handles, no out-of-band buffers, small)
  // in batches, one critical section each. Stops before the first item that is not plain or does
  // not fit; returns the index of that item (len(objs) when all went out).
  std::size_t put_objs(const py::sequence& objs, std::size_t start, unsigned accounting) {
    const std::size_t n = objs.size();
    constexpr std::size_t kChunk = 256;
    std::string buf;                 // the chunk's pickles, back to back
    std::vector<std::size_t> ends;   // pickle k is buf[ends[k-1], ends[k])
    std::vector<Ring::Piece> pieces;
    buf.reserve(kChunk * 64);
    ends.reserve(kChunk);
    pieces.reserve(kChunk);
    std::size_t i = start;
    while (i < n) {
      buf.clear();
      ends.clear();
      bool stop = false;
      for (; i < n && ends.size() < kChunk; ++i) {
        py::object o = objs[i];
        const std::size_t before = buf.size();
        if (!encode_plain(o.ptr(), buf)) {
          Dumped d;
          dump_general(o.ptr(), d);
          if (d.flags != 0 || !d.fds.empty() || !PyBytes_CheckExact(d.payload.ptr())) {
            stop = true;  // the caller puts this one through put() and calls us again after it
            break;
          }
          buf.append(PyBytes_AS_STRING(d.payload.ptr()), static_cast<std::size_t>(PyBytes_GET_SIZE(d.payload.ptr())));
        }
        if (ch_.out_of_band(buf.size() - before)) {
          buf.resize(before);
          stop = true;
          break;
        }
        ends.push_back(buf.size());
      }
      pieces.clear();
      for (std::size_t k = 0, from = 0; k < ends.size(); from = ends[k++])
        pieces.push_back({buf.data() + from, ends[k] - from});
      const std::size_t first = i - pieces.size();
      const bool may_wait = !(accounting & kNoBackpressure);
      accounting &= ~kNoBackpressure;
      std::size_t done =
          pieces.empty() ? 0 : ring().try_put_many(proto::Kind::DATA, 0, pieces.data(), pieces.size(), accounting);
      accounting |= may_wait ? 0u : kNoBackpressure;
      while (may_wait && done < pieces.size() && wait_room(Ring::record_size(pieces[done].len)))
        done += ring().try_put_many(proto::Kind::DATA, 0, pieces.data() + done, pieces.size() - done, accounting);
      if (done < pieces.size()) return first + done;  // consumers stalled: the caller buffers the rest
      if (stop) return i;
    }
    return n;
  }

  // Takes and unpickles one object; raises queue.Empty on timeout. An object that fails to
  // unpickle raises its error; nothing else is lost.
  py::object get_obj(double timeout) {
    py::object item = next_item(timeout);
    if (!item) throw_empty();
    install_pending_modules();
    return load(item);
  }

  // Between 1 and max objects; raises queue.Empty on timeout. If one fails to unpickle, the
  // objects after it are kept for the next get and its error is raised.
  py::list get_objs(std::size_t max, double timeout) {
    py::list out;
    if (max == 0) return out;
    if (!leftover_.empty()) {
      while (!leftover_.empty() && out.size() < max) {
        PyObject* r = load_item_or_error(leftover_.front().ptr());
        if (r == nullptr) {
          py::error_already_set err;
          if (out.size() == 0) {
            leftover_.pop_front();  // it raises once; the rest stay in leftover_
            throw err;
          }
          return out;  // deliver what decoded; the failing one raises on the next get
        }
        leftover_.pop_front();
        out.append(py::reinterpret_steal<py::object>(r));
      }
      return out;
    }
    PySink sink;
    sink.frames.reserve(std::min<std::size_t>(max, 1024));
    std::vector<UniqueFd> fds;
    if (ch_.get_many(sink, max, fds, timeout_ns(timeout), PyWaitHook{}, nullptr, &g_blocking) == 0) throw_empty();
    install_pending_modules();
    // Unpickle straight from the taken frames. If one fails, it and the frames after it become
    // leftovers (the failing one is retried, and raises, first), so nothing is lost.
    ReceivedFds rx(fds);
    for (std::size_t i = 0; i < sink.frames.size(); ++i) {
      Frame& f = sink.frames[i];
      py::object item = (f.flags == 0 && f.nhandles == 0) ? std::move(f.payload) : assemble_or_error(f, rx);
      PyObject* r = load_item_or_error(item.ptr());
      if (r == nullptr) {
        py::error_already_set err;
        // The failing frame raises exactly once: now if nothing decoded before it, else next time.
        if (out.size() != 0) leftover_.push_back(std::move(item));
        keep_rest(sink.frames, i + 1, rx);
        if (out.size() == 0) throw err;
        return out;  // deliver what decoded; the error surfaces on the next get
      }
      out.append(py::reinterpret_steal<py::object>(r));
    }
    return out;
  }

  bool has_leftover() const { return !leftover_.empty(); }

  Ring& ring() const { return ch_.ring(); }

 private:
  // The ring is full: waits for room while consumers make progress (see kStallNs). True when a
  // record of rec bytes fits; false when consumers stalled. Runs signal handlers meanwhile.
  bool wait_room(std::size_t rec) {
    std::uint64_t seen = ring().consumed();
    std::int64_t last = futex::now_ns();
    for (;;) {
      {
        ReleaseGil nogil;
        const std::int64_t slice_end = last + WaitPolicy::standard().slice_ns;
        for (;;) {
          if (ring().writable(rec)) break;
          const std::int64_t now = futex::now_ns();
          const std::uint64_t c = ring().consumed();
          if (c != seen) {
            seen = c;
            last = now;
          } else if (now - last >= kStallNs) {
            break;
          }
          if (now >= slice_end) break;
          ring().wait_space(rec, std::min(kStallNs / 4, slice_end - now));
        }
      }
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (ring().writable(rec)) return true;
      if (futex::now_ns() - last >= kStallNs) return false;
    }
  }

  py::object put_dumped(Dumped& d, unsigned accounting) {
    const bool may_wait = !(accounting & kNoBackpressure);
    accounting &= ~kNoBackpressure;
    if (d.fds.empty() && PyBytes_CheckExact(d.payload.ptr())) {
      const std::size_t n = static_cast<std::size_t>(PyBytes_GET_SIZE(d.payload.ptr()));
      if (!ch_.out_of_band(n)) {
        Ring::Piece piece{PyBytes_AS_STRING(d.payload.ptr()), n};
        for (;;) {
          Ring::PutStatus st = ring().try_put(proto::Kind::DATA, d.flags, &piece, 1, nullptr, 0, accounting);
          if (st == Ring::PutStatus::ok) return py::none();
          if (st != Ring::PutStatus::full || !may_wait || !wait_room(Ring::record_size(n))) break;
        }
      }
    }
    Pieces pieces(d.payload);
    std::unique_ptr<Pending> p;
    if (ch_.out_of_band(pieces.total())) {
      ReleaseGil nogil;
      p = ch_.put(proto::Kind::DATA, d.flags, pieces.data(), pieces.size(), d.fds.data(), d.fds.size(), accounting);
    } else {
      p = ch_.put(proto::Kind::DATA, d.flags, pieces.data(), pieces.size(), d.fds.data(), d.fds.size(), accounting);
    }
    // Accepted (and counted) but not published: wait while consumers make progress.
    while (p && may_wait && !ring().writable(p->record_bytes()) && wait_room(p->record_bytes()))
      if (ch_.publish(*p, 0)) return py::none();
    if (!p) return py::none();
    return py::cast(std::move(p));
  }

  py::object next_item(double timeout) {
    if (!leftover_.empty()) return pop_leftover();
    py::object item = get(timeout);
    if (item.is_none()) return py::object();
    return item;
  }

  static py::object load(const py::object& item) {
    PyObject* r = load_item_or_error(item.ptr());
    if (r == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(r);
  }

  // A frame refused while its item was assembled is kept in leftover_ as its exception instance
  // (no real item is one: items are bytes, bytearrays and tuples), raised when its turn comes.
  static bool is_error(const py::object& item) { return PyExceptionInstance_Check(item.ptr()) != 0; }

  static py::object raise_if_error(py::object item) {
    if (is_error(item)) {
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(item.ptr())), item.ptr());
      throw py::error_already_set();
    }
    return item;
  }

  // load_item, or the error of a refused frame (new reference, or nullptr with the error set).
  static PyObject* load_item_or_error(PyObject* item) {
    if (PyExceptionInstance_Check(item)) {
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(item)), item);
      return nullptr;
    }
    return load_item(item);
  }

  py::object pop_leftover() {
    py::object item = std::move(leftover_.front());
    leftover_.pop_front();
    return item;
  }

  // assemble, with a ProtocolError (a block refused by BlockCache::open) as its exception instance.
  py::object assemble_or_error(Frame& f, ReceivedFds& rx) {
    try {
      return assemble(f, rx);
    } catch (const ProtocolError& e) {
      return py::module_::import("ringpool._core").attr("ProtocolError")(e.what());
    }
  }

  // The frames from `from` on, as leftovers, in order (after an earlier one failed).
  void keep_rest(std::vector<Frame>& frames, std::size_t from, ReceivedFds& rx) {
    for (std::size_t j = from; j < frames.size(); ++j) {
      Frame& g = frames[j];
      leftover_.push_back((g.flags == 0 && g.nhandles == 0) ? std::move(g.payload) : assemble_or_error(g, rx));
    }
  }

  [[noreturn]] static void throw_empty() {
    static PyObject* empty = py::object(py::module_::import("queue").attr("Empty")).release().ptr();
    PyErr_SetNone(empty);
    throw py::error_already_set();
  }

  std::deque<py::object> leftover_;
  // A taken frame as get() returns it: the payload (an OobBuffer over the block if the frame is
  // out of band) alone, or (flags, payload, fds) with the frame's descriptors, now owned by Python.
  // rx moves past the frame's handles before anything can throw, so a refused frame (a block that
  // fails BlockCache's checks) costs only itself: the frames after it still find their own.
  py::object assemble(Frame& f, ReceivedFds& rx) {
    FrameHandles hs = rx.next(f.flags, f.nhandles, f.oob_len);
    py::object payload = hs.oob ? py::cast(std::move(hs.oob)) : f.payload;
    const std::uint8_t user_flags = f.flags & static_cast<std::uint8_t>(~proto::flag::kOutOfBand);
    if (user_flags == 0 && hs.fds.empty() && !(f.flags & proto::flag::kOutOfBand)) return payload;
    py::list fdl;
    for (UniqueFd& fd : hs.fds) fdl.append(fd.release());
    return py::make_tuple(user_flags, payload, fdl);
  }

  Channel ch_;
  std::size_t put_limit_ = 0;  // limit_puts

 public:
  Channel& channel() noexcept { return ch_; }
};


// -- the hot methods, without pybind11's dispatcher ---------------------------------------------
// pybind11's generic dispatch costs ~0.3 us per call here, as much as pickling a small message, so
// the per-message methods are plain METH_FASTCALL method descriptors on the same type. Errors are
// translated as pybind11 would (ProtocolError, OSError, Python errors as they are).

PyChannel& self_of(PyObject* self) {
  auto* inst = reinterpret_cast<py::detail::instance*>(self);
  return *inst->get_value_and_holder().value_ptr<PyChannel>();
}

template <class F>
PyObject* guarded(F&& f) noexcept(false) {
  try {
    return f().release().ptr();
  } catch (abi::__forced_unwind&) {
    throw;  // thread exit during finalization must unwind
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const ProtocolError& e) {
    PyErr_SetString(py::module_::import("ringpool._core").attr("ProtocolError").ptr(), e.what());
  } catch (const SysError& e) {
    PyErr_SetObject(PyExc_OSError, py::make_tuple(e.code().value(), e.what()).ptr());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

bool arg_count(const char* name, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi) {
  if (nargs >= lo && nargs <= hi) return true;
  PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd arguments (%zd given)", name, lo, hi, nargs);
  return false;
}

double timeout_arg(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t i) {
  if (nargs <= i || args[i] == Py_None) return -1.0;
  double t = PyFloat_AsDouble(args[i]);
  if (t == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return t;
}

unsigned unsigned_arg(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t i, unsigned dflt) {
  if (nargs <= i) return dflt;
  unsigned long v = PyLong_AsUnsignedLong(args[i]);
  if (v == static_cast<unsigned long>(-1) && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<unsigned>(v);
}

PyObject* fast_put_obj(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!arg_count("put_obj", nargs, 1, 2)) return nullptr;
  return guarded([&] { return self_of(self).put_obj(args[0], unsigned_arg(args, nargs, 1, Ring::kCountItem)); });
}

PyObject* fast_put_plain(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!arg_count("put_plain", nargs, 1, 2)) return nullptr;
  return guarded([&] { return self_of(self).put_plain(args[0], unsigned_arg(args, nargs, 1, Ring::kCountItem)); });
}

PyObject* fast_get_obj(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!arg_count("get_obj", nargs, 0, 1)) return nullptr;
  return guarded([&] { return self_of(self).get_obj(timeout_arg(args, nargs, 0)); });
}

PyObject* fast_put_objs(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!arg_count("put_objs", nargs, 1, 3)) return nullptr;
  return guarded([&] {
    if (!PySequence_Check(args[0])) throw py::type_error("put_objs takes a sequence");
    std::size_t start = nargs > 1 ? py::cast<std::size_t>(args[1]) : 0;
    return py::int_(self_of(self).put_objs(py::reinterpret_borrow<py::sequence>(args[0]), start,
                                           unsigned_arg(args, nargs, 2, Ring::kCountItem)));
  });
}

PyObject* fast_get_objs(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!arg_count("get_objs", nargs, 1, 2)) return nullptr;
  return guarded([&] {
    return self_of(self).get_objs(py::cast<std::size_t>(args[0]), timeout_arg(args, nargs, 1));
  });
}

PyObject* fast_put(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!arg_count("put", nargs, 1, 4)) return nullptr;
  return guarded([&] {
    const auto flags = static_cast<std::uint8_t>(unsigned_arg(args, nargs, 1, 0));
    py::object fds = nargs > 2 ? py::reinterpret_borrow<py::object>(args[2]) : py::none();
    return self_of(self).put(args[0], flags, fds, unsigned_arg(args, nargs, 3, Ring::kCountItem));
  });
}

PyObject* fast_get(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!arg_count("get", nargs, 0, 1)) return nullptr;
  return guarded([&] { return self_of(self).get(timeout_arg(args, nargs, 0)); });
}

PyObject* fast_poll(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!arg_count("poll", nargs, 0, 1)) return nullptr;
  return guarded([&] {
    PyChannel& c = self_of(self);
    if (c.has_leftover()) return py::bool_(true);
    return py::bool_(c.poll(nargs == 0 ? 0.0 : timeout_arg(args, nargs, 0)));
  });
}

PyObject* fast_readable(PyObject* self, PyObject* const*, Py_ssize_t nargs) {
  if (!arg_count("readable", nargs, 0, 0)) return nullptr;
  PyChannel& c = self_of(self);
  return Py_NewRef(c.has_leftover() || c.ring().readable() ? Py_True : Py_False);
}

// fileno() runs before every multiprocessing.connection.wait (PPE's manager thread waits ~5 times
// per task): a plain C call, not pybind11's dispatcher.
PyObject* fast_fileno(PyObject* self, PyObject* const*, Py_ssize_t nargs) {
  if (!arg_count("fileno", nargs, 0, 0)) return nullptr;
  return guarded([&] { return py::int_(self_of(self).ring().readiness_fd()); });
}

PyMethodDef kFastMethods[] = {
    {"put_obj", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_put_obj)), METH_FASTCALL,
     "put_obj(obj, accounting=COUNT_ITEM): pickle and publish; None, or a Pending if the ring is full. A pickle "
     "over limit_puts' limit raises OverflowError, nothing published."},
    {"put_plain", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_put_plain)), METH_FASTCALL,
     "put_plain(obj, accounting=COUNT_ITEM): put_obj if obj is plain data the fast encoder writes (None, bool, "
     "int64, float, str, bytes, tuples, lists and dicts, shallow); else NotImplemented, nothing published."},
    {"get_obj", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_get_obj)), METH_FASTCALL,
     "get_obj(timeout=None): take and unpickle one object; raises queue.Empty on timeout."},
    {"put_objs", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_put_objs)), METH_FASTCALL,
     "put_objs(objs, start=0, accounting=COUNT_ITEM): publish plain objects in batches; returns the index "
     "of the first object not published."},
    {"get_objs", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_get_objs)), METH_FASTCALL,
     "get_objs(max, timeout=None): 1..max unpickled objects; raises queue.Empty on timeout."},
    {"put", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_put)), METH_FASTCALL,
     "put(payload, flags=0, fds=None, accounting=COUNT_ITEM): publish bytes or a list of buffers with "
     "borrowed fds; None, or a Pending (accepted, counted) if the ring is full."},
    {"get", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_get)), METH_FASTCALL,
     "get(timeout=None): None on timeout; bytes for a plain frame; else (flags, payload, fds)."},
    {"poll", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_poll)), METH_FASTCALL,
     "poll(timeout=0.0): wait up to timeout (None: forever) for a frame; whether one is waiting."},
    {"fileno", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_fileno)), METH_FASTCALL,
     "fileno(): the readiness eventfd, readable while a frame waits (arms producer signalling once)."},
    {"readable", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&fast_readable)), METH_FASTCALL,
     "readable(): whether a frame is waiting (approximate by nature)."},
    {nullptr, nullptr, 0, nullptr},
};

void add_fast_methods(py::class_<PyChannel>& cls) {
  auto* type = reinterpret_cast<PyTypeObject*>(cls.ptr());
  for (PyMethodDef* d = kFastMethods; d->ml_name != nullptr; ++d) {
    py::object descr = py::reinterpret_steal<py::object>(PyDescr_NewMethod(type, d));
    if (!descr) throw py::error_already_set();
    cls.attr(d->ml_name) = descr;
  }
}

}  // namespace

void init_channel(py::module_& m) {
  py::class_<Pending, std::unique_ptr<Pending>>(m, "Pending",
                                               "A frame accepted while the ring was full; publish it later.")
      .def_property_readonly("record_bytes", &Pending::record_bytes)
      .def_property_readonly("published", [](const Pending& p) { return p.published; });

  py::class_<OobPayload>(m, "OobBuffer", py::buffer_protocol(),
                         "Bytes of an out-of-band frame, in shared memory; freed for reuse when the last view goes.")
      .def_buffer([](OobPayload& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {static_cast<py::ssize_t>(1)}, false);
      })
      .def("__len__", [](const OobPayload& b) { return b.size(); });

  auto cls = py::class_<PyChannel>(m, "Channel", R"doc(A shared-memory ring with handle passing and out-of-band blocks.

Every method may be called from any thread of any process that holds the channel. Blocking
methods release the GIL, spin briefly, then sleep on a futex, and run Python signal handlers
at least every 20 ms (an exception from a handler propagates).)doc")
      .def_static("create", &PyChannel::create, py::arg("capacity") = py::int_(std::size_t{1} << 20), py::arg("inline_max") = 0,
                  py::arg("count_items") = false)
      .def_static("attach", &PyChannel::attach, py::arg("memfd"), py::arg("tx"), py::arg("rx"), py::arg("event"),
                  "Attach to a ring from its four descriptors; takes ownership of them.")
      .def("handles", &PyChannel::handles, "(memfd, tx, rx, event): borrowed descriptors, dup them to pass on.")
      .def("stage", &PyChannel::stage, py::arg("payload"), py::arg("flags") = 0, py::arg("fds") = py::none(),
           py::arg("accounting") = Ring::kCountItem)
      .def("publish", &PyChannel::publish, py::arg("pending"))
      .def("put_payload", &PyChannel::put_payload, py::arg("payload"), py::arg("flags") = 0,
           py::arg("fds") = py::none(), py::arg("accounting") = Ring::kCountItem,
           "Publish dumps() output with backpressure (see put_obj); None, or a Pending.")
      .def("wait_writable", &PyChannel::wait_writable, py::arg("record_bytes"), py::arg("timeout"))
      .def("limit_puts", &PyChannel::limit_puts, py::arg("max_bytes"),
           "put_obj and put_plain of a pickle over max_bytes raise OverflowError from now on (0: no limit).")
      .def("get_many", &PyChannel::get_many, py::arg("max"), py::arg("timeout") = -1.0)
      .def("acquire_item", &PyChannel::acquire_item, py::arg("maxsize"), py::arg("timeout") = -1.0)
      .def("task_done", [](PyChannel& c) { return c.ring().task_done(); })
      .def("join", &PyChannel::join, py::arg("timeout") = -1.0)
      .def_property_readonly("items", [](PyChannel& c) { return c.ring().size(); },
                             "Frames accepted and not yet taken (approximate by nature).")
      .def_property_readonly("unfinished", [](PyChannel& c) { return c.ring().unfinished(); })
      .def_property_readonly("capacity", [](PyChannel& c) { return c.ring().capacity(); })
      .def_property_readonly("inline_max", [](PyChannel& c) { return c.ring().inline_max(); })
      .def_property_readonly("committed", [](PyChannel& c) { return c.ring().committed(); })
      .def_property_readonly("consumed", [](PyChannel& c) { return c.ring().consumed(); })
      .def_static("record_size", &Ring::record_size);
  add_fast_methods(cls);

  m.attr("NO_BACKPRESSURE") = kNoBackpressure;
  m.def(
      "set_modules_channel",
      [](PyChannel* chan, py::object install) {
        ModulesHook& h = modules_hook();
        if (chan == nullptr) {
          h.ring.reset();
          h.install = py::none();
          return;
        }
        h.install = std::move(install);
        h.ring = chan->channel().ring_ptr();
      },
      py::arg("chan").none(true), py::arg("install") = py::none(),
      "A worker's code-shipping hook: object-level gets call install() when chan has a frame.");
  m.def("block_pool_bytes", [] { return BlockPool::instance().cached_bytes(); },
        "Bytes of out-of-band blocks this process keeps for reuse.");
  m.def("set_block_pool_limit", [](std::size_t n) { BlockPool::instance().set_max_bytes(n); });
  // A block's header identity, for tools and tests that must recognise (or forge) one.
  m.attr("BLOCK_MAGIC") = kBlockMagic;
  m.attr("BLOCK_VERSION") = kBlockVersion;
  m.def(
      "create_memfd", [](const std::string& name, std::size_t size) { return create_memfd(name.c_str(), size).release(); },
      py::arg("name"), py::arg("size"),
      "A new memfd of size bytes (close-on-exec), sealed against shrinking and growing; the caller owns it.");
  m.def(
      "check_received_memfd",
      [](int fd, std::size_t min_size, std::size_t max_size, const std::string& what) {
        return check_received_memfd(fd, min_size, max_size, what.c_str());
      },
      py::arg("fd"), py::arg("min_size"), py::arg("max_size"), py::arg("what") = "segment",
      "Its size, if fd is a memfd sealed against shrinking and growing, of min_size..max_size bytes; "
      "else ProtocolError naming what is wrong. Call before mapping a memfd from another process.");
}

}  // namespace ringpool::py_bindings
