#include "ringpool/detail/fdpass.hpp"

#include <fcntl.h>
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

namespace {

// One packet read (or peeked) from the handle socket, with the descriptors the kernel installed.
struct Received {
  ssize_t len = 0;  // bytes read; 0 at end of stream
  FdPacket pkt{};
  int flags = 0;    // msg_flags
  std::vector<UniqueFd> fds;
};

// recvmsg of one packet, never blocking: false when nothing is queued.
bool read_packet(int sock, int flags, Received& out) {
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerPacket)];
  iovec iov{&out.pkt, sizeof out.pkt};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t r;
  do r = ::recvmsg(sock, &msg, flags | MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  while (r < 0 && errno == EINTR);
  if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return false;
  if (r < 0) throw_errno("recvmsg(fds)");
  out.len = r;
  out.flags = msg.msg_flags;
  // Collect whatever descriptors arrived, even with a malformed packet, so they are closed.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* p = CMSG_DATA(c);
    for (std::size_t i = 0; i < cnt; ++i) {
      int fd;
      std::memcpy(&fd, p + i * sizeof(int), sizeof fd);
      out.fds.emplace_back(fd);
    }
  }
  return true;
}

// SO_PEEK_OFF on the handle socket for the life of this object: peeks then read from `offset`
// on (the kernel moves it past each peek), instead of from the front. Off again (-1) at the end,
// so that a plain peek reads the front. The consumer lock is held meanwhile (the offset is the
// socket's, shared by every process holding it); a consumer that dies inside leaves it set, and
// the next one clears it when it recovers the lock (FdChannel::reset_peek_offset).
class PeekOffset {
 public:
  PeekOffset(int sock, int offset) : sock_(sock) {
    if (::setsockopt(sock_, SOL_SOCKET, SO_PEEK_OFF, &offset, sizeof offset) != 0) throw_errno("setsockopt(SO_PEEK_OFF)");
  }
  ~PeekOffset() { reset(); }
  void reset() noexcept {
    if (sock_ < 0) return;
    const int off = -1;
    ::setsockopt(sock_, SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off);
    sock_ = -1;
  }
  PeekOffset(const PeekOffset&) = delete;
  PeekOffset& operator=(const PeekOffset&) = delete;

 private:
  int sock_;
};

[[noreturn]] void throw_no_room(std::size_t n) {
  throw SysError(EMFILE, "cannot receive the " + std::to_string(n) +
                             " descriptor(s) of a frame: this process is out of file descriptors "
                             "(RLIMIT_NOFILE); the frame stays queued, take it again once some are closed");
}

}  // namespace

void FdChannel::reset_peek_offset() noexcept {
  const int off = -1;
  if (rx_) ::setsockopt(rx_.get(), SOL_SOCKET, SO_PEEK_OFF, &off, sizeof off);
}

void FdChannel::discard_front() {
  FdPacket pkt{};
  iovec iov{&pkt, sizeof pkt};
  msghdr msg{};  // no control buffer: the kernel closes the packet's descriptors
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  ssize_t r;
  do r = ::recvmsg(rx_.get(), &msg, MSG_DONTWAIT);
  while (r < 0 && errno == EINTR);
  if (r < 0) throw_errno("recvmsg(fds)");
}

void FdChannel::wait_readable(std::int64_t deadline, BlockingHook* hook) {
  const std::int64_t left = deadline - futex::now_ns();
  if (left <= 0) throw ProtocolError("handles of a committed frame never arrived");
  // The producer sent them before committing the record, so they are normally queued already;
  // wait a little in case of scheduling noise, then give up loudly (the caller's lock released).
  pollfd p{rx_.get(), POLLIN, 0};
  run_blocking(hook, [&] { ::poll(&p, 1, static_cast<int>(std::min<std::int64_t>(left / 1000000 + 1, 100))); });
}

std::vector<UniqueFd> FdChannel::peek(std::uint64_t seq, std::size_t n, BlockingHook* hook, int timeout_ms) {
  const std::uint32_t nparts = static_cast<std::uint32_t>((n + kMaxFdsPerPacket - 1) / kMaxFdsPerPacket);
  const std::size_t first = std::min<std::size_t>(n, kMaxFdsPerPacket);
  const std::int64_t deadline = futex::now_ns() + static_cast<std::int64_t>(timeout_ms) * 1000000;
  for (;;) {
    Received got;
    if (!read_packet(rx_.get(), MSG_PEEK, got)) {
      wait_readable(deadline, hook);
      continue;
    }
    if (got.len == 0) throw ProtocolError("handle socket closed");
    if (got.len != static_cast<ssize_t>(sizeof got.pkt) || got.pkt.magic != kFdPacketMagic) {
      discard_front();
      throw ProtocolError("malformed packet on the handle socket");
    }
    if (got.pkt.seq < seq) {  // orphan of a record that was never committed
      discard_front();
      continue;
    }
    // Our descriptor table is full: the peek installed fewer than the packet carries (and closed
    // what it did install, with `got`). The packet stays queued, as does the record.
    if (got.flags & MSG_CTRUNC) throw_no_room(n);
    if (got.pkt.seq > seq || got.pkt.part != 0 || got.pkt.nparts != nparts || got.pkt.nfds != first ||
        got.fds.size() != first) {
      discard_front();
      throw ProtocolError("handle packets out of order with ring records");
    }
    if (nparts > 1) {
      // The later packets are peeked too, before anything is consumed: with SO_PEEK_OFF a peek
      // reads (and installs the descriptors of) the packet after the ones already peeked. Every
      // descriptor of the record is then ours before the record is taken, so a table that fills
      // meanwhile (another thread of this process opening files) can no longer make the record
      // lose them: it fails here, with nothing consumed (SysError EMFILE).
      PeekOffset offset(rx_.get(), sizeof(FdPacket));
      std::vector<UniqueFd> all = std::move(got.fds);
      for (std::uint32_t part = 1; part < nparts; ++part) {
        Received more;
        while (!read_packet(rx_.get(), MSG_PEEK, more)) {
          // Sent before the record was committed, so normally queued already; poll() would not
          // wait (the first packet is readable), so sleep a little between looks.
          if (futex::now_ns() >= deadline) throw ProtocolError("handles of a committed frame never arrived");
          run_blocking(hook, [] { ::usleep(1000); });
        }
        if (more.flags & MSG_CTRUNC) throw_no_room(n);
        const std::size_t cnt = std::min<std::size_t>(kMaxFdsPerPacket, n - std::size_t{part} * kMaxFdsPerPacket);
        if (more.len != static_cast<ssize_t>(sizeof more.pkt) || more.pkt.magic != kFdPacketMagic ||
            more.pkt.seq != seq || more.pkt.part != part || more.pkt.nparts != nparts || more.pkt.nfds != cnt ||
            more.fds.size() != cnt) {
          // Consume the record's packets peeked so far, so the next take does not meet them.
          offset.reset();
          for (std::uint32_t i = 0; i < part; ++i) discard_front();
          throw ProtocolError("handle packets out of order with ring records");
        }
        for (auto& fd : more.fds) all.push_back(std::move(fd));
      }
      return all;
    }
    return std::move(got.fds);
  }
}

void FdChannel::finish(std::uint64_t seq, std::size_t n, std::vector<UniqueFd>& peeked, std::vector<UniqueFd>& out,
                       BlockingHook* hook, int timeout_ms) {
  (void)seq;
  (void)hook;
  (void)timeout_ms;
  const std::uint32_t nparts = static_cast<std::uint32_t>((n + kMaxFdsPerPacket - 1) / kMaxFdsPerPacket);
  // peek() installed every packet's descriptors: consume the packets (the kernel drops its
  // references; we hold ours).
  for (std::uint32_t part = 0; part < nparts; ++part) discard_front();
  for (auto& fd : peeked) out.push_back(std::move(fd));
  peeked.clear();
}

void FdChannel::recv(std::uint64_t seq, std::size_t n, std::vector<UniqueFd>& out, int timeout_ms) {
  if (n == 0) return;
  std::vector<UniqueFd> first = peek(seq, n, nullptr, timeout_ms);
  finish(seq, n, first, out, nullptr, timeout_ms);
}

}  // namespace ringpool
