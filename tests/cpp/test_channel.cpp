// Channel's receive side: waits with timeouts, order, out-of-band blocks, handles with their
// record, get_many's bounds, and a sleeping consumer woken by a put.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ringpool/channel.hpp"
#include "ringpool/error.hpp"
#include "ringpool/wait.hpp"

using namespace ringpool;

namespace {

constexpr std::int64_t kMs = 1'000'000;

// Copies each frame as a Python-free consumer would; notes the out-of-band length under the lock.
struct RecordSink final : Ring::Sink {
  std::vector<proto::FrameHeader> headers;
  std::vector<std::string> payloads;
  std::vector<std::uint64_t> oob_lengths;
  void take(const proto::FrameHeader& h, const std::uint8_t* p) override {
    headers.push_back(h);
    payloads.emplace_back(reinterpret_cast<const char*>(p), h.payload_len);
    oob_lengths.push_back((h.flags & proto::flag::kOutOfBand) ? Channel::oob_length(h, p) : 0);
  }
};

void put(Channel& ch, const std::string& s, const int* fds = nullptr, std::size_t nfds = 0) {
  Ring::Piece p{s.data(), s.size()};
  REQUIRE(ch.put(proto::Kind::DATA, 0, &p, 1, fds, nfds, Ring::kCountItem) == nullptr);
}

std::int64_t elapsed_ns(std::int64_t since) { return futex::now_ns() - since; }

ino_t inode(int fd) {
  struct stat st {};
  REQUIRE(::fstat(fd, &st) == 0);
  return st.st_ino;
}

}  // namespace

TEST_CASE("channel receive: a get on an empty channel times out, not sooner") {
  Channel ch(Ring::create({64 * 1024, 0}));
  RecordSink sink;
  std::vector<UniqueFd> fds;
  std::int64_t t0 = futex::now_ns();
  CHECK_FALSE(ch.get(sink, fds, 0));  // 0: one try, no wait
  CHECK(elapsed_ns(t0) < 5 * kMs);
  t0 = futex::now_ns();
  CHECK_FALSE(ch.get(sink, fds, 30 * kMs));
  const std::int64_t waited = elapsed_ns(t0);
  CHECK(waited >= 30 * kMs);
  CHECK(waited < 2000 * kMs);
  t0 = futex::now_ns();
  CHECK(ch.get_many(sink, 8, fds, 30 * kMs) == 0);
  CHECK(elapsed_ns(t0) >= 30 * kMs);
  CHECK_FALSE(ch.wait_readable(10 * kMs));
  CHECK(sink.headers.empty());
}

TEST_CASE("channel receive: items arrive once each, in order") {
  Channel ch(Ring::create({64 * 1024, 0}));
  for (int i = 0; i < 200; ++i) put(ch, "item " + std::to_string(i));
  RecordSink sink;
  std::vector<UniqueFd> fds;
  for (int i = 0; i < 200; ++i) REQUIRE(ch.get(sink, fds, 1000 * kMs));
  CHECK_FALSE(ch.get(sink, fds, 0));
  REQUIRE(sink.payloads.size() == 200);
  for (int i = 0; i < 200; ++i) CHECK(sink.payloads[i] == "item " + std::to_string(i));
  CHECK(fds.empty());
}

TEST_CASE("channel receive: an out-of-band item is read in place and its block handed back") {
  Channel ch(Ring::create({64 * 1024, 1024}));
  std::string big(300 * 1024, 'o');
  big[777] = 'X';
  Ring::Piece piece{big.data(), big.size()};
  auto pending = ch.stage(proto::Kind::DATA, 0, &piece, 1, nullptr, 0);
  REQUIRE(pending->block);
  std::shared_ptr<Block> sent = pending->block;  // the producer's view of the block's state
  REQUIRE(ch.publish(*pending));
  put(ch, "after");

  RecordSink sink;
  std::vector<UniqueFd> fds;
  REQUIRE(ch.get(sink, fds, 1000 * kMs));
  REQUIRE((sink.headers[0].flags & proto::flag::kOutOfBand) != 0);
  CHECK(sink.oob_lengths[0] == big.size());
  ReceivedFds received(fds);
  {
    FrameHandles h = received.next(sink.headers[0], sink.oob_lengths[0]);
    REQUIRE(h.oob);
    CHECK(h.fds.empty());  // the block was the frame's only handle
    CHECK(h.oob->size() == big.size());
    CHECK(h.oob->view() == big);
    CHECK(sent->header()->state.load() == kBlockBusy);  // held by the reader
  }
  CHECK(sent->header()->state.load() == kBlockFree);  // the last view went: back to the producer
  REQUIRE(ch.get(sink, fds, 1000 * kMs));
  CHECK(sink.payloads[1] == "after");

  // A descriptor that names more bytes than its block holds is refused before the block is mapped
  // (BlockCache::open checks its size against the length: security.md), so the reader never
  // touches it and it stays as its producer left it.
  pending = ch.stage(proto::Kind::DATA, 0, &piece, 1, nullptr, 0);
  sent = pending->block;
  REQUIRE(ch.publish(*pending));
  RecordSink sink2;
  std::vector<UniqueFd> fds2;
  REQUIRE(ch.get(sink2, fds2, 1000 * kMs));
  ReceivedFds received2(fds2);
  CHECK_THROWS_AS(received2.next(sink2.headers[0], sent->capacity() + 1), ProtocolError);
  CHECK(sent->header()->state.load() == kBlockBusy);
}

TEST_CASE("channel receive: descriptors arrive with their record, in order") {
  Channel ch(Ring::create({64 * 1024, 0}));
  int a[2], b[2];
  REQUIRE(::pipe(a) == 0);
  REQUIRE(::pipe(b) == 0);
  UniqueFd a0(a[0]), a1(a[1]), b0(b[0]), b1(b[1]);
  const int first[] = {a1.get()};
  const int third[] = {b1.get(), a0.get()};
  put(ch, "one", first, 1);
  put(ch, "two");
  put(ch, "three", third, 2);
  put(ch, "four");

  // A frame with handles ends a batch, so this takes several gets; the handles of every frame
  // taken so far are in one vector, matched to frames in order by ReceivedFds.
  RecordSink sink;
  std::vector<UniqueFd> fds;
  while (sink.headers.size() < 4) REQUIRE(ch.get_many(sink, 16, fds, 1000 * kMs) > 0);
  REQUIRE(fds.size() == 3);
  ReceivedFds received(fds);
  std::vector<std::vector<ino_t>> got;
  for (const auto& h : sink.headers) {
    FrameHandles fh = received.next(h);
    CHECK_FALSE(fh.oob);
    got.emplace_back();
    for (UniqueFd& fd : fh.fds) got.back().push_back(inode(fd.get()));
  }
  CHECK(received.position() == fds.size());
  CHECK(sink.payloads == std::vector<std::string>{"one", "two", "three", "four"});
  CHECK(got[0] == std::vector<ino_t>{inode(a1.get())});
  CHECK(got[1].empty());
  CHECK(got[2] == std::vector<ino_t>{inode(b1.get()), inode(a0.get())});
  CHECK(got[3].empty());
  // The received write end is a working duplicate of the one sent.
  REQUIRE(::write(fds[0].get(), "!", 1) == 1);
  char c = 0;
  REQUIRE(::read(a0.get(), &c, 1) == 1);
  CHECK(c == '!');
  // Asking for more handles than arrived is a protocol error, not a read past the vector.
  ReceivedFds short_of(fds, fds.size());
  CHECK_THROWS_AS(short_of.next(sink.headers[0]), ProtocolError);
}

TEST_CASE("channel receive: get_many takes at least one and at most max") {
  Channel ch(Ring::create({64 * 1024, 0}));
  for (int i = 0; i < 10; ++i) put(ch, std::to_string(i));
  RecordSink sink;
  std::vector<UniqueFd> fds;
  CHECK(ch.get_many(sink, 0, fds, -1) == 0);  // max 0: nothing, and no wait even without a limit
  CHECK(ch.get_many(sink, 4, fds, 1000 * kMs) == 4);
  CHECK(ch.get_many(sink, 1, fds, 1000 * kMs) == 1);
  CHECK(ch.get_many(sink, 100, fds, 1000 * kMs) == 5);
  CHECK(ch.get_many(sink, 100, fds, 10 * kMs) == 0);
  REQUIRE(sink.payloads.size() == 10);
  for (int i = 0; i < 10; ++i) CHECK(sink.payloads[i] == std::to_string(i));
}

TEST_CASE("channel receive: a consumer asleep on the futex wakes for a put") {
  auto ring = Ring::create({64 * 1024, 0});
  Channel ch(ring);
  // Slices far longer than the test: only the producer's wake-up can end the sleep in time.
  WaitPolicy policy;
  policy.spin_ns = 0;
  policy.slice_ns = 60'000 * kMs;
  std::atomic<bool> slept{false}, put_ok{false};
  std::thread producer([&] {
    // Put only once the consumer sleeps (it counts itself in data_waiters around its futex wait).
    const std::int64_t give_up = futex::now_ns() + 10'000 * kMs;
    while (!(slept = ring->control_for_testing()->data_waiters.load() != 0) && futex::now_ns() < give_up)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const std::string s = "wake";
    Ring::Piece p{s.data(), s.size()};
    put_ok = ch.put(proto::Kind::DATA, 0, &p, 1, nullptr, 0, Ring::kCountItem) == nullptr;  // no REQUIRE off the main thread
  });
  RecordSink sink;
  std::vector<UniqueFd> fds;
  int rounds = 0;
  const std::int64_t t0 = futex::now_ns();
  const bool got = ch.get(sink, fds, 30'000 * kMs, [&](auto&& round) { ++rounds; round(); }, &policy);
  const std::int64_t waited = elapsed_ns(t0);
  producer.join();
  CHECK(slept);
  REQUIRE(put_ok);
  REQUIRE(got);
  CHECK(sink.payloads.at(0) == "wake");
  CHECK(rounds >= 1);
  CHECK(waited < 10'000 * kMs);  // woken, not the end of a 60 s slice
}

TEST_CASE("channel receive: an exception from the wait hook ends the wait (Python's signal handlers)") {
  Channel ch(Ring::create({64 * 1024, 0}));
  WaitPolicy policy;
  policy.spin_ns = 1000;
  policy.slice_ns = 5 * kMs;
  RecordSink sink;
  std::vector<UniqueFd> fds;
  int rounds = 0;
  auto interrupt_on_third = [&](auto&& round) {
    round();
    if (++rounds == 3) throw std::runtime_error("interrupted");
  };
  const std::int64_t t0 = futex::now_ns();
  CHECK_THROWS_AS(ch.get(sink, fds, -1, interrupt_on_third, &policy), std::runtime_error);
  CHECK(rounds == 3);
  CHECK(elapsed_ns(t0) < 5000 * kMs);  // three slices, not forever
}
