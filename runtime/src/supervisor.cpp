#include "ringpool/supervisor.hpp"

#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <future>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "ringpool/error.hpp"

namespace ringpool {

namespace asio = boost::asio;

struct Supervisor::Impl {
  struct Worker {
    std::uint64_t zygote;
    std::unique_ptr<asio::posix::stream_descriptor> pidfd;  // our own pidfd of the worker
  };

  // Order matters for destruction: handlers' objects before the io_context.
  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
  std::unique_ptr<Spawner> spawner;
  std::map<pid_t, Worker> live;
  std::map<pid_t, int> exited;  // bounded: oldest entries dropped
  std::uint64_t zygote_exits = 0;
  LogHandler log;            // set_log's; read and written on the io thread only
  pid_t last_zygote = -1;    // the latest zygote that ended, and whether it died (not stopped)
  bool last_zygote_died = false;
  std::mutex note_mu;  // guards note: written on the io thread, read by any
  std::string note;
  std::thread thread;

  template <class F>
  auto call(F f) -> decltype(f()) {
    std::packaged_task<decltype(f())()> task(std::move(f));
    auto fut = task.get_future();
    asio::post(io, [&task] { task(); });
    return fut.get();
  }

  void watch(pid_t pid, std::uint64_t zygote, ExitHandler on_exit) {
    // A pidfd of our own (not a dup: Asio makes its descriptor non-blocking, and a dup would share
    // that flag with the owner's pidfd, whose blocking waitid would then fail with EAGAIN). The
    // worker is our child and not reaped yet, so its pid cannot have been reused.
    auto sd = std::make_unique<asio::posix::stream_descriptor>(io, open_pidfd(pid).release());
    auto* raw = sd.get();
    live[pid] = Worker{zygote, std::move(sd)};
    raw->async_wait(asio::posix::stream_descriptor::wait_read, [this, pid, raw, on_exit = std::move(on_exit)](
                                                                     boost::system::error_code ec) {
      if (ec) return;
      int code = -1;  // unknown (the owner reaped it first)
      siginfo_t si{};
      // WNOWAIT: observe, do not reap; the ChildProcess owner reaps (and DataLoader's SIGCHLD
      // handler, which also uses WNOWAIT, must still find the zombie).
      if (::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(raw->native_handle()), &si,
                   WEXITED | WNOHANG | WNOWAIT) == 0 &&
          si.si_pid != 0) {
        code = si.si_code == CLD_EXITED ? si.si_status : -si.si_status;
        exited[pid] = code;
        if (exited.size() > 4096) exited.erase(exited.begin());
      }
      live.erase(pid);
      if (on_exit) on_exit(pid, code);
    });
  }

  void on_zygote_exit(std::uint64_t incarnation, bool orderly, pid_t zygote, int code, const std::string& what) {
    ++zygote_exits;
    last_zygote = zygote;
    last_zygote_died = !orderly;
    if (orderly) {  // stop(): its workers run on (each dies with this thread, not with it)
      emit_log(log, LogEvent::zygote_stopped, "zygote stopped (pid " + std::to_string(zygote) + ")", zygote, code);
      return;
    }
    int killed = 0;
    for (auto& [pid, w] : live)
      if (w.zygote == incarnation) {
        ::syscall(SYS_pidfd_send_signal, w.pidfd->native_handle(), SIGKILL, nullptr, 0);
        ++killed;
      }
    emit_log(log, LogEvent::zygote_died,
             what + (killed ? "; killing the " + std::to_string(killed) + " worker(s) it forked" : std::string()) +
                 "; the next start starts a new zygote",
             zygote, code);
  }

  // A zygote incarnation is ready (its READY arrived).
  void on_zygote_ready() {
    const pid_t pid = spawner->zygote_pid();
    if (last_zygote > 0 && last_zygote_died)
      emit_log(log, LogEvent::zygote_restarted,
               "zygote restarted (pid " + std::to_string(pid) + ") after the previous one (pid " +
                   std::to_string(last_zygote) + ") died",
               pid);
    else if (last_zygote > 0)
      emit_log(log, LogEvent::zygote_started,
               "zygote started again (pid " + std::to_string(pid) + ") after pid " + std::to_string(last_zygote) +
                   " was stopped",
               pid);
    else
      emit_log(log, LogEvent::zygote_started, "zygote started (pid " + std::to_string(pid) + ")", pid);
  }
};

Supervisor::Supervisor(SpawnerFactory make_spawner) : impl_(new Impl), owner_(::getpid()) {
  impl_->spawner = make_spawner(impl_->io);
  impl_->spawner->on_zygote_ready = [impl = impl_](const std::string& note) {
    {
      std::lock_guard<std::mutex> g(impl->note_mu);
      impl->note = note;
    }
    impl->on_zygote_ready();
  };
  impl_->spawner->on_zygote_exit = [impl = impl_](std::uint64_t inc, bool orderly, pid_t pid, int code,
                                                   const std::string& what) {
    impl->on_zygote_exit(inc, orderly, pid, code, what);
  };
  impl_->thread = std::thread([impl = impl_] {
    // Signals are for the application's threads (Python handles them in the main thread).
    sigset_t all;
    sigfillset(&all);
    ::pthread_sigmask(SIG_SETMASK, &all, nullptr);
    for (;;) {
      try {
        impl->io.run();
        return;
      } catch (const std::exception&) {
        // A handler threw: keep serving (the handler's own request has already failed).
      }
    }
  });
}

Supervisor::~Supervisor() {
  if (::getpid() != owner_) return;  // a forked child: the thread is not here; leak the state
  asio::post(impl_->io, [impl = impl_] {
    // A zygote still here is stopped and reaped by finish(), whose end on_zygote_exit never sees.
    const pid_t zygote = impl->spawner->zygote_pid();
    impl->spawner->finish();
    if (zygote > 0)
      emit_log(impl->log, LogEvent::zygote_stopped, "zygote stopped (pid " + std::to_string(zygote) + ")", zygote);
    impl->work.reset();
    impl->io.stop();
  });
  impl_->thread.join();
  delete impl_;
}

std::unique_ptr<Supervisor> Supervisor::exec_mode() {
  return std::make_unique<Supervisor>([](asio::io_context&) { return make_exec_spawner(); });
}

std::unique_ptr<Supervisor> Supervisor::zygote_mode(ZygoteOptions options) {
  return std::make_unique<Supervisor>(
      [o = std::move(options)](asio::io_context& io) mutable { return make_zygote_spawner(io, std::move(o)); });
}

namespace {
void check_owner(pid_t owner) {
  if (::getpid() != owner)
    throw std::logic_error("a ringpool Supervisor cannot be used in a forked child of the process that made it");
}
}  // namespace

ChildProcess Supervisor::spawn(SpawnRequest req, ExitHandler on_exit) {
  check_owner(owner_);
  std::promise<ChildProcess> done;
  auto fut = done.get_future();
  asio::post(impl_->io, [impl = impl_, &done, req = std::move(req), on_exit = std::move(on_exit)]() mutable {
    impl->spawner->spawn(std::move(req), [impl, &done, on_exit = std::move(on_exit)](std::exception_ptr err,
                                                                                      Spawned s) mutable {
      if (err) {
        done.set_exception(err);
        return;
      }
      try {
        impl->watch(s.process.pid(), s.zygote, std::move(on_exit));
      } catch (const std::exception& e) {
        // Unwatched, its exit would never be reported: a crash unnoticed, and an owner waiting
        // for that exit (a pool's shutdown) waiting for ever. It is killed and reaped instead,
        // and the spawn fails (out of descriptors for its pidfd, say).
        try {
          s.process.send_signal(SIGKILL);
          while (!s.process.wait()) {  // EINTR
          }
        } catch (const std::exception&) {  // not ours to reap after all: the kill is what matters
        }
        done.set_exception(std::make_exception_ptr(
            std::runtime_error(std::string("the new process could not be watched (killed): ") + e.what())));
        return;
      }
      done.set_value(std::move(s.process));
    });
  });
  return fut.get();
}

void Supervisor::start() {
  check_owner(owner_);
  std::promise<void> ready;
  auto fut = ready.get_future();
  asio::post(impl_->io, [impl = impl_, &ready] {
    impl->spawner->start([&ready](std::exception_ptr err) {
      if (err) ready.set_exception(err);
      else ready.set_value();
    });
  });
  fut.get();
}

void Supervisor::start_async() {
  check_owner(owner_);
  asio::post(impl_->io, [impl = impl_] { impl->spawner->start([](std::exception_ptr) {}); });
}

void Supervisor::stop() {
  check_owner(owner_);
  impl_->call([impl = impl_] { impl->spawner->stop(); });
}

void Supervisor::set_log(LogHandler handler) {
  check_owner(owner_);
  impl_->call([impl = impl_, &handler] { impl->log = std::move(handler); });
}

const char* Supervisor::mode() const noexcept { return impl_->spawner->mode(); }

pid_t Supervisor::zygote_pid() {
  check_owner(owner_);
  return impl_->call([impl = impl_] { return impl->spawner->zygote_pid(); });
}

std::vector<pid_t> Supervisor::live_workers() {
  check_owner(owner_);
  return impl_->call([impl = impl_] {
    std::vector<pid_t> v;
    for (auto& [pid, w] : impl->live) v.push_back(pid);
    return v;
  });
}

std::optional<int> Supervisor::exit_code(pid_t pid) {
  check_owner(owner_);
  return impl_->call([impl = impl_, pid]() -> std::optional<int> {
    auto it = impl->exited.find(pid);
    if (it == impl->exited.end()) return std::nullopt;
    return it->second;
  });
}

std::string Supervisor::zygote_note() {
  std::lock_guard<std::mutex> g(impl_->note_mu);
  return impl_->note;
}

std::uint64_t Supervisor::zygote_exits() {
  check_owner(owner_);
  return impl_->call([impl = impl_] { return impl->zygote_exits; });
}

}  // namespace ringpool
