// Ring: single-process semantics, handles, and multi-process delivery with killed peers.
#include <doctest/doctest.h>
#include <dirent.h>
#include <sys/resource.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "ringpool/block.hpp"
#include "ringpool/channel.hpp"
#include "ringpool/error.hpp"
#include "ringpool/ring.hpp"
#include "ringpool/segment.hpp"
#include "fd_limit.hpp"

using namespace ringpool;

namespace {

struct StringSink final : Ring::Sink {
  std::vector<std::string> got;
  std::vector<proto::FrameHeader> headers;
  void take(const proto::FrameHeader& h, const std::uint8_t* p) override {
    headers.push_back(h);
    got.emplace_back(reinterpret_cast<const char*>(p), h.payload_len);
  }
};

Ring::PutStatus put_str(Ring& r, const std::string& s, const int* fds = nullptr, std::size_t nfds = 0) {
  Ring::Piece p{s.data(), s.size()};
  return r.try_put(proto::Kind::DATA, 0, &p, 1, fds, nfds);
}

std::string get_str(Ring& r) {
  StringSink sink;
  std::vector<UniqueFd> fds;
  REQUIRE(r.try_get(sink, fds));
  return sink.got.at(0);
}

// Runs fn in a forked child and returns its exit status.
template <class F>
pid_t spawn(F fn) {
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int code = 1;
    try {
      code = fn();
    } catch (...) {
      code = 99;
    }
    ::_exit(code);
  }
  return pid;
}

int wait_exit(pid_t pid) {
  int st = 0;
  ::waitpid(pid, &st, 0);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
}

}  // namespace

TEST_CASE("ring: FIFO, empty and zero-length frames") {
  auto r = Ring::create({64 * 1024, 0});
  StringSink sink;
  std::vector<UniqueFd> fds;
  CHECK_FALSE(r->try_get(sink, fds));
  CHECK(put_str(*r, "") == Ring::PutStatus::ok);
  CHECK(put_str(*r, "a") == Ring::PutStatus::ok);
  CHECK(put_str(*r, std::string(1000, 'b')) == Ring::PutStatus::ok);
  CHECK(r->size() == 3);
  CHECK(get_str(*r).empty());
  CHECK(get_str(*r) == "a");
  CHECK(get_str(*r) == std::string(1000, 'b'));
  CHECK(r->size() == 0);
  CHECK_FALSE(r->readable());
}

TEST_CASE("ring: full ring refuses, wraps around many times without corruption") {
  auto r = Ring::create({4096, 0});
  CHECK(r->capacity() == 4096);
  std::string big(4096 - 48, 'x');
  CHECK(put_str(*r, big) == Ring::PutStatus::ok);  // exactly fills the ring
  CHECK(put_str(*r, "") == Ring::PutStatus::full);
  CHECK(get_str(*r) == big);
  CHECK(put_str(*r, std::string(4096, 'y')) == Ring::PutStatus::too_large);
  // Odd sizes force records to straddle the end of the data area (the mirror mapping).
  std::uint64_t n = 0;
  for (int round = 0; round < 2000; ++round) {
    std::string s(static_cast<std::size_t>(round * 37 % 1500), static_cast<char>('a' + round % 26));
    REQUIRE(put_str(*r, s) == Ring::PutStatus::ok);
    REQUIRE(get_str(*r) == s);
    ++n;
  }
  CHECK(r->committed() == n + 1);
}

TEST_CASE("ring: only the head of a large ring is pre-faulted; the rest fills in as the cursors pass") {
  auto r = Ring::create({1 << 20, 0});
  auto allocated = [&] {
    struct stat st {};
    REQUIRE(::fstat(r->handles().memfd, &st) == 0);
    return static_cast<std::size_t>(st.st_blocks) * 512;  // shmem pages the memfd holds
  };
  const std::size_t head = page_size() + kRingPrefaultBytes;
  CHECK(allocated() <= head);  // not the whole 1 MiB (a populated ring would hold all of it)
  // A peer attached through the descriptors sees every frame, across several passes over pages
  // that were not pre-faulted and across the wrap (the mirror mapping).
  const RingHandles h = r->handles();
  auto peer = Ring::attach(UniqueFd(::fcntl(h.memfd, F_DUPFD_CLOEXEC, 0)), UniqueFd(::fcntl(h.tx, F_DUPFD_CLOEXEC, 0)),
                           UniqueFd(::fcntl(h.rx, F_DUPFD_CLOEXEC, 0)), UniqueFd(::fcntl(h.event, F_DUPFD_CLOEXEC, 0)));
  for (int round = 0; round < 3000; ++round) {
    std::string s(static_cast<std::size_t>(round * 997 % 3000 + 1), static_cast<char>('a' + round % 26));
    REQUIRE(put_str(*r, s) == Ring::PutStatus::ok);
    REQUIRE(get_str(*peer) == s);
  }
  CHECK(allocated() == page_size() + (1u << 20));  // every page was reached
}

TEST_CASE("ring: put_many and get_many batch a prefix") {
  auto r = Ring::create({4096, 0});
  std::vector<std::string> msgs;
  for (int i = 0; i < 200; ++i) msgs.push_back("m" + std::to_string(i));
  std::vector<Ring::Piece> pieces;
  for (auto& m : msgs) pieces.push_back({m.data(), m.size()});
  std::size_t put = r->try_put_many(proto::Kind::DATA, 0, pieces.data(), pieces.size());
  CHECK(put > 10);
  CHECK(put < 200);  // 4 KiB holds fewer than 200 records of 56 bytes
  StringSink sink;
  std::vector<UniqueFd> fds;
  CHECK(r->try_get_many(sink, 1000, fds) == put);
  for (std::size_t i = 0; i < put; ++i) CHECK(sink.got[i] == msgs[i]);
  // Sequence numbers are consecutive.
  for (std::size_t i = 1; i < put; ++i) CHECK(sink.headers[i].seq == sink.headers[i - 1].seq + 1);
}

TEST_CASE("ring: handles travel with their frame, more than 253 at once") {
  auto r = Ring::create({64 * 1024, 0});
  int p[2];
  REQUIRE(::pipe(p) == 0);
  std::vector<int> many(300, p[1]);
  CHECK(put_str(*r, "one", &p[0], 1) == Ring::PutStatus::ok);
  CHECK(put_str(*r, "none") == Ring::PutStatus::ok);
  CHECK(put_str(*r, "many", many.data(), many.size()) == Ring::PutStatus::ok);
  StringSink sink;
  std::vector<UniqueFd> fds;
  REQUIRE(r->try_get(sink, fds));
  REQUIRE(fds.size() == 1);
  // The received fd is the pipe's read end: write through the original write end and read it.
  REQUIRE(::write(p[1], "z", 1) == 1);
  char c = 0;
  REQUIRE(::read(fds[0].get(), &c, 1) == 1);
  CHECK(c == 'z');
  fds.clear();
  REQUIRE(r->try_get(sink, fds));
  CHECK(fds.empty());
  REQUIRE(r->try_get(sink, fds));
  CHECK(fds.size() == 300);
  CHECK(sink.got == std::vector<std::string>{"one", "none", "many"});
  ::close(p[0]);
  ::close(p[1]);
}

TEST_CASE("ring: a record of more than 253 handles keeps them all when the table fills while it is taken") {
  // Its handles travel as two packets. Every descriptor must be this process's before the record
  // is taken: here the sink (which runs between peeking the handles and taking the record, where
  // another thread of the process could open files) fills the descriptor table. Before the later
  // packets were peeked too, the second packet's receive was then cut short and the record's
  // descriptors lost ("handle packet truncated").
  auto r = Ring::create({64 * 1024, 0});
  int p[2];
  REQUIRE(::pipe(p) == 0);
  std::vector<int> many(300, p[1]);
  REQUIRE(put_str(*r, "many", many.data(), many.size()) == Ring::PutStatus::ok);
  testing::FdLimit limit(300 + 16);  // room for the record's handles
  struct FillingSink final : Ring::Sink {
    testing::FdLimit* limit = nullptr;
    std::string got;
    void take(const proto::FrameHeader& h, const std::uint8_t* payload) override {
      got.assign(reinterpret_cast<const char*>(payload), h.payload_len);
      limit->take_the_rest();
    }
  } sink;
  sink.limit = &limit;
  std::vector<UniqueFd> fds;
  std::string error;
  std::size_t got = 0;
  try {
    got = r->try_get_many(sink, 1, fds);
  } catch (const std::exception& e) {
    error = e.what();
  }
  const std::size_t filled = limit.taken();
  limit.give_back();
  CHECK(error == "");
  CHECK(got == 1);
  CHECK(sink.got == "many");
  CHECK(filled > 0);  // the table did fill
  REQUIRE(fds.size() == 300);
  // Each is the pipe's write end.
  REQUIRE(::write(fds[299].get(), "z", 1) == 1);
  char c = 0;
  REQUIRE(::read(p[0], &c, 1) == 1);
  CHECK(c == 'z');
  ::close(p[0]);
  ::close(p[1]);
}

TEST_CASE("ring: wait_data_any wakes for a frame in any of its rings, and for the bell") {
  auto a = Ring::create({64 * 1024, 0});
  auto b = Ring::create({64 * 1024, 0});
  Ring* rings[] = {a.get(), b.get()};
  std::atomic<std::uint32_t> bell{0};
  // Something there already: no sleep.
  REQUIRE(put_str(*b, "ready") == Ring::PutStatus::ok);
  CHECK(Ring::wait_data_any(rings, 2, &bell, 0, 10'000'000'000) == futex::WaitResult::woken);
  StringSink sink;
  std::vector<UniqueFd> fds;
  REQUIRE(b->try_get(sink, fds));
  // A frame published into the second ring while the waiter sleeps (10 s timeout: only a missed
  // wake-up would reach it).
  std::thread producer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    put_str(*b, "later");
  });
  futex::WaitResult r = futex::WaitResult::interrupted;
  while (!b->readable() && r != futex::WaitResult::timed_out) r = Ring::wait_data_any(rings, 2, &bell, 0, 10'000'000'000);
  producer.join();
  CHECK(r != futex::WaitResult::timed_out);
  CHECK(b->readable());
  CHECK(a->control_for_testing()->data_waiters.load() == 0);  // each wait unregisters
  CHECK(b->control_for_testing()->data_waiters.load() == 0);
  REQUIRE(b->try_get(sink, fds));
  // The bell, rung from another thread.
  std::thread ringer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    bell.fetch_add(1);
    futex::wake_private(&bell, 1);
  });
  r = futex::WaitResult::interrupted;
  while (bell.load() == 0 && r != futex::WaitResult::timed_out) r = Ring::wait_data_any(rings, 2, &bell, 0, 10'000'000'000);
  ringer.join();
  CHECK(r != futex::WaitResult::timed_out);
  // Nothing comes: the timeout.
  CHECK(Ring::wait_data_any(rings, 2, &bell, 1, 1'000'000) == futex::WaitResult::timed_out);
}

TEST_CASE("ring: orphan handles of a producer that died before committing are dropped") {
  auto r = Ring::create({64 * 1024, 0});
  int p[2];
  REQUIRE(::pipe(p) == 0);
  pid_t pid = spawn([&] {
    RingControl* ctl = r->control_for_testing();
    ::pthread_mutex_lock(&ctl->prod_lock);
    std::uint64_t seq = ctl->next_seq.load();
    ctl->next_seq.store(seq + 1);
    int fds[2] = {p[0], p[1]};
    r->fd_channel_for_testing().send(seq, fds, 2);
    std::memset(r->control_for_testing() + 1, 0xAB, 64);  // scribble, as a half-written record would
    return 0;  // dies holding prod_lock, fds sent, nothing published
  });
  CHECK(wait_exit(pid) == 0);
  CHECK_FALSE(r->readable());
  CHECK(put_str(*r, "after", &p[1], 1) == Ring::PutStatus::ok);  // EOWNERDEAD recovered
  StringSink sink;
  std::vector<UniqueFd> fds;
  REQUIRE(r->try_get(sink, fds));
  CHECK(sink.got.at(0) == "after");
  CHECK(fds.size() == 1);
  ::close(p[0]);
  ::close(p[1]);
}

TEST_CASE("ring: a consumer that died holding the lock does not wedge the others") {
  auto r = Ring::create({64 * 1024, 0});
  CHECK(put_str(*r, "kept") == Ring::PutStatus::ok);
  pid_t pid = spawn([&] {
    ::pthread_mutex_lock(&r->control_for_testing()->cons_lock);
    return 0;
  });
  CHECK(wait_exit(pid) == 0);
  CHECK(get_str(*r) == "kept");
}

TEST_CASE("ring: frame counters stay exact when a consumer or producer dies between its stores") {
  auto r = Ring::create({64 * 1024, 0});
  RingControl* ctl = r->control_for_testing();
  CHECK(put_str(*r, "one") == Ring::PutStatus::ok);
  CHECK(put_str(*r, "two") == Ring::PutStatus::ok);
  CHECK(get_str(*r) == "one");
  // A consumer killed after counting the next frame as consumed, before moving head past it.
  pid_t pid = spawn([&] {
    ::pthread_mutex_lock(&ctl->cons_lock);
    const std::uint64_t c = ctl->consumed.load();
    ctl->cons_intent_consumed.store(c);
    ctl->cons_intent_head.store(ctl->head.load() + 64);  // where head was going
    ctl->consumed.store(c + 1);
    return 0;
  });
  CHECK(wait_exit(pid) == 0);
  CHECK(get_str(*r) == "two");  // the frame is still there, taken once
  CHECK(ctl->consumed.load() == 2);
  CHECK(ctl->committed.load() == 2);
  // A producer killed after counting a frame as committed, before publishing it.
  pid = spawn([&] {
    ::pthread_mutex_lock(&ctl->prod_lock);
    const std::uint64_t c = ctl->committed.load();
    ctl->prod_intent_committed.store(c);
    ctl->prod_intent_tail.store(ctl->tail.load() + 64);
    ctl->committed.store(c + 1);
    return 0;
  });
  CHECK(wait_exit(pid) == 0);
  CHECK_FALSE(r->readable());
  CHECK(put_str(*r, "three") == Ring::PutStatus::ok);
  CHECK(ctl->committed.load() == 3);
  CHECK(get_str(*r) == "three");
  CHECK(ctl->consumed.load() == ctl->committed.load());
  // A consumer killed after moving head (the frame was taken): nothing to roll back.
  CHECK(put_str(*r, "four") == Ring::PutStatus::ok);
  pid = spawn([&] {
    StringSink sink;
    std::vector<UniqueFd> fds;
    if (!r->try_get(sink, fds)) return 1;
    ::pthread_mutex_lock(&ctl->cons_lock);  // and dies holding the lock
    return 0;
  });
  CHECK(wait_exit(pid) == 0);
  CHECK_FALSE(r->readable());
  CHECK(put_str(*r, "five") == Ring::PutStatus::ok);
  CHECK(get_str(*r) == "five");
  CHECK(ctl->consumed.load() == 5);
  CHECK(ctl->committed.load() == 5);
}

TEST_CASE("ring: blocking waits time out and wake up") {
  auto r = Ring::create({4096, 0});
  auto t0 = futex::now_ns();
  CHECK(r->wait_data(20'000'000) == futex::WaitResult::timed_out);
  CHECK(futex::now_ns() - t0 >= 19'000'000);
  pid_t pid = spawn([&] {
    ::usleep(50'000);
    return put_str(*r, "wake") == Ring::PutStatus::ok ? 0 : 1;
  });
  while (!r->readable()) r->wait_data(2'000'000'000);
  CHECK(get_str(*r) == "wake");
  CHECK(wait_exit(pid) == 0);
}

TEST_CASE("ring: readiness eventfd follows the ring state") {
  auto r = Ring::create({4096, 0});
  CHECK(put_str(*r, "before arming") == Ring::PutStatus::ok);
  int efd = r->readiness_fd();
  std::uint64_t v = 0;
  CHECK(::read(efd, &v, 8) == 8);  // signalled for the frame published before arming
  ::write(efd, &v, 8);             // put it back as it was
  (void)get_str(*r);
  CHECK(::read(efd, &v, 8) == -1);  // drained once empty
  CHECK(put_str(*r, "x") == Ring::PutStatus::ok);
  CHECK(::read(efd, &v, 8) == 8);
}

TEST_CASE("ring: readiness armed once stays exact across calls and attachments") {
  auto r = Ring::create({4096, 0});
  const int efd = r->readiness_fd();
  for (int i = 0; i < 3; ++i) CHECK(r->readiness_fd() == efd);  // later calls only return the fd
  std::uint64_t v = 0;
  CHECK(::read(efd, &v, 8) == -1);  // empty: not ready, however often asked
  // A second attachment that never asked for the fd: its producers still signal (the arming
  // lives in the shared control block), once, and its consumer drains.
  const RingHandles h = r->handles();
  auto dup = [](int fd) { return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); };
  auto other = Ring::attach(dup(h.memfd), dup(h.tx), dup(h.rx), dup(h.event));
  CHECK(put_str(*other, "a") == Ring::PutStatus::ok);
  CHECK(put_str(*other, "b") == Ring::PutStatus::ok);
  for (int i = 0; i < 3; ++i) CHECK(r->readiness_fd() == efd);
  CHECK(::read(efd, &v, 8) == 8);
  CHECK(v == 1);                    // one signal for two frames, none added by the calls
  ::write(efd, &v, 8);              // put it back as it was
  CHECK(get_str(*other) == "a");
  CHECK(::read(efd, &v, 8) == 8);   // a frame is left: still ready
  ::write(efd, &v, 8);
  CHECK(get_str(*r) == "b");
  CHECK(::read(efd, &v, 8) == -1);  // taken through the arming attachment: drained
}

TEST_CASE("channel: large payloads go out of band through recycled blocks") {
  auto ring = Ring::create({64 * 1024, 0});
  Channel ch(ring);
  // The pool is per process: earlier test cases (pool, channel) leave their own free blocks in it.
  const std::size_t before = BlockPool::instance().cached_bytes();
  std::string big(1 << 20, 'q');
  big[12345] = 'Z';
  for (int i = 0; i < 3; ++i) {
    Ring::Piece p{big.data(), big.size()};
    REQUIRE(ch.put(proto::Kind::DATA, 0, &p, 1, nullptr, 0, Ring::kCountItem) == nullptr);
    StringSink sink;
    std::vector<UniqueFd> fds;
    REQUIRE(ring->try_get(sink, fds));
    REQUIRE((sink.headers[0].flags & proto::flag::kOutOfBand) != 0);
    REQUIRE(fds.size() == 1);
    proto::OobDescriptor d;
    std::memcpy(&d, sink.got[0].data(), sizeof d);
    REQUIRE(d.length == big.size());
    auto block = BlockCache::instance().open(std::move(fds[0]), d.length);
    CHECK(std::memcmp(block->data(), big.data(), big.size()) == 0);
    block->mark_free();
  }
  CHECK(BlockPool::instance().cached_bytes() - before <= (1u << 20));  // at most one new block, reused
}

namespace {

// A memfd of size bytes with the given seals (0: none), as a careless or hostile peer might send.
UniqueFd memfd_with(std::size_t size, int seals) {
  UniqueFd fd(::memfd_create("test-segment", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  REQUIRE(fd);
  REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(size)) == 0);
  if (seals != 0) REQUIRE(::fcntl(fd.get(), F_ADD_SEALS, seals) == 0);
  return fd;
}

// A memfd laid out as a valid out-of-band block (header and all) of `capacity` data bytes.
UniqueFd block_memfd(std::size_t capacity, int seals) {
  UniqueFd fd = memfd_with(page_size() + capacity, 0);
  BlockHeader h{};
  h.magic = kBlockMagic;
  h.version = kBlockVersion;
  h.capacity = capacity;
  REQUIRE(::pwrite(fd.get(), &h, sizeof h, 0) == static_cast<ssize_t>(sizeof h));
  if (seals != 0) REQUIRE(::fcntl(fd.get(), F_ADD_SEALS, seals) == 0);
  return fd;
}

std::string protocol_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ProtocolError& e) {
    return e.what();
  }
  return "(no ProtocolError)";
}

}  // namespace

TEST_CASE("segment: a received memfd must be sealed and of the expected size before it is mapped") {
  const int both = F_SEAL_SHRINK | F_SEAL_GROW;
  CHECK(check_received_memfd(memfd_with(8192, both).get(), 4096, 8192, "seg") == 8192);
  CHECK(check_received_memfd(create_memfd("ours", 8192).get(), 8192, 8192, "seg") == 8192);  // ours pass
  const auto err = [](UniqueFd fd, std::size_t lo, std::size_t hi) {
    return protocol_error_of([&] { check_received_memfd(fd.get(), lo, hi, "seg"); });
  };
  CHECK(err(memfd_with(8192, 0), 0, 1 << 20) == "seg is not sealed (F_SEAL_SHRINK and F_SEAL_GROW missing): "
                                                "its sender could resize it under our mapping");
  CHECK(err(memfd_with(8192, F_SEAL_SHRINK), 0, 1 << 20).find("F_SEAL_GROW missing") != std::string::npos);
  CHECK(err(memfd_with(8192, F_SEAL_GROW), 0, 1 << 20).find("F_SEAL_SHRINK missing") != std::string::npos);
  CHECK(err(memfd_with(8192, both | F_SEAL_WRITE), 0, 1 << 20).find("sealed against writing") != std::string::npos);
  CHECK(err(memfd_with(4096, both), 8192, 1 << 20) == "seg is too short: 4096 bytes, at least 8192 expected");
  CHECK(err(memfd_with(16384, both), 0, 8192) == "seg is too large: 16384 bytes, at most 8192 allowed");
  // Not a memfd at all: a pipe, and a memfd made without MFD_ALLOW_SEALING (born with F_SEAL_SEAL).
  int p[2];
  REQUIRE(::pipe2(p, O_CLOEXEC) == 0);
  UniqueFd r(p[0]), w(p[1]);
  CHECK(protocol_error_of([&] { check_received_memfd(r.get(), 0, 8192, "seg"); }) ==
        "seg is not a memfd (it cannot carry seals)");
  UniqueFd plain(::memfd_create("no-sealing", MFD_CLOEXEC));
  REQUIRE(::ftruncate(plain.get(), 8192) == 0);
  CHECK(err(std::move(plain), 0, 1 << 20).find("not sealed") != std::string::npos);
}

TEST_CASE("segment: an unsealed ring segment is refused by attach") {
  auto ring = Ring::create({64 * 1024, 0});
  RingHandles h = ring->handles();
  const auto attach_with = [&](UniqueFd memfd) {
    return protocol_error_of([&] {
      Ring::attach(std::move(memfd), dup_cloexec(h.tx), dup_cloexec(h.rx), dup_cloexec(h.event));
    });
  };
  // A copy of the segment's bytes in an unsealed memfd: valid in every other respect.
  UniqueFd copy = memfd_with(page_size() + 64 * 1024, 0);
  std::vector<char> bytes(page_size() + 64 * 1024);
  REQUIRE(::pread(h.memfd, bytes.data(), bytes.size(), 0) == static_cast<ssize_t>(bytes.size()));
  REQUIRE(::pwrite(copy.get(), bytes.data(), bytes.size(), 0) == static_cast<ssize_t>(bytes.size()));
  CHECK(attach_with(std::move(copy)).find("ring segment is not sealed") == 0);
  CHECK(attach_with(memfd_with(page_size(), F_SEAL_SHRINK | F_SEAL_GROW)).find("ring segment is too short") == 0);
  CHECK(Ring::attach(dup_cloexec(h.memfd), dup_cloexec(h.tx), dup_cloexec(h.rx), dup_cloexec(h.event)) != nullptr);
}

TEST_CASE("channel: BlockCache maps only sealed blocks whose size fits the length they carry") {
  const int both = F_SEAL_SHRINK | F_SEAL_GROW;
  const std::size_t cap = block_size_class(100000);
  const auto open_err = [](UniqueFd fd, std::uint64_t len) {
    return protocol_error_of([&] { BlockCache::instance().open(std::move(fd), len); });
  };
  CHECK(open_err(block_memfd(cap, 0), 100000).find("out-of-band block is not sealed") == 0);
  CHECK(open_err(block_memfd(cap, both), cap + 1).find("out-of-band block is too short") == 0);
  // 16 MiB for a 10-byte message: more than any producer gives it, so a peer cannot make us map
  // (and populate) memory out of proportion to what it claims to send.
  CHECK(open_err(block_memfd(16 << 20, both), 10).find("out-of-band block is too large") == 0);
  CHECK(open_err(block_memfd(cap, both), std::uint64_t{1} << 62).find("beyond the protocol's maximum") !=
        std::string::npos);
  // A good one maps; the same block then serves any length it may be reused for, no other.
  UniqueFd good = block_memfd(cap, both);
  UniqueFd again(dup_cloexec(good.get()));
  auto b = BlockCache::instance().open(std::move(good), 100000);
  CHECK(b->capacity() == cap);
  CHECK(open_err(dup_cloexec(again.get()), 10).find("does not fit") != std::string::npos);
  CHECK(BlockCache::instance().open(std::move(again), cap) == b);  // the cached mapping
  b->mark_free();
}

TEST_CASE("channel: a full ring yields a pending frame that publishes later") {
  auto ring = Ring::create({4096, 4096 - 48});
  Channel ch(ring);
  std::string fill(4096 - 48, 'f');
  Ring::Piece p{fill.data(), fill.size()};
  REQUIRE(ch.put(proto::Kind::DATA, 0, &p, 1, nullptr, 0, Ring::kCountItem) == nullptr);
  std::string s = "later";
  Ring::Piece q{s.data(), s.size()};
  auto pending = ch.put(proto::Kind::DATA, 0, &q, 1, nullptr, 0, Ring::kCountItem);
  REQUIRE(pending != nullptr);
  CHECK(ring->size() == 2);  // accepted counts
  s = "mutated";              // the pending frame owns a copy
  CHECK_FALSE(ch.publish(*pending));
  (void)get_str(*ring);
  CHECK(ch.publish(*pending));
  CHECK(get_str(*ring) == "later");
  CHECK(ring->size() == 0);
}

TEST_CASE("ring: exactly-once per-producer FIFO across processes [stress]") {
  // 4 producer processes x 50k frames, 2 consumer processes; each consumer reports a checksum and
  // checks per-producer order; the parent checks the union.
  constexpr int kProducers = 4, kPer = 50000;
  auto r = Ring::create({1 << 16, 0});
  auto* shared = static_cast<std::atomic<std::uint64_t>*>(
      ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  for (int i = 0; i < 8; ++i) new (&shared[i]) std::atomic<std::uint64_t>(0);
  std::vector<pid_t> pids;
  for (int c = 0; c < 2; ++c)
    pids.push_back(spawn([&, c] {
      std::vector<int> last(kProducers, -1);
      std::uint64_t sum = 0, count = 0;
      while (shared[0].load() < static_cast<std::uint64_t>(kProducers * kPer)) {
        StringSink sink;
        std::vector<UniqueFd> fds;
        if (!r->try_get_many(sink, 64, fds)) {
          r->wait_data(10'000'000);
          continue;
        }
        for (auto& m : sink.got) {
          int prod = 0, i = 0;
          std::sscanf(m.c_str(), "%d:%d", &prod, &i);
          if (i <= last[prod]) return 3;  // reordered or duplicated
          last[prod] = i;
          sum += static_cast<std::uint64_t>(prod) * 1000003u + static_cast<std::uint64_t>(i);
          ++count;
        }
        shared[0].fetch_add(sink.got.size());
      }
      shared[1 + c].store(sum);
      shared[3 + c].store(count);
      return 0;
    }));
  for (int p = 0; p < kProducers; ++p)
    pids.push_back(spawn([&, p] {
      char buf[64];
      for (int i = 0; i < kPer; ++i) {
        int n = std::snprintf(buf, sizeof buf, "%d:%d:%0*d", p, i, i % 40, 0);
        Ring::Piece piece{buf, static_cast<std::size_t>(n)};
        while (r->try_put(proto::Kind::DATA, 0, &piece, 1, nullptr, 0) != Ring::PutStatus::ok)
          r->wait_space(Ring::record_size(piece.len), 10'000'000);
      }
      return 0;
    }));
  for (pid_t pid : pids) CHECK(wait_exit(pid) == 0);
  std::uint64_t expect = 0;
  for (int p = 0; p < kProducers; ++p)
    for (int i = 0; i < kPer; ++i) expect += static_cast<std::uint64_t>(p) * 1000003u + static_cast<std::uint64_t>(i);
  CHECK(shared[3].load() + shared[4].load() == static_cast<std::uint64_t>(kProducers * kPer));
  CHECK(shared[1].load() + shared[2].load() == expect);
  CHECK(r->size() == 0);
  ::munmap(shared, 4096);
}

TEST_CASE("ring: item counting for bounded queues, derived size otherwise") {
  auto counted = Ring::create({4096, 0, /*count_items=*/true});
  CHECK(counted->try_acquire_item(2));
  CHECK(counted->try_acquire_item(2));
  CHECK_FALSE(counted->try_acquire_item(2));
  CHECK(put_str(*counted, "a") == Ring::PutStatus::ok);  // kCountItem: items += 1 as well
  CHECK(counted->items() == 3);
  (void)get_str(*counted);
  CHECK(counted->items() == 2);

  auto derived = Ring::create({4096, 0});
  CHECK(put_str(*derived, "x") == Ring::PutStatus::ok);
  CHECK(put_str(*derived, "y") == Ring::PutStatus::ok);
  CHECK(derived->items() == 0);  // never touched
  CHECK(derived->size() == 2);
  (void)get_str(*derived);
  CHECK(derived->size() == 1);
}
