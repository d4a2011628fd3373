#include "ringpool/segment.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <utility>

#include "ringpool/error.hpp"

namespace ringpool {

std::size_t page_size() noexcept {
  static const std::size_t ps = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  return ps;
}

UniqueFd dup_cloexec(int fd) {
  int d = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (d < 0) throw_errno("fcntl(F_DUPFD_CLOEXEC)");
  return UniqueFd(d);
}

UniqueFd create_memfd(const char* debug_name, std::size_t size) {
  UniqueFd fd(::memfd_create(debug_name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) throw_errno("memfd_create");
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) throw_errno("ftruncate(memfd)");
  // A peer that could shrink the file would make our mapping SIGBUS; seal the size.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) throw_errno("fcntl(F_ADD_SEALS)");
  return fd;
}

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010  // Linux 5.1; older headers lack it
#endif

std::size_t check_received_memfd(int fd, std::size_t min_size, std::size_t max_size, const char* what) {
  // Seals first, size second: a sender may still resize an unsealed file between the two calls,
  // but not once both seals are on, so the size read after a passing seal check is final.
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    if (errno == EINVAL) throw ProtocolError(std::string(what) + " is not a memfd (it cannot carry seals)");
    throw_errno(std::string("fcntl(F_GET_SEALS) of ") + what);
  }
  const int need = F_SEAL_SHRINK | F_SEAL_GROW;
  if ((seals & need) != need) {
    std::string missing = (seals & F_SEAL_SHRINK) ? "F_SEAL_GROW" : (seals & F_SEAL_GROW) ? "F_SEAL_SHRINK"
                                                                                          : "F_SEAL_SHRINK and F_SEAL_GROW";
    throw ProtocolError(std::string(what) + " is not sealed (" + missing +
                        " missing): its sender could resize it under our mapping");
  }
  if (seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE))
    throw ProtocolError(std::string(what) + " is sealed against writing; ringpool maps segments writable");
  const std::size_t size = fd_size(fd);
  if (size < min_size)
    throw ProtocolError(std::string(what) + " is too short: " + std::to_string(size) + " bytes, at least " +
                        std::to_string(min_size) + " expected");
  if (size > max_size)
    throw ProtocolError(std::string(what) + " is too large: " + std::to_string(size) + " bytes, at most " +
                        std::to_string(max_size) + " allowed");
  return size;
}

std::size_t fd_size(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_errno("fstat");
  return static_cast<std::size_t>(st.st_size);
}

Segment::Segment(UniqueFd fd, std::size_t size, std::size_t mirror_offset, bool populate)
    : fd_(std::move(fd)), size_(size), mirror_offset_(mirror_offset) {
  const int pop = populate ? MAP_POPULATE : 0;
  if (mirror_offset == 0) {
    map_len_ = size;
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | pop, fd_.get(), 0);
    if (p == MAP_FAILED) throw_errno("mmap(segment)");
    base_ = static_cast<std::uint8_t*>(p);
    return;
  }
  // Reserve the whole range first so the two fixed mappings cannot land on anything else.
  const std::size_t mirror_len = size - mirror_offset;
  map_len_ = size + mirror_len;
  void* res = ::mmap(nullptr, map_len_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (res == MAP_FAILED) throw_errno("mmap(reserve)");
  base_ = static_cast<std::uint8_t*>(res);
  void* a = ::mmap(base_, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | pop, fd_.get(), 0);
  if (a == MAP_FAILED) {
    int e = errno;
    unmap();
    throw SysError(e, "mmap(segment)");
  }
  void* b = ::mmap(base_ + size, mirror_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED | pop, fd_.get(),
                   static_cast<off_t>(mirror_offset));
  if (b == MAP_FAILED) {
    int e = errno;
    unmap();
    throw SysError(e, "mmap(mirror)");
  }
}

Segment::Segment(Segment&& o) noexcept
    : fd_(std::move(o.fd_)),
      base_(std::exchange(o.base_, nullptr)),
      size_(std::exchange(o.size_, 0)),
      map_len_(std::exchange(o.map_len_, 0)),
      mirror_offset_(std::exchange(o.mirror_offset_, 0)) {}

Segment& Segment::operator=(Segment&& o) noexcept {
  if (this != &o) {
    unmap();
    fd_ = std::move(o.fd_);
    base_ = std::exchange(o.base_, nullptr);
    size_ = std::exchange(o.size_, 0);
    map_len_ = std::exchange(o.map_len_, 0);
    mirror_offset_ = std::exchange(o.mirror_offset_, 0);
  }
  return *this;
}

Segment::~Segment() { unmap(); }

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

void Segment::populate(std::size_t offset, std::size_t len) noexcept {
  if (base_ == nullptr || offset >= size_) return;
  const std::size_t ps = page_size();
  const std::size_t lo = offset / ps * ps;
  std::size_t hi = (offset + len + ps - 1) / ps * ps;
  if (hi > size_) hi = size_;
  if (hi <= lo) return;
  (void)::madvise(base_ + lo, hi - lo, MADV_POPULATE_WRITE);
  if (mirror_offset_ != 0 && hi > mirror_offset_) {  // the same pages' second mapping
    const std::size_t mlo = lo > mirror_offset_ ? lo : mirror_offset_;
    (void)::madvise(base_ + size_ + (mlo - mirror_offset_), hi - mlo, MADV_POPULATE_WRITE);
  }
}

void Segment::unmap() noexcept {
  if (base_ != nullptr) ::munmap(base_, map_len_);
  base_ = nullptr;
}

}  // namespace ringpool
