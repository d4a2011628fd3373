// A pickle codec for plain data (Value), so the C++ service can read and write task arguments
// without an interpreter and without ever running code a worker sent.
//
// The decoder understands only the opcodes CPython's pickler emits for None, bool, int, float,
// str, bytes, list, tuple and dict at protocols 2 to 5 (plus the memo). Every opcode that would
// import a name, call something or build another type (GLOBAL, STACK_GLOBAL, REDUCE, BUILD,
// NEWOBJ, INST, OBJ, PERSID, EXT*, sets, bytearray, out-of-band buffers, ...) is refused by name.
// docs/design/pickle-codec.md has the full subset, the limits and the type mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>

#include "ringpool/value.hpp"

namespace ringpool {

// The input is not a pickle of plain data, breaks a limit, or a Value cannot be pickled. what()
// says why and, when decoding, names the opcode and its byte offset.
class PickleError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct PickleLimits {
  // Deepest container nesting decoded or encoded ([[1]] has depth 2). Decoding, encoding,
  // repr(), == and destruction of a Value all recurse, so this keeps them far from the end of a
  // thread's stack; real task arguments are seldom deeper than ten.
  std::size_t max_depth = 128;
  // Memo references let a short pickle name one subobject many times; the decoded Value holds a
  // copy per reference. The decoded size (sizeof(Value) per value plus the bytes of every str and
  // bytes) may be at most this many times the input size, plus max_decoded_slack. Without shared
  // subobjects a pickle decodes to under 48 times its size; the headroom admits moderate
  // sharing while a few hundred bytes of memo references cannot ask for gigabytes.
  std::size_t max_expansion = 64;
  std::size_t max_decoded_slack = std::size_t{16} << 20;
};

// Pickles v with the given protocol (2 to 5; std::invalid_argument otherwise), choosing the
// opcodes CPython would (BININT1/BININT2/BININT/LONG1 for ints, SHORT_ forms for short strings
// at protocol 4+). pickle.loads() of the result is equal to the Python equivalent of v.
// Throws PickleError for: a str that is not valid UTF-8; bytes at protocol 2 (CPython would need
// a REDUCE of _codecs.encode, which our decoder refuses); a dict key that Python cannot hash (a
// list or dict, also inside a tuple) or that repeats an earlier key by Python's equality (1, 1.0
// and True are the same key); nesting deeper than limits.max_depth.
std::string pickle_dumps(const Value& v, int protocol = 5, const PickleLimits& limits = {});

// Appends to out the opcodes with which pickle_dumps(v, protocol) pushes v, without its PROTO
// and STOP: a piece of a larger pickle that a caller writes itself (a task's call record). They
// use no memo, so they fit anywhere a value may stand. On a throw (as pickle_dumps) out is as it
// was.
void pickle_dump_ops(std::string& out, const Value& v, int protocol = 5, const PickleLimits& limits = {});

// Unpickles data, which must hold exactly one pickle (no bytes after STOP). Throws PickleError
// for any opcode outside the plain-data subset, truncated or malformed input, an int that does
// not fit in int64, a str that is not UTF-8, a recursive structure, an unhashable or repeated
// dict key, or a limit exceeded.
Value pickle_loads(std::string_view data, const PickleLimits& limits = {});

namespace detail {
// pickle_loads without its fast path for pickles that never read their memo: the general
// decoder alone (the fuzz target checks that both agree).
Value pickle_loads_graph(std::string_view data, const PickleLimits& limits = {});
// Reads the int opcode at in[pos] (BININT1, BININT2, BININT, or LONG1 of up to 8 bytes) as the
// decoders do and moves pos past it; false (pos unchanged) for any other opcode, a truncated one
// or a LONG1 outside int64. For readers of records whose layout they know (ringpool::Pool).
bool read_int_op(std::string_view in, std::size_t& pos, std::int64_t& out);
// pickle_dump_ops of a tuple of these items, without building the tuple (a call's arguments).
void pickle_dump_tuple_ops(std::string& out, std::span<const Value> items, int protocol = 5,
                           const PickleLimits& limits = {});
}  // namespace detail

}  // namespace ringpool
