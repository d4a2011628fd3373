// UTF-8 decoding shared by Value::repr() and the pickle codec (internal to the runtime).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ringpool::detail {

// Decodes the UTF-8 sequence starting at s[i] into cp and returns its length, or 0 if it is not
// valid UTF-8. Strict like Python's "utf-8" codec: overlong forms, code points above U+10FFFF
// and surrogates (which Python's pickle would only write with its "surrogatepass" handler) are
// all invalid.
inline std::size_t utf8_decode(std::string_view s, std::size_t i, std::uint32_t& cp) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char c = b(0);
  std::size_t len;
  std::uint32_t min;
  if (c < 0x80) {
    cp = c;
    return 1;
  } else if ((c & 0xe0) == 0xc0) {
    len = 2, cp = c & 0x1f, min = 0x80;
  } else if ((c & 0xf0) == 0xe0) {
    len = 3, cp = c & 0x0f, min = 0x800;
  } else if ((c & 0xf8) == 0xf0) {
    len = 4, cp = c & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (s.size() - i < len) return 0;
  for (std::size_t k = 1; k < len; ++k) {
    if ((b(k) & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (b(k) & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return len;
}

// Offset of the first byte that does not start a valid UTF-8 sequence, or s.size().
inline std::size_t utf8_invalid_offset(std::string_view s) {
  std::size_t i = 0;
  std::uint32_t cp;
  while (i < s.size()) {
    // ASCII fast path: most task arguments are plain identifiers and numbers.
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const std::size_t len = utf8_decode(s, i, cp);
    if (len == 0) return i;
    i += len;
  }
  return s.size();
}

}  // namespace ringpool::detail
