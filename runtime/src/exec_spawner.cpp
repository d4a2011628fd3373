// Exec mode: a fresh interpreter per worker (see spawner.hpp).
#include <signal.h>

#include "ringpool/spawner.hpp"

namespace ringpool {

namespace {

class ExecSpawner final : public Spawner {
 public:
  const char* mode() const noexcept override { return "exec"; }

  void spawn(SpawnRequest req, SpawnHandler done) override {
    Spawned out;
    try {
      LaunchOptions o = std::move(req.program);
      o.fds.clear();
      for (std::size_t i = 0; i < req.fds.size(); ++i) o.fds.emplace_back(req.fds[i], static_cast<int>(3 + i));
      // The worker dies with us. The supervisor calls this on its own thread, which lives as long
      // as the context, so PR_SET_PDEATHSIG (tied to the launching thread) cannot fire early.
      o.parent_death_signal = SIGKILL;
      out.process = ChildProcess::launch(o);
    } catch (...) {
      done(std::current_exception(), {});
      return;
    }
    done(nullptr, std::move(out));
  }
};

}  // namespace

std::unique_ptr<Spawner> make_exec_spawner() { return std::make_unique<ExecSpawner>(); }

}  // namespace ringpool
