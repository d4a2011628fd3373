// ringpool wire protocol: the frame header every message carries.
//
// Layout (little-endian, 48 bytes, 8-byte aligned; docs/design/protocol.md draws it):
//
//   0      4  magic        "RPF1" (0x31465052 read as u32 LE)
//   4      2  version      kProtocolVersion
//   6      1  kind         Kind
//   7      1  flags        Flag bits; unknown bits are an error
//   8      8  payload_len  bytes that follow the header
//  16      8  seq          producer-assigned sequence number (fd datagrams carry it too)
//  24      4  nhandles     file descriptors that travel with this frame
//  28      4  aux          kind-specific; not validated by the decoder (DATA writes 0)
//  32     16  reserved     must be zero; later versions may use them
//
// Header-only and free of any other ringpool dependency, so the fuzz target, the C++ runtime
// and a future C++ pool share one decoder.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

namespace ringpool::proto {

static_assert(std::endian::native == std::endian::little,
              "the wire format is little-endian and headers are memcpy'd; a big-endian port needs byte swaps");

inline constexpr std::uint32_t kMagic = 0x31465052u;  // bytes "RPF1"
inline constexpr std::uint16_t kProtocolVersion = 1;
inline constexpr std::size_t kHeaderSize = 48;
// One frame never claims more handles than this: a bound so a corrupt header cannot make a
// reader try to receive billions of descriptors.
inline constexpr std::uint32_t kMaxHandles = 1u << 16;

enum class Kind : std::uint8_t {
  DATA = 1,       // a user message (queue item, pipe message)
  HELLO = 2,      // reserved: channel handshake
  MODULES = 3,    // reserved: registered package sources
  CALL = 4,       // reserved: task call
  RESULT = 5,     // reserved: task result
  ERROR = 6,      // reserved: task error
  PROCESS = 7,    // reserved: pickled process object at start
  EXIT = 8,       // reserved: worker exit report
  HEARTBEAT = 9,  // reserved: liveness
  SHUTDOWN = 10,  // reserved: orderly stop
};
inline constexpr std::uint8_t kMaxKind = 10;

namespace flag {
// The payload lives in an out-of-band shared-memory block carried as handle 0; the inline
// payload is an OobDescriptor.
inline constexpr std::uint8_t kOutOfBand = 1u << 0;
// The payload starts with a buffer table (pickle protocol 5 out-of-band buffers follow the pickle).
inline constexpr std::uint8_t kBuffers = 1u << 1;
// The payload is raw bytes (Connection.send_bytes), not a pickle.
inline constexpr std::uint8_t kRaw = 1u << 2;
inline constexpr std::uint8_t kKnown = kOutOfBand | kBuffers | kRaw;
}  // namespace flag

struct FrameHeader {
  std::uint32_t magic;
  std::uint16_t version;
  std::uint8_t kind;
  std::uint8_t flags;
  std::uint64_t payload_len;
  std::uint64_t seq;
  std::uint32_t nhandles;
  std::uint32_t aux;
  std::uint8_t reserved[16];
};
static_assert(std::is_standard_layout_v<FrameHeader> && std::is_trivially_copyable_v<FrameHeader>,
              "frame headers are copied byte-wise into shared memory");
static_assert(sizeof(FrameHeader) == kHeaderSize, "the wire header is exactly 48 bytes");
static_assert(offsetof(FrameHeader, payload_len) == 8 && offsetof(FrameHeader, seq) == 16 &&
                  offsetof(FrameHeader, nhandles) == 24 && offsetof(FrameHeader, reserved) == 32,
              "field offsets are part of the protocol; golden vectors pin them");
static_assert(sizeof(FrameHeader) % 8 == 0, "records stay 8-byte aligned in the ring");

// The inline payload of a kOutOfBand frame.
struct OobDescriptor {
  std::uint64_t length;  // bytes of real payload in the block's data area
  std::uint64_t reserved;
};
static_assert(sizeof(OobDescriptor) == 16, "OOB descriptor is part of the protocol");

enum class DecodeError : std::uint8_t {
  ok = 0,
  truncated_header,   // fewer than kHeaderSize bytes available
  bad_magic,
  bad_version,
  bad_kind,
  bad_flags,
  bad_reserved,       // reserved bytes not zero
  too_many_handles,
  missing_handle,     // an out-of-band frame without its block as handle 0
  payload_too_large,  // payload_len beyond the limit the caller gave (e.g. the segment)
  truncated_payload,  // header fine, payload runs past the bytes available
};

constexpr std::string_view to_string(DecodeError e) noexcept {
  switch (e) {
    case DecodeError::ok: return "ok";
    case DecodeError::truncated_header: return "truncated frame header";
    case DecodeError::bad_magic: return "bad frame magic";
    case DecodeError::bad_version: return "unsupported protocol version";
    case DecodeError::bad_kind: return "unknown frame kind";
    case DecodeError::bad_flags: return "unknown frame flags";
    case DecodeError::bad_reserved: return "reserved header bytes not zero";
    case DecodeError::too_many_handles: return "frame claims too many handles";
    case DecodeError::missing_handle: return "out-of-band frame without its block handle";
    case DecodeError::payload_too_large: return "frame payload longer than allowed";
    case DecodeError::truncated_payload: return "truncated frame payload";
  }
  return "unknown decode error";
}

struct Decoded {
  DecodeError error = DecodeError::ok;
  FrameHeader header{};
  const std::uint8_t* payload = nullptr;  // points into the caller's bytes; valid while they are
  explicit operator bool() const noexcept { return error == DecodeError::ok; }
};

inline FrameHeader make_header(Kind kind, std::uint8_t flags, std::uint64_t payload_len,
                               std::uint64_t seq, std::uint32_t nhandles) noexcept {
  FrameHeader h{};
  h.magic = kMagic;
  h.version = kProtocolVersion;
  h.kind = static_cast<std::uint8_t>(kind);
  h.flags = flags;
  h.payload_len = payload_len;
  h.seq = seq;
  h.nhandles = nhandles;
  return h;
}

// Validates a header alone (no payload bytes needed). max_payload bounds payload_len.
inline DecodeError check_header(const FrameHeader& h, std::uint64_t max_payload) noexcept {
  if (h.magic != kMagic) return DecodeError::bad_magic;
  if (h.version != kProtocolVersion) return DecodeError::bad_version;
  if (h.kind == 0 || h.kind > kMaxKind) return DecodeError::bad_kind;
  if ((h.flags & ~flag::kKnown) != 0) return DecodeError::bad_flags;
  for (std::uint8_t b : h.reserved)
    if (b != 0) return DecodeError::bad_reserved;
  if (h.nhandles > kMaxHandles) return DecodeError::too_many_handles;
  if ((h.flags & flag::kOutOfBand) && h.nhandles == 0) return DecodeError::missing_handle;
  if (h.payload_len > max_payload) return DecodeError::payload_too_large;
  return DecodeError::ok;
}

// Decodes one frame from [data, data+avail). Never reads outside that range.
inline Decoded decode(const void* data, std::size_t avail,
                      std::uint64_t max_payload = UINT64_MAX) noexcept {
  Decoded d;
  if (data == nullptr || avail < kHeaderSize) {
    d.error = DecodeError::truncated_header;
    return d;
  }
  std::memcpy(&d.header, data, kHeaderSize);
  d.error = check_header(d.header, max_payload);
  if (d.error != DecodeError::ok) return d;
  if (d.header.payload_len > avail - kHeaderSize) {
    d.error = DecodeError::truncated_payload;
    return d;
  }
  d.payload = static_cast<const std::uint8_t*>(data) + kHeaderSize;
  return d;
}

// Writes header then payload into out (which must hold kHeaderSize + payload_len bytes).
inline void encode(const FrameHeader& h, const void* payload, void* out) noexcept {
  std::memcpy(out, &h, kHeaderSize);
  if (h.payload_len != 0)
    std::memcpy(static_cast<std::uint8_t*>(out) + kHeaderSize, payload, h.payload_len);
}

}  // namespace ringpool::proto
