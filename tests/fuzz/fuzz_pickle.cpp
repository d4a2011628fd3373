// libFuzzer target for the plain-data pickle codec (runtime/src/pickle.cpp).
//
//   clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -Iruntime/include -Iproto/include \
//       tests/fuzz/fuzz_pickle.cpp runtime/src/pickle.cpp runtime/src/value.cpp -o fuzz_pickle
//   mkdir corpus && cp proto/golden/pickle/*.pkl corpus/ && ./fuzz_pickle -max_total_time=10 corpus
//
// ctest runs it as fuzz.pickle_codec (tests/CMakeLists.txt). The decoder may refuse an input
// only with PickleError, and what it accepts, its general (memo graph) decoder alone accepts too,
// as an equal Value. Whatever it accepts must survive the way back: encoding it succeeds at
// every protocol that can carry it, decodes to an equal Value, and encodes again to the same
// bytes. Any broken property traps, which libFuzzer reports as a crash.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "ringpool/pickle.hpp"
#include "ringpool/value.hpp"

#include "fuzz_util.hpp"

namespace {

using ringpool::PickleError;
using ringpool::PickleLimits;
using ringpool::Value;

using ringpool_fuzz::require;
using ringpool_fuzz::holds_bytes;


// A small slack keeps each run's allocations modest; the expansion rule is the default one.
constexpr PickleLimits kLimits{.max_depth = 64, .max_decoded_slack = std::size_t{1} << 20};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  Value v;
  try {
    v = ringpool::pickle_loads(input, kLimits);
  } catch (const PickleError& e) {
    require(std::string_view(e.what()).starts_with("pickle: "));
    return 0;
  } catch (...) {
    require(false);  // any other exception is a bug
  }
  // The fast path (pickles that never read their memo) and the general decoder agree.
  try {
    require(ringpool::detail::pickle_loads_graph(input, kLimits) == v);
  } catch (...) {
    require(false);
  }

  (void)v.repr();
  for (int protocol = holds_bytes(v) ? 3 : 2; protocol <= 5; ++protocol) {
    std::string once;
    try {
      once = ringpool::pickle_dumps(v, protocol, kLimits);
    } catch (...) {
      require(false);  // anything the decoder accepts can be written
    }
    Value again;
    try {
      again = ringpool::pickle_loads(once, kLimits);
    } catch (...) {
      require(false);  // and read back: our output has no sharing, so it fits the same limits
    }
    require(again == v);
    require(ringpool::pickle_dumps(again, protocol, kLimits) == once);
  }
  return 0;
}
