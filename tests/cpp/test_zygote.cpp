// The spawner: fork_sibling's glibc fix-ups, the supervisor in exec mode, and the whole zygote
// exchange against a C++ zygote (this binary run with --test-zygote).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <string>
#include <thread>

#include "ringpool/detail/control.hpp"
#include "ringpool/detail/zygote.hpp"
#include "ringpool/error.hpp"
#include "ringpool/supervisor.hpp"

using namespace ringpool;

// The test zygote: HELLO config "fail" makes its preload fail. Each worker writes
// "<pid> <ppid>\n" on its first descriptor, then obeys one command byte from its second:
// 'e' + code: exit with that code; anything else or EOF: exit 0.
int test_zygote_main() {
  try {
    const std::string config = zygote_receive_config(kZygoteControlFd, 10000);
    if (config == "fail") {
      zygote_send_ready(kZygoteControlFd, false, "ModuleNotFoundError: no module named 'nope'");
      return 1;
    }
    zygote_send_ready(kZygoteControlFd, true, "");
    auto w = zygote_serve(kZygoteControlFd, ZygoteHooks{});
    if (!w) return 0;
    const std::string line = std::to_string(::getpid()) + " " + std::to_string(::getppid()) + "\n";
    if (::write(w->fd_base, line.data(), line.size()) < 0) ::_exit(90);
    char cmd[2] = {0, 0};
    if (::read(w->fd_base + 1, cmd, 2) == 2 && cmd[0] == 'e') ::_exit(cmd[1]);
    ::_exit(0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test zygote: %s\n", e.what());
    return 2;
  }
}

namespace {

std::string read_line(int fd, int timeout_ms = 10000) {
  std::string s;
  char c;
  while (true) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) break;
    if (::read(fd, &c, 1) != 1 || c == '\n') break;
    s += c;
  }
  return s;
}

ZygoteOptions test_zygote(const std::string& config) {
  ZygoteOptions o;
  o.launch.executable = "/proc/self/exe";
  o.launch.argv = {"ringpool_cpp_tests", "--test-zygote"};
  o.launch.env = {"PATH=/usr/bin:/bin"};
  o.config = config;
  o.ready_timeout = std::chrono::milliseconds(20000);
  return o;
}

struct Pipe {
  UniqueFd r, w;
  Pipe() {
    int p[2];
    REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
    r = UniqueFd(p[0]);
    w = UniqueFd(p[1]);
  }
};

}  // namespace

TEST_CASE("fork_sibling: the child is our parent's child, with glibc's tid and robust list right") {
  // Shared memory with a robust, process-shared mutex and a result slot.
  struct Shared {
    pthread_mutex_t mu;
    int owner_tid;
    int tid;
  };
  void* mem = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  REQUIRE(mem != MAP_FAILED);
  auto* sh = new (mem) Shared{};
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(&sh->mu, &a);
  Pipe report;
  const pid_t middle = ::fork();  // the "zygote": single-threaded, our child
  if (middle == 0) {
    UniqueFd pidfd;
    const pid_t s = fork_sibling(&pidfd);
    if (s == 0) {  // the sibling: lock and die holding the lock
      pthread_mutex_lock(&sh->mu);
      sh->owner_tid = sh->mu.__data.__owner;
      sh->tid = static_cast<int>(::syscall(SYS_gettid));
      ::_exit(5);
    }
    if (::write(report.w.get(), &s, sizeof s) != sizeof s) ::_exit(1);
    ::_exit(0);
  }
  int st = 0;
  REQUIRE(::waitpid(middle, &st, 0) == middle);
  CHECK(WIFEXITED(st));
  CHECK(WEXITSTATUS(st) == 0);
  pid_t sibling = -1;
  REQUIRE(::read(report.r.get(), &sibling, sizeof sibling) == sizeof sibling);
  REQUIRE(sibling > 0);
  // It is our child: we can wait for it and see its exit code.
  siginfo_t si{};
  REQUIRE(::waitid(P_PID, static_cast<id_t>(sibling), &si, WEXITED) == 0);
  CHECK(si.si_code == CLD_EXITED);
  CHECK(si.si_status == 5);
  CHECK(sh->tid == sibling);
  CHECK(sh->owner_tid == sibling);  // glibc's cached tid was set by the kernel
  // The robust list was registered: the kernel marked the mutex as owner-dead at its exit.
  CHECK(pthread_mutex_lock(&sh->mu) == EOWNERDEAD);
  pthread_mutex_consistent(&sh->mu);
  pthread_mutex_unlock(&sh->mu);
  ::munmap(mem, sizeof(Shared));
}

TEST_CASE("fork_sibling refuses a multithreaded process") {
  std::thread t([] { std::this_thread::sleep_for(std::chrono::milliseconds(300)); });
  CHECK_THROWS_WITH_AS(fork_sibling(nullptr), doctest::Contains("threads"), std::runtime_error);
  t.join();
}

TEST_CASE("supervisor, exec mode: spawn from any thread, exit codes observed, pdeathsig from its thread") {
  auto sup = Supervisor::exec_mode();
  CHECK(std::string(sup->mode()) == "exec");
  Pipe p;
  SpawnRequest r;
  r.program.executable = "/bin/sh";
  r.program.argv = {"sh", "-c", "echo ok >&3; exit 7"};
  r.program.env = {"PATH=/usr/bin:/bin"};
  r.fds = {p.w.get()};
  ChildProcess c;
  // From a thread that ends right away: the worker must not die with it.
  std::thread([&] { c = sup->spawn(r); }).join();
  p.w.reset();
  CHECK(read_line(p.r.get()) == "ok");
  CHECK(c.wait() == 7);
  for (int i = 0; i < 200 && !sup->live_workers().empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(sup->live_workers().empty());
  r.program.executable = "/nonexistent/python";
  CHECK_THROWS_AS(sup->spawn(r), SysError);
}

TEST_CASE("supervisor, zygote mode: workers are our children, the zygote's death kills them, a new one starts") {
  auto sup = Supervisor::zygote_mode(test_zygote("ok"));
  CHECK(std::string(sup->mode()) == "zygote");
  sup->start();
  const pid_t zygote = sup->zygote_pid();
  CHECK(zygote > 0);
  Pipe report, cmd;
  SpawnRequest r;
  r.fds = {report.w.get(), cmd.r.get()};
  ChildProcess c = sup->spawn(r);
  report.w.reset();
  cmd.r.reset();
  const std::string line = read_line(report.r.get());
  CHECK(line == std::to_string(c.pid()) + " " + std::to_string(::getpid()));
  const char exit9[2] = {'e', 9};
  REQUIRE(::write(cmd.w.get(), exit9, 2) == 2);
  CHECK(c.wait() == 9);

  // A running worker of a zygote that dies is killed; the next spawn starts a new zygote.
  Pipe report2, cmd2;
  r.fds = {report2.w.get(), cmd2.r.get()};
  ChildProcess c2 = sup->spawn(r);
  report2.w.reset();
  cmd2.r.reset();
  CHECK(!read_line(report2.r.get()).empty());
  ::kill(zygote, SIGKILL);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(c2.wait() == -SIGKILL);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));
  for (int i = 0; i < 200 && sup->zygote_exits() == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(sup->zygote_exits() == 1);
  Pipe report3, cmd3;
  r.fds = {report3.w.get(), cmd3.r.get()};
  ChildProcess c3 = sup->spawn(r);
  report3.w.reset();
  cmd3.w.reset();  // EOF: exit 0
  cmd3.r.reset();
  CHECK(!read_line(report3.r.get()).empty());
  CHECK(c3.wait() == 0);
  CHECK(sup->zygote_pid() != zygote);
  CHECK(sup->zygote_pid() > 0);
}

TEST_CASE("supervisor, zygote mode: a failed preload fails the spawn with the zygote's message") {
  auto sup = Supervisor::zygote_mode(test_zygote("fail"));
  Pipe p;
  SpawnRequest r;
  r.fds = {p.w.get()};
  CHECK_THROWS_WITH_AS(sup->spawn(r), doctest::Contains("no module named 'nope'"), std::runtime_error);
  CHECK_THROWS_WITH_AS(sup->start(), doctest::Contains("failed to preload"), std::runtime_error);
}

TEST_CASE("control: a peer's last message is read even when it closed with ours unread (ECONNRESET first)") {
  // The zygote answers a request, then reads SHUTDOWN and exits while a second SHUTDOWN of ours
  // sits unread: the kernel then reports ECONNRESET to us ahead of the answer still queued.
  auto [ours, theirs] = control_socketpair();
  send_control(ours.get(), proto::Kind::SHUTDOWN, 1, 0, {});  // never read by the peer
  const int fd = ours.get();  // any descriptor to pass along, as an answer carries a pidfd
  send_control(theirs.get(), proto::Kind::PROCESS, 7, 1234, {}, std::span<const int>(&fd, 1));
  theirs.reset();
  bool would_block = false;
  auto m = try_recv_control(ours.get(), would_block);
  REQUIRE(m.has_value());
  CHECK(m->kind() == proto::Kind::PROCESS);
  CHECK(m->header.aux == 1234);
  CHECK(m->fds.size() == 1);
  auto end = try_recv_control(ours.get(), would_block);
  CHECK_FALSE(end.has_value());
  CHECK_FALSE(would_block);
}
