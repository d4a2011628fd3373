// Publishes a frame through an installed ringpool::runtime and reads it back, then runs a task in
// a ringpool::Pool with default options: its workers must import the ringpool Python package that
// cmake --install put under the prefix (argv[1]), found through PoolOptions::python_path's default.
// Includes every public header (docs/guide/cpp-pool.md, "Headers"), so that one which needs a
// header the install left out fails here.
#include <ringpool/block.hpp>
#include <ringpool/channel.hpp>
#include <ringpool/error.hpp>
#include <ringpool/fd.hpp>
#include <ringpool/kernel.hpp>
#include <ringpool/log.hpp>
#include <ringpool/pickle.hpp>
#include <ringpool/pool.hpp>
#include <ringpool/process.hpp>
#include <ringpool/proto/frame.hpp>
#include <ringpool/proto/task.hpp>
#include <ringpool/ring.hpp>
#include <ringpool/segment.hpp>
#include <ringpool/spawner.hpp>
#include <ringpool/supervisor.hpp>
#include <ringpool/value.hpp>
#include <ringpool/wait.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

namespace {
struct Sink final : ringpool::Ring::Sink {
  std::string got;
  void take(const ringpool::proto::FrameHeader& h, const std::uint8_t* p) override {
    got.assign(reinterpret_cast<const char*>(p), h.payload_len);
  }
};
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 1;
  auto ring = ringpool::Ring::create({64 * 1024, 0});
  ringpool::Channel ch(ring);
  const std::string msg = "hello from an installed ringpool";
  ringpool::Ring::Piece piece{msg.data(), msg.size()};
  if (ch.put(ringpool::proto::Kind::DATA, 0, &piece, 1, nullptr, 0, ringpool::Ring::kCountItem) != nullptr) return 2;
  Sink sink;
  std::vector<ringpool::UniqueFd> fds;
  if (!ring->try_get(sink, fds) || sink.got != msg) return 3;
  std::puts(sink.got.c_str());

  const std::string prefix = std::filesystem::canonical(argv[1]).string();
  ringpool::PoolOptions o;
  if (o.python_path.size() != 1 || o.python_path[0].rfind(prefix + "/", 0) != 0) {
    std::fprintf(stderr, "python_path's default is not under the prefix %s\n", prefix.c_str());
    return 4;
  }
  o.workers = 1;
  std::atomic<int> events{0};  // the handler runs on the pool's threads
  o.log = [&events](const ringpool::LogRecord&) { ++events; };
  ringpool::Pool pool(o);
  // Where the worker's ringpool comes from (eval: any function "module:qualname" will do).
  auto where = pool.submit("builtins:eval", {ringpool::Value("__import__('ringpool').__file__")});
  if (where.wait_for(std::chrono::seconds(120)) != std::future_status::ready) return 5;
  const std::string file = where.get().as_str();
  std::printf("worker's ringpool: %s\n", file.c_str());
  if (file.rfind(prefix + "/", 0) != 0) return 6;
  pool.shutdown();
  return events > 0 ? 0 : 7;
}
