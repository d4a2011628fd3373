// libFuzzer target for the result records a C++ pool reads from its workers
// (runtime/src/task_record.hpp: read_result, read_envelope, result_from; the bytes a worker wrote, copied out of
// the result ring or its out-of-band block, as pool.cpp's collector decodes them).
//
// Each input is one record payload. The collector first tries read_result (the fields read in
// place, only the value decoded), and falls back to decoding the whole record as a pickle and
// taking it apart (result_from); for a record neither decodes, it reads the envelope
// (read_envelope). Properties: none throws anything but a std::exception (the
// collector turns those into an error for the record); whatever read_result accepts, the whole
// decode accepts too and gives the same Result, field for field and the value byte for byte in
// its pickle (read_result's promise: "the caller decodes the whole record then, which gives the
// same Result"); and a decoded value survives the way back (pickle_dumps, pickle_loads). Any
// broken property traps.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "ringpool/pickle.hpp"
#include "ringpool/value.hpp"
#include "task_record.hpp"

#include "fuzz_util.hpp"

namespace {

using namespace ringpool;
using task_record::Result;

using ringpool_fuzz::require;
using ringpool_fuzz::holds_bytes;


// The value's identity: its pickle (NaNs compare by their bits, unlike Value's ==).
std::string identity(const Value& v) {
  try {
    return pickle_dumps(v, holds_bytes(v) ? 3 : 2);
  } catch (...) {
    require(false);  // anything decoded can be written again
  }
  return {};
}

bool same_double(std::optional<double> a, std::optional<double> b) {
  if (a.has_value() != b.has_value()) return false;
  return !a || std::memcmp(&*a, &*b, sizeof(double)) == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view record(reinterpret_cast<const char*>(data), size);
  std::string scratch;
  std::optional<Result> fast;
  try {
    fast = task_record::read_result(record, scratch);
  } catch (...) {
    require(false);  // read_result reports any other shape as nullopt
  }

  // The collector reads the envelope of a record that did not decode, to tell a result its codec
  // refuses from bytes no worker writes: it must never throw, and it must agree with read_result
  // on the record's own fields, with the value between them and the tail.
  std::optional<task_record::Envelope> env;
  try {
    env = task_record::read_envelope(record);
  } catch (...) {
    require(false);
  }
  if (env) require(env->fields.value.is_none() && env->value_at < env->value_end && env->value_end < size);
  if (fast) {
    require(env.has_value());
    require(env->fields.wid == fast->wid);
    require(env->fields.tid == fast->tid);
    require(env->fields.status == fast->status);
    require(same_double(env->fields.elapsed, fast->elapsed));
  }

  std::optional<Result> whole;
  try {
    whole = task_record::result_from(pickle_loads(record));
  } catch (const std::exception&) {
    // The collector reports it as an undecodable record.
  } catch (...) {
    require(false);
  }

  if (fast) {
    require(whole.has_value());
    require(fast->wid == whole->wid);
    require(fast->tid == whole->tid);
    require(fast->status == whole->status);
    require(same_double(fast->elapsed, whole->elapsed));
    require(identity(fast->value) == identity(whole->value));
  }
  if (whole) {
    // What the pool hands on survives a round trip (a service replies with it).
    const std::string once = identity(whole->value);
    Value again;
    try {
      again = pickle_loads(once);
    } catch (...) {
      require(false);
    }
    require(identity(again) == once);
  }
  return 0;
}
