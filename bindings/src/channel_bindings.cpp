// ringpool._core.Channel: the Python face of ringpool::Channel.
//
// GIL rules (they keep a cross-process lock and the GIL from ever deadlocking):
// - ring locks are taken only while holding the GIL, and nothing that needs the GIL runs while a
//   ring lock is held (payload objects are allocated before the lock is released, but the GIL is
//   never released inside it);
// - waits (spin, futex) run with the GIL released and no ring lock held;
// - large copies into out-of-band blocks run with the GIL released.
#include <Python.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "bindings.h"
#include "ringpool/channel.hpp"
#include "ringpool/error.hpp"

namespace py = pybind11;

namespace ringpool::py_bindings {

namespace {

// How long a blocked call spins (GIL released) before sleeping on the futex. Spinning wins when
// the peer answers within microseconds on the other core; on two cores a long spin steals the
// peer's CPU, so keep it short. RINGPOOL_SPIN_NS overrides it.
std::int64_t spin_ns() {
  static const std::int64_t v = [] {
    const char* e = std::getenv("RINGPOOL_SPIN_NS");
    return e ? std::max<std::int64_t>(0, std::atoll(e)) : std::int64_t{20000};
  }();
  return v;
}

// A futex sleep never lasts longer than this, so a signal delivered to another thread still
// reaches PyErr_CheckSignals promptly (Ctrl-C, SIGCHLD handlers).
constexpr std::int64_t kWaitSliceNs = 20'000'000;

inline void cpu_relax() { __builtin_ia32_pause(); }

// Retries try_fn (GIL held) until it succeeds or the timeout passes; in between, spins on ready()
// and sleeps with wait(ns), both without the GIL, and runs Python signal handlers.
// timeout < 0: no limit. Returns whether try_fn succeeded.
template <class Try, class Ready, class Wait>
bool block_until(double timeout, Try&& try_fn, Ready&& ready, Wait&& wait) {
  if (try_fn()) return true;
  if (timeout == 0) return false;
  const std::int64_t start = futex::now_ns();
  const std::int64_t deadline = timeout < 0 ? INT64_MAX : start + static_cast<std::int64_t>(timeout * 1e9);
  for (;;) {
    {
      py::gil_scoped_release nogil;
      const std::int64_t spin_end = futex::now_ns() + spin_ns();
      while (!ready() && futex::now_ns() < spin_end) cpu_relax();
      if (!ready()) {
        const std::int64_t left = deadline - futex::now_ns();
        if (left > 0) wait(std::min(left, kWaitSliceNs));
      }
    }
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (try_fn()) return true;
    if (futex::now_ns() >= deadline) return false;
  }
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

// A received out-of-band payload: exposes the block's bytes (writable: the reader owns them until
// it lets go) and hands the block back to its producer when the last view is gone.
struct OobBuffer {
  std::shared_ptr<Block> block;
  std::size_t length;
  std::uint64_t generation;  // a forked child must not free its parent's block
  OobBuffer(std::shared_ptr<Block> b, std::size_t n) : block(std::move(b)), length(n), generation(fork_generation()) {}
  ~OobBuffer() {
    if (block && generation == fork_generation()) block->mark_free();
  }
};

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
      if (h.payload_len < sizeof(proto::OobDescriptor)) throw ProtocolError("short out-of-band descriptor");
      proto::OobDescriptor d;
      std::memcpy(&d, p, sizeof d);
      f.oob_len = d.length;
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

class PyChannel {
 public:
  explicit PyChannel(std::shared_ptr<Ring> ring) : ch_(std::move(ring)) {}

  static PyChannel create(std::size_t capacity, std::size_t inline_max) {
    return PyChannel(Ring::create({capacity, inline_max}));
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
      py::gil_scoped_release nogil;  // a big copy; the Py_buffers stay held
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
      py::gil_scoped_release nogil;
      p = ch_.stage(proto::Kind::DATA, flags, pieces.data(), pieces.size(), fds.data(), fds.size());
    }
    if (accounting & Ring::kCountItem) ring().add_items(1);
    if (accounting & Ring::kCountTask) ring().add_unfinished(1);
    return p;
  }

  bool publish(Pending& p) { return ch_.publish(p, 0); }

  // Publishes a prefix of a list of bytes in one critical section; returns how many.
  std::size_t put_many(const py::list& items, std::uint8_t flags, unsigned accounting) {
    std::vector<Ring::Piece> pieces;
    pieces.reserve(items.size());
    std::size_t limit = ring().inline_max();
    for (py::handle it : items) {
      if (!PyBytes_CheckExact(it.ptr())) throw py::type_error("put_many takes a list of bytes");
      std::size_t n = static_cast<std::size_t>(PyBytes_GET_SIZE(it.ptr()));
      if (n > limit) break;  // the caller sends this one (and the rest) through put()
      pieces.push_back({PyBytes_AS_STRING(it.ptr()), n});
    }
    if (pieces.empty()) return 0;
    return ring().try_put_many(proto::Kind::DATA, flags, pieces.data(), pieces.size(), accounting);
  }

  bool wait_writable(std::size_t record_bytes, double timeout) {
    return block_until(
        timeout, [&] { return ring().writable(record_bytes); }, [&] { return ring().writable(record_bytes); },
        [&](std::int64_t ns) { ring().wait_space(record_bytes, ns); });
  }

  // None on timeout; bytes for a plain frame; (flags, payload, fds) otherwise.
  py::object get(double timeout) {
    OneSink sink;
    std::vector<UniqueFd> fds;
    bool ok = block_until(
        timeout, [&] { return ring().try_get(sink, fds); }, [&] { return ring().readable(); },
        [&](std::int64_t ns) { ring().wait_data(ns); });
    if (!ok) return py::none();
    if (sink.frame.flags == 0 && sink.frame.nhandles == 0) return std::move(sink.frame.payload);
    std::size_t pos = 0;
    return assemble(sink.frame, fds, pos);
  }

  // Up to max frames (at least one unless the timeout passes: then an empty list).
  py::list get_many(std::size_t max, double timeout) {
    PySink sink;
    std::vector<UniqueFd> fds;
    py::list out;
    if (max == 0) return out;
    bool ok = block_until(
        timeout, [&] { return ring().try_get_many(sink, max, fds) != 0; }, [&] { return ring().readable(); },
        [&](std::int64_t ns) { ring().wait_data(ns); });
    if (!ok) return out;
    std::size_t pos = 0;
    for (auto& f : sink.frames) out.append(assemble(f, fds, pos));
    return out;
  }

  bool poll(double timeout) {
    return block_until(
        timeout, [&] { return ring().readable(); }, [&] { return ring().readable(); },
        [&](std::int64_t ns) { ring().wait_data(ns); });
  }

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

  Ring& ring() const { return ch_.ring(); }

 private:
  py::object assemble(Frame& f, std::vector<UniqueFd>& fds, std::size_t& pos) {
    std::size_t n = f.nhandles;
    if (pos + n > fds.size()) throw ProtocolError("frame handles missing");
    py::object payload = f.payload;
    std::size_t first = pos;
    if (f.flags & proto::flag::kOutOfBand) {
      auto block = BlockCache::instance().open(std::move(fds[pos]));
      if (f.oob_len > block->capacity()) throw ProtocolError("out-of-band length beyond its block");
      payload = py::cast(std::make_unique<OobBuffer>(std::move(block), static_cast<std::size_t>(f.oob_len)));
      ++first;
    }
    pos += n;
    const std::uint8_t user_flags = f.flags & static_cast<std::uint8_t>(~proto::flag::kOutOfBand);
    if (user_flags == 0 && first == pos && !(f.flags & proto::flag::kOutOfBand)) return payload;
    py::list fdl;
    for (std::size_t i = first; i < pos; ++i) fdl.append(fds[i].release());
    return py::make_tuple(user_flags, payload, fdl);
  }

  Channel ch_;
};

}  // namespace

void init_channel(py::module_& m) {
  py::class_<Pending, std::unique_ptr<Pending>>(m, "Pending",
                                               "A frame accepted while the ring was full; publish it later.")
      .def_property_readonly("record_bytes", &Pending::record_bytes)
      .def_property_readonly("published", [](const Pending& p) { return p.published; });

  py::class_<OobBuffer>(m, "OobBuffer", py::buffer_protocol(),
                        "Bytes of an out-of-band frame, in shared memory; freed for reuse when the last view goes.")
      .def_buffer([](OobBuffer& b) {
        return py::buffer_info(b.block->data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.length)}, {static_cast<py::ssize_t>(1)}, false);
      })
      .def("__len__", [](const OobBuffer& b) { return b.length; });

  py::class_<PyChannel>(m, "Channel", R"doc(A shared-memory ring with handle passing and out-of-band blocks.

Every method may be called from any thread of any process that holds the channel. Blocking
methods release the GIL, spin briefly, then sleep on a futex, and run Python signal handlers
at least every 20 ms (an exception from a handler propagates).)doc")
      .def_static("create", &PyChannel::create, py::arg("capacity") = std::size_t{1} << 20, py::arg("inline_max") = 0)
      .def_static("attach", &PyChannel::attach, py::arg("memfd"), py::arg("tx"), py::arg("rx"), py::arg("event"),
                  "Attach to a ring from its four descriptors; takes ownership of them.")
      .def("handles", &PyChannel::handles, "(memfd, tx, rx, event): borrowed descriptors, dup them to pass on.")
      .def("put", &PyChannel::put, py::arg("payload"), py::arg("flags") = 0, py::arg("fds") = py::none(),
           py::arg("accounting") = Ring::kCountItem)
      .def("stage", &PyChannel::stage, py::arg("payload"), py::arg("flags") = 0, py::arg("fds") = py::none(),
           py::arg("accounting") = Ring::kCountItem)
      .def("publish", &PyChannel::publish, py::arg("pending"))
      .def("put_many", &PyChannel::put_many, py::arg("items"), py::arg("flags") = 0,
           py::arg("accounting") = Ring::kCountItem)
      .def("wait_writable", &PyChannel::wait_writable, py::arg("record_bytes"), py::arg("timeout"))
      .def("get", &PyChannel::get, py::arg("timeout") = -1.0)
      .def("get_many", &PyChannel::get_many, py::arg("max"), py::arg("timeout") = -1.0)
      .def("poll", &PyChannel::poll, py::arg("timeout") = 0.0)
      .def("readable", [](PyChannel& c) { return c.ring().readable(); })
      .def("acquire_item", &PyChannel::acquire_item, py::arg("maxsize"), py::arg("timeout") = -1.0)
      .def("add_items", [](PyChannel& c, std::int64_t n) { c.ring().add_items(n); })
      .def("add_unfinished", [](PyChannel& c, std::int64_t n) { c.ring().add_unfinished(n); })
      .def("task_done", [](PyChannel& c) { return c.ring().task_done(); })
      .def("join", &PyChannel::join, py::arg("timeout") = -1.0)
      .def("fileno", [](PyChannel& c) { return c.ring().readiness_fd(); })
      .def_property_readonly("items", [](PyChannel& c) { return c.ring().items(); })
      .def_property_readonly("unfinished", [](PyChannel& c) { return c.ring().unfinished(); })
      .def_property_readonly("capacity", [](PyChannel& c) { return c.ring().capacity(); })
      .def_property_readonly("inline_max", [](PyChannel& c) { return c.ring().inline_max(); })
      .def_property_readonly("committed", [](PyChannel& c) { return c.ring().committed(); })
      .def_property_readonly("consumed", [](PyChannel& c) { return c.ring().consumed(); })
      .def_static("record_size", &Ring::record_size);

  m.def("block_pool_bytes", [] { return BlockPool::instance().cached_bytes(); },
        "Bytes of out-of-band blocks this process keeps for reuse.");
  m.def("set_block_pool_limit", [](std::size_t n) { BlockPool::instance().set_max_bytes(n); });
}

}  // namespace ringpool::py_bindings
