#include "ringpool/channel.hpp"

#include <cstring>

#include "ringpool/error.hpp"

namespace ringpool {

Pending::~Pending() {
  // A staged block that never went out goes straight back to the pool.
  if (block && !published) block->mark_free();
}

std::unique_ptr<Pending> Channel::stage(proto::Kind kind, std::uint8_t flags, const Ring::Piece* pieces,
                                        std::size_t npieces, const int* fds, std::size_t nfds) {
  auto p = std::make_unique<Pending>();
  p->kind = kind;
  p->flags = flags;
  std::size_t len = 0;
  for (std::size_t i = 0; i < npieces; ++i) len += pieces[i].len;
  if (out_of_band(len)) {
    p->block = BlockPool::instance().acquire(len);
    std::uint8_t* dst = p->block->data();
    for (std::size_t i = 0; i < npieces; ++i) {
      if (pieces[i].len != 0) std::memcpy(dst, pieces[i].data, pieces[i].len);
      dst += pieces[i].len;
    }
    proto::OobDescriptor d{len, 0};
    p->bytes.assign(reinterpret_cast<const char*>(&d), sizeof d);
    p->flags |= proto::flag::kOutOfBand;
  } else {
    p->bytes.resize(len);
    char* dst = p->bytes.data();
    for (std::size_t i = 0; i < npieces; ++i) {
      if (pieces[i].len != 0) std::memcpy(dst, pieces[i].data, pieces[i].len);
      dst += pieces[i].len;
    }
  }
  p->fds.reserve(nfds);
  for (std::size_t i = 0; i < nfds; ++i) p->fds.push_back(dup_cloexec(fds[i]));
  return p;
}

bool Channel::publish(Pending& p, unsigned accounting) {
  if (p.published) return true;
  std::vector<int> fds;
  fds.reserve(p.fds.size() + 1);
  if (p.block) fds.push_back(p.block->fd());
  for (auto& f : p.fds) fds.push_back(f.get());
  Ring::Piece piece{p.bytes.data(), p.bytes.size()};
  Ring::PutStatus st = ring_->try_put(p.kind, p.flags, &piece, 1, fds.data(), fds.size(), accounting);
  if (st == Ring::PutStatus::too_large) throw ProtocolError("frame larger than the ring");
  if (st != Ring::PutStatus::ok) return false;
  p.published = true;
  p.fds.clear();  // our duplicates are in flight now; close them
  if (p.counted) ring_->published_pending();
  return true;
}

std::unique_ptr<Pending> Channel::put(proto::Kind kind, std::uint8_t flags, const Ring::Piece* pieces,
                                      std::size_t npieces, const int* fds, std::size_t nfds, unsigned accounting) {
  std::size_t len = 0;
  for (std::size_t i = 0; i < npieces; ++i) len += pieces[i].len;
  if (!out_of_band(len)) {
    Ring::PutStatus st = ring_->try_put(kind, flags, pieces, npieces, fds, nfds, accounting);
    if (st == Ring::PutStatus::ok) return nullptr;
    if (st == Ring::PutStatus::too_large) throw ProtocolError("frame larger than the ring");
  }
  auto p = stage(kind, flags, pieces, npieces, fds, nfds);
  if (publish(*p, accounting)) return nullptr;
  // Accepted but not yet published: count it now, the retry publishes without accounting.
  if (accounting & Ring::kCountItem) {
    ring_->accept_pending();
    p->counted = true;
  }
  if (accounting & Ring::kCountTask) ring_->add_unfinished(1);
  return p;
}

std::uint64_t Channel::oob_length(const proto::FrameHeader& h, const std::uint8_t* payload) {
  if (h.payload_len < sizeof(proto::OobDescriptor)) throw ProtocolError("short out-of-band descriptor");
  proto::OobDescriptor d;
  std::memcpy(&d, payload, sizeof d);
  return d.length;
}

std::unique_ptr<OobPayload> Channel::open_block(UniqueFd block, std::uint64_t length) {
  // open() is the one place a received block is vetted: it refuses an unsealed block and one
  // whose capacity does not fit length (security.md), so the block holds length bytes here.
  std::shared_ptr<Block> b = BlockCache::instance().open(std::move(block), length);
  return std::make_unique<OobPayload>(std::move(b), static_cast<std::size_t>(length));
}

FrameHandles ReceivedFds::next(std::uint8_t flags, std::uint32_t nhandles, std::uint64_t oob_length) {
  const std::size_t n = nhandles;
  if (n > fds_.size() - pos_) throw ProtocolError("frame handles missing");
  FrameHandles out;
  std::size_t first = pos_;
  pos_ += n;  // consumed even if opening the block throws: the next frame's handles stay aligned
  if (flags & proto::flag::kOutOfBand) {
    if (n == 0) throw ProtocolError("out-of-band frame without its block");
    out.oob = Channel::open_block(std::move(fds_[first]), oob_length);
    ++first;
  }
  out.fds = std::span<UniqueFd>(fds_.data() + first, pos_ - first);
  return out;
}

}  // namespace ringpool
