#include "ringpool/block.hpp"

#include <pthread.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "ringpool/error.hpp"

namespace ringpool {

namespace {

std::atomic<std::uint64_t> g_fork_generation{0};

void on_fork_child() { g_fork_generation.fetch_add(1, std::memory_order_relaxed); }

struct AtForkRegistration {
  AtForkRegistration() { ::pthread_atfork(nullptr, nullptr, &on_fork_child); }
};
const AtForkRegistration g_atfork;

constexpr std::size_t kMinBlock = 64 * 1024;

}  // namespace

// Block sizes: len rounded up to a granule of 1/8 of its power of two (at least 64 KiB), so a
// block wastes at most 12.5% (a pure power-of-two class would give a 64 MiB array, whose frame
// is a few bytes larger, a 128 MiB block).
std::size_t block_size_class(std::size_t len) noexcept {
  std::size_t p = kMinBlock;
  while (p < len) p <<= 1;
  const std::size_t granule = std::max(kMinBlock, p / 8);
  return (len + granule - 1) / granule * granule;
}

// acquire() reuses a free block of up to this capacity for len (see there).
std::size_t block_capacity_limit(std::size_t len) noexcept {
  const std::size_t cls = block_size_class(len);
  return cls + cls / 4;
}

std::uint64_t fork_generation() noexcept { return g_fork_generation.load(std::memory_order_relaxed); }

void note_fork_child() noexcept { on_fork_child(); }

Block::Block(Segment seg) : seg_(std::move(seg)) {
  hdr_ = reinterpret_cast<BlockHeader*>(seg_.base());
  data_ = seg_.base() + page_size();
  capacity_ = seg_.size() - page_size();
}

BlockPool& BlockPool::instance() {
  static BlockPool* pool = new BlockPool();  // leaked on purpose: used from atexit paths
  return *pool;
}

void BlockPool::drop_if_forked() {
  const std::uint64_t g = fork_generation();
  if (g != generation_) {
    // The parent owns these blocks; the child only forgets its copies of the mappings.
    blocks_.clear();
    bytes_ = 0;
    generation_ = g;
  }
}

std::shared_ptr<Block> BlockPool::acquire(std::size_t len) {
  if (len > kMaxBlockPayload) throw std::length_error("out-of-band payload larger than 1 TiB");
  const std::size_t cls = block_size_class(len);
  std::lock_guard<std::mutex> g(mu_);
  drop_if_forked();
  for (auto& b : blocks_) {
    // Any free block that fits without wasting more than a quarter of it (readers hold us to it).
    if (b->capacity() < len || b->capacity() > block_capacity_limit(len)) continue;
    std::uint32_t expected = kBlockFree;
    // Acquire pairs with the reader's release in Block::mark_free.
    if (b->header()->state.compare_exchange_strong(expected, kBlockBusy, std::memory_order_acquire)) return b;
  }
  // Make room: forget free blocks of other sizes first, then the oldest busy ones.
  while (bytes_ + cls > max_bytes_ && !blocks_.empty()) {
    auto it = std::find_if(blocks_.begin(), blocks_.end(), [](const std::shared_ptr<Block>& b) {
      return b->header()->state.load(std::memory_order_acquire) == kBlockFree;
    });
    if (it == blocks_.end()) it = blocks_.begin();
    bytes_ -= (*it)->capacity();
    blocks_.erase(it);
  }
  const std::size_t total = page_size() + cls;
  Segment seg(create_memfd("ringpool-block", total), total, 0, /*populate=*/true);
  auto* h = new (seg.base()) BlockHeader{};
  h->magic = kBlockMagic;
  h->version = kBlockVersion;
  h->capacity = cls;
  h->state.store(kBlockBusy, std::memory_order_relaxed);
  auto b = std::make_shared<Block>(std::move(seg));
  if (bytes_ + cls <= max_bytes_) {
    blocks_.push_back(b);
    bytes_ += cls;
  }
  return b;
}

void BlockPool::set_max_bytes(std::size_t n) {
  std::lock_guard<std::mutex> g(mu_);
  max_bytes_ = n;
}

std::size_t BlockPool::cached_bytes() {
  std::lock_guard<std::mutex> g(mu_);
  drop_if_forked();
  return bytes_;
}

BlockCache& BlockCache::instance() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

void BlockCache::set_max_bytes(std::size_t n) {
  std::lock_guard<std::mutex> g(mu_);
  max_bytes_ = n;
}

std::shared_ptr<Block> BlockCache::open(UniqueFd fd, std::uint64_t length) {
  if (length > kMaxBlockPayload)
    throw ProtocolError("out-of-band length " + std::to_string(length) + " beyond the protocol's maximum");
  const std::size_t len = static_cast<std::size_t>(length);
  // The capacity a producer following BlockPool::acquire can have used for len: checked on hits
  // too, since a block is reused for payloads of other sizes.
  const auto fits = [len](std::size_t capacity) { return capacity >= len && capacity <= block_capacity_limit(len); };
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw_errno("fstat(block)");
  // While we keep a mapping, the block's inode cannot be freed, so (dev, ino) cannot be reused
  // by another block under our feet. Entries whose mapping is gone are dropped.
  const std::pair<std::uint64_t, std::uint64_t> key{st.st_dev, st.st_ino};
  std::lock_guard<std::mutex> g(mu_);
  if (generation_ != fork_generation()) {
    map_.clear();
    kept_bytes_ = 0;
    generation_ = fork_generation();
  }
  ++clock_;
  auto it = map_.find(key);
  if (it != map_.end()) {
    if (auto b = it->second.weak.lock()) {
      // Vetted when it was mapped; its seals hold its size (see check_received_memfd).
      if (!fits(b->capacity())) throw ProtocolError("out-of-band length does not fit its block's capacity");
      if (!it->second.keep) {
        it->second.keep = b;
        kept_bytes_ += b->capacity();
      }
      it->second.last_use = clock_;
      return b;
    }
    map_.erase(it);
  }
  const std::size_t ps = page_size();
  const std::size_t total = check_received_memfd(fd.get(), ps + std::max<std::size_t>(len, 1),
                                                 ps + block_capacity_limit(len), "out-of-band block");
  Segment seg(std::move(fd), total, 0, /*populate=*/true);
  const auto* h = reinterpret_cast<const BlockHeader*>(seg.base());
  if (h->magic != kBlockMagic || h->version != kBlockVersion || h->capacity != total - ps)
    throw ProtocolError("not a ringpool out-of-band block");
  // The mapping holds the block (and its inode, so the key stays unique); a reader never sends a
  // block on, so the cache keeps mappings, not descriptors.
  seg.close_fd();
  auto b = std::make_shared<Block>(std::move(seg));
  if (map_.size() > 1024) std::erase_if(map_, [](const auto& kv) { return !kv.second.keep && kv.second.weak.expired(); });
  // Evict least recently used mappings beyond the budget (they stay alive while in use).
  while (kept_bytes_ + b->capacity() > max_bytes_) {
    auto victim = map_.end();
    for (auto e = map_.begin(); e != map_.end(); ++e)
      if (e->second.keep && (victim == map_.end() || e->second.last_use < victim->second.last_use)) victim = e;
    if (victim == map_.end()) break;
    kept_bytes_ -= victim->second.keep->capacity();
    victim->second.keep.reset();
    if (victim->second.weak.expired()) map_.erase(victim);
  }
  Entry e;
  e.weak = b;
  if (kept_bytes_ + b->capacity() <= max_bytes_) {
    e.keep = b;
    kept_bytes_ += b->capacity();
  }
  e.last_use = clock_;
  map_[key] = std::move(e);
  return b;
}

}  // namespace ringpool
