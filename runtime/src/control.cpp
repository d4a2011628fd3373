#include "ringpool/detail/control.hpp"

#include <poll.h>
#include <sys/socket.h>

#include <cstring>
#include <stdexcept>

#include "ringpool/error.hpp"

namespace ringpool {

std::pair<UniqueFd, UniqueFd> control_socketpair() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) throw_errno("socketpair(SOCK_SEQPACKET)");
  return {UniqueFd(sv[0]), UniqueFd(sv[1])};
}

void send_control(int sock, proto::Kind kind, std::uint64_t seq, std::uint32_t aux, std::string_view payload,
                  std::span<const int> fds) {
  if (payload.size() > kMaxControlPayload) throw std::length_error("control message payload too long");
  if (fds.size() > kMaxControlFds)
    throw std::length_error("control message carries more than 253 descriptors (" + std::to_string(fds.size()) + ")");
  proto::FrameHeader h = proto::make_header(kind, 0, payload.size(), seq, static_cast<std::uint32_t>(fds.size()));
  h.aux = aux;
  iovec iov[2] = {{&h, sizeof h}, {const_cast<char*>(payload.data()), payload.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = payload.empty() ? 1 : 2;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxControlFds)];
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    const ssize_t r = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (r >= 0) return;  // seqpacket: all or nothing
    if (errno == EINTR) continue;
    if (errno == EAGAIN) {  // a non-blocking socket with a full buffer: wait for room
      pollfd p{sock, POLLOUT, 0};
      ::poll(&p, 1, 100);
      continue;
    }
    throw_errno("sendmsg(control)");
  }
}

namespace {

// One recvmsg of a message already known to be queued (or blocking, on a blocking socket).
std::optional<ControlMessage> receive(int sock, int flags, bool& would_block) {
  would_block = false;
  ssize_t len;
  bool reset = false;
  for (;;) {
    len = ::recv(sock, nullptr, 0, MSG_PEEK | MSG_TRUNC | flags);
    if (len >= 0) break;
    if (errno == EINTR) continue;
    if (reset && (errno == EAGAIN || errno == ECONNRESET)) return std::nullopt;  // nothing after it
    if (errno == ECONNRESET) {
      // The peer closed with messages of ours unread. Linux reports (and clears) that error ahead
      // of anything still queued for us, such as the peer's last answers before it exited: read
      // on once, without blocking, before calling it the end.
      reset = true;
      flags |= MSG_DONTWAIT;
      continue;
    }
    if (errno == EAGAIN) {
      would_block = true;
      return std::nullopt;
    }
    throw_errno("recv(control)");
  }
  // len == 0 is end of stream, unless a zero-length message is queued; a valid message is
  // never shorter than a header, so both end here.
  std::string buf(static_cast<std::size_t>(len), '\0');
  iovec iov{buf.data(), buf.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxControlFds)];
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t got;
  do got = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | flags);
  while (got < 0 && errno == EINTR);
  if (got < 0) throw_errno("recvmsg(control)");
  ControlMessage m;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < n; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      m.fds.emplace_back(fd);
    }
  }
  if (got == 0) return std::nullopt;
  if (msg.msg_flags & MSG_TRUNC) throw ProtocolError("control message truncated");
  const auto d = proto::decode(buf.data(), static_cast<std::size_t>(got), kMaxControlPayload);
  if (msg.msg_flags & MSG_CTRUNC) {
    // Descriptors dropped: by our own shortage (EMFILE) if the frame is whole and claims no more
    // than a message carries and more than arrived; otherwise the sender sent too many.
    if (d && proto::kHeaderSize + d.header.payload_len == static_cast<std::uint64_t>(got) &&
        d.header.nhandles <= kMaxControlFds && d.header.nhandles > m.fds.size())
      throw ControlHandlesDropped(d.header);
    throw ProtocolError("control message truncated");
  }
  if (!d) throw ProtocolError("bad control message: " + std::string(proto::to_string(d.error)));
  // One frame per message, nothing after it (bytes the header does not account for would be
  // dropped unseen; found by fuzz_control).
  if (proto::kHeaderSize + d.header.payload_len != static_cast<std::uint64_t>(got))
    throw ProtocolError("control message of " + std::to_string(got) + " bytes holds a frame of " +
                        std::to_string(proto::kHeaderSize + d.header.payload_len));
  if (d.header.nhandles != m.fds.size())
    throw ProtocolError("control message claims " + std::to_string(d.header.nhandles) + " descriptors, carries " +
                        std::to_string(m.fds.size()));
  m.header = d.header;
  m.payload.assign(reinterpret_cast<const char*>(d.payload), d.header.payload_len);
  return m;
}

}  // namespace

std::optional<ControlMessage> recv_control(int sock, int timeout_ms) {
  if (timeout_ms >= 0) {
    pollfd p{sock, POLLIN, 0};
    int r;
    do r = ::poll(&p, 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    if (r < 0) throw_errno("poll(control)");
    if (r == 0) throw SysError(ETIMEDOUT, "no control message within " + std::to_string(timeout_ms) + " ms");
  }
  bool would_block;
  return receive(sock, 0, would_block);
}

std::optional<ControlMessage> try_recv_control(int sock, bool& would_block) {
  return receive(sock, MSG_DONTWAIT, would_block);
}

}  // namespace ringpool
