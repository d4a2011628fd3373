// ChildProcess: launching with exact descriptors, exit codes, pidfd signals and sentinels.
#include <doctest/doctest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "ringpool/error.hpp"
#include "ringpool/process.hpp"

using namespace ringpool;

namespace {

LaunchOptions sh(const std::string& script) {
  LaunchOptions o;
  o.executable = "/bin/sh";
  o.argv = {"sh", "-c", script};
  o.env = {"PATH=/usr/bin:/bin"};
  return o;
}

std::string read_all(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

bool readable_within(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

}  // namespace

TEST_CASE("process: exit codes in Python's convention") {
  auto c = ChildProcess::launch(sh("exit 3"));
  CHECK(c.pid() > 0);
  CHECK(c.wait() == 3);
  CHECK(c.poll() == 3);  // idempotent
  auto k = ChildProcess::launch(sh("exec sleep 30"));
  CHECK_FALSE(k.poll().has_value());
  CHECK(k.send_signal(SIGKILL));
  CHECK(k.wait() == -SIGKILL);
  CHECK_FALSE(k.send_signal(SIGTERM));  // already exited: not an error
}

TEST_CASE("process: the sentinel becomes readable at exit and stays readable") {
  auto c = ChildProcess::launch(sh("sleep 0.2"));
  CHECK_FALSE(readable_within(c.sentinel(), 0));
  CHECK(readable_within(c.sentinel(), 10000));
  CHECK(c.wait() == 0);
  CHECK(readable_within(c.sentinel(), 0));
}

TEST_CASE("process: the child gets exactly the descriptors it is given") {
  int out[2], extra[2];
  REQUIRE(::pipe(out) == 0);
  REQUIRE(::pipe(extra) == 0);  // open here, not passed: must not show up in the child
  LaunchOptions o = sh("echo via-fd-5 >&5; ls /proc/self/fd >&5");
  o.fds = {{out[1], 5}};
  auto c = ChildProcess::launch(o);
  ::close(out[1]);
  std::string text = read_all(out[0]);
  CHECK(c.wait() == 0);
  std::istringstream lines(text);
  std::string first;
  std::getline(lines, first);
  CHECK(first == "via-fd-5");
  std::set<int> fds;
  for (std::string l; std::getline(lines, l);) fds.insert(std::stoi(l));
  // 0-2, our 5, and the directory ls is reading; never the other pipe or anything else of ours.
  for (int fd : fds) CHECK((fd <= 2 || fd == 5 || fd == 3));
  ::close(out[0]);
  ::close(extra[0]);
  ::close(extra[1]);
}

TEST_CASE("process: descriptors can be moved onto each other's numbers") {
  int a[2], b[2];
  REQUIRE(::pipe(a) == 0);
  REQUIRE(::pipe(b) == 0);
  // Give a's write end as b[1]'s number and b's write end as a[1]'s number (a swap).
  LaunchOptions o = sh("echo A >&" + std::to_string(b[1]) + "; echo B >&" + std::to_string(a[1]));
  o.fds = {{a[1], b[1]}, {b[1], a[1]}};
  auto c = ChildProcess::launch(o);
  ::close(a[1]);
  ::close(b[1]);
  CHECK(read_all(a[0]) == "A\n");
  CHECK(read_all(b[0]) == "B\n");
  CHECK(c.wait() == 0);
  ::close(a[0]);
  ::close(b[0]);
}

TEST_CASE("process: environment, working directory") {
  int out[2];
  REQUIRE(::pipe(out) == 0);
  LaunchOptions o = sh("echo \"$FOO\" >&3; pwd >&3");
  o.env.push_back("FOO=bar baz");
  o.cwd = "/tmp";
  o.fds = {{out[1], 3}};
  auto c = ChildProcess::launch(o);
  ::close(out[1]);
  CHECK(read_all(out[0]) == "bar baz\n/tmp\n");
  CHECK(c.wait() == 0);
  ::close(out[0]);
}

TEST_CASE("process: a failed exec is an error with the child's errno, and no zombie") {
  LaunchOptions o;
  o.executable = "/nonexistent/ringpool-test";
  o.argv = {"x"};
  try {
    ChildProcess::launch(o);
    FAIL("launch should have thrown");
  } catch (const SysError& e) {
    CHECK(e.code().value() == ENOENT);
  }
  CHECK(::waitpid(-1, nullptr, WNOHANG) <= 0);  // nothing left to reap
  o = sh("true");
  o.fds = {{0, 1}};  // targets below 3 are refused
  CHECK_THROWS_AS(ChildProcess::launch(o), SysError);
}

TEST_CASE("process: the parent-death signal takes the child down with its launcher") {
  int pidpipe[2];
  REQUIRE(::pipe(pidpipe) == 0);
  pid_t launcher = ::fork();
  REQUIRE(launcher >= 0);
  if (launcher == 0) {
    LaunchOptions o = sh("exec sleep 60");
    o.parent_death_signal = SIGKILL;
    auto c = ChildProcess::launch(o);
    pid_t p = c.pid();
    (void)!::write(pidpipe[1], &p, sizeof p);
    ::_exit(0);  // the launcher dies; the sleeper must follow
  }
  ::close(pidpipe[1]);
  pid_t sleeper = 0;
  REQUIRE(::read(pidpipe[0], &sleeper, sizeof sleeper) == sizeof sleeper);
  ::close(pidpipe[0]);
  ::waitpid(launcher, nullptr, 0);
  UniqueFd watch;
  try {
    watch = open_pidfd(sleeper);
  } catch (const SysError&) {
    return;  // already gone and reaped
  }
  CHECK(readable_within(watch.get(), 5000));  // exited within 5 s
}
