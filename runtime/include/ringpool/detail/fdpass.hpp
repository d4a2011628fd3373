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
#pragma once

#include <cstdint>
#include <vector>

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

  // Receives the n fds of record `seq` into out (appended, owned by the caller), dropping orphan
  // packets of lower sequence numbers. Throws ProtocolError if they do not arrive within timeout.
  void recv(std::uint64_t seq, std::size_t n, std::vector<UniqueFd>& out, int timeout_ms = 10000);

  int tx_fd() const noexcept { return tx_.get(); }
  int rx_fd() const noexcept { return rx_.get(); }

 private:
  UniqueFd tx_;
  UniqueFd rx_;
};

}  // namespace ringpool
