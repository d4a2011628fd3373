// Publishes a frame through an installed ringpool::runtime and reads it back.
#include <ringpool/channel.hpp>

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
