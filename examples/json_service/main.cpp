// An example C++ service that runs Python functions through ringpool::Pool.
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
//                     [--package NAME=FOLDER]... [--exec] [--preload MODULE]...
// It prints "listening on 127.0.0.1:PORT" once it accepts connections; SIGINT/SIGTERM stop it
// after the requests in flight are answered.
//
// The Python code never runs in this process: requests become plain-data pickles (ringpool's C++
// codec), and a worker's answer can only ever be plain data. A worker that crashes fails only its
// request (the client gets a WorkerDied error); the pool replaces it and the service goes on.
#include <utility>  // before Asio: Boost 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <cstdio>
#include <deque>
#include <iostream>
#include <memory>
#include <string>

#include "json.hpp"
#include "ringpool/pickle.hpp"
#include "ringpool/pool.hpp"

namespace asio = boost::asio;
using asio::ip::tcp;
using ringpool::Value;

namespace {

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

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, ringpool::Pool& pool) : socket_(std::move(socket)), pool_(pool) {}

  void start() { read(); }

 private:
  void read() {
    auto self = shared_from_this();
    asio::async_read_until(socket_, buffer_, '\n', [self](boost::system::error_code ec, std::size_t n) {
      if (ec) return;  // closed (or too long a line): the session ends with its last reply
      std::string line(asio::buffers_begin(self->buffer_.data()), asio::buffers_begin(self->buffer_.data()) + n);
      self->buffer_.consume(n);
      self->dispatch(line);
      self->read();
    });
  }

  void dispatch(const std::string& line) {
    Value id;
    try {
      Value req = json::parse(line);
      if (!req.is_dict()) throw json::ParseError("a request is a JSON object");
      if (const Value* v = req.find(Value("id"))) id = *v;
      const Value* fn = req.find(Value("fn"));
      if (!fn || !fn->is_str()) throw json::ParseError("\"fn\" must be a string \"module:function\"");
      std::vector<Value> args;
      if (const Value* a = req.find(Value("args"))) {
        if (!a->is_list()) throw json::ParseError("\"args\" must be an array");
        args = a->as_list();
      }
      std::vector<std::pair<std::string, Value>> kwargs;
      if (const Value* k = req.find(Value("kwargs"))) {
        if (!k->is_dict()) throw json::ParseError("\"kwargs\" must be an object");
        for (const auto& [key, val] : k->as_dict()) kwargs.emplace_back(key.as_str(), val);
      }
      auto self = shared_from_this();
      pool_.async_submit(fn->as_str(), std::move(args), std::move(kwargs),
                         [self, id](std::exception_ptr err, Value result) {
                           // On the pool's collector thread: hand the answer to our io thread.
                           Value reply = err ? error_for(id, err)
                                             : Value::dict({{Value("id"), id},
                                                            {Value("ok"), Value(true)},
                                                            {Value("result"), std::move(result)}});
                           asio::post(self->socket_.get_executor(),
                                      [self, line = json::dump(reply) + "\n"]() mutable { self->send(std::move(line)); });
                         });
    } catch (const json::ParseError& e) {
      send(json::dump(error_reply(id, "BadRequest", e.what())) + "\n");
    } catch (const std::exception& e) {
      send(json::dump(error_for(id, std::current_exception())) + "\n");
    }
  }

  void send(std::string line) {
    out_.push_back(std::move(line));
    if (out_.size() == 1) write_next();
  }

  void write_next() {
    auto self = shared_from_this();
    asio::async_write(socket_, asio::buffer(out_.front()), [self](boost::system::error_code ec, std::size_t) {
      if (ec) return;
      self->out_.pop_front();
      if (!self->out_.empty()) self->write_next();
    });
  }

  tcp::socket socket_;
  ringpool::Pool& pool_;
  asio::streambuf buffer_{1 << 20};
  std::deque<std::string> out_;
};

void accept(tcp::acceptor& acceptor, ringpool::Pool& pool) {
  acceptor.async_accept([&acceptor, &pool](boost::system::error_code ec, tcp::socket socket) {
    if (ec) return;
    std::make_shared<Session>(std::move(socket), pool)->start();
    accept(acceptor, pool);
  });
}

int usage() {
  std::cerr << "usage: json_service [--port N] [--workers N] [--python PATH] [--python-path DIR]... "
               "[--package NAME=FOLDER]... [--preload MODULE]... [--exec]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  ringpool::PoolOptions options;
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
      else if (a == "--package") {
        const std::string v = next();
        const auto eq = v.find('=');
        if (eq == std::string::npos) return usage();
        options.packages.emplace_back(v.substr(0, eq), v.substr(eq + 1));
      } else {
        return usage();
      }
    } catch (const std::exception& e) {
      std::cerr << "json_service: " << e.what() << "\n";
      return usage();
    }
  }
  try {
    ringpool::Pool pool(options);
    asio::io_context io;
    tcp::acceptor acceptor(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), port));
    accept(acceptor, pool);
    asio::signal_set stop(io, SIGINT, SIGTERM);
    stop.async_wait([&](boost::system::error_code, int) {
      acceptor.close();
      io.stop();
    });
    std::printf("listening on 127.0.0.1:%u\n", static_cast<unsigned>(acceptor.local_endpoint().port()));
    std::fflush(stdout);
    io.run();
    pool.shutdown(true);
  } catch (const std::exception& e) {
    std::cerr << "json_service: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
