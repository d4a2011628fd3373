// The C++ side of the task records (proto/include/ringpool/proto/task.hpp): the call records the
// C++ pool writes and the result records it reads, byte for byte as docs/design/protocol.md
// ("Task records") draws them. Private to the runtime (pool.cpp) and its tests
// (tests/cpp/test_task.cpp checks every writer and reader here against proto/golden/task/).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include "ringpool/pickle.hpp"
#include "ringpool/proto/task.hpp"
#include "ringpool/value.hpp"

namespace ringpool::task_record {

namespace task = proto::task;
namespace op = proto::task::opcode;

// -- call records (written) ----------------------------------------------------------------------

// PROTO 5, MARK, op, tid: how every call record with a task id starts.
inline void write_head(std::string& out, task::Op kind, std::uint64_t tid) {
  out += op::kProto;
  out += static_cast<char>(op::kProtocol);
  out += op::kMark;
  pickle_dump_ops(out, Value(static_cast<std::int64_t>(kind)));
  pickle_dump_ops(out, Value(static_cast<std::int64_t>(tid)));
}

// TUPLE, STOP: how every call record ends.
inline void write_tail(std::string& out) {
  out += op::kTuple;
  out += op::kStop;
}

// (CALL, tid, fn, args, kwargs) from fn_ops, the opcodes of fn, and `body`, those of args and
// kwargs (or None) back to back.
inline void write_call(std::string& out, std::uint64_t tid, std::string_view fn_ops, std::string_view body) {
  write_head(out, task::Op::CALL, tid);
  out += fn_ops;
  out += body;
  write_tail(out);
}

// (RUN, tid, fn, [args, ...], None or SINGLE): begin_run writes up to the list's MARK, the caller
// appends each item's opcodes (an argument tuple, or a bare argument when single), end_run closes
// the list and the record.
inline void begin_run(std::string& out, std::uint64_t tid, std::string_view fn_ops) {
  write_head(out, task::Op::RUN, tid);
  out += fn_ops;
  out += op::kEmptyList;
  out += op::kMark;
}
inline void end_run(std::string& out, bool single) {
  out += op::kAppends;
  if (single)
    pickle_dump_ops(out, Value(task::kSingle));
  else
    out += op::kNone;
  write_tail(out);
}

// (PING or STOP, None, None, None, None): the records that carry no call.
inline std::string control_record(task::Op kind) {
  Value::List f(task::call::kFields);
  f[task::call::kOp] = Value(static_cast<std::int64_t>(kind));
  return pickle_dumps(Value::tuple(std::move(f)));
}

// -- result records (read) -----------------------------------------------------------------------

// A worker's answer: the record (wid, tid, status, value, elapsed) that the worker loop
// (ringpool._pool_worker) writes.
struct Result {
  int wid = 0;
  std::optional<std::uint64_t> tid;  // None for a start-up failure or an undecodable call
  std::int64_t status = 0;
  Value value;
  std::optional<double> elapsed;
};

// A worker id as a record carries it (an int64), if it is one a pool can have given (an int >= 0).
inline std::optional<int> worker_id(std::int64_t v) {
  if (v < 0 || v > std::numeric_limits<int>::max()) return std::nullopt;
  return static_cast<int>(v);
}

// The whole record, decoded as a pickle first.
inline Result result_from(Value rec) {
  auto& f = rec.as_tuple();
  if (f.size() != task::result::kFields) throw PickleError("result record of the wrong shape");
  Result r;
  const std::int64_t wid = f[task::result::kWid].as_int();
  const std::optional<int> w = worker_id(wid);
  if (!w) throw PickleError("result record names worker " + std::to_string(wid) + ", not a worker id");
  r.wid = *w;
  if (!f[task::result::kTid].is_none()) r.tid = static_cast<std::uint64_t>(f[task::result::kTid].as_int());
  r.status = f[task::result::kStatus].as_int();
  r.value = std::move(f[task::result::kValue]);
  if (f[task::result::kElapsed].is_float()) r.elapsed = f[task::result::kElapsed].as_float();
  return r;
}

// The record's own fields (wid, tid, status, elapsed; not its value) and where its value's
// opcodes stand, when the record has the shape read_result reads. The collector asks this of a
// record that did not decode, to tell a result its decoder refuses (the worker's answer to that
// task, beyond PickleLimits) from bytes no worker loop writes.
struct Envelope {
  Result fields;  // value: None
  std::size_t value_at = 0, value_end = 0;
};
inline std::optional<Envelope> read_envelope(std::string_view s) {
  std::size_t p = 0;
  if (s.size() < 16 || s[0] != op::kProto || static_cast<std::uint8_t>(s[1]) > op::kProtocol) return std::nullopt;
  p = 2;
  if (s[p] == op::kFrame) {
    // As the decoders check it: the frame's length fits in what follows (a record that claims
    // more is refused by the whole decode, so it must not pass here; found by fuzz_task_record).
    std::uint64_t frame = 0;
    for (std::size_t i = 8; i >= 1; --i) frame = (frame << 8) | static_cast<unsigned char>(s[p + i]);
    p += 9;
    if (frame > s.size() - p) return std::nullopt;
  }
  if (p >= s.size() || s[p] != op::kMark) return std::nullopt;
  ++p;
  Envelope e;
  Result& r = e.fields;
  std::int64_t v = 0;
  if (!detail::read_int_op(s, p, v)) return std::nullopt;
  const std::optional<int> wid = worker_id(v);
  if (!wid) return std::nullopt;  // the whole decode reports it
  r.wid = *wid;
  if (p < s.size() && s[p] == op::kNone) {
    ++p;
  } else {
    if (!detail::read_int_op(s, p, v)) return std::nullopt;
    r.tid = static_cast<std::uint64_t>(v);
  }
  if (!detail::read_int_op(s, p, r.status)) return std::nullopt;
  // The tail: BINFLOAT (9 bytes), TUPLE, an optional MEMOIZE, STOP.
  std::size_t end = s.size() - 1;
  if (s[end] != op::kStop) return std::nullopt;
  if (s[end - 1] == op::kMemoize) --end;
  if (s[end - 1] != op::kTuple) return std::nullopt;
  end -= 1 + 9;
  if (end <= p || s[end] != op::kBinFloat) return std::nullopt;
  std::uint64_t bits = 0;
  for (std::size_t i = 1; i <= 8; ++i) bits = (bits << 8) | static_cast<unsigned char>(s[end + i]);
  double elapsed;
  std::memcpy(&elapsed, &bits, sizeof elapsed);
  r.elapsed = elapsed;
  e.value_at = p;
  e.value_end = end;
  return e;
}

// The answer's own fields read straight from the record as the worker's pickler writes it
//   PROTO [FRAME] MARK <wid> <tid|NONE> <status> <value ops> BINFLOAT <elapsed> TUPLE [MEMOIZE] STOP
// with only <value> decoded as a pickle (an int or None inline; anything else from a copy of its
// opcodes between PROTO and STOP, `scratch` being the reused buffer). Nothing before <value>
// stores into the memo, so the value's memo indices are those of a pickle of its own. nullopt
// when the record has another shape, or its value does not decode alone: the caller decodes the
// whole record then, which gives the same Result or the error to report.
inline std::optional<Result> read_result(std::string_view s, std::string& scratch) {
  constexpr std::size_t kFragmentLimit = 64 * 1024;  // larger values: no copy, the whole record
  std::optional<Envelope> env = read_envelope(s);
  if (!env) return std::nullopt;
  Result r = std::move(env->fields);
  const std::size_t p = env->value_at, end = env->value_end;
  std::int64_t v = 0;
  std::size_t q = p;
  if (s[p] == op::kNone && p + 1 == end) {
    r.value = Value();
  } else if (detail::read_int_op(s, q, v) && q == end) {
    r.value = Value(v);
  } else {
    if (end - p > kFragmentLimit) return std::nullopt;
    scratch.clear();
    scratch += op::kProto;
    scratch += static_cast<char>(op::kProtocol);
    scratch.append(s.substr(p, end - p));
    scratch += op::kStop;
    try {
      // One level less deep than alone: in the whole record the value sits inside the record's
      // tuple, and the whole decode must accept what this one does (found by fuzz_task_record).
      PickleLimits limits;
      limits.max_depth -= 1;
      r.value = pickle_loads(scratch, limits);
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }
  return r;
}

}  // namespace ringpool::task_record
