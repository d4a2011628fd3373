// A test that runs its process out of file descriptors: RLIMIT_NOFILE lowered to what is open
// now plus some room, and (take_the_rest) every descriptor left taken. Both are undone by
// give_back() or when the object goes, so a failing check cannot leave the test binary short.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <stdexcept>
#include <vector>

namespace ringpool::testing {

// Descriptors open in this process now (the count includes the one that reads the list).
inline int open_fd_count() {
  int n = 0;
  if (DIR* d = ::opendir("/proc/self/fd")) {
    while (::readdir(d)) ++n;
    ::closedir(d);
  }
  return n;
}

class FdLimit {
 public:
  explicit FdLimit(int room) {
    const int open_now = open_fd_count();
    if (::getrlimit(RLIMIT_NOFILE, &old_) != 0) throw std::runtime_error("getrlimit failed");
    rlimit low = old_;
    low.rlim_cur = static_cast<rlim_t>(open_now + room);
    if (::setrlimit(RLIMIT_NOFILE, &low) != 0) throw std::runtime_error("setrlimit failed");
  }
  FdLimit(const FdLimit&) = delete;
  FdLimit& operator=(const FdLimit&) = delete;
  ~FdLimit() { give_back(); }

  // Opens descriptors until the table is full; true if it stopped at EMFILE. Safe to call from
  // a callback that runs while the code under test is in the middle of something.
  bool take_the_rest() {
    int fd;
    while ((fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0) hog_.push_back(fd);
    return errno == EMFILE;
  }
  std::size_t taken() const { return hog_.size(); }

  // Closes what take_the_rest took and restores the limit (idempotent).
  void give_back() {
    for (int fd : hog_) ::close(fd);
    hog_.clear();
    if (!restored_) {
      ::setrlimit(RLIMIT_NOFILE, &old_);
      restored_ = true;
    }
  }

 private:
  rlimit old_{};
  bool restored_ = false;
  std::vector<int> hog_;
};

}  // namespace ringpool::testing
