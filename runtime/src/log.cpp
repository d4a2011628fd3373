#include "ringpool/log.hpp"

namespace ringpool {

const char* to_string(LogEvent event) noexcept {
  switch (event) {
    case LogEvent::worker_started: return "worker_started";
    case LogEvent::worker_replaced: return "worker_replaced";
    case LogEvent::worker_died: return "worker_died";
    case LogEvent::worker_recycled: return "worker_recycled";
    case LogEvent::worker_timed_out: return "worker_timed_out";
    case LogEvent::worker_stopped: return "worker_stopped";
    case LogEvent::spawn_failed: return "spawn_failed";
    case LogEvent::zygote_started: return "zygote_started";
    case LogEvent::zygote_restarted: return "zygote_restarted";
    case LogEvent::zygote_died: return "zygote_died";
    case LogEvent::zygote_stopped: return "zygote_stopped";
    case LogEvent::protocol_error: return "protocol_error";
    case LogEvent::fd_exhausted: return "fd_exhausted";
    case LogEvent::fd_recovered: return "fd_recovered";
    case LogEvent::pool_broken: return "pool_broken";
  }
  return "unknown";
}

LogLevel level_of(LogEvent event) noexcept {
  switch (event) {
    case LogEvent::worker_started:
    case LogEvent::worker_recycled:
    case LogEvent::worker_stopped:
    case LogEvent::zygote_stopped:
      return LogLevel::debug;
    case LogEvent::worker_replaced:
    case LogEvent::zygote_started:
    case LogEvent::zygote_restarted:
    case LogEvent::fd_recovered:
      return LogLevel::info;
    case LogEvent::worker_died:
    case LogEvent::worker_timed_out:
    case LogEvent::spawn_failed:
    case LogEvent::zygote_died:
    case LogEvent::protocol_error:
    case LogEvent::fd_exhausted:
      return LogLevel::warning;
    case LogEvent::pool_broken:
      return LogLevel::error;
  }
  return LogLevel::warning;
}

void emit_log(const LogHandler& handler, LogEvent event, std::string message, pid_t pid, int exit_code,
              int worker) noexcept {
  if (!handler) return;
  try {
    handler(LogRecord{event, level_of(event), std::move(message), pid, exit_code, worker});
  } catch (...) {
    // A handler's failure (or std::bad_alloc building the record) is the handler's business:
    // the event it was told about has already happened and must go on being handled.
  }
}

}  // namespace ringpool
