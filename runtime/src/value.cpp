#include "ringpool/value.hpp"

#include <charconv>
#include <cmath>
#include <cstring>

#include "utf8.hpp"

namespace ringpool {

namespace {

constexpr std::string_view kTypeNames[] = {"NoneType", "bool", "int", "float", "str", "bytes", "list", "tuple", "dict"};

void append_hex(std::string& out, std::uint32_t v, int digits) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (int shift = (digits - 1) * 4; shift >= 0; shift -= 4) out += kHex[(v >> shift) & 0xf];
}

// Python's float repr: the shortest digits that round-trip, written positionally when the
// decimal exponent is in [-4, 16) and in scientific notation otherwise (float_repr_style 'r').
void append_float(std::string& out, double d) {
  if (std::isnan(d)) {
    out += "nan";
    return;
  }
  if (std::isinf(d)) {
    out += d < 0 ? "-inf" : "inf";
    return;
  }
  char buf[64];
  // Shortest round-trip digits in the form "-d.ddde+XX"; rearranged below.
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  (void)ec;  // 64 bytes always suffice for a double
  std::string_view sci(buf, static_cast<std::size_t>(end - buf));
  bool negative = sci.front() == '-';
  if (negative) sci.remove_prefix(1);
  const std::size_t e_pos = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e_pos))
    if (c != '.') digits += c;
  int exp = 0;
  std::string_view exp_text = sci.substr(e_pos + 1);
  if (exp_text.front() == '+') exp_text.remove_prefix(1);
  std::from_chars(exp_text.data(), exp_text.data() + exp_text.size(), exp);

  if (negative) out += '-';
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out += "0.";
      out.append(static_cast<std::size_t>(-exp - 1), '0');
      out += digits;
    } else {
      const std::size_t int_len = static_cast<std::size_t>(exp) + 1;
      if (digits.size() <= int_len) {
        out += digits;
        out.append(int_len - digits.size(), '0');
        out += ".0";
      } else {
        out.append(digits, 0, int_len);
        out += '.';
        out.append(digits, int_len);
      }
    }
    return;
  }
  out += digits[0];
  if (digits.size() > 1) {
    out += '.';
    out.append(digits, 1);
  }
  out += exp < 0 ? "e-" : "e+";
  const int mag = exp < 0 ? -exp : exp;
  if (mag < 10) out += '0';
  out += std::to_string(mag);
}

// Non-ASCII code points Python's str.isprintable() rejects that are likely to turn up: C1
// controls, no-break and other odd spaces, format characters and line/paragraph separators.
// Python escapes many more (unassigned code points, private use); this is not the full table.
bool known_unprintable(std::uint32_t cp) {
  return (cp >= 0x80 && cp <= 0xa0) || cp == 0xad || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200f) ||
         (cp >= 0x2028 && cp <= 0x202f) || (cp >= 0x205f && cp <= 0x2064) || cp == 0x3000 || cp == 0xfeff ||
         (cp >= 0xe000 && cp <= 0xf8ff);
}

void append_str(std::string& out, std::string_view s) {
  // Python prefers single quotes and switches to double quotes only to avoid escaping.
  const bool has_single = s.find('\'') != std::string_view::npos;
  const bool has_double = s.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  out += quote;
  for (std::size_t i = 0; i < s.size();) {
    std::uint32_t cp = 0;
    const std::size_t len = detail::utf8_decode(s, i, cp);
    if (len == 0) {
      // Not UTF-8, so not something Python could hold; show the byte the way bytes would.
      out += "\\x";
      append_hex(out, static_cast<unsigned char>(s[i]), 2);
      ++i;
      continue;
    }
    if (cp == static_cast<unsigned char>(quote) || cp == '\\') {
      out += '\\';
      out += static_cast<char>(cp);
    } else if (cp == '\t') {
      out += "\\t";
    } else if (cp == '\n') {
      out += "\\n";
    } else if (cp == '\r') {
      out += "\\r";
    } else if (cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp <= 0xff && known_unprintable(cp))) {
      out += "\\x";
      append_hex(out, cp, 2);
    } else if (cp > 0xff && known_unprintable(cp)) {
      out += "\\u";
      append_hex(out, cp, 4);
    } else {
      out.append(s, i, len);
    }
    i += len;
  }
  out += quote;
}

void append_bytes(std::string& out, std::string_view s) {
  const bool has_single = s.find('\'') != std::string_view::npos;
  const bool has_double = s.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  out += 'b';
  out += quote;
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == static_cast<unsigned char>(quote) || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c >= 0x7f) {
      out += "\\x";
      append_hex(out, c, 2);
    } else {
      out += ch;
    }
  }
  out += quote;
}

void append_repr(std::string& out, const Value& v);

void append_items(std::string& out, const Value::List& items, char open, char close, bool one_tuple) {
  out += open;
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i) out += ", ";
    append_repr(out, items[i]);
  }
  if (one_tuple && items.size() == 1) out += ',';
  out += close;
}

void append_repr(std::string& out, const Value& v) {
  switch (v.type()) {
    case Value::Type::none:
      out += "None";
      break;
    case Value::Type::boolean:
      out += v.as_bool() ? "True" : "False";
      break;
    case Value::Type::integer:
      out += std::to_string(v.as_int());
      break;
    case Value::Type::floating:
      append_float(out, v.as_float());
      break;
    case Value::Type::str:
      append_str(out, v.as_str());
      break;
    case Value::Type::bytes:
      append_bytes(out, v.as_bytes());
      break;
    case Value::Type::list:
      append_items(out, v.as_list(), '[', ']', false);
      break;
    case Value::Type::tuple:
      append_items(out, v.as_tuple(), '(', ')', true);
      break;
    case Value::Type::dict: {
      out += '{';
      bool first = true;
      for (const auto& [key, val] : v.as_dict()) {
        if (!first) out += ", ";
        first = false;
        append_repr(out, key);
        out += ": ";
        append_repr(out, val);
      }
      out += '}';
      break;
    }
  }
}

}  // namespace

std::string_view Value::type_name(Type t) noexcept { return kTypeNames[static_cast<std::size_t>(t)]; }

void Value::throw_type_error(Type want) const {
  throw ValueTypeError("ringpool::Value: expected " + std::string(type_name(want)) + ", got " +
                       std::string(type_name()));
}

const Value* Value::find(const Value& key) const {
  for (const auto& [k, v] : as_dict())
    if (k == key) return &v;
  return nullptr;
}

const Value& Value::at(const Value& key) const {
  if (const Value* v = find(key)) return *v;
  throw std::out_of_range("ringpool::Value: key " + key.repr() + " not in dict");
}

std::string Value::repr() const {
  std::string out;
  append_repr(out, *this);
  return out;
}

bool operator==(const Value& a, const Value& b) noexcept {
  if (a.v_.index() != b.v_.index()) return false;
  switch (a.type()) {
    case Value::Type::none:
      return true;
    case Value::Type::boolean:
      return std::get<bool>(a.v_) == std::get<bool>(b.v_);
    case Value::Type::integer:
      return std::get<std::int64_t>(a.v_) == std::get<std::int64_t>(b.v_);
    case Value::Type::floating: {
      // By bit pattern, so that NaN equals itself and a decoded value equals its re-decode.
      const double x = std::get<double>(a.v_), y = std::get<double>(b.v_);
      return std::memcmp(&x, &y, sizeof x) == 0;
    }
    case Value::Type::str:
      return std::get<std::string>(a.v_) == std::get<std::string>(b.v_);
    case Value::Type::bytes:
      return std::get<Value::Bytes>(a.v_).data == std::get<Value::Bytes>(b.v_).data;
    case Value::Type::list:
      return std::get<Value::ListBox>(a.v_).items == std::get<Value::ListBox>(b.v_).items;
    case Value::Type::tuple:
      return std::get<Value::TupleBox>(a.v_).items == std::get<Value::TupleBox>(b.v_).items;
    case Value::Type::dict:
      return std::get<Value::DictBox>(a.v_).entries == std::get<Value::DictBox>(b.v_).entries;
  }
  return false;
}

}  // namespace ringpool
