// Error types of the ringpool runtime. Every failure of a system call carries errno and the call.
#pragma once

#include <cerrno>
#include <stdexcept>
#include <string>
#include <system_error>

namespace ringpool {

// A system call failed; code() holds errno.
class SysError : public std::system_error {
 public:
  SysError(int err, const std::string& what) : std::system_error(err, std::generic_category(), what) {}
};

[[noreturn]] inline void throw_errno(const std::string& what) { throw SysError(errno, what); }

// The peer broke the protocol or shared memory is corrupt (bad frame, missing handles).
class ProtocolError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace ringpool
