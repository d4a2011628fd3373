// Publishes a frame through an installed ringpool::runtime and reads it back. Includes every
// public header (docs/guide/cpp-pool.md, "Headers"), so that one which needs a header the
// install left out fails here.
#include <ringpool/block.hpp>
#include <ringpool/channel.hpp>
#include <ringpool/error.hpp>
#include <ringpool/fd.hpp>
#include <ringpool/kernel.hpp>
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

#include <cstdio>
#include <cstring>
#include <string>

namespace {
struct Sink final : ringpool::Ring::Sink {
  std::string got;
  void take(const ringpool::proto::FrameHeader& h, const std::uint8_t* p) override {
    got.assign(reinterpret_cast<const char*>(p), h.payload_len);
  }
};
}  // namespace

int main() {
  auto ring = ringpool::Ring::create({64 * 1024, 0});
  ringpool::Channel ch(ring);
  const std::string msg = "hello from an installed ringpool";
  ringpool::Ring::Piece piece{msg.data(), msg.size()};
  if (ch.put(ringpool::proto::Kind::DATA, 0, &piece, 1, nullptr, 0, ringpool::Ring::kCountItem) != nullptr) return 2;
  Sink sink;
  std::vector<ringpool::UniqueFd> fds;
  if (!ring->try_get(sink, fds) || sink.got != msg) return 3;
  std::puts(sink.got.c_str());
  return 0;
}
