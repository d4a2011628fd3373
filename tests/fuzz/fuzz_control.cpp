// libFuzzer target for the control messages (runtime/src/control.cpp: recv_control,
// try_recv_control, send_control), the SOCK_SEQPACKET protocol between a parent and its zygote.
//
// Each input is a series of messages put on a real seqpacket socketpair, each either raw bytes
// (any header, any length, 0-3 descriptors attached) or made by send_control from fields of the
// input, then read back one call per message. A raw message must come back as a message whose
// header passed the frame checks, whose payload is exactly what the header claims and whose
// descriptor count is what it carries, or be refused with ProtocolError (its descriptors closed)
// or, if empty, read as the end; a send_control message must come back field for field, or be
// refused if its kind is not one the protocol knows. No descriptor may leak. Any broken property
// traps.
//
// Input layout (bytes past the end read as zero):
//   u8 count     1 + count % 8 messages, each:
//     u8 how     bits 0-1: descriptors attached (0-3); bit 2: raw bytes (else send_control);
//                bit 3: read with recv_control(sock, 0) (else try_recv_control)
//     u16 len    little-endian, bytes that follow (the low 14 bits)
//     raw:          the message
//     send_control: u8 kind, u64 seq, u32 aux, then the payload
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ringpool/detail/control.hpp"
#include "ringpool/error.hpp"

#include "fuzz_util.hpp"

namespace {

using namespace ringpool;

using ringpool_fuzz::require;

int lowest_free_fd() {
  int fd = ::fcntl(0, F_DUPFD, 0);
  require(fd >= 0);
  ::close(fd);
  return fd;
}

struct Expect {
  bool raw;
  std::string bytes;  // raw: the whole message; else the payload
  std::size_t nfds;
  std::uint8_t kind;
  std::uint64_t seq;
  std::uint32_t aux;
  bool blocking_read;
};

void send_raw(int sock, const std::string& bytes, const std::vector<int>& fds) {
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  require(::sendmsg(sock, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
}

void fuzz_one(const std::uint8_t* data, std::size_t size) {
  std::size_t at = 0;
  auto u8 = [&]() -> std::uint8_t { return at < size ? data[at++] : 0; };
  auto take = [&](std::size_t n) {
    n = std::min(n, size - at);
    std::string s(reinterpret_cast<const char*>(data + at), n);
    at += n;
    return s;
  };

  auto [a, b] = control_socketpair();
  std::vector<Expect> sent;
  const std::size_t count = 1 + u8() % 8;
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint8_t how = u8();
    std::size_t len = u8();
    len |= std::size_t{u8()} << 8;
    len &= 0x3fff;  // 8 messages of up to 16 KiB fit the socket's buffer: no send blocks
    std::string body = take(len);
    Expect e{};
    e.raw = how & 4;
    e.nfds = how & 3;
    e.blocking_read = how & 8;
    std::vector<UniqueFd> owned;
    std::vector<int> fds;
    for (std::size_t k = 0; k < e.nfds; ++k) {
      owned.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
      require(static_cast<bool>(owned.back()));
      fds.push_back(owned.back().get());
    }
    if (e.raw) {
      e.bytes = body;
      send_raw(a.get(), body, fds);
    } else {
      std::size_t p = 0;
      auto field = [&](std::size_t n) {
        std::uint64_t v = 0;
        for (std::size_t k = 0; k < n; ++k, ++p) v |= std::uint64_t{p < body.size() ? static_cast<std::uint8_t>(body[p]) : 0u} << (8 * k);
        return v;
      };
      e.kind = static_cast<std::uint8_t>(field(1));
      e.seq = field(8);
      e.aux = static_cast<std::uint32_t>(field(4));
      e.bytes = p < body.size() ? body.substr(p) : std::string();
      send_control(a.get(), static_cast<proto::Kind>(e.kind), e.seq, e.aux, e.bytes, fds);
    }
    sent.push_back(std::move(e));
  }

  for (const Expect& e : sent) {
    std::optional<ControlMessage> m;
    bool would_block = false;
    try {
      if (e.blocking_read)
        m = recv_control(b.get(), 0);
      else
        m = try_recv_control(b.get(), would_block);
    } catch (const ProtocolError&) {
      // Refused; the message (and its descriptors) are gone, the next one is read next.
      require(e.raw || e.kind == 0 || e.kind > proto::kMaxKind);
      continue;
    }
    require(!would_block);  // every message is queued already
    if (!m) {
      require(e.raw && e.bytes.empty());  // an empty message reads as the end of the stream
      continue;
    }
    const proto::FrameHeader& h = m->header;
    require(proto::check_header(h, kMaxControlPayload) == proto::DecodeError::ok);
    require(m->payload.size() == h.payload_len);
    require(m->fds.size() == h.nhandles && m->fds.size() == e.nfds);
    for (const UniqueFd& fd : m->fds) require(::fcntl(fd.get(), F_GETFD) == FD_CLOEXEC);
    if (e.raw) {
      require(e.bytes.size() == proto::kHeaderSize + h.payload_len);
      require(std::memcmp(e.bytes.data(), &h, proto::kHeaderSize) == 0);
      require(std::string_view(e.bytes).substr(proto::kHeaderSize) == m->payload);
    } else {
      require(h.kind == e.kind && h.seq == e.seq && h.aux == e.aux && h.flags == 0);
      require(m->payload == e.bytes);
    }
  }
  // Nothing is left: the next read would block, and once the peer is gone it is the end.
  bool would_block = false;
  require(!try_recv_control(b.get(), would_block) && would_block);
  a.reset();
  require(!try_recv_control(b.get(), would_block) && !would_block);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  ::signal(SIGPIPE, SIG_IGN);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const int fd_floor = lowest_free_fd();
  fuzz_one(data, size);
  require(lowest_free_fd() == fd_floor);
  return 0;
}
