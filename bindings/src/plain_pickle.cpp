#include "plain_pickle.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace ringpool::py_bindings {

namespace {

// Pickle opcodes (Lib/pickletools.py). Only those CPython writes for plain data at protocols 2-5.
namespace op {
constexpr std::uint8_t kProto = 0x80, kFrame = 0x95, kStop = '.';
constexpr std::uint8_t kNone = 'N', kTrue = 0x88, kFalse = 0x89;
constexpr std::uint8_t kBinInt1 = 'K', kBinInt2 = 'M', kBinInt = 'J', kLong1 = 0x8a;
constexpr std::uint8_t kBinFloat = 'G';
constexpr std::uint8_t kShortBinUnicode = 0x8c, kBinUnicode = 'X';
constexpr std::uint8_t kShortBinBytes = 'C', kBinBytes = 'B';
constexpr std::uint8_t kEmptyTuple = ')', kTuple1 = 0x85, kTuple2 = 0x86, kTuple3 = 0x87;
constexpr std::uint8_t kMark = '(', kTuple = 't';
constexpr std::uint8_t kEmptyList = ']', kAppend = 'a', kAppends = 'e';
constexpr std::uint8_t kEmptyDict = '}', kSetItem = 's', kSetItems = 'u';
constexpr std::uint8_t kMemoize = 0x94, kBinPut = 'q', kLongBinPut = 'r', kBinGet = 'h', kLongBinGet = 'j';
}  // namespace op

// -- encoder ------------------------------------------------------------------------------------

constexpr int kMaxDepth = 8;          // containers inside containers, counting the outermost
constexpr int kMaxContainers = 64;    // lists and dicts per object (each is checked for aliasing)

void put_le(std::string& out, std::uint64_t v, int n) {
  char b[8];
  for (int i = 0; i < n; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  out.append(b, static_cast<std::size_t>(n));
}

// Every type accepted here is exact, so nothing below can run Python code: the objects cannot
// change while they are written, and no reducer, __reduce__ or dispatch table is ever bypassed
// (the C pickler itself serializes these exact types before consulting any of them).
class Encoder {
 public:
  explicit Encoder(std::string& out) : out_(out) {}

  bool put(PyObject* o, int depth) {
    PyTypeObject* t = Py_TYPE(o);
    if (o == Py_None) {
      out_.push_back(static_cast<char>(op::kNone));
    } else if (t == &PyBool_Type) {
      out_.push_back(static_cast<char>(o == Py_True ? op::kTrue : op::kFalse));
    } else if (t == &PyLong_Type) {
      return put_int(o);
    } else if (t == &PyFloat_Type) {
      char b[8];
      if (PyFloat_Pack8(PyFloat_AS_DOUBLE(o), b, 0) != 0) return fail();  // big-endian, as pickle
      out_.push_back(static_cast<char>(op::kBinFloat));
      out_.append(b, 8);
    } else if (t == &PyUnicode_Type) {
      Py_ssize_t n = 0;
      const char* s = PyUnicode_AsUTF8AndSize(o, &n);  // fails on lone surrogates: pickle's job
      if (s == nullptr) return fail();
      return put_sized(op::kShortBinUnicode, op::kBinUnicode, s, n);
    } else if (t == &PyBytes_Type) {
      return put_sized(op::kShortBinBytes, op::kBinBytes, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o));
    } else if (t == &PyTuple_Type) {
      if (depth == 0) return false;
      const Py_ssize_t n = PyTuple_GET_SIZE(o);
      if (n == 0) {
        out_.push_back(static_cast<char>(op::kEmptyTuple));
        return true;
      }
      if (n > 3) out_.push_back(static_cast<char>(op::kMark));
      for (Py_ssize_t i = 0; i < n; ++i)
        if (!put(PyTuple_GET_ITEM(o, i), depth - 1)) return false;
      out_.push_back(static_cast<char>(n > 3 ? op::kTuple : op::kTuple1 + (n - 1)));
    } else if (t == &PyList_Type) {
      if (depth == 0 || !first_sight(o)) return false;
      out_.push_back(static_cast<char>(op::kEmptyList));
      const Py_ssize_t n = PyList_GET_SIZE(o);
      if (n == 0) return true;
      out_.push_back(static_cast<char>(op::kMark));
      for (Py_ssize_t i = 0; i < n; ++i)
        if (!put(PyList_GET_ITEM(o, i), depth - 1)) return false;
      out_.push_back(static_cast<char>(op::kAppends));
    } else if (t == &PyDict_Type) {
      if (depth == 0 || !first_sight(o)) return false;
      out_.push_back(static_cast<char>(op::kEmptyDict));
      if (PyDict_GET_SIZE(o) == 0) return true;
      out_.push_back(static_cast<char>(op::kMark));
      Py_ssize_t pos = 0;
      PyObject *k, *v;
      while (PyDict_Next(o, &pos, &k, &v))
        if (!put(k, depth - 1) || !put(v, depth - 1)) return false;
      out_.push_back(static_cast<char>(op::kSetItems));
    } else {
      return false;
    }
    return true;
  }

 private:
  static bool fail() {
    PyErr_Clear();
    return false;
  }

  // A list or dict reached twice must unpickle as one object, which takes the memo: declined,
  // so the pickle module writes it. (Shared str, tuple, int... come back equal but not
  // identical, as across any process boundary with a copying transport.)
  bool first_sight(PyObject* o) {
    for (int i = 0; i < nseen_; ++i)
      if (seen_[i] == o) return false;
    if (nseen_ == kMaxContainers) return false;
    seen_[nseen_++] = o;
    return true;
  }

  bool put_int(PyObject* o) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow != 0) return false;  // beyond int64: the pickle module writes it
    if (v == -1 && PyErr_Occurred()) return fail();
    if (v >= 0 && v < 0x100) {
      out_.push_back(static_cast<char>(op::kBinInt1));
      put_le(out_, static_cast<std::uint64_t>(v), 1);
    } else if (v >= 0 && v < 0x10000) {
      out_.push_back(static_cast<char>(op::kBinInt2));
      put_le(out_, static_cast<std::uint64_t>(v), 2);
    } else if (v >= INT32_MIN && v <= INT32_MAX) {
      out_.push_back(static_cast<char>(op::kBinInt));
      put_le(out_, static_cast<std::uint64_t>(v), 4);
    } else {
      int n = 5;  // the fewest two's-complement bytes that hold v (more than 4 here)
      while (n < 8 && (v < -(1LL << (8 * n - 1)) || v >= (1LL << (8 * n - 1)))) ++n;
      out_.push_back(static_cast<char>(op::kLong1));
      out_.push_back(static_cast<char>(n));
      put_le(out_, static_cast<std::uint64_t>(v), n);
    }
    return true;
  }

  bool put_sized(std::uint8_t short_op, std::uint8_t long_op, const char* s, Py_ssize_t n) {
    if (n < 0x100) {
      out_.push_back(static_cast<char>(short_op));
      out_.push_back(static_cast<char>(n));
    } else if (static_cast<std::uint64_t>(n) <= 0xffffffffu) {
      out_.push_back(static_cast<char>(long_op));
      put_le(out_, static_cast<std::uint64_t>(n), 4);
    } else {
      return false;  // 4 GiB and more: the pickle module's 8-byte forms
    }
    out_.append(s, static_cast<std::size_t>(n));
    return true;
  }

  std::string& out_;
  PyObject* seen_[kMaxContainers];
  int nseen_ = 0;
};

// -- decoder ------------------------------------------------------------------------------------

constexpr std::size_t kMaxMemoIndex = 1u << 16;  // BINPUT beyond this: the pickle module's job

// Owned references on the stack and in the memo; released by clear().
struct DecodeState {
  std::vector<PyObject*> stack;
  std::vector<std::size_t> marks;
  std::vector<PyObject*> memo;
  bool busy = false;

  void clear() {
    for (PyObject* o : stack) Py_DECREF(o);
    for (PyObject* o : memo) Py_XDECREF(o);
    stack.clear();
    marks.clear();
    memo.clear();
  }
};

// Reused between calls on a thread (no allocation per message). Allocating a container may run
// the garbage collector and with it a finalizer that unpickles again on this thread: a nested
// decode gets a state of its own.
thread_local DecodeState tl_state;

class Decoder {
 public:
  Decoder(DecodeState& s, const char* p, std::size_t n)
      : s_(s), p_(reinterpret_cast<const std::uint8_t*>(p)), end_(p_ + n) {}

  // New reference, or nullptr (no error set) to decline.
  PyObject* run() {
    while (p_ < end_) {
      const std::uint8_t code = *p_++;
      switch (code) {
        case op::kProto: {
          const std::uint8_t* a = take(1);
          if (a == nullptr || *a > 5) return nullptr;
          break;
        }
        case op::kFrame: {
          // Framing only groups reads, but pickle.loads refuses a frame longer than the data.
          const std::uint8_t* a = take(8);
          if (a == nullptr || le(a, 8) > static_cast<std::uint64_t>(end_ - p_)) return nullptr;
          break;
        }
        case op::kNone:
          if (!push(Py_NewRef(Py_None))) return nullptr;
          break;
        case op::kTrue:
          if (!push(Py_NewRef(Py_True))) return nullptr;
          break;
        case op::kFalse:
          if (!push(Py_NewRef(Py_False))) return nullptr;
          break;
        case op::kBinInt1:
        case op::kBinInt2: {
          const int n = code == op::kBinInt1 ? 1 : 2;
          const std::uint8_t* a = take(n);
          if (a == nullptr || !push(PyLong_FromLong(static_cast<long>(le(a, n))))) return nullptr;
          break;
        }
        case op::kBinInt: {
          const std::uint8_t* a = take(4);
          if (a == nullptr) return nullptr;
          const auto v = static_cast<std::int32_t>(static_cast<std::uint32_t>(le(a, 4)));
          if (!push(PyLong_FromLong(v))) return nullptr;
          break;
        }
        case op::kLong1: {
          const std::uint8_t* a = take(1);
          if (a == nullptr || *a > 8) return nullptr;  // wider than int64: the pickle module's job
          const int n = *a;
          const std::uint8_t* b = take(n);
          if (b == nullptr) return nullptr;
          std::uint64_t u = le(b, n);
          if (n > 0 && n < 8 && (b[n - 1] & 0x80)) u |= ~std::uint64_t{0} << (8 * n);  // sign-extend
          if (!push(PyLong_FromLongLong(static_cast<long long>(u)))) return nullptr;
          break;
        }
        case op::kBinFloat: {
          const std::uint8_t* a = take(8);
          if (a == nullptr) return nullptr;
          const double d = PyFloat_Unpack8(reinterpret_cast<const char*>(a), 0);
          if (d == -1.0 && PyErr_Occurred()) return nullptr;
          if (!push(PyFloat_FromDouble(d))) return nullptr;
          break;
        }
        case op::kShortBinUnicode:
        case op::kBinUnicode: {
          const char* s = nullptr;
          std::size_t n = 0;
          if (!sized(code == op::kShortBinUnicode ? 1 : 4, s, n)) return nullptr;
          if (!push(PyUnicode_DecodeUTF8(s, static_cast<Py_ssize_t>(n), "surrogatepass"))) return nullptr;
          break;
        }
        case op::kShortBinBytes:
        case op::kBinBytes: {
          const char* s = nullptr;
          std::size_t n = 0;
          if (!sized(code == op::kShortBinBytes ? 1 : 4, s, n)) return nullptr;
          if (!push(PyBytes_FromStringAndSize(s, static_cast<Py_ssize_t>(n)))) return nullptr;
          break;
        }
        case op::kEmptyTuple:
          if (!push(PyTuple_New(0))) return nullptr;
          break;
        case op::kTuple1:
        case op::kTuple2:
        case op::kTuple3:
          if (!make_tuple(static_cast<std::size_t>(code - op::kTuple1 + 1))) return nullptr;
          break;
        case op::kMark:
          s_.marks.push_back(s_.stack.size());
          break;
        case op::kTuple: {
          if (s_.marks.empty()) return nullptr;
          const std::size_t m = s_.marks.back();
          s_.marks.pop_back();
          if (!make_tuple(s_.stack.size() - m)) return nullptr;
          break;
        }
        case op::kEmptyList:
          if (!push(PyList_New(0))) return nullptr;
          break;
        case op::kEmptyDict:
          if (!push(PyDict_New())) return nullptr;
          break;
        case op::kAppend:
          if (!fill(s_.stack.size() - 1, 1)) return nullptr;
          break;
        case op::kSetItem:
          if (!fill(s_.stack.size() - 2, 2)) return nullptr;
          break;
        case op::kAppends:
        case op::kSetItems: {
          if (s_.marks.empty()) return nullptr;
          const std::size_t m = s_.marks.back();
          s_.marks.pop_back();
          if (!fill(m, code == op::kAppends ? 1 : 2)) return nullptr;
          break;
        }
        case op::kMemoize:
          if (!put_memo(s_.memo.size())) return nullptr;
          break;
        case op::kBinPut:
        case op::kLongBinPut: {
          const int n = code == op::kBinPut ? 1 : 4;
          const std::uint8_t* a = take(n);
          if (a == nullptr || !put_memo(static_cast<std::size_t>(le(a, n)))) return nullptr;
          break;
        }
        case op::kBinGet:
        case op::kLongBinGet: {
          const int n = code == op::kBinGet ? 1 : 4;
          const std::uint8_t* a = take(n);
          if (a == nullptr) return nullptr;
          const std::size_t i = static_cast<std::size_t>(le(a, n));
          if (i >= s_.memo.size() || s_.memo[i] == nullptr) return nullptr;
          if (!push(Py_NewRef(s_.memo[i]))) return nullptr;
          break;
        }
        case op::kStop: {
          if (!s_.marks.empty() || s_.stack.size() != 1) return nullptr;
          PyObject* r = s_.stack.back();
          s_.stack.pop_back();
          return r;
        }
        default:
          return nullptr;  // anything else (GLOBAL, REDUCE, sets, protocol 0/1 forms...)
      }
    }
    return nullptr;  // no STOP
  }

 private:
  static std::uint64_t le(const std::uint8_t* a, int n) {
    std::uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | a[i];
    return v;
  }

  const std::uint8_t* take(std::size_t n) {
    if (static_cast<std::size_t>(end_ - p_) < n) return nullptr;
    const std::uint8_t* a = p_;
    p_ += n;
    return a;
  }

  bool sized(int width, const char*& s, std::size_t& n) {
    const std::uint8_t* a = take(static_cast<std::size_t>(width));
    if (a == nullptr) return false;
    n = static_cast<std::size_t>(le(a, width));
    const std::uint8_t* b = take(n);
    s = reinterpret_cast<const char*>(b);
    return b != nullptr;
  }

  bool push(PyObject* o) {
    if (o == nullptr) return false;
    s_.stack.push_back(o);
    return true;
  }

  // The lowest stack index the current operation may consume: above the innermost mark.
  std::size_t floor() const { return s_.marks.empty() ? 0 : s_.marks.back(); }

  bool make_tuple(std::size_t n) {
    if (s_.stack.size() < n || s_.stack.size() - n < floor()) return false;
    PyObject* t = PyTuple_New(static_cast<Py_ssize_t>(n));
    if (t == nullptr) return false;
    const std::size_t base = s_.stack.size() - n;
    for (std::size_t i = 0; i < n; ++i) PyTuple_SET_ITEM(t, static_cast<Py_ssize_t>(i), s_.stack[base + i]);
    s_.stack.resize(base);
    s_.stack.push_back(t);
    return true;
  }

  // APPEND(S)/SETITEM(S): the items from stack[from] on go into the list or dict just below
  // them, which must be one this decoder built (an exact list or dict), above the current mark.
  bool fill(std::size_t from, std::size_t arity) {
    const std::size_t size = s_.stack.size();
    if (from == 0 || from > size || from - 1 < floor() || (size - from) % arity != 0) return false;
    PyObject* target = s_.stack[from - 1];
    if (arity == 1) {
      if (!PyList_CheckExact(target)) return false;
      for (std::size_t i = from; i < size; ++i)
        if (PyList_Append(target, s_.stack[i]) != 0) return false;
    } else {
      if (!PyDict_CheckExact(target)) return false;
      for (std::size_t i = from; i < size; i += 2)
        if (PyDict_SetItem(target, s_.stack[i], s_.stack[i + 1]) != 0) return false;  // unhashable key...
    }
    for (std::size_t i = from; i < size; ++i) Py_DECREF(s_.stack[i]);
    s_.stack.resize(from);
    return true;
  }

  bool put_memo(std::size_t i) {
    if (s_.stack.size() <= floor() || i > kMaxMemoIndex) return false;
    if (i >= s_.memo.size()) s_.memo.resize(i + 1, nullptr);
    Py_XSETREF(s_.memo[i], Py_NewRef(s_.stack.back()));
    return true;
  }

  DecodeState& s_;
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

}  // namespace

bool encode_plain(PyObject* obj, std::string& out) {
  const std::size_t mark = out.size();
  out.push_back(static_cast<char>(op::kProto));
  out.push_back(5);
  Encoder e(out);
  if (!e.put(obj, kMaxDepth)) {
    out.resize(mark);
    return false;
  }
  out.push_back(static_cast<char>(op::kStop));
  return true;
}

PyObject* decode_plain(const char* p, std::size_t n) {
  DecodeState nested;
  DecodeState& s = tl_state.busy ? nested : tl_state;
  const bool outer = &s == &tl_state;
  if (outer) s.busy = true;
  PyObject* r = Decoder(s, p, n).run();
  s.clear();
  if (outer) s.busy = false;
  if (r == nullptr) PyErr_Clear();
  return r;
}

}  // namespace ringpool::py_bindings
