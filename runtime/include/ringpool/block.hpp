// Out-of-band blocks: payloads too large for the ring travel in their own memfd-backed block,
// passed as handle 0 of an OOB frame. Blocks are recycled, never allocated per message:
//
//   producer process                           consumer process
//   BlockPool::acquire(len) ── state=BUSY       BlockCache::open(fd, len) ── vetted, mapped once per inode
//   copy payload into block                     reader uses the bytes in place (zero copy)
//   publish frame + block fd ─────────────────▶ last view dropped ── state=FREE (release)
//   acquire() reuses a FREE block  ◀────────────────────────────────┘ (acquire load)
//
// A fresh page costs a fault and zeroing (~2.5 us per 4 KiB here, slower than copying it), so the
// pool keeps blocks pre-faulted and a consumer keeps their mappings: in steady state a large
// message costs one memcpy on the producer side and none on the consumer side.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <map>
#include <utility>
#include <vector>

#include "ringpool/fd.hpp"
#include "ringpool/segment.hpp"

namespace ringpool {

inline constexpr std::uint32_t kBlockMagic = 0x4b4c4250u;  // "PBLK"
inline constexpr std::uint32_t kBlockVersion = 1;
inline constexpr std::uint32_t kBlockFree = 0;  // the producer may reuse it
inline constexpr std::uint32_t kBlockBusy = 1;  // staged, in flight, or held by a reader

// The longest payload a block may carry: the descriptor's length is a u64 another process wrote,
// and sizes are computed from it. The same bound as a ring's capacity; far beyond any real message.
inline constexpr std::size_t kMaxBlockPayload = std::size_t{1} << 40;

// The data area BlockPool::acquire gives a payload of len bytes (len rounded up to 1/8 of its
// power of two, at least 64 KiB), and the largest one it may reuse for it (25% more). A reader
// refuses a block outside [len, block_capacity_limit(len)], so a peer cannot make it map (and
// populate) far more memory than the message it claims to send. len <= kMaxBlockPayload.
std::size_t block_size_class(std::size_t len) noexcept;
std::size_t block_capacity_limit(std::size_t len) noexcept;

// First page of a block; the data area starts at the next page.
struct BlockHeader {
  std::uint32_t magic;
  std::uint32_t version;
  std::atomic<std::uint32_t> state;
  std::uint32_t reserved0;
  std::uint64_t capacity;  // bytes in the data area
  std::uint8_t reserved[40];
};
static_assert(std::is_standard_layout_v<BlockHeader> && sizeof(BlockHeader) == 64,
              "BlockHeader lives in shared memory with a fixed layout");

class Block {
 public:
  Block(Segment seg);
  std::uint8_t* data() const noexcept { return data_; }
  std::size_t capacity() const noexcept { return capacity_; }
  int fd() const noexcept { return seg_.fd(); }
  BlockHeader* header() const noexcept { return hdr_; }
  // Hands the block back to its producer. Release pairs with the acquire load in
  // BlockPool::acquire: our reads of the data happen before the producer overwrites it.
  void mark_free() noexcept { hdr_->state.store(kBlockFree, std::memory_order_release); }

 private:
  Segment seg_;
  BlockHeader* hdr_;
  std::uint8_t* data_;
  std::size_t capacity_;
};

// Producer side: one per process, thread-safe.
class BlockPool {
 public:
  static BlockPool& instance();
  // A block with at least len bytes, marked BUSY: a free pooled one if one fits (at most 25%
  // larger), else a new one rounded up to 1/8 of len's power of two (at least 64 KiB).
  std::shared_ptr<Block> acquire(std::size_t len);
  // Bytes the pool may keep mapped (free or busy). Beyond it, blocks are created and then
  // forgotten after use (the reader's mapping keeps them alive until it lets go).
  void set_max_bytes(std::size_t n);
  std::size_t cached_bytes();

 private:
  BlockPool() = default;
  void drop_if_forked();
  std::mutex mu_;
  std::vector<std::shared_ptr<Block>> blocks_;
  std::size_t bytes_ = 0;
  std::size_t max_bytes_ = std::size_t{1} << 30;
  std::uint64_t generation_ = 0;
};

// Consumer side: one per process, thread-safe. Maps each block once and keeps recently used
// mappings (up to a byte budget) so the next frame that names the same block costs no mmap.
class BlockCache {
 public:
  static BlockCache& instance();
  // The block behind fd, holding a payload of `length` bytes (the descriptor's claim). Takes
  // ownership of fd (closed before returning). A block not mapped yet is vetted before mmap
  // (check_received_memfd: sealed, a size that fits `length`) and its header validated; a cached
  // one was vetted when first mapped (its seals are permanent), so a hit costs one fstat. Throws
  // ProtocolError for a block that fails, or whose capacity does not fit `length`.
  std::shared_ptr<Block> open(UniqueFd fd, std::uint64_t length);
  void set_max_bytes(std::size_t n);

 private:
  BlockCache() = default;
  struct Entry {
    std::weak_ptr<Block> weak;
    std::shared_ptr<Block> keep;  // non-null while in the LRU budget
    std::uint64_t last_use = 0;
  };
  std::mutex mu_;
  std::map<std::pair<std::uint64_t, std::uint64_t>, Entry> map_;  // key: (st_dev, st_ino)
  std::size_t kept_bytes_ = 0;
  std::size_t max_bytes_ = std::size_t{512} << 20;
  std::uint64_t clock_ = 0;
  std::uint64_t generation_ = 0;
};

// Incremented in every child after fork(): per-process ownership (pool blocks, readers' views)
// must not be acted on twice.
std::uint64_t fork_generation() noexcept;
// What the pthread_atfork child handler does, for a child made without glibc's fork()
// (zygote workers: see fork_sibling).
void note_fork_child() noexcept;

}  // namespace ringpool
