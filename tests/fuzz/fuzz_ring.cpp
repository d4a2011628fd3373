// libFuzzer target for the ring's consumer side over a segment another process wrote
// (runtime/src/ring.cpp: Ring::attach, Ring::try_get_many; channel.cpp: ReceivedFds, the
// out-of-band block a frame names; fdpass.cpp: the packets on the handle socket).
//
// Each input builds one hostile ring: a memfd (sealed or not) whose control block, records and
// cursors come from the input, a handle socket holding packets the input describes (with /dev/null
// descriptors or sealed memfds posing as out-of-band blocks), then attaches to it and takes
// frames the way a Channel's reader does, and puts one frame the way a producer does. What the
// reader may do: refuse the segment or a record with ProtocolError, or take records. What it must
// not do: read outside its mapping, take more than asked, lose track of its cursor, hand out a
// descriptor count other than the records claim, or leak a descriptor. Any broken property traps.
//
// Not fuzzed: the two robust mutexes (an attacker that holds or garbles a ring's lock can wedge
// the ring; security.md lists that) and the readiness state's "held" value (which only makes a
// reader wait kSignallerWait); both are set as a live ring has them.
//
// Input layout (bytes past the end read as zero):
//   u8 shape    bits 0-1: data area = page << bits; 2: seal the memfd; 3: one page too many;
//               4: header fields (magic .. options) from the input; 5: count_items
//   u8 max      frames per take (1 + max % 16)
//   u8 npackets up to 7 packets on the handle socket, 16 bytes each:
//               u64 seq, u8 part, u8 nparts, u8 nfds claimed, u8 nfds sent (% 4),
//               u8 fd kinds (2 bits per fd: /dev/null, block, block with a bad header, pipe),
//               u8 block pages (1 + % 4), u8 bad magic, u8 unused
//   64 bytes    the control block's head (magic .. reserved0), used with shape bit 4
//   512 bytes   the control block from `tail` on (cursors, counters, wait words, readiness)
//   the rest    the data area, from offset 0
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <new>
#include <vector>

#include "ringpool/block.hpp"
#include "ringpool/channel.hpp"
#include "ringpool/error.hpp"
#include "ringpool/detail/fdpass.hpp"
#include "ringpool/ring.hpp"
#include "ringpool/segment.hpp"

#include "fuzz_util.hpp"

namespace {

using namespace ringpool;

using ringpool_fuzz::require;

struct Input {
  const std::uint8_t* p;
  std::size_t n;
  std::size_t at = 0;
  std::uint8_t u8() { return at < n ? p[at++] : 0; }
  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= std::uint64_t{u8()} << (8 * i);
    return v;
  }
  void bytes(void* dst, std::size_t len) {
    auto* d = static_cast<std::uint8_t*>(dst);
    for (std::size_t i = 0; i < len; ++i) d[i] = u8();
  }
};

// The lowest free descriptor number: unchanged across an iteration unless one leaked.
int lowest_free_fd() {
  int fd = ::fcntl(0, F_DUPFD, 0);
  require(fd >= 0);
  ::close(fd);
  return fd;
}

// A memfd posing as an out-of-band block: sealed, `pages` pages after the header page, with a
// valid header unless `bad`.
UniqueFd make_block(std::size_t pages, bool bad) {
  const std::size_t ps = page_size();
  UniqueFd fd = create_memfd("fuzz-block", ps + pages * ps);
  BlockHeader h{};
  h.magic = bad ? 0 : kBlockMagic;
  h.version = kBlockVersion;
  h.capacity = pages * ps;
  require(::pwrite(fd.get(), &h, sizeof h, 0) == static_cast<ssize_t>(sizeof h));
  return fd;
}

UniqueFd make_fd(unsigned kind, std::size_t pages) {
  switch (kind & 3) {
    case 0:
      return UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    case 1:
      return make_block(pages, false);
    case 2:
      return make_block(pages, true);
    default: {
      int p[2];
      require(::pipe2(p, O_CLOEXEC) == 0);
      ::close(p[1]);
      return UniqueFd(p[0]);
    }
  }
}

// Copies what it takes, as every real sink does, and checks where the record lies.
struct CheckingSink final : Ring::Sink {
  const std::uint8_t* lo;
  const std::uint8_t* hi;
  std::vector<proto::FrameHeader> headers;
  std::vector<std::string> payloads;
  void take(const proto::FrameHeader& h, const std::uint8_t* p) override {
    require(p >= lo && h.payload_len <= static_cast<std::uint64_t>(hi - p));
    headers.push_back(h);
    payloads.emplace_back(reinterpret_cast<const char*>(p), h.payload_len);
  }
};

void fuzz_one(Input& in) {
  const std::size_t ps = page_size();
  const std::uint8_t shape = in.u8();
  const std::size_t cap = ps << (shape & 3);
  const bool sealed = shape & 4;
  const bool extra_page = shape & 8;
  const bool raw_head = shape & 16;
  const std::size_t max = 1 + in.u8() % 16;

  // -- the handle socket: packets as the input describes them, then the writer closes ---------
  int sv[2];
  require(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  UniqueFd tx(sv[0]), rx(sv[1]);
  const std::size_t npackets = in.u8() % 8;
  for (std::size_t i = 0; i < npackets; ++i) {
    FdPacket pkt{};
    pkt.seq = in.u64();
    pkt.part = in.u8();
    pkt.nparts = in.u8();
    pkt.nfds = in.u8();
    const std::size_t nsend = in.u8() % 4;
    const std::uint8_t kinds = in.u8();
    const std::size_t pages = 1 + in.u8() % 4;
    pkt.magic = in.u8() ? kFdPacketMagic ^ 1 : kFdPacketMagic;
    (void)in.u8();
    std::vector<UniqueFd> owned;
    std::vector<int> raw;
    for (std::size_t k = 0; k < nsend; ++k) {
      owned.push_back(make_fd(kinds >> (2 * k), pages));
      require(static_cast<bool>(owned.back()));
      raw.push_back(owned.back().get());
    }
    iovec iov{&pkt, sizeof pkt};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
    if (!raw.empty()) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * raw.size());
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * raw.size());
      std::memcpy(CMSG_DATA(c), raw.data(), sizeof(int) * raw.size());
    }
    require(::sendmsg(tx.get(), &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof pkt));
  }
  tx.reset();  // a reader waiting for more packets sees the end at once

  // -- the segment ---------------------------------------------------------------------------
  const std::size_t total = ps + cap + (extra_page ? ps : 0);
  UniqueFd memfd(::memfd_create("fuzz-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  require(static_cast<bool>(memfd));
  require(::ftruncate(memfd.get(), static_cast<off_t>(total)) == 0);
  if (sealed) require(::fcntl(memfd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0);
  // The image is built in memory and written with one pwrite (cheaper than faulting in a mapping).
  std::vector<std::uint8_t> image(total);
  std::uint8_t* base = image.data();
  auto* ctl = new (base) RingControl{};
  ctl->magic = kRingMagic;
  ctl->layout_version = kRingLayoutVersion;
  ctl->capacity = cap;
  ctl->data_offset = ps;
  ctl->inline_max = cap / 8;
  ctl->options = (shape & 32) ? kOptCountItems : 0;
  std::uint8_t head[offsetof(RingControl, prod_lock)];
  in.bytes(head, sizeof head);
  if (raw_head) std::memcpy(base, head, sizeof head);
  // A robust mutex keeps no pointer in itself until it is locked: initialized here, it works
  // wherever the page is mapped.
  for (pthread_mutex_t* m : {&ctl->prod_lock, &ctl->cons_lock}) {
    pthread_mutexattr_t a;
    ::pthread_mutexattr_init(&a);
    ::pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    ::pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    require(::pthread_mutex_init(m, &a) == 0);
    ::pthread_mutexattr_destroy(&a);
  }
  constexpr std::size_t kFrom = offsetof(RingControl, tail);
  constexpr std::size_t kLen = 512;
  static_assert(kFrom + kLen <= sizeof(RingControl) && kLen > offsetof(RingControl, signaled) + 4 - kFrom,
                "the fuzzed part of the control block reaches past the readiness word");
  in.bytes(base + kFrom, kLen);
  // Not "held" (see the top of this file): a reader would wait kSignallerWait for the holder.
  std::uint32_t sig = ctl->signaled.load(std::memory_order_relaxed);
  if ((sig & Ring::kSignalStateMask) == Ring::kSignalling) ctl->signaled.store(sig & ~Ring::kSignalStateMask);
  std::uint8_t* data = base + ps;
  const std::size_t data_len = total - ps;
  for (std::size_t i = 0; i < data_len && in.at < in.n; ++i) data[i] = in.u8();
  require(::pwrite(memfd.get(), base, total, 0) == static_cast<ssize_t>(total));
  // The immutable fields as written (magic, layout_version, capacity, data_offset).
  struct {
    std::uint32_t magic, layout_version;
    std::uint64_t capacity, data_offset;
  } snapshot_head{};
  static_assert(offsetof(RingControl, data_offset) == 16, "the snapshot mirrors the control block's head");
  require(::pread(memfd.get(), &snapshot_head, sizeof snapshot_head, 0) == static_cast<ssize_t>(sizeof snapshot_head));

  UniqueFd ev(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  require(static_cast<bool>(ev));
  std::shared_ptr<Ring> ring;
  try {
    ring = Ring::attach(std::move(memfd), UniqueFd(), std::move(rx), std::move(ev));
  } catch (const ProtocolError&) {
    return;
  }
  // Attached: only a sealed segment whose header agrees with its size.
  require(sealed && !extra_page);
  require(snapshot_head.magic == kRingMagic && snapshot_head.layout_version == kRingLayoutVersion);
  require(snapshot_head.capacity == cap && snapshot_head.data_offset == ps);
  require(ring->capacity() == cap);

  RingControl* c = ring->control_for_testing();
  const std::uint8_t* rdata = reinterpret_cast<const std::uint8_t*>(c) + ps;
  std::vector<UniqueFd> fds;
  for (int round = 0; round < 8; ++round) {
    CheckingSink sink;
    sink.lo = rdata;
    sink.hi = rdata + 2 * cap;  // the data area and its mirror
    const std::uint64_t head_before = c->head.load();
    const std::size_t fds_before = fds.size();
    std::size_t got;
    try {
      got = ring->try_get_many(sink, max, fds);
    } catch (const ProtocolError&) {
      // Refused: nothing taken in this call is lost; the descriptors received so far are ours.
      require(fds.size() >= fds_before);
      break;
    }
    require(got <= max && got == sink.headers.size());
    std::uint64_t moved = 0, handles = 0;
    for (const auto& h : sink.headers) {
      moved += Ring::record_size(h.payload_len);
      handles += h.nhandles;
    }
    require(c->head.load() == head_before + moved);
    require(fds.size() - fds_before == handles);
    // Each frame's handles, as a Channel reader hands them out: an out-of-band frame's block is
    // vetted and mapped, and its bytes are all readable.
    ReceivedFds rxf(fds, fds_before);
    for (std::size_t k = 0; k < sink.headers.size(); ++k) {
      const auto& h = sink.headers[k];
      try {
        const bool oob = h.flags & proto::flag::kOutOfBand;
        const std::uint64_t len =
            oob ? Channel::oob_length(h, reinterpret_cast<const std::uint8_t*>(sink.payloads[k].data())) : 0;
        FrameHandles fh = rxf.next(h, len);
        require(rxf.position() <= fds.size());
        if (fh.oob) {
          require(fh.oob->size() == len);
          std::uint8_t sum = 0;
          for (std::size_t b = 0; b < fh.oob->size(); b += 512) sum ^= fh.oob->data()[b];
          if (fh.oob->size() != 0) sum ^= fh.oob->data()[fh.oob->size() - 1];
          (void)sum;
        }
      } catch (const ProtocolError&) {
      }
    }
    if (got == 0) break;
  }
  fds.clear();

  // A producer on the same hostile cursors: it writes inside the data area or refuses.
  const char msg[] = "fuzz";
  Ring::Piece piece{msg, sizeof msg};
  const Ring::PutStatus st = ring->try_put(proto::Kind::DATA, 0, &piece, 1, nullptr, 0);
  require(st == Ring::PutStatus::ok || st == Ring::PutStatus::full);
  Ring::Piece many[3] = {piece, piece, piece};
  require(ring->try_put_many(proto::Kind::DATA, 0, many, 3) <= 3);
  (void)ring->readable();
  (void)ring->size();
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  ::signal(SIGPIPE, SIG_IGN);
  // Blocks are mapped once per inode and kept up to a budget; keep that small across runs.
  BlockCache::instance().set_max_bytes(1 << 20);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const int fd_floor = lowest_free_fd();
  {
    Input in{data, size};
    fuzz_one(in);
  }
  require(lowest_free_fd() == fd_floor);  // every descriptor received or refused was closed
  return 0;
}
