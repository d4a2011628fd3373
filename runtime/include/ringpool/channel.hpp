// Channel: a ring plus out-of-band blocks, the unit the Python queues and the C++ pool talk
// through. A payload up to ring.inline_max() is copied into the ring; a larger one is copied once
// into a pooled block and the ring carries a 16-byte descriptor with the block as handle 0.
// A put that finds the ring full never waits: it returns a Pending that owns everything needed to
// publish later (a copy of the bytes or the staged block, and duplicates of the fds), so the
// caller's buffers and descriptors are free as soon as put returns.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ringpool/block.hpp"
#include "ringpool/ring.hpp"

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

  // Whether a payload of len bytes goes out of band.
  bool out_of_band(std::size_t len) const noexcept { return len > ring_->inline_max(); }
  Ring& ring() const noexcept { return *ring_; }
  const std::shared_ptr<Ring>& ring_ptr() const noexcept { return ring_; }

 private:
  std::shared_ptr<Ring> ring_;
};

}  // namespace ringpool
