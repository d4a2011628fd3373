// JSON text <-> ringpool::Value for the example service, over Debian's nlohmann-json (the parser
// is not ours to maintain; this file only maps its types onto Value's).
//
// Reading: objects become dicts with str keys in document order, arrays lists, integers int64,
// other numbers float, strings str (nlohmann refuses ill-formed UTF-8). Anything a client can get
// wrong -- malformed or truncated text, nesting past kMaxDepth, an integer past int64, a key twice
// in one object -- throws BadJson, never anything else: the text comes from an untrusted client.
// nlohmann's SAX interface builds the Value directly (no JSON tree in between) on an explicit
// stack, so no input makes the parser recurse.
// Writing: tuples become arrays, bytes a base64 string, non-str dict keys their repr, NaN and
// infinities null, and a str that is not UTF-8 is written with U+FFFD in place of the bad bytes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "ringpool/value.hpp"

namespace json_value {

using Json = nlohmann::ordered_json;  // ordered: a dict keeps the client's key order

class BadJson : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Deeper documents are refused while parsing: pickling, printing and freeing a Value recurse
// once per level, so the bound keeps the stack small.
inline constexpr int kMaxDepth = 64;

namespace detail {

// nlohmann's SAX callbacks -> one Value. Each returns false to stop the parse (error_ says why).
class Builder {
 public:
  using Json = json_value::Json;

  bool null() { return put(ringpool::Value()); }
  bool boolean(bool b) { return put(ringpool::Value(b)); }
  bool number_integer(std::int64_t i) { return put(ringpool::Value(i)); }
  bool number_unsigned(std::uint64_t u) {
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) return fail("integer out of range");
    return put(ringpool::Value(static_cast<std::int64_t>(u)));
  }
  // nlohmann reads an integer too large for 64 bits as a float; the service refuses it instead
  // of letting 1e20-sized "integers" reach Python as floats.
  bool number_float(double d, const std::string& text) {
    if (text.find_first_of(".eE") == std::string::npos) return fail("integer out of range");
    return put(ringpool::Value(d));
  }
  bool string(std::string& s) { return put(ringpool::Value(std::move(s))); }
  bool binary(Json::binary_t&) { return fail("binary values are not JSON"); }
  bool start_object(std::size_t) { return open(ringpool::Value::dict()); }
  bool key(std::string& k) {
    keys_.back() = std::move(k);
    return true;
  }
  bool end_object() { return close(); }
  bool start_array(std::size_t) { return open(ringpool::Value::list()); }
  bool end_array() { return close(); }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    return fail(e.what());  // "[json.exception.parse_error.101] parse error at line 1, column 3: ..."
  }

  ringpool::Value take() { return std::move(root_); }
  const std::string& error() const { return error_; }

 private:
  // The message names the problem; text of the request it quotes (a parse error's "last read"
  // token, a duplicate key) is cut at kQuoted bytes, so an error reply stays small whatever the
  // request.
  bool fail(std::string why) {
    if (why.size() > kQuoted) why = why.substr(0, kQuoted) + "...";
    if (error_.empty()) error_ = "JSON: " + std::move(why);
    return false;
  }
  static constexpr std::size_t kQuoted = 256;

  bool put(ringpool::Value v) {
    if (open_.empty()) {
      root_ = std::move(v);
    } else if (open_.back().is_list()) {
      open_.back().as_list().push_back(std::move(v));
    } else {
      open_.back().as_dict().emplace_back(ringpool::Value(std::move(keys_.back())), std::move(v));
    }
    return true;
  }

  bool open(ringpool::Value container) {
    if (open_.size() >= static_cast<std::size_t>(kMaxDepth))
      return fail("nesting deeper than " + std::to_string(kMaxDepth));
    open_.push_back(std::move(container));
    keys_.emplace_back();
    return true;
  }

  bool close() {
    ringpool::Value done = std::move(open_.back());
    open_.pop_back();
    keys_.pop_back();
    if (done.is_dict() && !unique_keys(done.as_dict())) return false;
    return put(std::move(done));
  }

  // A key twice would leave "which one counts" to each reader (the service's check, Python's
  // dict): refused. Sorting views keeps a large object O(n log n).
  bool unique_keys(const ringpool::Value::Dict& entries) {
    std::vector<std::string_view> keys;
    keys.reserve(entries.size());
    for (const auto& [k, v] : entries) keys.push_back(k.as_str());
    std::sort(keys.begin(), keys.end());
    const auto dup = std::adjacent_find(keys.begin(), keys.end());
    return dup == keys.end() || fail("duplicate key \"" + std::string(*dup) + "\"");
  }

  ringpool::Value root_;
  std::vector<ringpool::Value> open_;  // the containers being filled, innermost last
  std::vector<std::string> keys_;      // per open container: the key of the value to come
  std::string error_;
};

inline std::string base64(std::string_view in) {
  static constexpr char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const std::uint32_t n = (std::uint8_t(in[i]) << 16) | (std::uint8_t(in[i + 1]) << 8) | std::uint8_t(in[i + 2]);
    out += t[n >> 18], out += t[(n >> 12) & 63], out += t[(n >> 6) & 63], out += t[n & 63];
  }
  if (i + 1 == in.size()) {
    const std::uint32_t n = std::uint8_t(in[i]) << 16;
    out += t[n >> 18], out += t[(n >> 12) & 63], out += "==";
  } else if (i + 2 == in.size()) {
    const std::uint32_t n = (std::uint8_t(in[i]) << 16) | (std::uint8_t(in[i + 1]) << 8);
    out += t[n >> 18], out += t[(n >> 12) & 63], out += t[(n >> 6) & 63], out += '=';
  }
  return out;
}

inline Json to_json(const ringpool::Value& v) {
  using T = ringpool::Value::Type;
  switch (v.type()) {
    case T::none: return nullptr;
    case T::boolean: return v.as_bool();
    case T::integer: return v.as_int();
    case T::floating: return v.as_float();  // dump() writes a non-finite float as null
    case T::str: return v.as_str();
    case T::bytes: return base64(v.as_bytes());
    case T::list:
    case T::tuple: {
      Json a = Json::array();
      for (const auto& x : v.is_list() ? v.as_list() : v.as_tuple()) a.push_back(to_json(x));
      return a;
    }
    case T::dict: {
      // Appended to ordered_map's vector directly: its operator[] searches linearly, which makes
      // a large result dict quadratic. Keys are unique already (a Python dict's), unless a
      // non-str key's repr equals a str key: then both are written.
      Json o = Json::object();
      auto& entries = static_cast<std::vector<std::pair<const std::string, Json>>&>(o.get_ref<Json::object_t&>());
      entries.reserve(v.as_dict().size());
      for (const auto& [k, x] : v.as_dict()) entries.emplace_back(k.is_str() ? k.as_str() : k.repr(), to_json(x));
      return o;
    }
  }
  return nullptr;
}

}  // namespace detail

// One JSON document (one request line) -> Value. Throws BadJson.
inline ringpool::Value parse(std::string_view text) {
  detail::Builder builder;
  if (!Json::sax_parse(text, &builder)) throw BadJson(builder.error().empty() ? "JSON: parse failed" : builder.error());
  return builder.take();
}

// A lower bound on dump(v).size(), found without building anything; it stops adding once it is
// over `enough` (then it is only known to be larger). The real size is at most ~8x the bound (a
// float's shortest form has 3 to 24 characters, a str's byte up to 6 as an escape): a service
// refuses a reply over its cap from the bound when it can, before the JSON tree and text exist.
inline std::size_t dump_size_at_least(const ringpool::Value& v, std::size_t enough) {
  using T = ringpool::Value::Type;
  switch (v.type()) {
    case T::none: return 4;
    case T::boolean: return v.as_bool() ? 4 : 5;
    case T::integer: {
      const std::int64_t i = v.as_int();
      std::uint64_t u = i < 0 ? 0 - static_cast<std::uint64_t>(i) : static_cast<std::uint64_t>(i);
      std::size_t n = i < 0 ? 2 : 1;
      while (u >= 10) u /= 10, ++n;
      return n;
    }
    case T::floating: return 3;  // "1.0", or "null"
    case T::str: return v.as_str().size() + 2;
    case T::bytes: return (v.as_bytes().size() + 2) / 3 * 4 + 2;
    case T::list:
    case T::tuple: {
      const auto& items = v.is_list() ? v.as_list() : v.as_tuple();
      std::size_t n = 2 + (items.empty() ? 0 : items.size() - 1);
      for (const auto& x : items) {
        if (n > enough) break;
        n += dump_size_at_least(x, enough - n);
      }
      return n;
    }
    case T::dict: {
      const auto& entries = v.as_dict();
      std::size_t n = 2 + (entries.empty() ? 0 : entries.size() - 1);
      for (const auto& [k, x] : entries) {
        if (n > enough) break;
        n += (k.is_str() ? k.as_str().size() : 1) + 3;  // "key":
        n += dump_size_at_least(x, enough - std::min(n, enough));
      }
      return n;
    }
  }
  return 0;
}

// Value -> one line of JSON text (no newline). Never throws for a Value.
inline std::string dump(const ringpool::Value& v) {
  return detail::to_json(v).dump(-1, ' ', false, Json::error_handler_t::replace);
}

}  // namespace json_value
