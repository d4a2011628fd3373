// Channel: a ring plus out-of-band blocks, the unit the Python queues and the C++ pool talk
// through. A payload up to ring.inline_max() is copied into the ring; a larger one is copied once
// into a pooled block and the ring carries a 16-byte descriptor with the block as handle 0.
// A put that finds the ring full never waits: it returns a Pending that owns everything needed to
// publish later (a copy of the bytes or the staged block, and duplicates of the fds), so the
// caller's buffers and descriptors are free as soon as put returns.
//
// The receive side, shared by the Python bindings and the C++ pool:
//
//   get / get_many(sink, fds, timeout, around) ── Ring::try_get[_many] under the consumer lock:
//        │                                          sink.take() copies each payload (or, out of
//        │  nothing yet: block_until (wait.hpp)      band, notes oob_length() of its descriptor),
//        │  spins, then sleeps on the data futex     fds gets every frame's handles, in record order
//        ▼
//   ReceivedFds::next(header, oob_length) ── per frame: the opened block (OobPayload, handed back
//                                            to its producer when dropped) and its own handles
#pragma once

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ringpool/block.hpp"
#include "ringpool/ring.hpp"
#include "ringpool/wait.hpp"

namespace ringpool {

struct Pending {
  proto::Kind kind = proto::Kind::DATA;
  std::uint8_t flags = 0;
  std::string bytes;               // inline payload (or the OOB descriptor)
  std::shared_ptr<Block> block;    // staged OOB block, BUSY until published and read
  std::vector<UniqueFd> fds;       // owned duplicates
  bool published = false;
  bool counted = false;            // accepted with kCountItem: Ring::published_pending on publish
  Pending() = default;
  Pending(const Pending&) = delete;
  Pending& operator=(const Pending&) = delete;
  ~Pending();
  std::size_t record_bytes() const noexcept { return Ring::record_size(bytes.size()); }
};

// The payload of an out-of-band frame a get received: the block's bytes, in place and writable
// (the reader owns them until it lets go). Destroying it hands the block back to its producer,
// except in a process forked after the open: there the block is still its parent's.
class OobPayload {
 public:
  OobPayload(std::shared_ptr<Block> block, std::size_t length)
      : block_(std::move(block)), length_(length), generation_(fork_generation()) {}
  ~OobPayload() {
    if (block_ && generation_ == fork_generation()) block_->mark_free();
  }
  OobPayload(const OobPayload&) = delete;
  OobPayload& operator=(const OobPayload&) = delete;
  std::uint8_t* data() const noexcept { return block_->data(); }
  std::size_t size() const noexcept { return length_; }
  std::string_view view() const noexcept { return {reinterpret_cast<const char*>(data()), length_}; }

 private:
  std::shared_ptr<Block> block_;
  std::size_t length_;
  std::uint64_t generation_;
};

// One received frame's handles: its out-of-band block, opened, and the sender's descriptors.
struct FrameHandles {
  std::unique_ptr<OobPayload> oob;  // null unless the frame is out of band
  std::span<UniqueFd> fds;          // the sender's descriptors, in the order it passed them
};

// Hands out, frame by frame, the descriptors a get appended to its vector: they arrive in record
// order, header.nhandles per frame, an out-of-band frame's block first. Take the frames in the
// order the sink saw them. Not thread safe (one per get).
class ReceivedFds {
 public:
  explicit ReceivedFds(std::vector<UniqueFd>& fds, std::size_t pos = 0) noexcept : fds_(fds), pos_(pos) {}
  // The next frame's handles; an out-of-band frame's block is mapped (see Channel::open_block)
  // and must hold oob_length bytes. Throws ProtocolError if handles are missing.
  FrameHandles next(const proto::FrameHeader& h, std::uint64_t oob_length = 0) {
    return next(h.flags, h.nhandles, oob_length);
  }
  // The same from the two header fields it needs (for sinks that keep no whole header).
  FrameHandles next(std::uint8_t flags, std::uint32_t nhandles, std::uint64_t oob_length);
  std::size_t position() const noexcept { return pos_; }

 private:
  std::vector<UniqueFd>& fds_;
  std::size_t pos_;
};

class Channel {
 public:
  explicit Channel(std::shared_ptr<Ring> ring) : ring_(std::move(ring)) {}

  // Publishes a frame, or returns a Pending to retry with publish(). The accounting is applied
  // either way (a pending frame counts as accepted, as the stdlib's feeder buffer does).
  std::unique_ptr<Pending> put(proto::Kind kind, std::uint8_t flags, const Ring::Piece* pieces, std::size_t npieces,
                               const int* fds, std::size_t nfds, unsigned accounting);
  // Stages the payload out of band if it is too large for the ring (call without locks, it copies).
  // Returned pending has nothing published yet; publish() it.
  std::unique_ptr<Pending> stage(proto::Kind kind, std::uint8_t flags, const Ring::Piece* pieces,
                                 std::size_t npieces, const int* fds, std::size_t nfds);
  // Tries to publish a pending frame; true once published.
  bool publish(Pending& p, unsigned accounting = 0);

  // -- consumer side: any thread of any process ------------------------------------------------
  // Takes the oldest frame now: sink.take() copies its payload under the consumer lock, its
  // handles are appended to fds. False if no frame is published.
  // hook: see Ring::try_get_many (where a take may block).
  bool try_get(Ring::Sink& sink, std::vector<UniqueFd>& fds, BlockingHook* hook = nullptr) {
    return ring_->try_get(sink, fds, hook);
  }
  // Takes 1..max frames now in one critical section (a frame with handles ends the batch).
  std::size_t try_get_many(Ring::Sink& sink, std::size_t max, std::vector<UniqueFd>& fds,
                           BlockingHook* hook = nullptr) {
    return ring_->try_get_many(sink, max, fds, hook);
  }
  // try_get, waiting up to timeout_ns (negative: no limit; 0: no wait) with the spin-then-sleep
  // policy of wait.hpp (policy nullptr: WaitPolicy::standard()); around(round) runs each wait
  // round (see block_until: the bindings release the GIL there and run signal handlers, whose
  // exception ends the wait); hook runs what may block inside a take (Ring::try_get_many).
  // False on timeout.
  template <class Around = NoWaitHook>
  bool get(Ring::Sink& sink, std::vector<UniqueFd>& fds, std::int64_t timeout_ns, Around&& around = {},
           const WaitPolicy* policy = nullptr, BlockingHook* hook = nullptr) {
    return ringpool::block_until(
        timeout_ns, [&] { return ring_->try_get(sink, fds, hook); }, [&] { return ring_->readable(); },
        [&](std::int64_t ns) { ring_->wait_data(ns); }, around, policy);
  }
  // try_get_many, waiting as get() does for the first frame: 1..max frames, or 0 on timeout
  // (max 0: 0 at once).
  template <class Around = NoWaitHook>
  std::size_t get_many(Ring::Sink& sink, std::size_t max, std::vector<UniqueFd>& fds, std::int64_t timeout_ns,
                       Around&& around = {}, const WaitPolicy* policy = nullptr, BlockingHook* hook = nullptr) {
    std::size_t n = 0;
    if (max == 0) return 0;
    ringpool::block_until(
        timeout_ns, [&] { return (n = ring_->try_get_many(sink, max, fds, hook)) != 0; },
        [&] { return ring_->readable(); }, [&](std::int64_t ns) { ring_->wait_data(ns); }, around, policy);
    return n;
  }
  // Waits as get() does, taking nothing, until a frame is published (true) or timeout_ns passes.
  template <class Around = NoWaitHook>
  bool wait_readable(std::int64_t timeout_ns, Around&& around = {}, const WaitPolicy* policy = nullptr) {
    auto ready = [&] { return ring_->readable(); };
    return ringpool::block_until(
        timeout_ns, ready, ready, [&](std::int64_t ns) { ring_->wait_data(ns); }, around, policy);
  }
  // Whether a frame is published (approximate by nature: another consumer may take it first).
  bool readable() const noexcept { return ring_->readable(); }

  // The length an out-of-band frame's descriptor names. Cheap and allocation-free: a Sink calls
  // it on the payload under the consumer lock. ProtocolError if the payload is too short.
  static std::uint64_t oob_length(const proto::FrameHeader& h, const std::uint8_t* payload);
  // Maps an out-of-band frame's block (its first handle; taken over) through this process's
  // BlockCache; ProtocolError if the block is shorter than length.
  static std::unique_ptr<OobPayload> open_block(UniqueFd block, std::uint64_t length);

  // Whether a payload of len bytes goes out of band.
  bool out_of_band(std::size_t len) const noexcept { return len > ring_->inline_max(); }
  Ring& ring() const noexcept { return *ring_; }
  const std::shared_ptr<Ring>& ring_ptr() const noexcept { return ring_; }

 private:
  std::shared_ptr<Ring> ring_;
};

}  // namespace ringpool
