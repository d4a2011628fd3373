// Control messages: one protocol frame per SOCK_SEQPACKET message, descriptors attached.
//
// The spawner's parent <-> zygote socket carries these (docs/design/spawner.md lists the kinds and
// their fields). A seqpacket socket keeps message boundaries and delivers each message's
// descriptors with it, so no framing or sequence matching is needed, unlike the ring's side
// channel. A message is at most kMaxControlPayload bytes of payload and kMaxControlFds descriptors.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ringpool/error.hpp"
#include "ringpool/fd.hpp"
#include "ringpool/proto/frame.hpp"

namespace ringpool {

inline constexpr std::size_t kMaxControlPayload = 1 << 20;
inline constexpr std::size_t kMaxControlFds = 253;  // SCM_MAX_FD

struct ControlMessage {
  proto::FrameHeader header{};
  std::string payload;
  std::vector<UniqueFd> fds;
  proto::Kind kind() const noexcept { return static_cast<proto::Kind>(header.kind); }
};

// A well-formed message whose descriptors the kernel dropped because this process had none free
// (MSG_CTRUNC with no more claimed than a message may carry): the receiver's shortage, not the
// sender's fault. header says what the message was (a zygote's PROCESS answer names the pid of a
// child whose pidfd was lost, which the receiver must still reap).
class ControlHandlesDropped : public ProtocolError {
 public:
  explicit ControlHandlesDropped(const proto::FrameHeader& h)
      : ProtocolError("control message's descriptors dropped: this process has none free (RLIMIT_NOFILE?)"),
        header(h) {}
  proto::FrameHeader header;
};

// A connected AF_UNIX SOCK_SEQPACKET pair, close-on-exec.
std::pair<UniqueFd, UniqueFd> control_socketpair();

// Sends one message; blocks while the socket buffer is full. Throws SysError (EPIPE when the peer
// is gone) or std::length_error when the payload or descriptor count exceeds the limits.
void send_control(int sock, proto::Kind kind, std::uint64_t seq, std::uint32_t aux, std::string_view payload,
                  std::span<const int> fds = {});

// Receives one message. nullopt at end of stream (the peer closed). timeout_ms < 0 waits forever;
// a timeout throws SysError(ETIMEDOUT). A malformed message throws ProtocolError (its descriptors
// are closed); one whose descriptors this process had no room for, ControlHandlesDropped.
std::optional<ControlMessage> recv_control(int sock, int timeout_ms = -1);

// Non-blocking variant for event loops: nullopt with would_block set when nothing is queued.
std::optional<ControlMessage> try_recv_control(int sock, bool& would_block);

}  // namespace ringpool
