// Segment: an anonymous shared-memory file (memfd) and its mapping in this process.
//
// Why not boost::interprocess::shared_memory_object: it names every object in /dev/shm, and a
// name outlives a SIGKILLed process. A memfd has no name: it is reachable only through inherited
// or SCM_RIGHTS-passed descriptors and disappears with the last descriptor and mapping, so a
// crash can never leak it. The mapping itself is a few lines of mmap; the ring needs one Boost
// does not offer either: the data area mapped twice back to back, so a record that wraps around
// the end of the ring is still one contiguous range (no split copies, no padding records).
#pragma once

#include <cstddef>
#include <cstdint>

#include "ringpool/fd.hpp"

namespace ringpool {

std::size_t page_size() noexcept;

// A new memfd of `size` bytes (MFD_CLOEXEC), sealed against shrinking and growing before it can
// leave the process: a receiver refuses any segment without both seals (check_received_memfd).
UniqueFd create_memfd(const char* debug_name, std::size_t size);

// Vets a memfd received from another process before it is mapped; returns its size. It must carry
// F_SEAL_SHRINK and F_SEAL_GROW (else its sender could ftruncate it under our mapping, and the
// next access to a page past the new end is a SIGBUS), must not be sealed against writing (our
// mappings are writable), and its size must lie in [min_size, max_size]. Seals are never removed,
// so what this checks holds for the life of any mapping made afterwards. Throws ProtocolError
// naming `what` and the fault. Two system calls (fcntl, fstat): callers that cache mappings run
// it once per segment, not per message.
std::size_t check_received_memfd(int fd, std::size_t min_size, std::size_t max_size, const char* what);

class Segment {
 public:
  Segment() = default;
  // Maps [0, size) of fd. With mirror_offset > 0, [mirror_offset, size) is mapped a second time
  // right after the first mapping, so base()+size .. base()+2*size-mirror_offset mirrors the tail.
  // With populate, page tables are filled up front (MAP_POPULATE) so the hot path never faults.
  Segment(UniqueFd fd, std::size_t size, std::size_t mirror_offset, bool populate);
  Segment(Segment&&) noexcept;
  Segment& operator=(Segment&&) noexcept;
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  ~Segment();

  // Fills the page tables of [offset, offset + len) of the file now, in the first mapping and in
  // the mirror (best effort: MADV_POPULATE_WRITE, Linux 5.14; elsewhere the pages fault on first
  // touch). For a segment whose hot part is known, instead of populating all of it.
  void populate(std::size_t offset, std::size_t len) noexcept;

  std::uint8_t* base() const noexcept { return base_; }
  std::size_t size() const noexcept { return size_; }
  int fd() const noexcept { return fd_.get(); }
  // Closes the descriptor and keeps the mapping (which keeps the memory): for readers that never
  // pass the segment on, so a cache of mappings does not hold one descriptor each.
  void close_fd() noexcept { fd_.reset(); }

 private:
  void unmap() noexcept;
  UniqueFd fd_;
  std::uint8_t* base_ = nullptr;
  std::size_t size_ = 0;
  std::size_t map_len_ = 0;
  std::size_t mirror_offset_ = 0;
};

// Size of the file behind fd (fstat); throws SysError.
std::size_t fd_size(int fd);

}  // namespace ringpool
