// Zygote mode, the parent's side (see spawner.hpp; the zygote's side is zygote.cpp).
//
// States: down -> starting (launched, HELLO sent, waiting for its READY) -> ready. Requests queue
// while the zygote starts and go out one at a time (PROCESS, answered by PROCESS with the pid and a
// pidfd, or ERROR). The zygote's pidfd is watched: when it ends, the request in flight fails, and
// if it never became ready every queued request fails with it (a preload that crashes would
// otherwise be restarted forever); otherwise the next request starts a new incarnation.
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cerrno>
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ringpool/detail/control.hpp"
#include "ringpool/error.hpp"
#include "ringpool/spawner.hpp"

namespace ringpool {

namespace {

namespace asio = boost::asio;
using proto::Kind;

class ZygoteSpawner final : public Spawner {
 public:
  ZygoteSpawner(asio::io_context& io, ZygoteOptions o) : io_(io), opt_(std::move(o)), timer_(io) {}

  // The supervisor's last act on its thread (no handler of ours runs after it): the zygote and
  // the unused spares are our children, so they are stopped and reaped here, and a process that
  // makes and drops supervisors (a C++ service recreating its Pool, a context's shutdown()) keeps
  // no zombies. It must run before the thread ends: the zygote and the spares die by
  // PR_SET_PDEATHSIG with it, and a spare the zygote forked but had not reported yet would then
  // be a child nobody knows.
  void finish() override {
    std::deque<ChildProcess> unread;  // children the zygote reported after our last read
    if (control_) {
      try {
        send_control(control_->native_handle(), Kind::SHUTDOWN, 0, 0, {});
      } catch (...) {
      }
      drain_answers(control_->native_handle(), unread, std::chrono::seconds(1));
    }
    control_.reset();  // unused spares exit when they see the zygote's sockets close
    watch_.reset();
    spare_watch_.clear();
    timer_.cancel();
    std::vector<ChildProcess*> kids;
    if (zygote_) kids.push_back(&*zygote_);
    if (assigned_) kids.push_back(&*assigned_);
    for (auto& c : spares_) kids.push_back(&c);
    for (auto& c : dead_spares_) kids.push_back(&c);
    for (auto& c : unread) kids.push_back(&c);
    reap_within(kids, std::chrono::seconds(2));
    zygote_.reset();
    assigned_.reset();
    spares_.clear();
    dead_spares_.clear();
    state_ = State::down;
  }

  // Destroyed after the io thread's end; finish() has normally run already (then there is nothing
  // left to do). If it has not, the zygote and spares died with the thread: reap what is known.
  ~ZygoteSpawner() override { finish(); }

  // Reads what the zygote still says before it exits (it ends after SHUTDOWN, closing the
  // socket): a process it forked for a request whose answer the io loop did not read (a spare
  // forked just before the stop) is our child all the same, and must be reaped.
  static void drain_answers(int sock, std::deque<ChildProcess>& out, std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return;
      pollfd p{sock, POLLIN, 0};
      const int r = ::poll(&p, 1, static_cast<int>(left.count()));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return;
      bool would_block = false;
      std::optional<ControlMessage> m;
      try {
        m = try_recv_control(sock, would_block);
      } catch (const std::exception&) {
        return;
      }
      if (would_block) continue;
      if (!m) return;  // the zygote is gone
      if (m->kind() == Kind::PROCESS && m->fds.size() == 1)
        out.emplace_back(static_cast<pid_t>(m->header.aux), std::move(m->fds[0]));
    }
  }

  // Waits for the children to exit and reaps them; SIGKILLs those still running at the deadline.
  static void reap_within(const std::vector<ChildProcess*>& kids, std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (ChildProcess* c : kids) {
      if (c->sentinel() < 0) continue;  // moved from
      for (;;) {
        try {
          if (c->poll()) break;
        } catch (const std::exception&) {
          break;
        }
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
          c->send_signal(SIGKILL);
          try {
            for (int i = 0; i < 100 && !c->wait(); ++i) {  // EINTR
            }
          } catch (const std::exception&) {
          }
          break;
        }
        pollfd pfd{c->sentinel(), POLLIN, 0};
        ::poll(&pfd, 1, static_cast<int>(std::min<std::int64_t>(left.count(), 100)));
      }
    }
  }

  const char* mode() const noexcept override { return "zygote"; }
  pid_t zygote_pid() const noexcept override { return zygote_ ? zygote_->pid() : -1; }

  void spawn(SpawnRequest req, SpawnHandler done) override {
    queue_.push_back({std::move(req), std::move(done)});
    pump();
  }

  void start(ReadyHandler done) override {
    if (state_ == State::ready) {
      done(nullptr);
      return;
    }
    ready_waiters_.push_back(std::move(done));
    if (state_ == State::down) launch();
  }

  void stop() override {
    if (state_ == State::down || !control_) return;
    stopping_ = true;
    try {
      send_control(control_->native_handle(), Kind::SHUTDOWN, 0, 0, {});
    } catch (const std::exception&) {
      kill_zygote("could not be told to stop");
    }
  }

 private:
  enum class State { down, starting, ready };
  struct Pending {
    SpawnRequest req;
    SpawnHandler done;
  };

  void pump() {
    if (in_flight_ != InFlight::none) return;
    if (state_ == State::down) {
      if (!queue_.empty()) launch();
      return;
    }
    if (state_ != State::ready) return;
    std::vector<int> fds;
    std::uint32_t payload[4] = {0, 0, 0, 0};  // stdio mask, flags, spare pid, reserved
    if (!queue_.empty()) {
      Pending& p = queue_.front();
      for (int k = 0; k < 3; ++k)
        if (p.req.stdio[k] >= 0) {
          payload[0] |= 1u << k;
          fds.push_back(p.req.stdio[k]);
        }
      fds.insert(fds.end(), p.req.fds.begin(), p.req.fds.end());
      if (!spares_.empty()) {
        assigned_.emplace(std::move(spares_.front()));
        spares_.pop_front();
        spare_watch_.erase(assigned_->pid());  // a worker now: the supervisor watches it
        payload[2] = static_cast<std::uint32_t>(assigned_->pid());
      }
      in_flight_ = InFlight::request;
      refill_due_ = false;
    } else if (static_cast<int>(spares_.size()) < opt_.spares && !spares_failed_) {
      if (!refill_due_) {
        // Refill once starts have been quiet for a moment: a burst of start()s (a DataLoader's
        // workers) should not wait behind the fork of a spare.
        if (!refill_armed_) {
          refill_armed_ = true;
          refill_timer_.expires_after(std::chrono::milliseconds(100));
          refill_timer_.async_wait([this](boost::system::error_code ec) {
            refill_armed_ = false;
            if (ec) return;
            refill_due_ = true;
            pump();
          });
        }
        return;
      }
      payload[1] = 1;  // fork a spare
      in_flight_ = InFlight::spare;
    } else {
      return;
    }
    try {
      send_control(control_->native_handle(), Kind::PROCESS, ++seq_, 0,
                   std::string_view(reinterpret_cast<const char*>(payload), sizeof payload), fds);
    } catch (const std::length_error& e) {
      in_flight_ = InFlight::none;
      if (assigned_) {  // not sent: the spare stays a spare
        watch_spare(*assigned_);
        spares_.push_front(std::move(*assigned_));
        assigned_.reset();
      }
      finish_front(std::make_exception_ptr(std::invalid_argument(
          std::string("a worker cannot be given so many descriptors through the zygote: ") + e.what())));
      return pump();
    } catch (const std::exception& e) {
      kill_zygote(std::string("could not be sent a request: ") + e.what());
      return;
    }
    arm_timer(opt_.fork_timeout, "did not answer a fork request");
  }

  // A spare that ends unused (its zygote went away) is ours to reap.
  void watch_spare(const ChildProcess& spare) {
    const pid_t pid = spare.pid();
    try {
      auto sd = std::make_unique<asio::posix::stream_descriptor>(io_, open_pidfd(pid).release());
      sd->async_wait(asio::posix::stream_descriptor::wait_read, [this, pid](boost::system::error_code ec) {
        if (ec) return;  // cancelled: it became a worker
        spare_watch_.erase(pid);
        reap_spare(pid);
      });
      spare_watch_[pid] = std::move(sd);
    } catch (const std::exception&) {
    }
  }

  void reap_spare(pid_t pid) {
    for (auto it = spares_.begin(); it != spares_.end(); ++it)
      if (it->pid() == pid) {
        it->poll();
        spares_.erase(it);
        return;
      }
    for (auto it = dead_spares_.begin(); it != dead_spares_.end(); ++it)
      if (it->pid() == pid) {
        it->poll();
        dead_spares_.erase(it);
        return;
      }
  }

  void launch() {
    ++incarnation_;
    state_ = State::starting;
    death_reason_.clear();
    try {
      auto [ours, theirs] = control_socketpair();
      LaunchOptions lo = opt_.launch;
      lo.fds.emplace_back(theirs.get(), kZygoteControlFd);
      lo.parent_death_signal = SIGKILL;
      zygote_.emplace(ChildProcess::launch(lo));
      theirs.reset();
      send_control(ours.get(), Kind::HELLO, 0, 0, opt_.config);
      control_.emplace(io_, ours.release());
      watch_.emplace(io_, open_pidfd(zygote_->pid()).release());  // not a dup: see Supervisor::watch
    } catch (...) {
      const auto err = std::current_exception();
      control_.reset();
      if (zygote_) {
        zygote_->send_signal(SIGKILL);
        zygote_->wait();
        zygote_.reset();
      }
      state_ = State::down;
      fail_all(err);
      return;
    }
    watch_->async_wait(asio::posix::stream_descriptor::wait_read, [this, inc = incarnation_](boost::system::error_code ec) {
      if (!ec && inc == incarnation_) on_exited();
    });
    arm_timer(opt_.ready_timeout, "did not finish its preload in time");
    wait_control();
  }

  void arm_timer(std::chrono::milliseconds after, const char* what) {
    timer_.expires_after(after);
    timer_.async_wait([this, what, after, inc = incarnation_](boost::system::error_code ec) {
      if (ec || inc != incarnation_) return;
      kill_zygote(std::string(what) + " (" + std::to_string(after.count()) + " ms)");
    });
  }

  void wait_control() {
    control_->async_wait(asio::posix::stream_descriptor::wait_read, [this, inc = incarnation_](boost::system::error_code ec) {
      if (ec || inc != incarnation_ || !control_) return;
      on_control_readable();
    });
  }

  void on_control_readable() {
    std::optional<ControlMessage> m;
    bool would_block = false;
    try {
      m = try_recv_control(control_->native_handle(), would_block);
    } catch (const ControlHandlesDropped& e) {
      // We are out of descriptors: not the zygote's fault, and the zygote stays.
      if (state_ == State::ready && in_flight_ != InFlight::none && e.header.seq == seq_ &&
          static_cast<Kind>(e.header.kind) == Kind::PROCESS)
        return lost_pidfd(static_cast<pid_t>(e.header.aux), e);
      kill_zygote(std::string("sent a message whose descriptors could not be received: ") + e.what());
      return;
    } catch (const std::exception& e) {
      kill_zygote(std::string("sent a bad message: ") + e.what());
      return;
    }
    if (would_block) return wait_control();
    if (!m) {  // the zygote closed its end: it is exiting; its pidfd will say how
      control_.reset();
      return;
    }
    if (state_ == State::starting) {
      if (m->kind() != Kind::HELLO) {
        kill_zygote("sent something other than READY first");
        return;
      }
      timer_.cancel();
      if (m->header.aux != 0) {
        // The preload failed; the zygote exits on its own after saying why.
        death_reason_ = "failed to preload:\n" + m->payload;
        return wait_control();
      }
      state_ = State::ready;
      if (on_zygote_ready) on_zygote_ready(m->payload);
      spares_failed_ = false;
      refill_due_ = true;  // the first spares right away
      auto waiters = std::move(ready_waiters_);
      ready_waiters_.clear();
      for (auto& w : waiters) w(nullptr);
      pump();
      return wait_control();
    }
    if (in_flight_ == InFlight::none || m->header.seq != seq_) {
      kill_zygote("answered a request that was not asked");
      return;
    }
    const InFlight what = in_flight_;
    in_flight_ = InFlight::none;
    timer_.cancel();
    if (what == InFlight::spare) {
      if (m->kind() == Kind::PROCESS && m->fds.size() == 1) {
        ChildProcess spare(static_cast<pid_t>(m->header.aux), std::move(m->fds[0]));
        watch_spare(spare);
        spares_.push_back(std::move(spare));
      } else {
        spares_failed_ = true;  // not again for this incarnation; workers are forked on demand
      }
    } else if (m->kind() == Kind::PROCESS && m->fds.size() == 1) {
      // Forked for this request (no spare, or the spare had died: reap it when it is gone).
      if (assigned_) {
        watch_spare(*assigned_);
        dead_spares_.push_back(std::move(*assigned_));
        assigned_.reset();
      }
      Spawned s{ChildProcess(static_cast<pid_t>(m->header.aux), std::move(m->fds[0])), incarnation_};
      auto p = std::move(queue_.front());
      queue_.pop_front();
      p.done(nullptr, std::move(s));
    } else if (m->kind() == Kind::PROCESS && m->fds.empty() && assigned_ &&
               static_cast<pid_t>(m->header.aux) == assigned_->pid()) {
      Spawned s{std::move(*assigned_), incarnation_};
      assigned_.reset();
      auto p = std::move(queue_.front());
      queue_.pop_front();
      p.done(nullptr, std::move(s));
    } else if (m->kind() == Kind::ERROR) {
      if (assigned_) {
        watch_spare(*assigned_);
        dead_spares_.push_back(std::move(*assigned_));
        assigned_.reset();
      }
      const int err = static_cast<int>(m->header.aux);
      finish_front(err != 0 ? std::make_exception_ptr(SysError(err, "zygote fork: " + m->payload))
                            : std::make_exception_ptr(std::runtime_error("zygote fork: " + m->payload)));
    } else {
      kill_zygote("answered a fork request with a malformed message");
      return;
    }
    pump();
    wait_control();
  }

  // The zygote forked `pid` for the request in flight, but its pidfd did not reach us (no
  // descriptor free). It is our child all the same (forked with CLONE_PARENT, and unreaped its
  // pid cannot be reused): kill and reap it by pid, and fail the request (a spare: forked on
  // demand from now on) with EMFILE, to be retried once descriptors are back.
  void lost_pidfd(pid_t pid, const ControlHandlesDropped& e) {
    const InFlight what = in_flight_;
    in_flight_ = InFlight::none;
    timer_.cancel();
    if (pid > 0 && pid != ::getpid()) {
      ::kill(pid, SIGKILL);
      int status;
      while (::waitpid(pid, &status, __WALL) < 0 && errno == EINTR) {
      }
    }
    if (what == InFlight::spare) {
      spares_failed_ = true;
    } else {
      if (assigned_) {  // the spare it was to hand over had died: reap it when it is gone
        watch_spare(*assigned_);
        dead_spares_.push_back(std::move(*assigned_));
        assigned_.reset();
      }
      finish_front(std::make_exception_ptr(SysError(EMFILE, std::string("zygote fork: ") + e.what())));
    }
    pump();
    wait_control();
  }

  void finish_front(std::exception_ptr err) {
    auto p = std::move(queue_.front());
    queue_.pop_front();
    p.done(std::move(err), {});
  }

  void fail_all(std::exception_ptr err) {
    auto q = std::move(queue_);
    queue_.clear();
    in_flight_ = InFlight::none;
    for (auto& p : q) p.done(err, {});
    auto waiters = std::move(ready_waiters_);
    ready_waiters_.clear();
    for (auto& w : waiters) w(err);
  }

  void kill_zygote(std::string reason) {
    if (death_reason_.empty()) death_reason_ = std::move(reason);
    if (zygote_) zygote_->send_signal(SIGKILL);
  }

  void on_exited() {
    timer_.cancel();
    const pid_t pid = zygote_ ? zygote_->pid() : -1;
    int code = 255;
    if (zygote_) {
      if (auto c = zygote_->poll()) code = *c;
      zygote_.reset();
    }
    control_.reset();
    watch_.reset();
    const bool was_ready = state_ == State::ready;
    state_ = State::down;
    const std::uint64_t inc = incarnation_;
    std::string what = "ringpool zygote (pid " + std::to_string(pid) + ") ";
    what += death_reason_.empty() ? "exited with code " + std::to_string(code) : death_reason_;
    const auto err = std::make_exception_ptr(std::runtime_error(what));
    // Its spares see their sockets close and exit; their watches reap them.
    for (auto& sp : spares_) dead_spares_.push_back(std::move(sp));
    spares_.clear();
    spares_failed_ = false;
    if (assigned_) {
      dead_spares_.push_back(std::move(*assigned_));
      assigned_.reset();
    }
    if (!was_ready) {
      fail_all(err);  // it never came up: do not restart it for every queued request
    } else if (in_flight_ == InFlight::request) {
      in_flight_ = InFlight::none;
      finish_front(err);
    }
    in_flight_ = InFlight::none;
    const bool orderly = stopping_ && was_ready;
    stopping_ = false;
    if (on_zygote_exit) {
      // One line for a log record: a preload's traceback shortened to its first and last lines.
      std::string brief = what;
      if (const auto nl = brief.find('\n'); nl != std::string::npos) {
        const auto end = brief.find_last_not_of("\n ");
        const auto from = brief.rfind('\n', end);
        brief = brief.substr(0, nl) + " ... " + brief.substr(from + 1, end - from);
      }
      on_zygote_exit(inc, orderly, pid, code, was_ready ? brief : brief + " (before it was ready)");
    }
    pump();
  }

  asio::io_context& io_;
  ZygoteOptions opt_;
  State state_ = State::down;
  std::optional<ChildProcess> zygote_;
  std::optional<asio::posix::stream_descriptor> control_;
  std::optional<asio::posix::stream_descriptor> watch_;
  asio::steady_timer timer_;
  std::deque<Pending> queue_;
  std::vector<ReadyHandler> ready_waiters_;
  enum class InFlight { none, request, spare };
  InFlight in_flight_ = InFlight::none;
  std::deque<ChildProcess> spares_;                 // forked ahead, waiting in the zygote's hands
  std::deque<ChildProcess> dead_spares_;            // ending unused: reaped when their pidfd fires
  std::optional<ChildProcess> assigned_;            // the spare of the request in flight
  std::map<pid_t, std::unique_ptr<asio::posix::stream_descriptor>> spare_watch_;
  bool spares_failed_ = false;
  bool refill_due_ = false;
  bool refill_armed_ = false;
  asio::steady_timer refill_timer_{io_};
  bool stopping_ = false;
  std::uint64_t incarnation_ = 0;
  std::uint64_t seq_ = 0;
  std::string death_reason_;
};

}  // namespace

std::unique_ptr<Spawner> make_zygote_spawner(asio::io_context& io, ZygoteOptions options) {
  return std::make_unique<ZygoteSpawner>(io, std::move(options));
}

}  // namespace ringpool
