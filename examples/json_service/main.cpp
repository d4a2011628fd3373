// An example C++ service that runs Python functions through ringpool::Pool, and trusts no client.
//
// It accepts newline-delimited JSON requests on a localhost TCP port,
//
//   {"id": 7, "fn": "textjobs:word_count", "args": ["a b a"], "kwargs": {}}
//
// dispatches each to a worker process, and answers on the same connection, one line per request,
// in completion order (match them by id):
//
//   {"id": 7, "ok": true, "result": {"a": 2, "b": 1}}
//   {"id": 8, "ok": false, "error": {"type": "ValueError", "message": "..."}}
//
// Usage: json_service [--port N] [--workers N] [--python PATH] [--python-path DIR]...
//                     [--package NAME=FOLDER]... [--allow MODULE:FUNCTION]... [--exec] [--preload MODULE]...
//                     [--max-request-bytes N] [--max-connections N] [--max-pending N]
//                     [--max-held-bytes N] [--max-reply-bytes N] [--idle-timeout SECONDS]
//                     [--accept-backoff-ms N]
// It prints "listening on 127.0.0.1:PORT" once it accepts connections; SIGINT/SIGTERM stop it
// after the requests in flight are answered (a second signal stops it at once).
//
//   client ──line──► Session: size cap, JSON (json_value.hpp), allow-list (exports.hpp)
//                      │ async_submit                     ▲ post(reply) to the io thread
//                      ▼                                  │
//                    ringpool::Pool ──► Python workers ──► collector thread
//
// - Server: the accept loop (pauses at --max-connections, backs off on EMFILE and the like and
//   resumes), the set of sessions, the signals, and the service-wide budget of bytes held
//   (--max-held-bytes: requests read and not answered, a reply's worth reserved per task in the
//   pool, replies not yet written; while it is spent no connection reads or starts a task; they
//   resume as tasks finish and replies are taken).
// - Session: one connection on the io thread: reads lines, answers each, stops reading while
//   --max-pending replies are owed (backpressure) or the budget is spent, and is closed by its
//   timer when the client idles, dribbles a partial request, or stops reading its replies for
//   --idle-timeout.
// docs/design/security.md ("The example service") lists every check at this boundary.
//
// The Python code never runs in this process: requests become plain-data pickles (ringpool's C++
// codec), and a worker's answer can only ever be plain data. A worker that crashes fails only its
// request (the client gets a WorkerDied error); the pool replaces it and the service goes on.
#include <sys/prctl.h>
#include <sys/resource.h>

#include <utility>  // before Asio: Boost 1.74's awaitable.hpp uses std::exchange without it

#include <array>
#include <boost/asio.hpp>
#include <chrono>
#include <cstdio>
#include <deque>
#include <iostream>
#include <memory>
#include <string>
#include <unordered_map>

#include "exports.hpp"
#include "json_value.hpp"
#include "ringpool/pickle.hpp"
#include "ringpool/pool.hpp"

namespace asio = boost::asio;
using asio::ip::tcp;
using ringpool::Value;
using Clock = std::chrono::steady_clock;

namespace {

// What a client may cost the service; each has a flag (usage()).
struct Limits {
  // A longer line is answered with RequestTooLarge and its connection closed: the bound on what
  // one connection makes the service buffer.
  std::size_t max_request_bytes = 1 << 20;
  // Connections beyond this wait in the kernel's listen backlog (accepting pauses) until one
  // closes. Each costs an fd and up to max_pending tasks, so keep it under RLIMIT_NOFILE.
  std::size_t max_connections = 256;
  // Replies a connection may owe (running, queued in the pool, or not yet written) before the
  // service stops reading from it: bounds its share of the pool and its queued replies.
  std::size_t max_pending = 64;
  // Request bytes the service may hold, over all connections: read and not yet answered (a
  // partial request in a buffer, a request whose task is queued or running in the pool). While
  // this many are held no connection reads; reading resumes as tasks finish. Bounds the memory
  // that max_connections x max_pending requests would otherwise take (a request's task holds its
  // pickled arguments, up to 2.25x its JSON bytes). At least max_request_bytes (checked at start).
  std::size_t max_held_bytes = std::size_t{64} << 20;
  // A reply line (its JSON and newline) longer than this is replaced by a ReplyTooLarge error
  // (the connection goes on). Every task in the pool reserves this much of max_held_bytes until
  // its reply is written: so max_held_bytes / max_reply_bytes tasks run at once, service-wide
  // (a quarter of them per connection), and what their replies can make the service hold is in
  // the budget before they are made. At least max_request_bytes + max_reply_bytes must fit in
  // max_held_bytes (checked at start).
  std::size_t max_reply_bytes = 1 << 20;
  // A connection that sends nothing while owed nothing, leaves a request partial, or does not
  // take a reply, for this long, is closed. Shorter frees slots from idle clients sooner; longer
  // spares slow but honest ones.
  std::chrono::milliseconds idle_timeout{30'000};
  // The first pause after a failed accept (EMFILE, ENFILE, ...); it doubles up to 16 times this
  // while accepts keep failing, so a starved service neither spins nor stays deaf for long.
  std::chrono::milliseconds accept_backoff{100};
};

Value error_reply(const Value& id, const std::string& type, const std::string& message) {
  return Value::dict({{Value("id"), id},
                      {Value("ok"), Value(false)},
                      {Value("error"), Value::dict({{Value("type"), Value(type)}, {Value("message"), Value(message)}})}});
}

Value error_for(const Value& id, std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const ringpool::RemoteError& r) {
    return error_reply(id, r.type_name(), r.message());
  } catch (const ringpool::WorkerDied& d) {
    return error_reply(id, "WorkerDied", d.what());
  } catch (const ringpool::TaskTimeout& t) {
    return error_reply(id, "TaskTimeout", t.what());
  } catch (const ringpool::PoolClosed& c) {
    return error_reply(id, "PoolClosed", c.what());
  } catch (const std::exception& x) {
    return error_reply(id, "Error", x.what());
  }
}

// A malformed request: answered with BadRequest, the connection goes on.
class BadRequest : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The first line of an HTTP request ("POST / HTTP/1.1"): a browser page or a proxy talking to
// this port. Its connection is closed before any later line (a body that is valid JSON) is read.
bool http_request_line(const std::string& line) {
  static const char* methods[] = {"GET ", "POST ", "PUT ", "HEAD ", "OPTIONS ", "DELETE ", "PATCH ", "CONNECT ", "TRACE "};
  for (const char* m : methods)
    if (line.starts_with(m)) return true;
  return false;
}

std::string line_of(const Value& reply) { return json_value::dump(reply) + "\n"; }

std::string too_large_line(const Value& id, std::size_t max_bytes) {
  return line_of(error_reply(id, "ReplyTooLarge",
                             "the reply is over " + std::to_string(max_bytes) + " bytes of JSON (--max-reply-bytes)"));
}

// A task's reply line: its result or its error, or a ReplyTooLarge error if that line would be
// longer than max_bytes (Limits::max_reply_bytes). A result whose JSON is known to be too long
// from a lower bound on its size is refused before its JSON is built; one the worker refused to
// send (over PoolOptions::max_result_bytes, set from the cap in main()) is refused the same way.
std::string reply_line(const Value& id, std::exception_ptr err, Value result, std::size_t max_bytes) {
  auto too_large = [&] { return too_large_line(id, max_bytes); };
  if (!err && json_value::dump_size_at_least(result, max_bytes) + 32 > max_bytes) return too_large();
  if (err) {
    try {
      std::rethrow_exception(err);
    } catch (const ringpool::RemoteError& r) {
      // Refused by the worker (PoolOptions::max_result_bytes, main()), or a message too long to
      // send: known before the reply is built.
      if ((r.type_name() == "OverflowError" && r.message().find("max_result_bytes") != std::string::npos) ||
          r.message().size() + r.type_name().size() + 32 > max_bytes)
        return too_large();
    } catch (...) {
    }
  }
  std::string line = line_of(err ? error_for(id, err)
                                 : Value::dict({{Value("id"), id}, {Value("ok"), Value(true)}, {Value("result"), std::move(result)}}));
  return line.size() > max_bytes ? too_large() : line;
}

class Session;

class Server {
 public:
  Server(asio::io_context& io, unsigned short port, ringpool::Pool& pool, const exports::Allowlist& allow, Limits limits)
      : pool(pool),
        allow(allow),
        limits(limits),
        io_(io),
        acceptor_(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), port)),
        backoff_timer_(io),
        signals_(io, SIGINT, SIGTERM),
        backoff_(limits.accept_backoff) {}

  unsigned short port() const { return acceptor_.local_endpoint().port(); }

  void start() {
    accept();
    wait_signal();
  }

  // A session is closed and none of its tasks is still in the pool: its slot is free.
  void release(Session* s);

  // The held-bytes budget (Limits::max_held_bytes), in three shares:
  // - read: a session charges every byte it reads, and gives it back when its request is answered
  //   without the pool (a blank line, BadRequest, NotAllowed) or dropped (a closed connection);
  // - pool: a line that becomes a task moves its bytes here, and reserves max_reply_bytes more,
  //   until the task's answer arrives (from_pool() gives both back);
  // - replies: every reply line queued on a connection, until it is written or the connection
  //   closes.
  // The budget has room while one more task's reservation fits.
  void charge(std::size_t n) { held_ += n; }
  void discharge(std::size_t n);  // gives n bytes back (any share), waking sessions that wait
  void to_pool(std::size_t n) {
    held_ += limits.max_reply_bytes;
    in_pool_ += n + limits.max_reply_bytes;
  }
  void from_pool(std::size_t n) {
    in_pool_ -= n + limits.max_reply_bytes;
    discharge(n + limits.max_reply_bytes);
  }
  void reply_queued(std::size_t n) {
    held_ += n;
    in_replies_ += n;
  }
  void reply_gone(std::size_t n) {
    in_replies_ -= n;
    discharge(n);
  }
  // Whether s may read now. No, while the budget has no room: s waits and is resumed (Session::
  // resume) once it has. Except for one session, the finisher: if the budget is spent by bytes
  // neither the pool nor a reply holds (partial requests in buffers), nothing will ever give any
  // back, so the oldest waiting session with bytes buffered may read on until its request is
  // complete, and start it (and then waits like the others).
  bool may_read(Session& s);
  // Whether s may start a task now (the next line it dispatches may become one): with room, as
  // the finisher (its request complete), or when nothing is in the pool or owed as a reply
  // (nothing else would give bytes back). Otherwise s waits as for reading.
  bool may_dispatch(Session& s);
  // s completed a line or closed: if it was the finisher, it is no longer.
  void done_finishing(Session* s);

  ringpool::Pool& pool;
  const exports::Allowlist& allow;
  const Limits limits;

 private:
  void accept();
  void on_accept_error(const boost::system::error_code& ec);
  void wait_signal();
  void stop();

  asio::io_context& io_;
  tcp::acceptor acceptor_;
  asio::steady_timer backoff_timer_;
  asio::signal_set signals_;
  std::chrono::milliseconds backoff_;
  bool accepting_ = false;  // an accept or a back-off wait is pending
  bool failing_ = false;    // accepts have been failing since the last success (logged once)
  bool stopping_ = false;
  // Owning: a session lives while it holds a slot, however its handlers come and go.
  std::unordered_map<Session*, std::shared_ptr<Session>> sessions_;

  void wake_soon();
  void wake();
  bool room() const { return held_ + limits.max_reply_bytes <= limits.max_held_bytes; }
  void wait_for_room(Session& s);
  std::size_t held_ = 0;        // bytes held: read, in the pool (with reservations), replies
  std::size_t in_pool_ = 0;     // of which held by tasks in the pool
  std::size_t in_replies_ = 0;  // of which held by replies not yet written
  std::deque<std::weak_ptr<Session>> waiting_;  // sessions waiting for the budget, oldest first
  Session* finisher_ = nullptr;
  bool wake_posted_ = false;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, Server& server) : socket_(std::move(socket)), server_(server), timer_(socket_.get_executor()) {}

  void start() {
    idle_since_ = Clock::now();
    arm_timer(idle_since_ + server_.limits.idle_timeout);
    read();
  }

  // The service stops: read nothing more, close once every reply owed is written.
  void stop() {
    stopping_ = true;
    boost::system::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_receive, ignored);  // a pending read ends (EOF)
    finish_if_done();
  }

  // The budget has room again (or this session is the finisher): dispatch what is buffered, read.
  void resume() {
    waiting_budget = false;
    if (closed_) return;
    process();
    read();
  }
  bool has_partial() const { return !closed_ && !stopping_ && head_ < pending_.size(); }
  // What it holds of the budget in tasks (their requests and reservations) and replies.
  std::size_t holds() const { return pool_bytes_ + out_bytes_; }

  bool waiting_budget = false;  // in the server's queue of sessions waiting for the budget

 private:
  const Limits& limits() const { return server_.limits; }

  bool paused() const { return owed_ >= limits().max_pending; }

  void read() {
    if (reading_ || closed_ || stopping_) return;
    if (paused() || !server_.may_read(*this)) {
      read_paused_ = true;
      return;
    }
    if (read_paused_) {
      // The service was not listening: the client's clocks start again now, or a request it sent
      // in full while we held off could be cut as a slowloris, and a silent client as idle.
      read_paused_ = false;
      partial_since_ = idle_since_ = Clock::now();
    }
    reading_ = true;
    socket_.async_read_some(asio::buffer(chunk_), [self = shared_from_this()](boost::system::error_code ec, std::size_t n) {
      self->reading_ = false;
      if (self->closed_) return;
      if (ec) return self->on_end(ec);
      if (self->head_ == self->pending_.size()) self->partial_since_ = Clock::now();
      self->pending_.append(self->chunk_.data(), n);
      self->server_.charge(n);
      self->process();
      self->read();
    });
  }

  // EOF: the client may have only shut down its sending side, so its replies are still written.
  void on_end(const boost::system::error_code& ec) {
    if (ec != asio::error::eof) return close();
    if (head_ < pending_.size() && !stopping_) reply_without_request("BadRequest", "truncated request: the stream ended inside it");
    stopping_ = true;
    finish_if_done();
  }

  // Dispatches the complete lines buffered, while the client is owed fewer than max_pending replies.
  // Not gated by the held-bytes budget: the bytes of a buffered line are charged already, and a
  // line that becomes a task keeps its charge (moved to the pool's share) until it is answered.
  void process() {
    if (closed_) return;
    const std::size_t buffered = pending_.size();
    std::size_t to_pool = 0;  // bytes of the lines that became tasks (still charged)
    bool completed = false;   // a line was taken (the finisher's request is complete)
    while (!closed_ && !stopping_ && !paused()) {
      // Searched from where the last search ended: a request read in many chunks is scanned
      // once, not once per chunk.
      const auto nl = pending_.find('\n', std::max(head_, scanned_));
      if (nl == std::string::npos) {
        scanned_ = pending_.size();
        if (pending_.size() - head_ > limits().max_request_bytes) too_large();
        break;
      }
      if (nl - head_ > limits().max_request_bytes) {
        too_large();
        break;
      }
      // A line that may become a task waits for the budget's room (for its reply) in the buffer.
      if (pending_.find_first_not_of(" \t\r", head_) < nl && !server_.may_dispatch(*this)) break;
      std::string line = pending_.substr(head_, nl - head_);
      const std::size_t bytes = nl + 1 - head_;
      head_ = nl + 1;
      if (!completed) server_.done_finishing(this);  // a finisher starts its one request, no more
      completed = true;
      partial_since_ = Clock::now();  // what follows the newline is a new request
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      if (http_request_line(line)) {
        reply_without_request("BadRequest", "this port speaks newline-delimited JSON, not HTTP");
        stopping_ = true;
        break;
      }
      if (dispatch(line, bytes)) to_pool += bytes;
    }
    // Compact once per batch rather than once per line.
    if (stopping_) pending_.clear(), head_ = 0, scanned_ = 0;
    else if (head_ > 0) pending_.erase(0, head_), scanned_ -= std::min(scanned_, head_), head_ = 0;
    // A buffer that held a large request does not keep its memory (the budget counts bytes held,
    // not a buffer's capacity).
    if (pending_.capacity() > kKeepBuffer && pending_.size() <= pending_.capacity() / 4) pending_.shrink_to_fit();
    if (const std::size_t gone = buffered - pending_.size(); gone > to_pool) server_.discharge(gone - to_pool);
  }

  void too_large() {
    reply_without_request("RequestTooLarge",
                          "a request is at most " + std::to_string(limits().max_request_bytes) + " bytes");
    stopping_ = true;  // the stream cannot be resynchronised cheaply: close after this reply
  }

  void reply_without_request(const std::string& type, const std::string& message) {
    ++owed_;
    send(line_of(error_reply(Value(), type, message)));
  }

  // True if the line became a task in the pool (it stays charged until answered: `bytes`).
  bool dispatch(const std::string& line, std::size_t bytes) {
    ++owed_;
    Value id;
    try {
      Value req;
      try {
        req = json_value::parse(line);
      } catch (const json_value::BadJson& e) {
        throw BadRequest(e.what());
      }
      if (!req.is_dict()) throw BadRequest("a request is a JSON object");
      if (const Value* v = req.find(Value("id"))) id = *v;
      const Value* fn = req.find(Value("fn"));
      if (!fn || !fn->is_str()) throw BadRequest("\"fn\" must be a string \"module:function\"");
      // Before anything else is looked at: a refused function is never imported or run.
      if (!server_.allow.allowed(fn->as_str())) {
        const std::string& name = fn->as_str();
        const std::string shown = name.size() > 256 ? name.substr(0, 256) + "..." : name;
        send(line_of(error_reply(id, "NotAllowed", "function '" + shown + "' is not allowed by this service")));
        return false;
      }
      // The arguments are moved out of the request (req is ours and dropped after): a copy would
      // double the parsed tree, the largest transient of a request.
      std::vector<Value> args;
      if (Value* a = const_cast<Value*>(req.find(Value("args")))) {
        if (!a->is_list()) throw BadRequest("\"args\" must be an array");
        args = std::move(a->as_list());
      }
      std::vector<std::pair<std::string, Value>> kwargs;
      if (Value* k = const_cast<Value*>(req.find(Value("kwargs")))) {
        if (!k->is_dict()) throw BadRequest("\"kwargs\" must be an object");
        for (auto& [key, val] : k->as_dict()) kwargs.emplace_back(key.as_str(), std::move(val));
      }
      server_.pool.async_submit(fn->as_str(), std::move(args), std::move(kwargs),
                                [self = shared_from_this(), id, bytes](std::exception_ptr err, Value result) {
                                  // On the pool's collector thread: hand the answer to our io thread.
                                  std::string line = reply_line(id, err, std::move(result), self->limits().max_reply_bytes);
                                  asio::post(self->socket_.get_executor(), [self, bytes, line = std::move(line)]() mutable {
                                    --self->in_pool_;
                                    self->pool_bytes_ -= bytes + self->limits().max_reply_bytes;
                                    self->server_.from_pool(bytes);
                                    if (self->closed_) return self->release_if_done();
                                    self->send(std::move(line));
                                  });
                                });
      // After the submit succeeded (it throws otherwise); the answer cannot arrive before: it is
      // posted to this thread.
      ++in_pool_;
      pool_bytes_ += bytes + limits().max_reply_bytes;
      server_.to_pool(bytes);
      return true;
    } catch (const BadRequest& e) {
      send(line_of(error_reply(id, "BadRequest", e.what())));
    } catch (const std::exception& e) {  // PoolClosed, PickleError: submit refused the task
      send(line_of(error_for(id, std::current_exception())));
    }
    return false;
  }

  void send(std::string line) {
    if (closed_) return;
    // Every reply is at most max_reply_bytes: a task's is capped with its id (reply_line); one
    // that is still longer (its id is) or that echoes a long id (BadRequest, NotAllowed) is
    // replaced by a ReplyTooLarge without the id.
    if (line.size() > limits().max_reply_bytes) line = too_large_line(Value(), limits().max_reply_bytes);
    out_bytes_ += line.size();
    server_.reply_queued(line.size());
    out_.push_back(std::move(line));
    if (!writing_) write_next();
  }

  void write_next() {
    writing_ = true;
    write_since_ = Clock::now();
    asio::async_write(socket_, asio::buffer(out_.front()), [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
      self->writing_ = false;
      if (self->closed_) return;
      if (ec) return self->close();
      const std::size_t n = self->out_.front().size();
      self->out_.pop_front();
      self->out_bytes_ -= n;
      self->server_.reply_gone(n);
      --self->owed_;
      if (self->owed_ == 0) self->idle_since_ = Clock::now();
      if (!self->out_.empty()) self->write_next();
      self->finish_if_done();
      // Backpressure released: the lines buffered while paused go first, then more reading.
      self->process();
      self->read();
    });
  }

  void finish_if_done() {
    if (stopping_ && owed_ == 0 && !writing_) close();
  }

  void arm_timer(Clock::time_point at) {
    timer_.expires_at(at);
    timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (!ec && !self->closed_) self->on_timer();
    });
  }

  // Every deadline starts at an event (a write begun, a partial line begun, the last reply
  // written) and lasts idle_timeout, and the timer is armed at most idle_timeout after it last
  // fired: so it fires by each deadline without being re-armed at every event.
  void on_timer() {
    const auto now = Clock::now();
    const auto limit = limits().idle_timeout;
    auto next = now + limit;
    auto consider = [&](Clock::time_point since) {
      if (since + limit <= now) return true;
      next = std::min(next, since + limit);
      return false;
    };
    bool expired = false;
    if (writing_) expired |= consider(write_since_);  // the client does not take its replies
    if (reading_) {
      if (head_ < pending_.size()) expired |= consider(partial_since_);  // a dribbled request
      else if (owed_ == 0) expired |= consider(idle_since_);           // silent and owed nothing
    }
    if (expired) return close();
    arm_timer(next);
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    boost::system::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
    timer_.cancel();
    out_.clear();
    server_.reply_gone(out_bytes_);
    out_bytes_ = 0;
    server_.discharge(pending_.size());  // its tasks' bytes are given back as they finish
    pending_.clear();
    pending_.shrink_to_fit();
    head_ = scanned_ = 0;
    server_.done_finishing(this);
    release_if_done();
  }

  // The slot is given back only once the pool holds no task of ours: a client that resets its
  // connections cannot pile up more than max_connections x max_pending tasks.
  void release_if_done() {
    if (closed_ && in_pool_ == 0 && !released_) {
      released_ = true;
      server_.release(this);
    }
  }

  static constexpr std::size_t kKeepBuffer = 64 << 10;

  tcp::socket socket_;
  Server& server_;
  asio::steady_timer timer_;
  std::array<char, 16384> chunk_;
  std::string pending_;  // bytes read and not yet dispatched, from head_
  std::size_t head_ = 0;
  std::size_t scanned_ = 0;      // pending_ holds no newline before this (from head_)
  std::deque<std::string> out_;  // reply lines, front() being written
  std::size_t out_bytes_ = 0;    // their bytes (charged to the budget's replies share)
  std::size_t pool_bytes_ = 0;   // charged for its tasks in the pool (requests and reservations)
  std::size_t owed_ = 0;         // requests read whose reply is not yet written (at most max_pending)
  std::size_t in_pool_ = 0;      // of which submitted to the pool and not yet answered
  bool reading_ = false, writing_ = false, stopping_ = false, closed_ = false, released_ = false;
  bool read_paused_ = false;     // read() held off (max_pending, budget) since the last read
  Clock::time_point idle_since_, partial_since_, write_since_;
};

void Server::release(Session* s) {
  sessions_.erase(s);  // the caller's handler still holds the session
  if (stopping_ && sessions_.empty()) signals_.cancel();  // nothing left: io.run() returns
  accept();
}

void Server::discharge(std::size_t n) {
  if (n == 0) return;
  held_ -= n;
  if (!waiting_.empty()) wake_soon();
}

bool Server::may_read(Session& s) {
  if (room() || finisher_ == &s) return true;
  wait_for_room(s);
  return false;
}

bool Server::may_dispatch(Session& s) {
  if (finisher_ == &s || (in_pool_ == 0 && in_replies_ == 0)) return true;
  // Its share first: a session that holds a quarter of the budget in tasks and replies (and
  // holds anything) waits for its own tasks and replies, which re-run its dispatch as they end;
  // not in waiting_, since room elsewhere does not help it.
  if (s.holds() > 0 && s.holds() + limits.max_reply_bytes > limits.max_held_bytes / 4) return false;
  if (room()) return true;
  wait_for_room(s);
  return false;
}

void Server::wait_for_room(Session& s) {
  if (!s.waiting_budget) {
    s.waiting_budget = true;
    waiting_.push_back(s.weak_from_this());
  }
  wake_soon();  // a finisher may be needed
}

void Server::done_finishing(Session* s) {
  if (finisher_ != s) return;
  finisher_ = nullptr;
  if (!waiting_.empty()) wake_soon();
}

// Posted, not called in place: the budget changes inside a session's handlers, and resuming other
// sessions (or the same one) from there would re-enter them.
void Server::wake_soon() {
  if (wake_posted_) return;
  wake_posted_ = true;
  asio::post(io_, [this] {
    wake_posted_ = false;
    wake();
  });
}

void Server::wake() {
  if (room()) {
    // Every waiting session reads again; each read adds at most one chunk before it is checked.
    std::deque<std::weak_ptr<Session>> resumed;
    resumed.swap(waiting_);
    for (auto& w : resumed)
      if (auto s = w.lock()) s->resume();
    return;
  }
  // Tasks will give bytes back, or replies will be taken (or their connections closed by their
  // timers), or a request is completing.
  if (finisher_ || in_pool_ > 0 || in_replies_ > 0) return;
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    auto s = it->lock();
    if (!s || !s->waiting_budget) {
      it = waiting_.erase(it);
      continue;
    }
    if (s->has_partial()) {
      waiting_.erase(it);
      finisher_ = s.get();
      s->resume();
      return;
    }
    ++it;
  }
}

void Server::accept() {
  if (stopping_ || accepting_ || sessions_.size() >= limits.max_connections) return;
  accepting_ = true;
  acceptor_.async_accept([this](boost::system::error_code ec, tcp::socket socket) {
    accepting_ = false;
    if (stopping_) return;
    if (ec) return on_accept_error(ec);
    if (failing_) std::cerr << "json_service: accepting again\n";
    failing_ = false;
    backoff_ = limits.accept_backoff;
    auto s = std::make_shared<Session>(std::move(socket), *this);
    sessions_.emplace(s.get(), s);
    s->start();
    accept();
  });
}

// No accept error ends the loop. The waiting connections stay in the kernel's backlog; out of
// fds (EMFILE, ENFILE) or memory, the service pauses and retries, and takes them once a
// connection closes or the pause ends.
void Server::on_accept_error(const boost::system::error_code& ec) {
  if (ec == asio::error::connection_aborted) return accept();  // the client gave up while queued
  if (!failing_) std::cerr << "json_service: accept: " << ec.message() << "; retrying\n";
  failing_ = true;
  accepting_ = true;
  backoff_timer_.expires_after(backoff_);
  backoff_ = std::min(backoff_ * 2, limits.accept_backoff * 16);
  backoff_timer_.async_wait([this](boost::system::error_code wait_ec) {
    accepting_ = false;
    if (!wait_ec) accept();
  });
}

void Server::wait_signal() {
  signals_.async_wait([this](boost::system::error_code ec, int) {
    if (ec) return;  // cancelled: every session is done
    if (stopping_) return io_.stop();  // the second signal: now
    stop();
    if (!sessions_.empty()) wait_signal();
  });
}

void Server::stop() {
  stopping_ = true;
  boost::system::error_code ignored;
  acceptor_.close(ignored);
  backoff_timer_.cancel();
  // stop() may release sessions: iterate over a copy.
  std::vector<std::shared_ptr<Session>> live;
  for (auto& [p, s] : sessions_) live.push_back(s);
  for (auto& s : live) s->stop();
}

int usage(std::ostream& out = std::cerr) {
  out << "usage: json_service [--port N] [--workers N] [--python PATH] [--python-path DIR]...\n"
               "                    [--package NAME=FOLDER]... [--allow MODULE:FUNCTION]... [--preload MODULE]... [--exec]\n"
               "                    [--max-request-bytes N] [--max-connections N] [--max-pending N]\n"
               "                    [--max-held-bytes N] [--max-reply-bytes N] [--idle-timeout SECONDS]\n"
               "                    [--accept-backoff-ms N]\n"
               "Clients may call only the functions --allow names and those listed in a --package folder's EXPORTS.\n"
               "--max-held-bytes (default 64 MiB, at least --max-request-bytes + --max-reply-bytes): bytes held\n"
               "over all connections (requests read and not yet answered, a reply's worth per task running, replies\n"
               "not yet written); while they are held, no connection is read and no task started.\n"
               "--max-reply-bytes (default 1 MiB): a longer reply is a ReplyTooLarge error.\n";
  return 2;
}

std::size_t positive(const std::string& flag, const std::string& v) {
  std::size_t used = 0;
  const long long n = std::stoll(v, &used);
  if (used != v.size() || n <= 0) throw std::invalid_argument(flag + " needs a positive integer");
  return static_cast<std::size_t>(n);
}

}  // namespace

int main(int argc, char** argv) {
  ringpool::PoolOptions options;
  exports::Allowlist allow;
  Limits limits;
  unsigned short port = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
      return argv[++i];
    };
    try {
      if (a == "--port") port = static_cast<unsigned short>(std::stoi(next()));
      else if (a == "--workers") options.workers = std::stoi(next());
      else if (a == "--python") options.python = next();
      else if (a == "--python-path") options.python_path.push_back(next());
      else if (a == "--preload") options.preload.push_back(next());
      else if (a == "--exec") options.zygote = false;
      else if (a == "--allow") allow.allow(next());
      else if (a == "--max-request-bytes") limits.max_request_bytes = positive(a, next());
      else if (a == "--max-connections") limits.max_connections = positive(a, next());
      else if (a == "--max-pending") limits.max_pending = positive(a, next());
      else if (a == "--max-held-bytes") limits.max_held_bytes = positive(a, next());
      else if (a == "--max-reply-bytes") limits.max_reply_bytes = positive(a, next());
      else if (a == "--accept-backoff-ms") limits.accept_backoff = std::chrono::milliseconds(positive(a, next()));
      else if (a == "--idle-timeout") {
        const double s = std::stod(next());
        if (!(s > 0 && s < 1e6)) throw std::invalid_argument("--idle-timeout needs a positive number of seconds");
        limits.idle_timeout = std::chrono::milliseconds(static_cast<long long>(s * 1000));
      } else if (a == "--package") {
        const std::string v = next();
        const auto eq = v.find('=');
        if (eq == std::string::npos) return usage();
        options.packages.emplace_back(v.substr(0, eq), v.substr(eq + 1));
        if (allow.allow_package(v.substr(0, eq), v.substr(eq + 1)) == 0)
          std::cerr << "json_service: " << v.substr(eq + 1) << " has no EXPORTS: package " << v.substr(0, eq)
                    << " is shipped, but clients may call none of its functions\n";
      } else if (a == "--help" || a == "-h") {
        usage(std::cout);
        return 0;
      } else {
        std::cerr << "json_service: unknown option " << a << "\n";
        return usage();
      }
    } catch (const std::exception& e) {
      std::cerr << "json_service: " << e.what() << "\n";
      return usage();
    }
  }
  if (limits.max_held_bytes < limits.max_request_bytes || limits.max_held_bytes - limits.max_request_bytes < limits.max_reply_bytes) {
    // Otherwise one request of the largest size allowed, with its reply, would spend the whole
    // budget alone.
    std::cerr << "json_service: --max-held-bytes (" << limits.max_held_bytes
              << ") must be at least --max-request-bytes + --max-reply-bytes (" << limits.max_request_bytes << " + "
              << limits.max_reply_bytes << ")\n";
    return usage();
  }
  if (allow.size() == 0) std::cerr << "json_service: no function is allowed: every request will be refused\n";
  // A result is copied and decoded in this process before its reply's length is known: the
  // workers refuse (as OverflowError, a ReplyTooLarge here) any whose pickle is over 4x the reply
  // cap. A reply that fits the cap has a pickle of at most ~2.25x its JSON (a float: 9 bytes
  // pickled, 4 as JSON), so none that fits is refused.
  options.max_result_bytes = limits.max_reply_bytes > options.max_result_bytes / 4
                                 ? options.max_result_bytes  // the pool's default (1 GiB), not more
                                 : std::max<std::size_t>(4 * limits.max_reply_bytes, 64 << 10);
  rlimit nofile{};
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur != RLIM_INFINITY &&
      limits.max_connections + 64 > nofile.rlim_cur)
    std::cerr << "json_service: --max-connections " << limits.max_connections << " is near RLIMIT_NOFILE ("
              << nofile.rlim_cur << "): accepts will pause on EMFILE before the cap\n";
  // Not dumpable: a worker runs as our user, and could otherwise open every worker's ring
  // through /proc/<our pid>/fd or write code into /proc/<our pid>/mem (security.md, "Same user").
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
    std::perror("json_service: prctl(PR_SET_DUMPABLE, 0)");
    return 1;
  }
  try {
    ringpool::Pool pool(options);
    asio::io_context io;
    Server server(io, port, pool, allow, limits);
    server.start();
    std::printf("listening on 127.0.0.1:%u\n", static_cast<unsigned>(server.port()));
    std::fflush(stdout);
    io.run();
    pool.shutdown(true);
  } catch (const std::exception& e) {
    std::cerr << "json_service: " << e.what() << "\n";
    // The pool's messages speak of PoolOptions: say which flag sets what it names.
    if (std::string(e.what()).find("python_path") != std::string::npos)
      std::cerr << "json_service: PoolOptions::python_path is --python-path DIR (the folder holding the ringpool "
                   "package: a checkout's bindings/), PoolOptions::python is --python PATH\n";
    return 1;
  }
  return 0;
}
