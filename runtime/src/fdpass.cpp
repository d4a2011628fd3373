#include "ringpool/detail/fdpass.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "ringpool/detail/futex.hpp"
#include "ringpool/error.hpp"

namespace ringpool {

namespace {

void grow_send_buffer(int fd) {
  // Every packet in flight is charged to the sender's buffer (an skb of ~1 KiB each). The default
  // 208 KiB would stall a producer after a few hundred handle-carrying messages; ask for 16 MiB
  // (SO_SNDBUFFORCE works for root, SO_SNDBUF is capped at net.core.wmem_max otherwise).
  int want = 16 << 20;
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &want, sizeof want) != 0)
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof want);
}

}  // namespace

FdChannel FdChannel::create() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) throw_errno("socketpair");
  UniqueFd tx(sv[0]), rx(sv[1]);
  grow_send_buffer(tx.get());
  // The reverse direction is never used; shut it so nothing can wedge on it.
  ::shutdown(rx.get(), SHUT_WR);
  return FdChannel(std::move(tx), std::move(rx));
}

FdChannel::SendStatus FdChannel::send(std::uint64_t seq, const int* fds, std::size_t n) {
  const std::uint32_t nparts = static_cast<std::uint32_t>((n + kMaxFdsPerPacket - 1) / kMaxFdsPerPacket);
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerPacket)];
  for (std::uint32_t part = 0; part < nparts; ++part) {
    const std::size_t first = static_cast<std::size_t>(part) * kMaxFdsPerPacket;
    const std::size_t cnt = std::min<std::size_t>(kMaxFdsPerPacket, n - first);
    FdPacket pkt{seq, part, nparts, static_cast<std::uint32_t>(cnt), kFdPacketMagic};
    iovec iov{&pkt, sizeof pkt};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * cnt);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * cnt);
    std::memcpy(CMSG_DATA(c), fds + first, sizeof(int) * cnt);
    for (;;) {
      ssize_t r = ::sendmsg(tx_.get(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (r == static_cast<ssize_t>(sizeof pkt)) break;
      if (r < 0 && errno == EINTR) continue;
      if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return SendStatus::would_block;
      if (r < 0) throw_errno("sendmsg(fds)");
      throw ProtocolError("short write on the handle socket");
    }
  }
  return SendStatus::ok;
}

void FdChannel::recv(std::uint64_t seq, std::size_t n, std::vector<UniqueFd>& out, int timeout_ms) {
  const std::uint32_t nparts = static_cast<std::uint32_t>((n + kMaxFdsPerPacket - 1) / kMaxFdsPerPacket);
  std::uint32_t next_part = 0;
  const std::int64_t deadline = futex::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerPacket)];
  while (next_part < nparts) {
    FdPacket pkt{};
    iovec iov{&pkt, sizeof pkt};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t r = ::recvmsg(rx_.get(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      // The producer sent these before committing the record, so they are normally queued
      // already; wait a little in case of scheduling noise, then give up loudly.
      std::int64_t left = deadline - futex::now_ns();
      if (left <= 0) throw ProtocolError("handles of a committed frame never arrived");
      pollfd p{rx_.get(), POLLIN, 0};
      ::poll(&p, 1, static_cast<int>(std::min<std::int64_t>(left / 1000000 + 1, 100)));
      continue;
    }
    if (r < 0) throw_errno("recvmsg(fds)");
    if (r == 0) throw ProtocolError("handle socket closed");
    // Collect whatever descriptors arrived, even on a malformed packet, so they are closed.
    std::vector<UniqueFd> got;
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      std::size_t cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const int* p = reinterpret_cast<const int*>(CMSG_DATA(c));
      for (std::size_t i = 0; i < cnt; ++i) got.emplace_back(p[i]);
    }
    if (r != static_cast<ssize_t>(sizeof pkt) || pkt.magic != kFdPacketMagic)
      throw ProtocolError("malformed packet on the handle socket");
    if (msg.msg_flags & MSG_CTRUNC) throw ProtocolError("handle packet truncated (descriptor limit reached?)");
    if (pkt.seq < seq) continue;  // orphan of a record that was never committed: `got` closes them
    if (pkt.seq > seq || pkt.part != next_part || pkt.nparts != nparts || got.size() != pkt.nfds)
      throw ProtocolError("handle packets out of order with ring records");
    for (auto& fd : got) out.push_back(std::move(fd));
    ++next_part;
  }
}

}  // namespace ringpool
