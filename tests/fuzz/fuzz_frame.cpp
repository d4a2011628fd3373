// libFuzzer target for the frame decoder (proto/include/ringpool/proto/frame.hpp).
//
//   clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -Iproto/include \
//       tests/fuzz/fuzz_frame.cpp -o fuzz_frame
//   mkdir corpus && cp proto/golden/*.bin corpus/ && ./fuzz_frame -max_total_time=15 corpus
//
// ctest runs it as fuzz.frame_decoder (tests/CMakeLists.txt). Every input is decoded as a single
// frame under several payload limits and walked as a stream of back-to-back frames, the way a
// reader consumes a byte stream. Any broken invariant traps, which libFuzzer reports as a crash.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#include "ringpool/proto/frame.hpp"

#include "fuzz_util.hpp"

namespace {

namespace proto = ringpool::proto;

using ringpool_fuzz::require;

bool valid_error(proto::DecodeError e) {
  return static_cast<std::uint8_t>(e) <= static_cast<std::uint8_t>(proto::DecodeError::truncated_payload);
}

void check_message(proto::DecodeError e) {
  std::string_view s = proto::to_string(e);
  require(!s.empty());
  require(s != "unknown decode error");
  require((e == proto::DecodeError::ok) == (s == "ok"));
}

// Decodes [data, data+size) as one frame and checks every property the decoder promises.
proto::Decoded check_one(const std::uint8_t* data, std::size_t size, std::uint64_t max_payload) {
  const proto::Decoded d = proto::decode(data, size, max_payload);
  require(valid_error(d.error));
  check_message(d.error);
  require(static_cast<bool>(d) == (d.error == proto::DecodeError::ok));

  if (size < proto::kHeaderSize) {
    require(d.error == proto::DecodeError::truncated_header);
    require(d.payload == nullptr);
    return d;
  }
  require(d.error != proto::DecodeError::truncated_header);

  // The header is a plain copy of the first 48 bytes, whatever the verdict.
  require(std::memcmp(&d.header, data, proto::kHeaderSize) == 0);
  // decode() = check_header() + the payload bounds check, in that order.
  const proto::DecodeError hdr = proto::check_header(d.header, max_payload);
  const std::uint64_t avail = size - proto::kHeaderSize;
  if (hdr != proto::DecodeError::ok) {
    require(d.error == hdr);
  } else if (d.header.payload_len > avail) {
    require(d.error == proto::DecodeError::truncated_payload);
  } else {
    require(d.error == proto::DecodeError::ok);
  }

  if (!d) {
    require(d.payload == nullptr);
    return d;
  }

  // Accepted: the header satisfies every rule on its own.
  const proto::FrameHeader& h = d.header;
  require(h.magic == proto::kMagic && h.version == proto::kProtocolVersion);
  require(h.kind >= 1 && h.kind <= proto::kMaxKind);
  require((h.flags & ~proto::flag::kKnown) == 0);
  require(h.nhandles <= proto::kMaxHandles);
  require(!(h.flags & proto::flag::kOutOfBand) || h.nhandles >= 1);
  require(h.payload_len <= max_payload);
  for (std::uint8_t b : h.reserved) require(b == 0);

  // The payload lies inside the input, right after the header.
  require(d.payload == data + proto::kHeaderSize);
  require(d.payload >= data && d.payload <= data + size);
  require(h.payload_len <= static_cast<std::uint64_t>(data + size - d.payload));

  // Re-encoding reproduces the input prefix byte for byte.
  const std::size_t frame_len = proto::kHeaderSize + static_cast<std::size_t>(h.payload_len);
  std::vector<std::uint8_t> out(frame_len);
  proto::encode(h, d.payload, out.data());
  require(std::memcmp(out.data(), data, frame_len) == 0);

  // make_header builds the same header except aux, which it leaves zero.
  proto::FrameHeader m = proto::make_header(static_cast<proto::Kind>(h.kind), h.flags, h.payload_len, h.seq,
                                            h.nhandles);
  m.aux = h.aux;
  require(std::memcmp(&m, &h, proto::kHeaderSize) == 0);
  return d;
}

// A stream reader: frames back to back, each followed by the next; stop at the first error.
// `align` = 1 walks a packed stream, 8 walks ring records (payload padded to 8 bytes).
void walk(const std::uint8_t* data, std::size_t size, std::uint64_t max_payload, std::size_t align) {
  std::size_t off = 0;
  std::size_t frames = 0;
  while (off < size) {
    const proto::Decoded d = check_one(data + off, size - off, max_payload);
    if (!d) break;
    const std::size_t frame_len = proto::kHeaderSize + static_cast<std::size_t>(d.header.payload_len);
    require(frame_len <= size - off);
    const std::size_t rec = (frame_len + align - 1) / align * align;
    require(rec >= proto::kHeaderSize);  // progress: at least one header per step
    off += rec < size - off ? rec : size - off;
    ++frames;
  }
  require(off <= size);
  require(frames <= size / proto::kHeaderSize);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // A null pointer is a truncated header whatever length it claims.
  require(proto::decode(nullptr, size).error == proto::DecodeError::truncated_header);

  const std::uint64_t limits[] = {UINT64_MAX, size, size >= proto::kHeaderSize ? size - proto::kHeaderSize : 0, 0};
  proto::Decoded prev{};
  bool have_prev = false;
  for (std::uint64_t limit : limits) {
    const proto::Decoded d = check_one(data, size, limit);
    if (have_prev) {
      // Limits only shrink along the list: a shrinking limit can only turn ok/truncated_payload
      // into payload_too_large, and never changes any other verdict.
      if (d.error != prev.error) {
        require(d.error == proto::DecodeError::payload_too_large);
        require(prev.error == proto::DecodeError::ok || prev.error == proto::DecodeError::truncated_payload);
      }
    }
    prev = d;
    have_prev = true;
  }
  // With no limit the only payload verdict is truncated_payload.
  const proto::Decoded unlimited = proto::decode(data, size);
  require(unlimited.error != proto::DecodeError::payload_too_large);

  walk(data, size, UINT64_MAX, 1);
  walk(data, size, UINT64_MAX, 8);
  walk(data, size, 4096, 1);
  return 0;
}
