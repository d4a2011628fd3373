// Frame decoder tests against the golden vectors in proto/golden (see proto/golden/generate.py).
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "ringpool/proto/frame.hpp"

namespace {

namespace proto = ringpool::proto;
using Bytes = std::vector<std::uint8_t>;

const std::filesystem::path kGoldenDir = std::filesystem::path(RINGPOOL_SOURCE_DIR) / "proto" / "golden";

// --- a minimal parser for vectors.json: an array of flat objects whose values are strings or
// --- unsigned integers. Anything else fails the test.
struct Value {
  bool is_string = false;
  std::string str;
  std::uint64_t num = 0;
};
using Entry = std::map<std::string, Value>;

class JsonReader {
 public:
  explicit JsonReader(std::string text) : s_(std::move(text)) {}

  std::vector<Entry> parse() {
    std::vector<Entry> out;
    expect('[');
    if (peek() == ']') {
      ++i_;
    } else {
      for (;;) {
        out.push_back(object());
        if (peek() == ',') { ++i_; continue; }
        expect(']');
        break;
      }
    }
    REQUIRE_MESSAGE(peek() == '\0', "trailing bytes after the manifest");
    return out;
  }

 private:
  char peek() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
    return i_ < s_.size() ? s_[i_] : '\0';
  }
  void expect(char c) {
    REQUIRE_MESSAGE(peek() == c, "vectors.json: expected '" << c << "' at offset " << i_);
    ++i_;
  }
  std::string string() {
    expect('"');
    std::string r;
    while (i_ < s_.size() && s_[i_] != '"') {
      REQUIRE_MESSAGE(s_[i_] != '\\', "vectors.json: escapes are not expected in the manifest");
      r += s_[i_++];
    }
    expect('"');
    return r;
  }
  std::uint64_t number() {
    peek();
    REQUIRE_MESSAGE((i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9'),
                    "vectors.json: expected an unsigned integer at offset " << i_);
    std::uint64_t v = 0;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') {
      const std::uint64_t digit = static_cast<std::uint64_t>(s_[i_++] - '0');
      REQUIRE_MESSAGE(v <= (UINT64_MAX - digit) / 10, "vectors.json: integer overflows u64");
      v = v * 10 + digit;
    }
    return v;
  }
  Entry object() {
    Entry e;
    expect('{');
    if (peek() == '}') { ++i_; return e; }
    for (;;) {
      std::string key = string();
      expect(':');
      Value v;
      if (peek() == '"') {
        v.is_string = true;
        v.str = string();
      } else {
        v.num = number();
      }
      REQUIRE_MESSAGE(e.emplace(key, v).second, "vectors.json: duplicate key " << key);
      if (peek() == ',') { ++i_; continue; }
      expect('}');
      return e;
    }
  }

  std::string s_;
  std::size_t i_ = 0;
};

std::string read_text(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "cannot open " << p.string());
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

Bytes read_bytes(const std::filesystem::path& p) {
  const std::string s = read_text(p);
  return Bytes(s.begin(), s.end());
}

const std::string& str(const Entry& e, const char* key) {
  auto it = e.find(key);
  REQUIRE_MESSAGE(it != e.end(), "manifest entry lacks " << key);
  REQUIRE_MESSAGE(it->second.is_string, key << " is not a string");
  return it->second.str;
}

std::uint64_t num(const Entry& e, const char* key) {
  auto it = e.find(key);
  REQUIRE_MESSAGE(it != e.end(), "manifest entry lacks " << key);
  REQUIRE_MESSAGE(!it->second.is_string, key << " is not a number");
  return it->second.num;
}

Bytes from_hex(const std::string& hex) {
  REQUIRE(hex.size() % 2 == 0);
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  Bytes out;
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    const int hi = nibble(hex[i]), lo = nibble(hex[i + 1]);
    REQUIRE((hi >= 0 && lo >= 0));
    out.push_back(static_cast<std::uint8_t>(hi * 16 + lo));
  }
  return out;
}

// The enumerator name, as the manifest and the Python mirror spell it.
std::string_view name_of(proto::DecodeError e) {
  switch (e) {
    case proto::DecodeError::ok: return "ok";
    case proto::DecodeError::truncated_header: return "truncated_header";
    case proto::DecodeError::bad_magic: return "bad_magic";
    case proto::DecodeError::bad_version: return "bad_version";
    case proto::DecodeError::bad_kind: return "bad_kind";
    case proto::DecodeError::bad_flags: return "bad_flags";
    case proto::DecodeError::bad_reserved: return "bad_reserved";
    case proto::DecodeError::too_many_handles: return "too_many_handles";
    case proto::DecodeError::missing_handle: return "missing_handle";
    case proto::DecodeError::payload_too_large: return "payload_too_large";
    case proto::DecodeError::truncated_payload: return "truncated_payload";
  }
  return "?";
}

struct Golden {
  Entry entry;
  std::string name;
  Bytes bytes;
};

const std::vector<Golden>& golden() {
  static const std::vector<Golden> all = [] {
    std::vector<Golden> v;
    for (Entry& e : JsonReader(read_text(kGoldenDir / "vectors.json")).parse()) {
      Golden g;
      g.name = str(e, "name");
      g.bytes = read_bytes(kGoldenDir / (g.name + ".bin"));
      g.entry = std::move(e);
      v.push_back(std::move(g));
    }
    return v;
  }();
  return all;
}

std::vector<const Golden*> ok_vectors() {
  std::vector<const Golden*> v;
  for (const Golden& g : golden())
    if (str(g.entry, "expect") == "ok") v.push_back(&g);
  return v;
}

// Flips bit `bit` of a copy of `bytes`.
Bytes flipped(const Bytes& bytes, std::size_t bit) {
  Bytes b = bytes;
  b[bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
  return b;
}

}  // namespace

TEST_CASE("proto: the golden manifest covers every vector file") {
  const auto& all = golden();
  REQUIRE(all.size() >= 15);
  std::set<std::string> names;
  for (const Golden& g : all) CHECK_MESSAGE(names.insert(g.name).second, "duplicate vector " << g.name);
  for (const auto& f : std::filesystem::directory_iterator(kGoldenDir)) {
    if (f.path().extension() != ".bin") continue;
    CHECK_MESSAGE(names.count(f.path().stem().string()) == 1, f.path().filename().string() << " is not in vectors.json");
  }
  // Every decoder verdict except payload_too_large (which needs a caller limit) has a vector.
  std::set<std::string> expects;
  for (const Golden& g : all) expects.insert(str(g.entry, "expect"));
  for (int e = 0; e <= static_cast<int>(proto::DecodeError::truncated_payload); ++e) {
    const auto err = static_cast<proto::DecodeError>(e);
    if (err == proto::DecodeError::payload_too_large) continue;
    CHECK_MESSAGE(expects.count(std::string(name_of(err))) == 1, "no golden vector for " << name_of(err));
  }
}

TEST_CASE("proto: golden vectors decode to their expected result") {
  for (const Golden& g : golden()) {
    CAPTURE(g.name);
    REQUIRE(g.bytes.size() == num(g.entry, "size"));
    const proto::Decoded d = proto::decode(g.bytes.data(), g.bytes.size());
    CHECK(name_of(d.error) == str(g.entry, "expect"));
    CHECK(static_cast<bool>(d) == (d.error == proto::DecodeError::ok));
    CHECK(!proto::to_string(d.error).empty());
    if (!d) {
      CHECK(d.payload == nullptr);
      // The header-only check gives the same verdict unless the payload bytes are what's missing.
      if (g.bytes.size() >= proto::kHeaderSize && d.error != proto::DecodeError::truncated_payload)
        CHECK(proto::check_header(d.header, UINT64_MAX) == d.error);
    }
  }
}

TEST_CASE("proto: ok golden vectors carry the expected fields and payload") {
  const auto oks = ok_vectors();
  REQUIRE(oks.size() >= 6);
  for (const Golden* g : oks) {
    CAPTURE(g->name);
    const proto::Decoded d = proto::decode(g->bytes.data(), g->bytes.size());
    REQUIRE(d);
    const proto::FrameHeader& h = d.header;
    CHECK(h.magic == proto::kMagic);
    CHECK(h.version == proto::kProtocolVersion);
    CHECK(h.kind == num(g->entry, "kind"));
    CHECK(h.flags == num(g->entry, "flags"));
    CHECK(h.payload_len == num(g->entry, "payload_len"));
    CHECK(h.seq == num(g->entry, "seq"));
    CHECK(h.nhandles == num(g->entry, "nhandles"));
    CHECK(h.aux == 0);
    CHECK(h.payload_len == g->bytes.size() - proto::kHeaderSize);
    REQUIRE(d.payload == g->bytes.data() + proto::kHeaderSize);
    const Bytes expected = from_hex(str(g->entry, "payload_hex"));
    REQUIRE(expected.size() == h.payload_len);
    CHECK(Bytes(d.payload, d.payload + h.payload_len) == expected);
  }
}

TEST_CASE("proto: make_header + encode reproduce ok golden vectors byte for byte") {
  for (const Golden* g : ok_vectors()) {
    CAPTURE(g->name);
    const Bytes payload = from_hex(str(g->entry, "payload_hex"));
    const proto::FrameHeader h = proto::make_header(
        static_cast<proto::Kind>(num(g->entry, "kind")), static_cast<std::uint8_t>(num(g->entry, "flags")),
        payload.size(), num(g->entry, "seq"), static_cast<std::uint32_t>(num(g->entry, "nhandles")));
    CHECK(proto::check_header(h, UINT64_MAX) == proto::DecodeError::ok);
    Bytes out(proto::kHeaderSize + payload.size(), 0xAA);
    proto::encode(h, payload.data(), out.data());
    CHECK(out == g->bytes);
  }
}

TEST_CASE("proto: the OOB golden vector carries a 16-byte descriptor") {
  for (const Golden* g : ok_vectors()) {
    const proto::Decoded d = proto::decode(g->bytes.data(), g->bytes.size());
    REQUIRE(d);
    if (!(d.header.flags & proto::flag::kOutOfBand)) continue;
    CAPTURE(g->name);
    CHECK(d.header.nhandles >= 1);
    REQUIRE(d.header.payload_len == sizeof(proto::OobDescriptor));
    proto::OobDescriptor od;
    std::memcpy(&od, d.payload, sizeof od);
    CHECK(od.length == (16u << 20));
    CHECK(od.reserved == 0);
  }
}

TEST_CASE("proto: no strict prefix of an ok vector decodes") {
  for (const Golden* g : ok_vectors()) {
    CAPTURE(g->name);
    for (std::size_t n = 0; n < g->bytes.size(); ++n) {
      CAPTURE(n);
      // An exact-size copy, so a sanitizer build catches any read past the prefix.
      const Bytes prefix(g->bytes.begin(), g->bytes.begin() + static_cast<std::ptrdiff_t>(n));
      const proto::Decoded d = proto::decode(prefix.empty() ? nullptr : prefix.data(), n);
      CHECK_FALSE(d);
      CHECK(d.payload == nullptr);
      CHECK(d.error == (n < proto::kHeaderSize ? proto::DecodeError::truncated_header
                                               : proto::DecodeError::truncated_payload));
    }
  }
  CHECK(proto::decode(nullptr, 1000).error == proto::DecodeError::truncated_header);
}

TEST_CASE("proto: single-bit flips in an ok header never crash and never pass a bad header") {
  for (const Golden* g : ok_vectors()) {
    CAPTURE(g->name);
    const std::uint64_t avail = g->bytes.size() - proto::kHeaderSize;
    for (std::size_t bit = 0; bit < proto::kHeaderSize * 8; ++bit) {
      CAPTURE(bit);
      const Bytes b = flipped(g->bytes, bit);
      const proto::Decoded d = proto::decode(b.data(), b.size());
      CHECK(!proto::to_string(d.error).empty());
      if (d) {
        CHECK(proto::check_header(d.header, UINT64_MAX) == proto::DecodeError::ok);
        CHECK(d.payload == b.data() + proto::kHeaderSize);
        CHECK(d.header.payload_len <= avail);
      } else {
        CHECK(d.error != proto::DecodeError::truncated_header);
        CHECK(d.payload == nullptr);
      }
      // Fields that admit exactly one value (or zero bits) must reject every flip.
      const std::size_t byte = bit / 8;
      if (byte < 4) CHECK(d.error == proto::DecodeError::bad_magic);
      if (byte == 4 || byte == 5) CHECK(d.error == proto::DecodeError::bad_version);
      if (byte == 7 && bit % 8 >= 3) CHECK(d.error == proto::DecodeError::bad_flags);
      if (byte >= 32) CHECK(d.error == proto::DecodeError::bad_reserved);
      if (byte >= 8 && byte < 16) {  // payload_len: a longer claim runs past the bytes we have
        std::uint64_t len;
        std::memcpy(&len, b.data() + 8, sizeof len);
        CHECK(d.error == (len > avail ? proto::DecodeError::truncated_payload : proto::DecodeError::ok));
      }
      if (byte >= 16 && byte < 24) CHECK(d.error == proto::DecodeError::ok);  // seq is free
    }
  }
}

TEST_CASE("proto: max_payload is enforced") {
  for (const Golden* g : ok_vectors()) {
    CAPTURE(g->name);
    const std::uint64_t len = g->bytes.size() - proto::kHeaderSize;
    CHECK(proto::decode(g->bytes.data(), g->bytes.size(), len));
    CHECK(proto::decode(g->bytes.data(), g->bytes.size(), UINT64_MAX));
    if (len > 0) {
      CHECK(proto::decode(g->bytes.data(), g->bytes.size(), len - 1).error == proto::DecodeError::payload_too_large);
      CHECK(proto::decode(g->bytes.data(), g->bytes.size(), 0).error == proto::DecodeError::payload_too_large);
    } else {
      CHECK(proto::decode(g->bytes.data(), g->bytes.size(), 0));
    }
  }

  // The limit is checked before the payload bytes are: a 10-byte claim over 3 bytes.
  for (const Golden& g : golden()) {
    if (g.name != "truncated_payload") continue;
    CHECK(proto::decode(g.bytes.data(), g.bytes.size(), 9).error == proto::DecodeError::payload_too_large);
    CHECK(proto::decode(g.bytes.data(), g.bytes.size(), 10).error == proto::DecodeError::truncated_payload);
  }

  // A huge claim over a bare header neither overflows nor passes.
  proto::FrameHeader h = proto::make_header(proto::Kind::DATA, 0, UINT64_MAX, 1, 0);
  Bytes b(proto::kHeaderSize);
  std::memcpy(b.data(), &h, proto::kHeaderSize);
  CHECK(proto::decode(b.data(), b.size()).error == proto::DecodeError::truncated_payload);
  CHECK(proto::decode(b.data(), b.size(), UINT64_MAX - 1).error == proto::DecodeError::payload_too_large);
  CHECK(proto::check_header(h, UINT64_MAX) == proto::DecodeError::ok);
}

TEST_CASE("proto: check_header validates in a fixed order") {
  proto::FrameHeader h = proto::make_header(proto::Kind::DATA, proto::flag::kOutOfBand, 100, 1, 0);
  h.magic = 0;
  h.version = 7;
  h.kind = 0;
  h.flags |= 0x80;
  h.reserved[15] = 1;
  h.nhandles = proto::kMaxHandles + 1;
  CHECK(proto::check_header(h, 10) == proto::DecodeError::bad_magic);
  h.magic = proto::kMagic;
  CHECK(proto::check_header(h, 10) == proto::DecodeError::bad_version);
  h.version = proto::kProtocolVersion;
  CHECK(proto::check_header(h, 10) == proto::DecodeError::bad_kind);
  h.kind = proto::kMaxKind + 1;
  CHECK(proto::check_header(h, 10) == proto::DecodeError::bad_kind);
  h.kind = proto::kMaxKind;
  CHECK(proto::check_header(h, 10) == proto::DecodeError::bad_flags);
  h.flags = proto::flag::kOutOfBand;
  CHECK(proto::check_header(h, 10) == proto::DecodeError::bad_reserved);
  h.reserved[15] = 0;
  CHECK(proto::check_header(h, 10) == proto::DecodeError::too_many_handles);
  h.nhandles = 0;  // OOB needs its block as handle 0
  CHECK(proto::check_header(h, 10) == proto::DecodeError::missing_handle);
  h.nhandles = proto::kMaxHandles;
  CHECK(proto::check_header(h, 10) == proto::DecodeError::payload_too_large);
  CHECK(proto::check_header(h, 100) == proto::DecodeError::ok);
  for (std::uint8_t k = 1; k <= proto::kMaxKind; ++k) {
    h.kind = k;
    CHECK(proto::check_header(h, 100) == proto::DecodeError::ok);
  }
}

TEST_CASE("proto: every decode error has a distinct message") {
  std::set<std::string_view> seen;
  for (int e = 0; e <= static_cast<int>(proto::DecodeError::truncated_payload); ++e) {
    const std::string_view s = proto::to_string(static_cast<proto::DecodeError>(e));
    CHECK(!s.empty());
    CHECK(s != "unknown decode error");
    CHECK(seen.insert(s).second);
  }
}
