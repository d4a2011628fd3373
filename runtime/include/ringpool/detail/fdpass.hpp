// FdChannel: the side socket on which file descriptors travel next to ring records.
//
// A SOCK_STREAM socketpair (AF_UNIX). Datagram sockets would be the natural fit, but Linux caps a
// unix datagram queue at net.unix.max_dgram_qlen messages (10 by default), far fewer than a ring
// holds; a stream socket is bounded only by its send buffer. Every send is one fixed 24-byte
// FdPacket with up to 253 descriptors attached (SCM_MAX_FD); the kernel never merges two skbs
// that carry descriptors into one read, so each recvmsg returns exactly one packet.
//
// Ordering: producers send under the ring's producer lock, before committing the record, so the
// packets are in record order; consumers receive under the consumer lock, after taking the record.
// Each packet carries its record's sequence number: packets of a record that was never committed
// (its producer died after sending) have a lower seq than the next record's and are dropped.
//
// Receiving costs the reader descriptors, which it may not have (EMFILE). A consumer therefore
// receives in two steps around taking the record: peek() installs the first packet's descriptors
// by MSG_PEEK, leaving the packet queued, before the record is taken; finish() consumes it after.
// If the process is out of descriptors, peek() fails with nothing consumed, and the record and its
// handles stay for a later take (docs/design/security.md, "Descriptors").
#pragma once

#include <cstdint>
#include <vector>

#include "ringpool/blocking.hpp"
#include "ringpool/fd.hpp"

namespace ringpool {

inline constexpr int kMaxFdsPerPacket = 253;  // SCM_MAX_FD; 254 fails with EINVAL

struct FdPacket {
  std::uint64_t seq;
  std::uint32_t part;
  std::uint32_t nparts;
  std::uint32_t nfds;
  std::uint32_t magic;
};
static_assert(sizeof(FdPacket) == 24, "fixed-size packets keep stream reads aligned to sends");
inline constexpr std::uint32_t kFdPacketMagic = 0x44465052u;  // "RPFD"

class FdChannel {
 public:
  enum class SendStatus { ok, would_block };

  FdChannel() = default;
  FdChannel(UniqueFd tx, UniqueFd rx) : tx_(std::move(tx)), rx_(std::move(rx)) {}
  static FdChannel create();

  // Sends fds for record `seq`, splitting into packets of at most 253. Never blocks: returns
  // would_block if the socket buffer is full before the first packet; if it fills after some
  // packets, those become orphans (the caller must not commit `seq`) and would_block is returned.
  SendStatus send(std::uint64_t seq, const int* fds, std::size_t n);

  // Step one of receiving the n fds of record `seq` (n >= 1), before the record is taken: drops
  // orphan packets of lower sequence numbers, waits up to timeout for the record's packets (the
  // wait runs through hook) and returns all n descriptors, installed in this process by peeks
  // that leave the packets queued (a record of more than 253 is several packets: the later ones
  // are peeked past the first with SO_PEEK_OFF). Throws SysError(EMFILE) when this process cannot
  // hold them, having consumed nothing of the record's; ProtocolError if a packet is malformed,
  // out of order, or does not arrive within timeout (the record's packets are consumed).
  std::vector<UniqueFd> peek(std::uint64_t seq, std::size_t n, BlockingHook* hook = nullptr,
                             int timeout_ms = kHandleTimeoutMs);
  // Step two, after the record was taken: consumes the packets peek() returned the descriptors
  // of (`peeked`, moved to out). Cannot fail for want of descriptors: they are installed already.
  void finish(std::uint64_t seq, std::size_t n, std::vector<UniqueFd>& peeked, std::vector<UniqueFd>& out,
              BlockingHook* hook = nullptr, int timeout_ms = kHandleTimeoutMs);
  // Both steps at once: the n fds of record `seq`, appended to out (owned by the caller).
  void recv(std::uint64_t seq, std::size_t n, std::vector<UniqueFd>& out, int timeout_ms = kHandleTimeoutMs);

  // How long a reader waits for the handles of a committed frame. They were sent before the
  // commit, so only a producer that broke the protocol (or a loaded machine) makes it wait at all.
  static constexpr int kHandleTimeoutMs = 10000;

  // Clears a peek offset a consumer that died inside peek() left on the socket (the ring calls it
  // when it recovers the consumer lock).
  void reset_peek_offset() noexcept;

  int tx_fd() const noexcept { return tx_.get(); }
  int rx_fd() const noexcept { return rx_.get(); }

 private:
  // Consumes the packet at the front of the socket; its descriptors are closed by the kernel.
  void discard_front();
  // Waits (through hook) until the socket is readable or deadline (futex::now_ns() clock) passes.
  void wait_readable(std::int64_t deadline, BlockingHook* hook);

  UniqueFd tx_;
  UniqueFd rx_;
};

}  // namespace ringpool
