// The plain-data pickle codec. Opcode semantics follow CPython's Lib/pickle.py and
// Lib/pickletools.py; docs/design/pickle-codec.md explains the subset and the limits.
//
// The decoder works in two passes so that it sees object identity the way Python does:
//   1. The opcode pass builds a graph: every value is a node, containers hold node ids, and the
//      stack and the memo hold node ids. A memo GET therefore shares a node, and an APPEND to a
//      shared list is seen through every reference, exactly as in Python. Each opcode adds at
//      most one node and one reference, so this pass is linear in the input.
//   2. Materializing the result from the node graph copies shared nodes into a tree of Values.
//      Here a cycle (a recursive structure), excessive depth and copy blow-up are detected.
#include "ringpool/pickle.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "keyed_hash.hpp"
#include "utf8.hpp"

namespace ringpool {

namespace {

namespace op {
constexpr std::uint8_t MARK = '(', STOP = '.', POP = '0', POP_MARK = '1', BININT = 'J', BININT1 = 'K',
                       BININT2 = 'M', NONE = 'N', BINUNICODE = 'X', APPEND = 'a', DICT = 'd', EMPTY_DICT = '}',
                       APPENDS = 'e', GET = 'g', BINGET = 'h', LONG_BINGET = 'j', LIST = 'l', EMPTY_LIST = ']',
                       PUT = 'p', BINPUT = 'q', LONG_BINPUT = 'r', SETITEM = 's', TUPLE = 't', EMPTY_TUPLE = ')',
                       SETITEMS = 'u', BINFLOAT = 'G', PROTO = 0x80, TUPLE1 = 0x85, TUPLE2 = 0x86, TUPLE3 = 0x87,
                       NEWTRUE = 0x88, NEWFALSE = 0x89, LONG1 = 0x8a, LONG4 = 0x8b, BINBYTES = 'B',
                       SHORT_BINBYTES = 'C', SHORT_BINUNICODE = 0x8c, BINUNICODE8 = 0x8d, BINBYTES8 = 0x8e,
                       MEMOIZE = 0x94, FRAME = 0x95;
}  // namespace op

struct OpcodeInfo {
  std::uint8_t code;
  const char* name;
  const char* refusal;  // why the decoder refuses it; nullptr for the subset it implements
};

constexpr const char* kImports = "it would import a Python object by name";
constexpr const char* kCalls = "it would call or construct a Python object";
constexpr const char* kNotPlain = "its type is not in the plain-data subset";
constexpr const char* kText = "protocol 0 text and Python 2 string opcodes are not supported";

constexpr OpcodeInfo kOpcodes[] = {
    {'(', "MARK", nullptr}, {'.', "STOP", nullptr}, {'0', "POP", nullptr}, {'1', "POP_MARK", nullptr},
    {'2', "DUP", "CPython never writes it"}, {'F', "FLOAT", kText}, {'I', "INT", kText},
    {'J', "BININT", nullptr}, {'K', "BININT1", nullptr}, {'L', "LONG", kText}, {'M', "BININT2", nullptr},
    {'N', "NONE", nullptr}, {'P', "PERSID", "it would ask for a persistent object"},
    {'Q', "BINPERSID", "it would ask for a persistent object"}, {'R', "REDUCE", kCalls}, {'S', "STRING", kText},
    {'T', "BINSTRING", kText}, {'U', "SHORT_BINSTRING", kText}, {'V', "UNICODE", kText},
    {'X', "BINUNICODE", nullptr}, {'a', "APPEND", nullptr}, {'b', "BUILD", kCalls}, {'c', "GLOBAL", kImports},
    {'d', "DICT", nullptr}, {'}', "EMPTY_DICT", nullptr}, {'e', "APPENDS", nullptr}, {'g', "GET", nullptr},
    {'h', "BINGET", nullptr}, {'i', "INST", kImports}, {'j', "LONG_BINGET", nullptr}, {'l', "LIST", nullptr},
    {']', "EMPTY_LIST", nullptr}, {'o', "OBJ", kCalls}, {'p', "PUT", nullptr}, {'q', "BINPUT", nullptr},
    {'r', "LONG_BINPUT", nullptr}, {'s', "SETITEM", nullptr}, {'t', "TUPLE", nullptr},
    {')', "EMPTY_TUPLE", nullptr}, {'u', "SETITEMS", nullptr}, {'G', "BINFLOAT", nullptr},
    {0x80, "PROTO", nullptr}, {0x81, "NEWOBJ", kCalls}, {0x82, "EXT1", kImports}, {0x83, "EXT2", kImports},
    {0x84, "EXT4", kImports}, {0x85, "TUPLE1", nullptr}, {0x86, "TUPLE2", nullptr}, {0x87, "TUPLE3", nullptr},
    {0x88, "NEWTRUE", nullptr}, {0x89, "NEWFALSE", nullptr}, {0x8a, "LONG1", nullptr}, {0x8b, "LONG4", nullptr},
    {'B', "BINBYTES", nullptr}, {'C', "SHORT_BINBYTES", nullptr}, {0x8c, "SHORT_BINUNICODE", nullptr},
    {0x8d, "BINUNICODE8", nullptr}, {0x8e, "BINBYTES8", nullptr}, {0x8f, "EMPTY_SET", kNotPlain},
    {0x90, "ADDITEMS", kNotPlain}, {0x91, "FROZENSET", kNotPlain}, {0x92, "NEWOBJ_EX", kCalls},
    {0x93, "STACK_GLOBAL", kImports}, {0x94, "MEMOIZE", nullptr}, {0x95, "FRAME", nullptr},
    {0x96, "BYTEARRAY8", kNotPlain}, {0x97, "NEXT_BUFFER", "out-of-band buffers are not supported"},
    {0x98, "READONLY_BUFFER", "out-of-band buffers are not supported"},
};

const OpcodeInfo* find_opcode(std::uint8_t code) {
  for (const OpcodeInfo& info : kOpcodes)
    if (info.code == code) return &info;
  return nullptr;
}

std::string describe_opcode(std::uint8_t code) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex = "0x";
  hex += kHex[code >> 4];
  hex += kHex[code & 0xf];
  const OpcodeInfo* info = find_opcode(code);
  return info ? std::string(info->name) + " (" + hex + ")" : hex;
}

// ---- dict keys: Python's hashability and equality ------------------------------------------

// The first part of a key that Python cannot hash (a list or dict, also inside a tuple).
const Value* unhashable_part(const Value& key) {
  if (key.is_list() || key.is_dict()) return &key;
  if (key.is_tuple())
    for (const Value& item : key.as_tuple())
      if (const Value* bad = unhashable_part(item)) return bad;
  return nullptr;
}

bool is_number(const Value& v) { return v.is_bool() || v.is_int() || v.is_float(); }

// An int64 equal to d, if there is one.
bool float_as_int(double d, std::int64_t& out) {
  // [-2^63, 2^63) is exactly representable at both ends, so the range test is exact.
  if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0) || std::trunc(d) != d) return false;
  out = static_cast<std::int64_t>(d);
  return true;
}

std::int64_t int_value(const Value& v) { return v.is_bool() ? std::int64_t{v.as_bool()} : v.as_int(); }

// Python's == for hashable plain values: 1 == 1.0 == True, but str never equals bytes. NaNs are
// taken as equal to each other, which is stricter than Python, so that duplicate detection
// never lets a NaN key through that Python might have merged by identity.
bool key_equal(const Value& a, const Value& b) {
  if (is_number(a) && is_number(b)) {
    if (a.is_float() && b.is_float()) {
      const double x = a.as_float(), y = b.as_float();
      return x == y || (std::isnan(x) && std::isnan(y));
    }
    if (a.is_float() || b.is_float()) {
      const double d = a.is_float() ? a.as_float() : b.as_float();
      std::int64_t i;
      return float_as_int(d, i) && i == int_value(a.is_float() ? b : a);
    }
    return int_value(a) == int_value(b);
  }
  if (a.type() != b.type()) return false;
  if (a.is_tuple()) {
    const auto& x = a.as_tuple();
    const auto& y = b.as_tuple();
    if (x.size() != y.size()) return false;
    for (std::size_t i = 0; i < x.size(); ++i)
      if (!key_equal(x[i], y[i])) return false;
    return true;
  }
  return a == b;
}

// A hash consistent with key_equal (equal numbers hash alike whatever their type), keyed with
// the process's random SipHash key: a sender who cannot predict it cannot choose keys that
// collide, so the duplicate-key check below stays O(n) expected for any dict it sends.
std::uint64_t key_hash(const Value& v) {
  detail::SipHasher h;
  const auto tag = [&h](char t) { h.update(&t, 1); };
  if (is_number(v)) {
    std::int64_t i;
    if (!v.is_float()) {
      tag('i');
      h.update_u64(static_cast<std::uint64_t>(int_value(v)));
    } else if (float_as_int(v.as_float(), i)) {
      tag('i');  // 1.0 == 1, and -0.0 == 0
      h.update_u64(static_cast<std::uint64_t>(i));
    } else if (std::isnan(v.as_float())) {
      tag('n');  // every NaN is one key to key_equal, whatever its payload
    } else {
      tag('f');
      const double d = v.as_float();
      std::uint64_t bits;
      std::memcpy(&bits, &d, sizeof bits);
      h.update_u64(bits);
    }
    return h.finish();
  }
  switch (v.type()) {
    case Value::Type::str:
      tag('s');
      h.update(v.as_str().data(), v.as_str().size());
      break;
    case Value::Type::bytes:
      tag('b');
      h.update(v.as_bytes().data(), v.as_bytes().size());
      break;
    case Value::Type::tuple:
      tag('t');
      h.update_u64(v.as_tuple().size());
      for (const Value& item : v.as_tuple()) h.update_u64(key_hash(item));
      break;
    default:
      tag('N');  // None; check_dict_keys refuses the unhashable types before hashing
      break;
  }
  return h.finish();
}

// Why the keys of a dict could not come from (or go to) a Python dict, or an empty string.
std::string check_dict_keys(const Value::Dict& entries) {
  // key_hash -> entry index; the hash is already keyed, so the table's own hash may be the identity.
  std::unordered_multimap<std::uint64_t, std::size_t> seen;
  seen.reserve(entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const Value& key = entries[i].first;
    if (const Value* bad = unhashable_part(key)) return "unhashable dict key of type " + std::string(bad->type_name());
    const std::uint64_t h = key_hash(key);
    auto [lo, hi] = seen.equal_range(h);
    for (auto it = lo; it != hi; ++it)
      if (key_equal(entries[it->second].first, key))
        return "dict key " + key.repr() + " repeats key " + entries[it->second].first.repr() +
               " (Python would keep one entry)";
    seen.emplace(h, i);
  }
  return {};
}

// ---- decoder ---------------------------------------------------------------------------------

// The most a pickle of n bytes may decode to (PickleLimits::max_expansion), saturating.
std::size_t decoded_budget(std::size_t n, const PickleLimits& limits) {
  const std::size_t max = std::numeric_limits<std::size_t>::max();
  return n > (max - limits.max_decoded_slack) / (limits.max_expansion ? limits.max_expansion : 1)
             ? max
             : n * limits.max_expansion + limits.max_decoded_slack;
}

class Decoder {
 public:
  Decoder(std::string_view in, const PickleLimits& limits)
      : in_(in), limits_(limits), budget_(decoded_budget(in.size(), limits)) {
    // Singletons, as in Python: NONE, NEWFALSE and NEWTRUE never allocate.
    add_leaf(Value(), Value::Type::none);
    add_leaf(Value(false), Value::Type::boolean);
    add_leaf(Value(true), Value::Type::boolean);
  }

  Value run() {
    for (;;) {
      if (pos_ >= in_.size())
        throw PickleError("pickle: missing STOP: the input ends at offset " + std::to_string(pos_));
      op_offset_ = pos_;
      op_ = static_cast<std::uint8_t>(in_[pos_++]);
      if (op_ == op::STOP) break;
      step();
    }
    if (pos_ != in_.size())
      fail(std::to_string(in_.size() - pos_) + " trailing byte(s) after STOP");
    if (!marks_.empty()) fail("a MARK is still open");
    if (stack_.size() != 1) fail("the stack holds " + std::to_string(stack_.size()) + " values, not one");
    const std::uint32_t root = stack_.back();
    ++nodes_[root].uses;
    return build(root, 0, true);
  }

 private:
  struct Node {
    Value leaf;                        // the value of a scalar, str or bytes node
    std::vector<std::uint32_t> kids;   // list/tuple items; dict keys and values interleaved
    std::size_t offset;                // of the opcode that created it, for error messages
    std::size_t uses = 0;              // references from containers (and from the result)
    Value::Type type;
    bool on_path = false;              // being materialized: meeting it again means a cycle
  };

  [[noreturn]] void fail(const std::string& why) const {
    throw PickleError("pickle: " + why + " (opcode " + describe_opcode(op_) + " at offset " +
                      std::to_string(op_offset_) + ")");
  }
  [[noreturn]] void fail_node(const Node& n, const std::string& why) const {
    throw PickleError("pickle: " + why + " (the " + std::string(Value::type_name(n.type)) +
                      " made at offset " + std::to_string(n.offset) + ")");
  }

  // ---- input
  std::string_view take(std::size_t n) {
    if (n > in_.size() - pos_)
      fail("truncated: needs " + std::to_string(n) + " more byte(s), " + std::to_string(in_.size() - pos_) + " left");
    std::string_view s = in_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  std::uint64_t read_le(std::size_t n) {
    const std::string_view s = take(n);
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t{static_cast<unsigned char>(s[i])} << (8 * i);
    return v;
  }
  std::size_t read_size(std::size_t width) {
    const std::uint64_t n = read_le(width);
    // Checked here so that a huge length fails as truncation, before any allocation.
    if (n > in_.size() - pos_)
      fail("truncated: a length of " + std::to_string(n) + " but " + std::to_string(in_.size() - pos_) + " byte(s) left");
    return static_cast<std::size_t>(n);
  }
  // The decimal argument of the text opcodes PUT and GET, ended by a newline.
  std::uint32_t read_decimal_line() {
    const std::size_t nl = in_.find('\n', pos_);
    if (nl == std::string_view::npos) fail("truncated: no newline after the decimal argument");
    const std::string_view digits = in_.substr(pos_, nl - pos_);
    pos_ = nl + 1;
    if (digits.empty() || digits.size() > 10) fail("bad memo index '" + std::string(digits) + "'");
    std::uint64_t v = 0;
    for (char c : digits) {
      if (c < '0' || c > '9') fail("bad memo index '" + std::string(digits) + "'");
      v = v * 10 + static_cast<std::uint64_t>(c - '0');
    }
    if (v > std::numeric_limits<std::uint32_t>::max()) fail("memo index " + std::to_string(v) + " is too large");
    return static_cast<std::uint32_t>(v);
  }

  // ---- graph
  std::uint32_t add_node(Node n) {
    if (nodes_.size() >= std::numeric_limits<std::uint32_t>::max()) fail("too many values");
    nodes_.push_back(std::move(n));
    return static_cast<std::uint32_t>(nodes_.size() - 1);
  }
  std::uint32_t add_leaf(Value v, Value::Type t) {
    Node n;
    n.leaf = std::move(v);
    n.offset = op_offset_;
    n.type = t;
    return add_node(std::move(n));
  }
  std::uint32_t add_container(Value::Type t, std::vector<std::uint32_t> kids = {}) {
    for (std::uint32_t k : kids) ++nodes_[k].uses;
    Node n;
    n.kids = std::move(kids);
    n.offset = op_offset_;
    n.type = t;
    return add_node(std::move(n));
  }

  // ---- stack: like CPython, a MARK fences off the values below it
  std::size_t fence() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(std::uint32_t id) { stack_.push_back(id); }
  std::uint32_t pop() {
    if (stack_.size() <= fence()) fail("stack underflow");
    const std::uint32_t id = stack_.back();
    stack_.pop_back();
    return id;
  }
  std::uint32_t top() const {
    if (stack_.size() <= fence()) fail("stack underflow");
    return stack_.back();
  }
  std::vector<std::uint32_t> pop_mark() {
    if (marks_.empty()) fail("no MARK to pop to");
    std::vector<std::uint32_t> items(stack_.begin() + static_cast<std::ptrdiff_t>(marks_.back()), stack_.end());
    stack_.resize(marks_.back());
    marks_.pop_back();
    return items;
  }
  Node& target(Value::Type want) {
    Node& n = nodes_[top()];
    if (n.type != want)
      fail("expects a " + std::string(Value::type_name(want)) + " below, found " + std::string(Value::type_name(n.type)));
    return n;
  }
  void append_kids(Node& n, const std::vector<std::uint32_t>& kids) {
    for (std::uint32_t k : kids) ++nodes_[k].uses;
    n.kids.insert(n.kids.end(), kids.begin(), kids.end());
  }

  void memo_put(std::uint32_t index) { memo_[index] = top(); }
  void memo_get(std::uint32_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) fail("memo index " + std::to_string(index) + " was never stored");
    push(it->second);
  }

  void push_int(std::int64_t v) { push(add_leaf(Value(v), Value::Type::integer)); }

  // LONG1/LONG4: n bytes of little-endian two's complement.
  void load_long(std::size_t n) {
    const std::string_view b = take(n);
    if (n == 0) return push_int(0);
    const auto byte = [&](std::size_t i) { return static_cast<unsigned char>(b[i]); };
    const bool negative = byte(n - 1) & 0x80;
    // Bytes past the eighth may only repeat the sign, and the eighth must carry it: otherwise
    // the value needs more than 64 bits, and wrapping it would change the number.
    for (std::size_t i = 8; i < n; ++i)
      if (byte(i) != (negative ? 0xff : 0x00)) fail("int does not fit in 64 bits");
    std::uint64_t u = 0;
    for (std::size_t i = 0; i < n && i < 8; ++i) u |= std::uint64_t{byte(i)} << (8 * i);
    if (n < 8 && negative) u |= ~std::uint64_t{0} << (8 * n);
    if (n >= 8 && static_cast<bool>(u >> 63) != negative) fail("int does not fit in 64 bits");
    push_int(static_cast<std::int64_t>(u));
  }

  void load_str(std::size_t n) {
    const std::string_view s = take(n);
    const std::size_t bad = detail::utf8_invalid_offset(s);
    if (bad != s.size()) fail("str is not valid UTF-8 at byte " + std::to_string(bad) + " of its data");
    push(add_leaf(Value(s), Value::Type::str));
  }

  void load_tuple(std::size_t n) {
    if (stack_.size() - fence() < n) fail("stack underflow");
    std::vector<std::uint32_t> items(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
    stack_.resize(stack_.size() - n);
    push(add_container(Value::Type::tuple, std::move(items)));
  }

  void step() {
    switch (op_) {
      case op::PROTO: {
        const auto v = read_le(1);
        if (v > 5) fail("unsupported pickle protocol " + std::to_string(v));
        return;
      }
      case op::FRAME:
        // Frames only group opcodes for buffered reading; the whole input is in memory, so it is
        // enough that the frame lies inside it (as CPython's C unpickler checks).
        read_size(8);
        return;
      case op::MARK:
        marks_.push_back(stack_.size());
        return;
      case op::POP:
        pop();
        return;
      case op::POP_MARK:
        pop_mark();
        return;
      case op::NONE:
        return push(0);
      case op::NEWFALSE:
        return push(1);
      case op::NEWTRUE:
        return push(2);
      case op::BININT:
        return push_int(static_cast<std::int32_t>(static_cast<std::uint32_t>(read_le(4))));
      case op::BININT1:
        return push_int(static_cast<std::int64_t>(read_le(1)));
      case op::BININT2:
        return push_int(static_cast<std::int64_t>(read_le(2)));
      case op::LONG1:
        return load_long(static_cast<std::size_t>(read_le(1)));
      case op::LONG4: {
        const auto n = static_cast<std::int32_t>(static_cast<std::uint32_t>(read_le(4)));
        if (n < 0) fail("negative length");
        return load_long(static_cast<std::size_t>(n));
      }
      case op::BINFLOAT: {
        const std::string_view b = take(8);  // big-endian IEEE 754
        std::uint64_t bits = 0;
        for (char c : b) bits = (bits << 8) | static_cast<unsigned char>(c);
        double d;
        std::memcpy(&d, &bits, sizeof d);
        return push(add_leaf(Value(d), Value::Type::floating));
      }
      case op::SHORT_BINUNICODE:
        return load_str(read_size(1));
      case op::BINUNICODE:
        return load_str(read_size(4));
      case op::BINUNICODE8:
        return load_str(read_size(8));
      case op::SHORT_BINBYTES:
        return push(add_leaf(Value::bytes(take(read_size(1))), Value::Type::bytes));
      case op::BINBYTES:
        return push(add_leaf(Value::bytes(take(read_size(4))), Value::Type::bytes));
      case op::BINBYTES8:
        return push(add_leaf(Value::bytes(take(read_size(8))), Value::Type::bytes));
      case op::EMPTY_LIST:
        return push(add_container(Value::Type::list));
      case op::LIST:
        return push(add_container(Value::Type::list, pop_mark()));
      case op::APPEND: {
        const std::uint32_t item = pop();
        return append_kids(target(Value::Type::list), {item});
      }
      case op::APPENDS: {
        const std::vector<std::uint32_t> items = pop_mark();
        return append_kids(target(Value::Type::list), items);
      }
      case op::EMPTY_TUPLE:
        return push(add_container(Value::Type::tuple));
      case op::TUPLE1:
        return load_tuple(1);
      case op::TUPLE2:
        return load_tuple(2);
      case op::TUPLE3:
        return load_tuple(3);
      case op::TUPLE:
        return push(add_container(Value::Type::tuple, pop_mark()));
      case op::EMPTY_DICT:
        return push(add_container(Value::Type::dict));
      case op::DICT: {
        std::vector<std::uint32_t> items = pop_mark();
        if (items.size() % 2) fail("odd number of values for keys and values");
        return push(add_container(Value::Type::dict, std::move(items)));
      }
      case op::SETITEM: {
        const std::uint32_t value = pop();
        const std::uint32_t key = pop();
        return append_kids(target(Value::Type::dict), {key, value});
      }
      case op::SETITEMS: {
        const std::vector<std::uint32_t> items = pop_mark();
        if (items.size() % 2) fail("odd number of values for keys and values");
        return append_kids(target(Value::Type::dict), items);
      }
      case op::PUT:
        return memo_put(read_decimal_line());
      case op::BINPUT:
        return memo_put(static_cast<std::uint32_t>(read_le(1)));
      case op::LONG_BINPUT:
        return memo_put(static_cast<std::uint32_t>(read_le(4)));
      case op::MEMOIZE:
        if (memo_.size() >= std::numeric_limits<std::uint32_t>::max()) fail("memo is full");
        return memo_put(static_cast<std::uint32_t>(memo_.size()));
      case op::GET:
        return memo_get(read_decimal_line());
      case op::BINGET:
        return memo_get(static_cast<std::uint32_t>(read_le(1)));
      case op::LONG_BINGET:
        return memo_get(static_cast<std::uint32_t>(read_le(4)));
      default: {
        const OpcodeInfo* info = find_opcode(op_);
        fail(info && info->refusal ? std::string("refused, only plain data is accepted: ") + info->refusal
                                   : std::string("not a pickle opcode"));
      }
    }
  }

  // ---- materialization
  void charge(std::size_t bytes, const Node& n) {
    if (bytes > budget_ - used_)
      fail_node(n, "decoded size exceeds " + std::to_string(budget_) +
                       " bytes (memo references copy shared values; see PickleLimits::max_expansion)");
    used_ += bytes;
  }

  // `alone` says every container on the path from the result has one reference, and then so
  // does n if its own uses is 1: it is visited exactly once and may give its data away.
  Value build(std::uint32_t id, std::size_t depth, bool alone) {
    Node& n = nodes_[id];
    alone = alone && n.uses == 1;
    if (n.type == Value::Type::str || n.type == Value::Type::bytes) {
      charge(sizeof(Value) + (n.type == Value::Type::str ? n.leaf.as_str().size() : n.leaf.as_bytes().size()), n);
      return alone ? std::move(n.leaf) : n.leaf;
    }
    charge(sizeof(Value), n);
    if (n.type != Value::Type::list && n.type != Value::Type::tuple && n.type != Value::Type::dict) return n.leaf;

    if (n.on_path) fail_node(n, "recursive structure: a container contains itself");
    if (depth >= limits_.max_depth)
      fail_node(n, "nesting deeper than " + std::to_string(limits_.max_depth) + " containers");
    n.on_path = true;
    // n stays valid: nodes_ does not grow while materializing.
    Value out;
    if (n.type == Value::Type::dict) {
      Value::Dict entries;
      entries.reserve(n.kids.size() / 2);
      for (std::size_t i = 0; i + 1 < n.kids.size(); i += 2) {
        Value key = build(n.kids[i], depth + 1, alone);
        entries.emplace_back(std::move(key), build(n.kids[i + 1], depth + 1, alone));
      }
      if (std::string why = check_dict_keys(entries); !why.empty()) fail_node(n, why);
      out = Value::dict(std::move(entries));
    } else {
      Value::List items;
      items.reserve(n.kids.size());
      for (std::uint32_t k : n.kids) items.push_back(build(k, depth + 1, alone));
      out = n.type == Value::Type::list ? Value::list(std::move(items)) : Value::tuple(std::move(items));
    }
    n.on_path = false;
    return out;
  }

  std::string_view in_;
  PickleLimits limits_;
  std::size_t pos_ = 0;
  std::size_t op_offset_ = 0;
  std::uint8_t op_ = 0;
  // A deque, not a vector: one node per input byte is the worst case, and a vector's regrowth
  // would hold the old and the new array at once, tripling that peak (the bound is stated in
  // docs/design/pickle-codec.md, "Limits an attacker cannot exceed").
  std::deque<Node> nodes_;
  std::vector<std::uint32_t> stack_;
  std::vector<std::size_t> marks_;  // stack sizes at each open MARK
  // Memo indices are the sender's choice: keyed, so they cannot all be put in one bucket.
  std::unordered_map<std::uint32_t, std::uint32_t, detail::KeyedIntHash> memo_;
  std::size_t budget_ = 0;
  std::size_t used_ = 0;
};

// ---- the tree decoder: pickles that never read their memo ---------------------------------------

// Nearly every pickle that carries plain data (a task's call or result record) stores into its
// memo but never reads from it: no value is shared, so there is no graph to build. This decoder
// builds the Values directly on a stack. It accepts a strict subset of what Decoder accepts and
// gives up (nullopt) on anything else: a memo read, a rarely used opcode, or any error. Decoder
// then decodes the input again, and reports the error if there is one, so both paths give the
// same Value or the same PickleError (tests/fuzz/fuzz_pickle.cpp checks that they agree).
class TreeDecoder {
 public:
  TreeDecoder(std::string_view in, const PickleLimits& limits)
      : in_(in), limits_(limits), budget_(decoded_budget(in.size(), limits)) {
    stack_.reserve(8);
  }

  std::optional<Value> run() {
    for (;;) {
      if (pos_ >= in_.size()) return std::nullopt;
      const auto op = static_cast<std::uint8_t>(in_[pos_++]);
      if (op == op::STOP) break;
      if (!step(op)) return std::nullopt;
    }
    if (pos_ != in_.size() || !marks_.empty() || stack_.size() != 1) return std::nullopt;
    if (stack_.back().type == Value::Type::dict && !dict_ok(stack_.back())) return std::nullopt;
    return finish(std::move(stack_.back()));
  }

 private:
  // A value on the stack; a list, tuple or dict keeps its items apart until it is finished
  // (lists and dicts still receive APPEND and SETITEM while they sit on the stack).
  struct Item {
    Value value;
    Value::List kids;          // container items; dict keys and values interleaved
    Value::Type type = Value::Type::none;
    std::size_t depth = 0;     // container nesting ([[1]]: 2; a scalar: 0)
  };

  bool take(std::size_t n, std::string_view& out) {
    if (n > in_.size() - pos_) return false;
    out = in_.substr(pos_, n);
    pos_ += n;
    return true;
  }
  bool read_le(std::size_t n, std::uint64_t& v) {
    std::string_view s;
    if (!take(n, s)) return false;
    v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= std::uint64_t{static_cast<unsigned char>(s[i])} << (8 * i);
    return true;
  }
  bool charge(std::size_t bytes) {
    if (bytes > budget_ - used_) return false;
    used_ += bytes;
    return true;
  }
  // CPython's pickler keeps its stack short (batches of 1000 items); a stack this deep is a long
  // tuple or hand-made input, which the graph decoder takes: its nodes are not Items (80 bytes,
  // in a vector whose regrowth would triple that peak), so memory stays within the stated bound.
  static constexpr std::size_t kMaxStack = 4096;

  bool push_scalar(Value v, Value::Type t, std::size_t extra = 0) {
    if (stack_.size() >= kMaxStack || !charge(sizeof(Value) + extra)) return false;
    Item it;
    it.value = std::move(v);
    it.type = t;
    stack_.push_back(std::move(it));
    return true;
  }
  // An empty container (false when the limits refuse it): EMPTY_LIST/TUPLE/DICT push it as is,
  // the others fill it from the stack first.
  std::optional<Item> container(Value::Type t) {
    if (limits_.max_depth <= 1 || !charge(sizeof(Value))) return std::nullopt;
    Item it;
    it.type = t;
    it.depth = 1;
    return it;
  }
  bool push_container(Value::Type t) {
    if (stack_.size() >= kMaxStack) return false;
    std::optional<Item> c = container(t);
    if (!c) return false;
    stack_.push_back(std::move(*c));
    return true;
  }
  std::size_t fence() const { return marks_.empty() ? 0 : marks_.back(); }

  // The finished Value of an item; a container's depth was checked as its items arrived.
  static Value finish(Item&& it) {
    switch (it.type) {
      case Value::Type::list:
        return Value::list(std::move(it.kids));
      case Value::Type::tuple:
        return Value::tuple(std::move(it.kids));
      case Value::Type::dict: {
        Value::Dict entries;
        entries.reserve(it.kids.size() / 2);
        for (std::size_t i = 0; i + 1 < it.kids.size(); i += 2)
          entries.emplace_back(std::move(it.kids[i]), std::move(it.kids[i + 1]));
        return Value::dict(std::move(entries));
      }
      default:
        return std::move(it.value);
    }
  }
  // Moves stack_[from..] into the container `into` (a stack index below from).
  bool adopt(std::size_t into, std::size_t from) { return absorb(stack_[into], from); }
  bool absorb(Item& c, std::size_t from) {
    // Grow geometrically: reserving exactly one more item per APPEND would copy the whole list
    // on every APPEND, quadratic in a list a sender writes one APPEND at a time.
    const std::size_t need = c.kids.size() + (stack_.size() - from);
    if (need > c.kids.capacity()) c.kids.reserve(std::max(need, 2 * c.kids.capacity()));
    for (std::size_t i = from; i < stack_.size(); ++i) {
      Item& k = stack_[i];
      // Decoder refuses a container nested deeper than max_depth; giving up one level earlier
      // leaves that boundary to it.
      c.depth = std::max(c.depth, k.depth + 1);
      if (c.depth >= limits_.max_depth) return false;
      if (k.type == Value::Type::dict && !dict_ok(k)) return false;
      c.kids.push_back(finish(std::move(k)));
    }
    stack_.resize(from);
    return true;
  }
  static bool dict_ok(const Item& d) {
    if (d.kids.size() % 2) return false;
    for (std::size_t i = 0; i < d.kids.size(); i += 2) {
      const Value::Type t = d.kids[i].type();
      if (t == Value::Type::list || t == Value::Type::dict || t == Value::Type::tuple) return false;
    }
    Value::Dict probe;  // the full check (repeated keys) only when a dict has several keys
    if (d.kids.size() > 2) {
      probe.reserve(d.kids.size() / 2);
      for (std::size_t i = 0; i < d.kids.size(); i += 2) probe.emplace_back(d.kids[i], Value());
      return check_dict_keys(probe).empty();
    }
    return true;
  }
  // A new container from the items above the last MARK.
  bool from_mark(Value::Type t) {
    if (marks_.empty()) return false;
    const std::size_t m = marks_.back();
    marks_.pop_back();
    return collect(t, m) && (t != Value::Type::dict || stack_[m].kids.size() % 2 == 0);
  }
  // The items from stack index m up become a new container of type t, in their place.
  bool collect(Value::Type t, std::size_t m) {
    std::optional<Item> c = container(t);
    if (!c || !absorb(*c, m)) return false;
    stack_.push_back(std::move(*c));
    return true;
  }
  // APPEND(S)/SETITEM(S): the items from `from` up go into the container just below them, which
  // must sit above the last MARK too.
  bool extend(std::size_t from, Value::Type want) {
    if (from == 0 || from <= fence()) return false;
    if (stack_[from - 1].type != want) return false;
    return adopt(from - 1, from);
  }

  bool step(std::uint8_t op) {
    std::uint64_t v = 0;
    std::string_view b;
    switch (op) {
      case op::PROTO:
        return read_le(1, v) && v <= 5;
      case op::FRAME:
        return read_le(8, v) && v <= in_.size() - pos_;
      case op::MARK:
        marks_.push_back(stack_.size());
        return true;
      case op::NONE:
        return push_scalar(Value(), Value::Type::none);
      case op::NEWFALSE:
        return push_scalar(Value(false), Value::Type::boolean);
      case op::NEWTRUE:
        return push_scalar(Value(true), Value::Type::boolean);
      case op::BININT:
      case op::BININT1:
      case op::BININT2:
      case op::LONG1: {
        std::size_t at = pos_ - 1;
        std::int64_t i = 0;
        if (!detail::read_int_op(in_, at, i)) return false;
        pos_ = at;
        return push_scalar(Value(i), Value::Type::integer);
      }
      case op::BINFLOAT: {
        if (!take(8, b)) return false;
        std::uint64_t bits = 0;
        for (char c : b) bits = (bits << 8) | static_cast<unsigned char>(c);
        double d;
        std::memcpy(&d, &bits, sizeof d);
        return push_scalar(Value(d), Value::Type::floating);
      }
      case op::SHORT_BINUNICODE:
        return read_le(1, v) && str(v);
      case op::BINUNICODE:
        return read_le(4, v) && str(v);
      case op::BINUNICODE8:
        return read_le(8, v) && str(v);
      case op::SHORT_BINBYTES:
        return read_le(1, v) && bytes(v);
      case op::BINBYTES:
        return read_le(4, v) && bytes(v);
      case op::BINBYTES8:
        return read_le(8, v) && bytes(v);
      case op::EMPTY_LIST:
        return push_container(Value::Type::list);
      case op::EMPTY_TUPLE:
        return push_container(Value::Type::tuple);
      case op::EMPTY_DICT:
        return push_container(Value::Type::dict);
      case op::LIST:
        return from_mark(Value::Type::list);
      case op::TUPLE:
        return from_mark(Value::Type::tuple);
      case op::DICT:
        return from_mark(Value::Type::dict);
      case op::TUPLE1:
      case op::TUPLE2:
      case op::TUPLE3: {
        const std::size_t n = op == op::TUPLE1 ? 1 : op == op::TUPLE2 ? 2 : 3;
        if (stack_.size() - fence() < n) return false;
        return collect(Value::Type::tuple, stack_.size() - n);
      }
      case op::APPEND:
        return stack_.size() >= 2 && extend(stack_.size() - 1, Value::Type::list);
      case op::SETITEM:
        return stack_.size() >= 3 && extend(stack_.size() - 2, Value::Type::dict);
      case op::APPENDS:
      case op::SETITEMS: {  // the items above the last MARK (which goes) into the container below it
        if (marks_.empty()) return false;
        const std::size_t m = marks_.back();
        marks_.pop_back();
        if (op == op::SETITEMS && (stack_.size() - m) % 2) return false;
        return extend(m, op == op::APPENDS ? Value::Type::list : Value::Type::dict);
      }
      case op::MEMOIZE:
        return !stack_.empty() && stack_.size() > fence();
      case op::BINPUT:
        return read_le(1, v) && !stack_.empty() && stack_.size() > fence();
      case op::LONG_BINPUT:
        return read_le(4, v) && !stack_.empty() && stack_.size() > fence();
      default:
        return false;  // memo reads, POP, PUT/GET text forms, refused opcodes: the full decoder
    }
  }
  bool str(std::uint64_t n) {
    std::string_view s;
    if (!take(static_cast<std::size_t>(n), s)) return false;
    if (detail::utf8_invalid_offset(s) != s.size()) return false;
    return push_scalar(Value(s), Value::Type::str, s.size());
  }
  bool bytes(std::uint64_t n) {
    std::string_view s;
    if (!take(static_cast<std::size_t>(n), s)) return false;
    return push_scalar(Value::bytes(s), Value::Type::bytes, s.size());
  }

  std::string_view in_;
  PickleLimits limits_;
  std::size_t pos_ = 0;
  std::vector<Item> stack_;
  std::vector<std::size_t> marks_;
  std::size_t budget_ = 0;
  std::size_t used_ = 0;
};

// ---- encoder ---------------------------------------------------------------------------------

// CPython's pickler writes lists and dicts in batches of this many items (pickle._BATCHSIZE),
// so the unpickler's stack stays bounded; we do the same.
constexpr std::size_t kBatchSize = 1000;

class Encoder {
 public:
  // Appends to out.
  Encoder(int protocol, const PickleLimits& limits, std::string& out) : protocol_(protocol), limits_(limits), out_(out) {}

  void run(const Value& v) {
    out_ += static_cast<char>(op::PROTO);
    out_ += static_cast<char>(protocol_);
    save(v, 0);
    out_ += static_cast<char>(op::STOP);
  }
  void ops(const Value& v) { save(v, 0); }
  void tuple_ops(std::span<const Value> items) { save_tuple(items, 0); }

 private:
  [[noreturn]] static void fail(const std::string& why) { throw PickleError("pickle_dumps: " + why); }

  void put_op(std::uint8_t code) { out_ += static_cast<char>(code); }
  void put_le(std::uint64_t v, std::size_t width) {
    char b[8];  // one append, not a capacity check per byte (a call record is mostly these)
    for (std::size_t i = 0; i < width; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
    out_.append(b, width);
  }

  void save_int(std::int64_t v) {
    // The same choice as CPython's save_long: the shortest fixed-width form, else LONG1.
    if (v >= 0 && v <= 0xff) {
      put_op(op::BININT1);
      put_le(static_cast<std::uint64_t>(v), 1);
    } else if (v >= 0 && v <= 0xffff) {
      put_op(op::BININT2);
      put_le(static_cast<std::uint64_t>(v), 2);
    } else if (v >= std::numeric_limits<std::int32_t>::min() && v <= std::numeric_limits<std::int32_t>::max()) {
      put_op(op::BININT);
      put_le(static_cast<std::uint32_t>(static_cast<std::int32_t>(v)), 4);
    } else {
      // The fewest little-endian two's-complement bytes whose top bit is the sign.
      const auto u = static_cast<std::uint64_t>(v);
      std::size_t n = 8;
      while (n > 1) {
        const std::uint8_t top = static_cast<std::uint8_t>(u >> (8 * (n - 1)));
        const bool next_negative = (u >> (8 * (n - 1) - 1)) & 1;
        if ((top == 0x00 && !next_negative) || (top == 0xff && next_negative))
          --n;
        else
          break;
      }
      put_op(op::LONG1);
      put_le(n, 1);
      put_le(u, n);
    }
  }

  void save_sized(std::string_view data, std::uint8_t short_op, std::uint8_t op4, std::uint8_t op8, bool short_ok) {
    if (short_ok && data.size() < 256) {
      put_op(short_op);
      put_le(data.size(), 1);
    } else if (data.size() <= 0xffffffffu) {
      put_op(op4);
      put_le(data.size(), 4);
    } else if (protocol_ >= 4) {
      put_op(op8);
      put_le(data.size(), 8);
    } else {
      fail("a str or bytes of 4 GiB or more needs protocol 4 or higher");
    }
    out_.append(data);
  }

  void save_items(std::span<const Value> items, std::size_t depth) {
    for (const Value& item : items) save(item, depth + 1);
  }

  // A tuple of these items (at depth: the tuple's own).
  void save_tuple(std::span<const Value> items, std::size_t depth) {
    if (items.empty()) return put_op(op::EMPTY_TUPLE);
    if (items.size() <= 3) {
      save_items(items, depth);
      return put_op(static_cast<std::uint8_t>(op::TUPLE1 + items.size() - 1));
    }
    put_op(op::MARK);
    save_items(items, depth);
    put_op(op::TUPLE);
  }

  void save(const Value& v, std::size_t depth) {
    switch (v.type()) {
      case Value::Type::none:
        return put_op(op::NONE);
      case Value::Type::boolean:
        return put_op(v.as_bool() ? op::NEWTRUE : op::NEWFALSE);
      case Value::Type::integer:
        return save_int(v.as_int());
      case Value::Type::floating: {
        double d = v.as_float();
        std::uint64_t bits;
        std::memcpy(&bits, &d, sizeof bits);
        put_op(op::BINFLOAT);
        for (int shift = 56; shift >= 0; shift -= 8) out_ += static_cast<char>((bits >> shift) & 0xff);
        return;
      }
      case Value::Type::str: {
        const std::string& s = v.as_str();
        if (const std::size_t bad = detail::utf8_invalid_offset(s); bad != s.size())
          fail("str is not valid UTF-8 at byte " + std::to_string(bad));
        return save_sized(s, op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8, protocol_ >= 4);
      }
      case Value::Type::bytes:
        if (protocol_ < 3)
          fail("bytes need protocol 3 or higher (protocol 2 pickles them by calling _codecs.encode, which "
               "pickle_loads refuses)");
        return save_sized(v.as_bytes(), op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8, true);
      default:
        break;
    }

    if (depth >= limits_.max_depth) fail("nesting deeper than " + std::to_string(limits_.max_depth) + " containers");
    if (v.is_tuple()) return save_tuple(v.as_tuple(), depth);
    if (v.is_list()) {
      const auto& items = v.as_list();
      put_op(op::EMPTY_LIST);
      for (std::size_t begin = 0; begin < items.size(); begin += kBatchSize) {
        const std::size_t end = std::min(items.size(), begin + kBatchSize);
        if (end - begin == 1) {
          save(items[begin], depth + 1);
          put_op(op::APPEND);
          continue;
        }
        put_op(op::MARK);
        for (std::size_t i = begin; i < end; ++i) save(items[i], depth + 1);
        put_op(op::APPENDS);
      }
      return;
    }
    const auto& entries = v.as_dict();
    if (std::string why = check_dict_keys(entries); !why.empty()) fail(why);
    put_op(op::EMPTY_DICT);
    for (std::size_t begin = 0; begin < entries.size(); begin += kBatchSize) {
      const std::size_t end = std::min(entries.size(), begin + kBatchSize);
      if (end - begin == 1) {
        save(entries[begin].first, depth + 1);
        save(entries[begin].second, depth + 1);
        put_op(op::SETITEM);
        continue;
      }
      put_op(op::MARK);
      for (std::size_t i = begin; i < end; ++i) {
        save(entries[i].first, depth + 1);
        save(entries[i].second, depth + 1);
      }
      put_op(op::SETITEMS);
    }
  }

  int protocol_;
  PickleLimits limits_;
  std::string& out_;
};

void check_protocol(int protocol) {
  if (protocol < 2 || protocol > 5)
    throw std::invalid_argument("pickle_dumps: protocol " + std::to_string(protocol) + " is not in 2..5");
}

}  // namespace

namespace detail {
bool read_int_op(std::string_view in, std::size_t& pos, std::int64_t& out) {
  if (pos >= in.size()) return false;
  const auto byte = [&](std::size_t i) { return std::uint64_t{static_cast<unsigned char>(in[i])}; };
  const auto code = static_cast<std::uint8_t>(in[pos]);
  std::size_t at = pos + 1, n = 0;
  switch (code) {
    case op::BININT1: n = 1; break;
    case op::BININT2: n = 2; break;
    case op::BININT: n = 4; break;
    case op::LONG1:
      if (at >= in.size() || byte(at) > 8) return false;
      n = static_cast<std::size_t>(byte(at++));
      break;
    default:
      return false;
  }
  if (n > in.size() - at) return false;
  std::uint64_t u = 0;
  for (std::size_t i = 0; i < n; ++i) u |= byte(at + i) << (8 * i);
  if (code == op::BININT) {
    out = static_cast<std::int32_t>(static_cast<std::uint32_t>(u));
  } else if (code == op::LONG1 && n > 0) {
    const bool negative = byte(at + n - 1) & 0x80;
    if (n < 8 && negative) u |= ~std::uint64_t{0} << (8 * n);
    if (n == 8 && static_cast<bool>(u >> 63) != negative) return false;
    out = static_cast<std::int64_t>(u);
  } else {
    out = static_cast<std::int64_t>(u);  // BININT1, BININT2 (unsigned), LONG1 of no bytes (0)
  }
  pos = at + n;
  return true;
}
}  // namespace detail

std::string pickle_dumps(const Value& v, int protocol, const PickleLimits& limits) {
  check_protocol(protocol);
  std::string out;
  out.reserve(64);  // a small value in one allocation
  Encoder(protocol, limits, out).run(v);
  return out;
}

namespace {
// Runs write(encoder) appending to out; on a throw, out is as it was.
template <class Write>
void append_ops(std::string& out, int protocol, const PickleLimits& limits, Write&& write) {
  check_protocol(protocol);
  const std::size_t size = out.size();
  try {
    Encoder e(protocol, limits, out);
    write(e);
  } catch (...) {
    out.resize(size);
    throw;
  }
}
}  // namespace

void pickle_dump_ops(std::string& out, const Value& v, int protocol, const PickleLimits& limits) {
  append_ops(out, protocol, limits, [&](Encoder& e) { e.ops(v); });
}

namespace detail {
void pickle_dump_tuple_ops(std::string& out, std::span<const Value> items, int protocol, const PickleLimits& limits) {
  append_ops(out, protocol, limits, [&](Encoder& e) { e.tuple_ops(items); });
}
}  // namespace detail

Value pickle_loads(std::string_view data, const PickleLimits& limits) {
  if (std::optional<Value> v = TreeDecoder(data, limits).run()) return std::move(*v);
  return Decoder(data, limits).run();
}

namespace detail {
Value pickle_loads_graph(std::string_view data, const PickleLimits& limits) { return Decoder(data, limits).run(); }
}  // namespace detail

}  // namespace ringpool
