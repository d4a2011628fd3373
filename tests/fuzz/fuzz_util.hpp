// What every fuzz target shares: a failed invariant traps (libFuzzer saves the input), and the
// pickle-reading targets ask whether a decoded value holds bytes anywhere.
#pragma once

namespace ringpool_fuzz {

inline void require(bool ok) {
  if (!ok) __builtin_trap();
}

// Whether v (a ringpool::Value) holds a bytes object at any depth.
template <class V>
bool holds_bytes(const V& v) {
  if (v.is_bytes()) return true;
  if (v.is_list() || v.is_tuple()) {
    for (const V& item : v.is_list() ? v.as_list() : v.as_tuple())
      if (holds_bytes(item)) return true;
  }
  if (v.is_dict()) {
    for (const auto& [k, x] : v.as_dict())
      if (holds_bytes(k) || holds_bytes(x)) return true;
  }
  return false;
}

}  // namespace ringpool_fuzz
