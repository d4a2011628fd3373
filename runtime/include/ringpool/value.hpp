// Value: a plain-data value of the Python subset ringpool's service understands without running
// Python: None, bool, int (64-bit), float, str, bytes, list, tuple and dict.
//
// It is what pickle_loads() (pickle.hpp) produces and pickle_dumps() consumes. A Value owns its
// whole tree: copies are deep, so a Value can be handed to another thread without sharing.
//
// Equality is structural and strict, unlike Python's: the types must match (True != 1,
// 1 != 1.0, (1,) != [1]), floats compare by bit pattern (NaN == NaN, 0.0 != -0.0) so that a
// copy always equals its original, and dicts compare entry by entry in order.
#pragma once

#include <concepts>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace ringpool {

class Value;

// An accessor was called on a Value of another type; what() names both types.
class ValueTypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class Value {
 public:
  // The order is part of the API: it is the variant index.
  enum class Type : std::uint8_t { none, boolean, integer, floating, str, bytes, list, tuple, dict };

  using List = std::vector<Value>;                     // items of a list or a tuple
  using Dict = std::vector<std::pair<Value, Value>>;   // dict entries in insertion order

  Value() noexcept = default;  // None
  Value(std::nullptr_t) noexcept {}
  Value(bool b) noexcept : v_(b) {}
  // Any integer type but bool; values outside int64 (a large uint64_t) throw std::out_of_range.
  template <std::integral I>
    requires(!std::same_as<I, bool> && !std::same_as<I, char>)
  Value(I i) : v_(to_int64(i)) {}
  Value(double d) noexcept : v_(d) {}
  // Text is a Python str; it should be UTF-8 (pickle_dumps() refuses it otherwise).
  Value(const char* s) : v_(std::string(s)) {}
  Value(std::string s) noexcept : v_(std::move(s)) {}
  Value(std::string_view s) : v_(std::string(s)) {}

  static Value bytes(std::string_view data) { return Value(FromStorage{}, Bytes{std::string(data)}); }
  static Value bytes(const void* data, std::size_t size) {
    return bytes(std::string_view(static_cast<const char*>(data), size));
  }
  static Value list(List items = {}) { return Value(FromStorage{}, ListBox{std::move(items)}); }
  static Value tuple(List items = {}) { return Value(FromStorage{}, TupleBox{std::move(items)}); }
  static Value dict(Dict entries = {}) { return Value(FromStorage{}, DictBox{std::move(entries)}); }

  Type type() const noexcept { return static_cast<Type>(v_.index()); }
  // Python's name for the type: "NoneType", "bool", "int", "float", "str", "bytes", ...
  std::string_view type_name() const noexcept { return type_name(type()); }
  static std::string_view type_name(Type t) noexcept;

  bool is_none() const noexcept { return type() == Type::none; }
  bool is_bool() const noexcept { return type() == Type::boolean; }
  bool is_int() const noexcept { return type() == Type::integer; }
  bool is_float() const noexcept { return type() == Type::floating; }
  bool is_str() const noexcept { return type() == Type::str; }
  bool is_bytes() const noexcept { return type() == Type::bytes; }
  bool is_list() const noexcept { return type() == Type::list; }
  bool is_tuple() const noexcept { return type() == Type::tuple; }
  bool is_dict() const noexcept { return type() == Type::dict; }

  // Typed access; each throws ValueTypeError naming the actual type on a mismatch. There is no
  // implicit conversion: as_int() of a bool or as_float() of an int throws.
  bool as_bool() const { return get<bool>(Type::boolean); }
  std::int64_t as_int() const { return get<std::int64_t>(Type::integer); }
  double as_float() const { return get<double>(Type::floating); }
  const std::string& as_str() const { return get<std::string>(Type::str); }
  const std::string& as_bytes() const { return get<Bytes>(Type::bytes).data; }
  const List& as_list() const { return get<ListBox>(Type::list).items; }
  List& as_list() { return get<ListBox>(Type::list).items; }
  const List& as_tuple() const { return get<TupleBox>(Type::tuple).items; }
  List& as_tuple() { return get<TupleBox>(Type::tuple).items; }
  const Dict& as_dict() const { return get<DictBox>(Type::dict).entries; }
  Dict& as_dict() { return get<DictBox>(Type::dict).entries; }

  // Dict lookup by strict equality (see above: the key 1 does not find 1.0 or True). find()
  // returns nullptr when absent; at() throws std::out_of_range naming the key. Both throw
  // ValueTypeError if this is not a dict. Linear in the number of entries.
  const Value* find(const Value& key) const;
  const Value& at(const Value& key) const;

  // Python's repr() of the equivalent object, e.g. "{'a': [1, 2.5, None], b'x': (True,)}".
  // Exact for everything but non-ASCII text, where only a small set of non-printable characters
  // is escaped (Python consults the whole Unicode database).
  std::string repr() const;

  friend bool operator==(const Value& a, const Value& b) noexcept;

 private:
  struct Bytes {
    std::string data;
  };
  // Distinct wrappers so that list and tuple are different variant alternatives. std::vector may
  // be declared with the still-incomplete Value; that is the indirection making Value recursive.
  struct ListBox {
    List items;
  };
  struct TupleBox {
    List items;
  };
  struct DictBox {
    Dict entries;
  };
  using Storage = std::variant<std::monostate, bool, std::int64_t, double, std::string, Bytes, ListBox, TupleBox, DictBox>;

  struct FromStorage {};
  Value(FromStorage, Storage v) noexcept : v_(std::move(v)) {}

  template <std::integral I>
  static std::int64_t to_int64(I i) {
    if constexpr (std::is_unsigned_v<I> && sizeof(I) >= sizeof(std::int64_t)) {
      if (i > static_cast<I>(std::numeric_limits<std::int64_t>::max()))
        throw std::out_of_range("ringpool::Value: integer does not fit in int64");
    }
    return static_cast<std::int64_t>(i);
  }

  template <class T>
  const T& get(Type want) const {
    if (const T* p = std::get_if<T>(&v_)) return *p;
    throw_type_error(want);
  }
  template <class T>
  T& get(Type want) {
    if (T* p = std::get_if<T>(&v_)) return *p;
    throw_type_error(want);
  }
  [[noreturn]] void throw_type_error(Type want) const;

  Storage v_;
};

inline bool operator!=(const Value& a, const Value& b) noexcept { return !(a == b); }

}  // namespace ringpool
