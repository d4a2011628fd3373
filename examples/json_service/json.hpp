// A small JSON reader and writer over ringpool::Value, enough for the example service: objects
// become dicts with str keys, arrays lists, integers int64 (floats otherwise), strings UTF-8.
// Writing: tuples become arrays, bytes a base64 string, non-str dict keys their repr.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <string_view>

#include "ringpool/value.hpp"

namespace json {

class ParseError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Reader {
 public:
  explicit Reader(std::string_view text) : s_(text) {}

  ringpool::Value document() {
    ringpool::Value v = value(0);
    skip_ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 64;

  [[noreturn]] void fail(const std::string& why) const {
    throw ParseError("JSON: " + why + " at offset " + std::to_string(i_));
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\r' || s_[i_] == '\n')) ++i_;
  }
  bool eat(char c) {
    skip_ws();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  bool word(std::string_view w) {
    if (s_.substr(i_, w.size()) == w) {
      i_ += w.size();
      return true;
    }
    return false;
  }

  ringpool::Value value(int depth) {
    if (depth > kMaxDepth) fail("nesting too deep");
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end");
    const char c = s_[i_];
    if (c == '{') {
      ++i_;
      ringpool::Value::Dict d;
      if (eat('}')) return ringpool::Value::dict(std::move(d));
      do {
        skip_ws();
        if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string key");
        std::string k = string();
        expect(':');
        d.emplace_back(ringpool::Value(std::move(k)), value(depth + 1));
      } while (eat(','));
      expect('}');
      return ringpool::Value::dict(std::move(d));
    }
    if (c == '[') {
      ++i_;
      ringpool::Value::List l;
      if (eat(']')) return ringpool::Value::list(std::move(l));
      do l.push_back(value(depth + 1));
      while (eat(','));
      expect(']');
      return ringpool::Value::list(std::move(l));
    }
    if (c == '"') return ringpool::Value(string());
    if (word("true")) return ringpool::Value(true);
    if (word("false")) return ringpool::Value(false);
    if (word("null")) return ringpool::Value();
    return number();
  }

  ringpool::Value number() {
    const std::size_t start = i_;
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    bool integral = true;
    while (i_ < s_.size()) {
      const char c = s_[i_];
      if (c >= '0' && c <= '9') {
        ++i_;
      } else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') {
        integral = false;
        ++i_;
      } else {
        break;
      }
    }
    const std::string tok(s_.substr(start, i_ - start));
    if (tok.empty() || tok == "-") fail("expected a value");
    try {
      std::size_t used = 0;
      if (integral) {
        long long v = std::stoll(tok, &used);
        if (used == tok.size()) return ringpool::Value(static_cast<std::int64_t>(v));
      }
      double d = std::stod(tok, &used);
      if (used != tok.size()) fail("bad number");
      return ringpool::Value(d);
    } catch (const std::out_of_range&) {
      fail("number out of range");
    } catch (const std::invalid_argument&) {
      fail("bad number");
    }
  }

  void put_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::uint32_t hex4() {
    if (i_ + 4 > s_.size()) fail("short \\u escape");
    std::uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }

  std::string string() {
    ++i_;  // the opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      const char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      switch (s_[i_++]) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (!word("\\u")) fail("lone surrogate");
            const std::uint32_t lo = hex4();
            if (lo < 0xDC00 || lo >= 0xE000) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            fail("lone surrogate");
          }
          put_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

inline ringpool::Value parse(std::string_view text) { return Reader(text).document(); }

inline void write_string(std::string& out, std::string_view s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

inline std::string base64(std::string_view in) {
  static const char* t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
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

inline void write(std::string& out, const ringpool::Value& v) {
  using T = ringpool::Value::Type;
  switch (v.type()) {
    case T::none: out += "null"; break;
    case T::boolean: out += v.as_bool() ? "true" : "false"; break;
    case T::integer: out += std::to_string(v.as_int()); break;
    case T::floating: {
      const double d = v.as_float();
      if (!std::isfinite(d)) {
        out += "null";
      } else {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.17g", d);
        out += buf;
      }
      break;
    }
    case T::str: write_string(out, v.as_str()); break;
    case T::bytes: write_string(out, base64(v.as_bytes())); break;
    case T::list:
    case T::tuple: {
      const auto& items = v.is_list() ? v.as_list() : v.as_tuple();
      out += '[';
      for (std::size_t i = 0; i < items.size(); ++i) {
        if (i) out += ',';
        write(out, items[i]);
      }
      out += ']';
      break;
    }
    case T::dict: {
      out += '{';
      bool first = true;
      for (const auto& [k, x] : v.as_dict()) {
        if (!first) out += ',';
        first = false;
        write_string(out, k.is_str() ? k.as_str() : k.repr());
        out += ':';
        write(out, x);
      }
      out += '}';
      break;
    }
  }
}

inline std::string dump(const ringpool::Value& v) {
  std::string out;
  write(out, v);
  return out;
}

}  // namespace json
