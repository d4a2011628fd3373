// ringpool wire protocol: the task records that CALL and DATA frames carry between a task pool
// (ringpool.Executor in Python, ringpool::Pool in C++) and its workers (the worker loop in
// bindings/ringpool/_pool_worker.py, always Python).
//
// A record is the payload of one frame: a pickle (protocol 5) of a 5-tuple of plain fields.
//
//   call record   parent -> worker, on the worker's own call ring:
//                 (op, tid, fn, args, kwargs)
//   result record worker -> parent, on the pool's one result ring:
//                 (wid, tid, status, value, elapsed)
//
// docs/design/protocol.md ("Task records") draws the bytes of each record as the C++ pool writes
// and reads them; proto/golden/task/ holds one pickle per record shape, read by
// tests/cpp/test_task.cpp and tests/python/test_task_records.py, so the two sides cannot drift.
// Python reads every constant here through ringpool._core.task (bindings/src/module.cpp); nothing
// is copied by hand.
//
// Header-only and free of any other ringpool dependency, like frame.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ringpool::proto::task {

// -- call records: (op, tid, fn, args, kwargs) -------------------------------------------------
//
// The first field says what the record asks. The values are one number space for both pools:
// CHUNK is sent only by ringpool.Executor, but the C++ pool must never give 1 another meaning.
enum class Op : std::int64_t {
  CALL = 0,   // one call fn(*args, **kwargs), answered by one result record with this tid
  CHUNK = 1,  // (Executor's map with chunksize > 1) one task whose value is [fn(*a) for a in args]
  PING = 2,   // no call: answered by a PONG after every earlier answer (finds a lost result)
  STOP = 3,   // the worker exits after the records before it
  RUN = 4,    // consecutive calls of fn: args is a list, item k is task tid + k, each answered alone
};
inline constexpr std::int64_t kMaxOp = 4;

// Field positions of a call record. Readers take fields by these names (C++: the writer below
// and pool.cpp; Python: executor.py through _core.task.CALL_*), never by a bare index.
namespace call {
inline constexpr std::size_t kOp = 0;
inline constexpr std::size_t kTid = 1;     // int task id; None in PING and STOP
inline constexpr std::size_t kFn = 2;      // "module:qualname", an int (a function already sent), or (int, function)
inline constexpr std::size_t kArgs = 3;    // CALL: the argument tuple; RUN, CHUNK: a list of them (or of bare arguments)
inline constexpr std::size_t kKwargs = 4;  // CALL: a dict or None; RUN, CHUNK: None or kSingle
inline constexpr std::size_t kFields = 5;
inline constexpr std::string_view kNames[kFields] = {"op", "tid", "fn", "args", "kwargs"};
}  // namespace call

// The kwargs slot of a RUN or CHUNK record when its args list holds bare arguments instead of
// 1-tuples (a map over one iterable): no tuple per item to build, pickle and memoize.
inline constexpr std::int64_t kSingle = 1;

// -- result records: (wid, tid, status, value, elapsed) -----------------------------------------
//
// DIED is posted by ringpool.Executor's own watcher into its result ring, never by a worker; the
// C++ pool learns deaths from the supervisor. It is listed so that no worker status takes 5.
enum class Status : std::int64_t {
  OK = 0,           // value: what the call returned (a RUN item's or CHUNK's value)
  ERR = 1,          // value: the error payload (below); tid None: the record in front did not unpickle
  STARTED = 2,      // (with a task timeout) the call with this tid starts now; value None
  PONG = 3,         // the answer to a PING; tid and value None
  INIT_FAILED = 4,  // the Executor's initializer raised; tid None, value the error payload
  DIED = 5,         // (Executor only, posted by the parent) the worker wid has ended
};
inline constexpr std::int64_t kMaxStatus = 5;

namespace result {
inline constexpr std::size_t kWid = 0;      // the worker's number, given by its pool
inline constexpr std::size_t kTid = 1;      // the task answered, or None
inline constexpr std::size_t kStatus = 2;
inline constexpr std::size_t kValue = 3;
inline constexpr std::size_t kElapsed = 4;  // float seconds the call ran (0.0 for non-answers)
inline constexpr std::size_t kFields = 5;
inline constexpr std::string_view kNames[kFields] = {"wid", "tid", "status", "value", "elapsed"};
}  // namespace result

// The value of an ERR or INIT_FAILED record from a C++ pool's worker (plain mode): three strs.
// (An Executor's worker sends (exception, traceback) instead: it may pickle any object.)
namespace error {
inline constexpr std::size_t kType = 0;       // "ValueError", or "module.Qualname" outside builtins
inline constexpr std::size_t kMessage = 1;    // str(exception)
inline constexpr std::size_t kTraceback = 2;  // the formatted traceback, as text
inline constexpr std::size_t kFields = 3;
}  // namespace error

// -- limits both sides rely on --------------------------------------------------------------------

// Most calls in one RUN record the C++ pool writes. CPython's pickler writes a list's items in
// batches of 1000 APPENDS, and a worker's fast unpickler takes what CPython writes.
inline constexpr std::size_t kMaxRunCalls = 1000;
// A run stops growing at this many bytes of arguments: runs are for small calls (whose records
// cost more than their work), and a record this size still goes inline in the call ring.
inline constexpr std::size_t kMaxRunBytes = 64 * 1024;
// Records a worker takes from its call ring at once (one ring critical section). It runs and
// answers them in order, so the parent's crash accounting (records taken, the ring's `consumed`,
// against records answered) still finds the one that was running.
inline constexpr std::size_t kWorkerTake = 64;

// -- tuning both pools share (the same workers, the same records, the same behaviour) ------------

// Ring capacities: a call ring holds a worker's queued records (at most kMaxDepth calls, in RUN
// records of up to kMaxRunBytes); the result ring is shared by all workers, so it is larger.
inline constexpr std::size_t kCallCapacity = std::size_t{1} << 20;
inline constexpr std::size_t kResultCapacity = std::size_t{4} << 20;
// Unanswered calls per worker are bounded by about kQueuedWork seconds of work: deep enough that
// no-op tasks move in large batches, shallow enough that long tasks never wait behind a busy
// worker while another idles.
inline constexpr std::size_t kMinDepth = 2;
inline constexpr std::size_t kMaxDepth = 1024;
inline constexpr double kQueuedWork = 0.002;
// The parent's own time per result (seconds), added to the task time in the depth bound:
// "unanswered" includes results the parent has not read yet, so for no-op tasks the bound must
// cover the parent's per-result work, or a worker idles while its answers wait to be read.
inline constexpr double kResultCost = 2e-6;
// The task time the depth bound starts from (seconds), before any worker has reported one.
inline constexpr double kInitialTaskTime = 1e-4;
// The weight of each reported task time in the moving average the depth bound is computed from.
inline constexpr double kTaskTimeWeight = 0.05;
// Result records the parent takes from the result ring at once (one ring critical section), and
// handles under one hold of its pool lock.
inline constexpr std::size_t kResultBatch = 256;
// Seconds a pool's shutdown waits for its workers to exit after their STOP records before it
// kills them.
inline constexpr double kStopGrace = 5.0;
// Unanswered calls a worker may have, given the average task time (seconds).
constexpr std::size_t depth_for(double average_task_time) {
  const double d = kQueuedWork / (average_task_time + kResultCost);
  if (!(d >= static_cast<double>(kMinDepth))) return kMinDepth;  // NaN included
  if (d >= static_cast<double>(kMaxDepth)) return kMaxDepth;
  return static_cast<std::size_t>(d);
}

// -- the pickle bytes the C++ side writes and reads around a record's fields ---------------------
//
// A call record from the C++ pool:   PROTO 5, MARK, <op> <tid> <fn> <args> <kwargs>, TUPLE, STOP
// A result record from a worker:     PROTO 5, [FRAME n], MARK, <wid> <tid> <status> <value>,
//                                    BINFLOAT <elapsed>, TUPLE, [MEMOIZE], STOP
// (ringpool's plain-data encoder writes neither FRAME nor MEMOIZE; CPython's pickler would.)
namespace opcode {
inline constexpr char kProto = '\x80';
inline constexpr std::uint8_t kProtocol = 5;
inline constexpr char kFrame = '\x95';  // followed by a u64 frame length
inline constexpr char kMark = '(';
inline constexpr char kTuple = 't';
inline constexpr char kStop = '.';
inline constexpr char kNone = 'N';
inline constexpr char kEmptyList = ']';
inline constexpr char kAppends = 'e';
inline constexpr char kBinFloat = 'G';  // followed by 8 bytes, big-endian IEEE 754
inline constexpr char kMemoize = '\x94';
}  // namespace opcode

}  // namespace ringpool::proto::task
