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

}  // namespace ringpool
