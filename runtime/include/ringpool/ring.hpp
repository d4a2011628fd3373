// Ring: variable-length frames in one shared-memory segment, many producers and many consumers
// in any number of processes, FIFO per producer, with handles on a side socket.
//
//   producers ──(robust prod_lock: reserve, send fds, copy, publish tail)──┐
//                                                                        data area (mapped twice)
//   consumers ──(robust cons_lock: read head record, copy out, publish head, recv fds)──┘
//
// Between the two sides the ring is a single-producer/single-consumer queue: `tail` is written
// only under prod_lock, `head` only under cons_lock. A record becomes visible only when `tail`
// moves past it, and the move is the last store of a put: a producer killed anywhere inside put
// leaves `tail` where it was, the next producer gets EOWNERDEAD from the robust mutex, marks it
// consistent and overwrites the abandoned bytes. Consumers never see a half-written record.
// docs/design/ring.md has the byte layout and the pairing of every memory order.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include <pthread.h>

#include "ringpool/detail/fdpass.hpp"
#include "ringpool/detail/futex.hpp"
#include "ringpool/fd.hpp"
#include "ringpool/proto/frame.hpp"
#include "ringpool/segment.hpp"

namespace ringpool {

inline constexpr std::uint32_t kRingMagic = 0x474e4952u;  // "RING"
inline constexpr std::uint32_t kRingLayoutVersion = 2;
// How much of a ring's data area is pre-faulted at create and attach (the rest faults in on the
// first pass of the cursors): the head, where a short-lived ring's traffic stays.
inline constexpr std::size_t kRingPrefaultBytes = 64 * 1024;

// The control block at offset 0 of a ring segment. It lives in shared memory: no pointers, fixed
// offsets, lock-free atomics only, a version and reserved bytes.
struct RingControl {
  // -- immutable after creation --------------------------------------------------------------
  std::uint32_t magic;
  std::uint32_t layout_version;
  std::uint64_t capacity;     // bytes in the data area; a power of two
  std::uint64_t data_offset;  // where the data area starts (one page)
  std::uint64_t inline_max;   // payloads above this go out of band (a hint for channels)
  std::uint32_t options;      // kOptCountItems
  std::uint8_t reserved0[28];
  // -- locks (each on its own cache lines) ----------------------------------------------------
  alignas(64) pthread_mutex_t prod_lock;  // robust, process-shared
  alignas(64) pthread_mutex_t cons_lock;  // robust, process-shared
  // -- producer side: written under prod_lock --------------------------------------------------
  alignas(64) std::atomic<std::uint64_t> tail;      // bytes ever published
  std::atomic<std::uint64_t> next_seq;              // next frame sequence number
  std::atomic<std::uint64_t> committed;             // frames ever published
  std::atomic<std::uint64_t> head_cache;            // last head seen by a producer (may lag)
  // What the put in progress is about to make of `tail` and `committed`: a producer that finds
  // prod_lock EOWNERDEAD and `tail` short of intent_tail rolls `committed` back (the dead one
  // may have counted frames it never published).
  std::atomic<std::uint64_t> prod_intent_tail;
  std::atomic<std::uint64_t> prod_intent_committed; // committed before that put
  // -- consumer side: written under cons_lock --------------------------------------------------
  alignas(64) std::atomic<std::uint64_t> head;      // bytes ever consumed
  std::atomic<std::uint64_t> consumed;              // frames ever consumed
  std::atomic<std::uint64_t> tail_cache;            // last tail seen by a consumer (may lag)
  // The same for the frame being taken: a consumer that finds cons_lock EOWNERDEAD and `head`
  // short of cons_intent_head rolls `consumed` back (the frame was not taken after all).
  std::atomic<std::uint64_t> cons_intent_head;
  std::atomic<std::uint64_t> cons_intent_consumed;  // consumed before that frame
  // -- wait words ------------------------------------------------------------------------------
  alignas(64) std::atomic<std::uint32_t> data_futex;    // bumped when frames are published
  std::atomic<std::uint32_t> data_waiters;              // threads sleeping on data_futex
  alignas(64) std::atomic<std::uint32_t> space_futex;   // bumped when producers are woken
  std::atomic<std::uint32_t> space_waiters;             // producers waiting for bytes of room
  std::atomic<std::uint32_t> item_waiters;              // producers waiting for an item slot (maxsize)
  // -- queue accounting (stdlib qsize/maxsize, JoinableQueue) -----------------------------------
  alignas(64) std::atomic<std::int64_t> items;          // kOptCountItems: accepted, not yet taken
  std::atomic<std::int64_t> unfinished;                 // JoinableQueue: put minus task_done
  std::atomic<std::uint32_t> join_futex;
  std::atomic<std::uint32_t> join_waiters;
  std::atomic<std::int64_t> pending;                    // accepted, not yet published (no kOptCountItems)
  // -- readiness fd --------------------------------------------------------------------------
  alignas(64) std::atomic<std::uint32_t> poll_armed;    // someone asked for the eventfd
  std::atomic<std::uint32_t> signaled;                  // Ring::kSignal*: clear, signalling, signalled
  std::uint8_t reserved1[1024];
};
static_assert(std::is_standard_layout_v<RingControl>, "RingControl lives in shared memory");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free && std::atomic<std::int64_t>::is_always_lock_free,
              "atomics shared between processes must be lock-free (no hidden per-process lock)");
static_assert(sizeof(std::atomic<std::uint64_t>) == 8, "atomics must have the size of their value in shared memory");
static_assert(offsetof(RingControl, tail) % 64 == 0 && offsetof(RingControl, head) % 64 == 0 &&
                  offsetof(RingControl, head) - offsetof(RingControl, tail) >= 64,
              "head and tail must be a cache line apart to prevent false sharing between the sides");
static_assert(sizeof(RingControl) <= 4096, "the control block fits in the first page");
static_assert(offsetof(RingControl, prod_lock) == 64 && offsetof(RingControl, cons_lock) == 128 &&
                  offsetof(RingControl, tail) == 192 && offsetof(RingControl, head) == 256 &&
                  offsetof(RingControl, data_futex) == 320 && offsetof(RingControl, space_futex) == 384 &&
                  offsetof(RingControl, items) == 448 && offsetof(RingControl, poll_armed) == 512,
              "the control block layout is shared by every process attached to a ring (docs/design/ring.md)");
static_assert(sizeof(pthread_mutex_t) <= 64, "each robust mutex fits its own cache line");

// RingControl::options
inline constexpr std::uint32_t kOptCountItems = 1;  // maintain `items` on every put and get (maxsize)

// The largest data area a ring may ask for. Far beyond any memory this runs on; without a bound,
// rounding a capacity above 2^63 up to a power of two would overflow (and loop forever).
inline constexpr std::size_t kMaxRingCapacity = std::size_t{1} << 40;

struct RingOptions {
  // Bytes in the data area. Larger rings absorb bursts without blocking; the first
  // kRingPrefaultBytes are pre-faulted at creation and attach, the rest faults in on the first
  // pass of the cursors. Rounded up to a power of two >= 1 page. 1..kMaxRingCapacity, else
  // Ring::create throws std::invalid_argument.
  std::size_t capacity = 1u << 20;
  // Payloads above this travel out of band (0: capacity / 8). Smaller keeps the ring from being
  // monopolised by a few large frames; larger saves the block hand-off for mid-size messages.
  std::size_t inline_max = 0;
  // Keep an exact shared item count for maxsize (one more atomic read-modify-write, on a line both
  // sides write, per frame). Without it, size() is derived from the publish/take counters.
  bool count_items = false;
};

// The descriptors that make up a ring; pass all four to attach() in another process.
struct RingHandles {
  int memfd, tx, rx, event;
};

class Ring {
 public:
  enum class PutStatus { ok, full, fd_backpressure, too_large };

  struct Piece {
    const void* data;
    std::size_t len;
  };

  // Receives a frame's payload under the consumer lock; must copy what it needs. May throw:
  // the frame then stays in the ring.
  class Sink {
   public:
    virtual void take(const proto::FrameHeader& h, const std::uint8_t* payload) = 0;

   protected:
    ~Sink() = default;
  };

  // Accounting done in the same critical section as the publish.
  static constexpr unsigned kCountItem = 1;  // items += 1
  static constexpr unsigned kCountTask = 2;  // unfinished += 1

  static std::shared_ptr<Ring> create(const RingOptions& opts = {});
  static std::shared_ptr<Ring> attach(UniqueFd memfd, UniqueFd tx, UniqueFd rx, UniqueFd event);

  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // -- producer side: any thread of any process ------------------------------------------------
  // Publishes one frame gathered from pieces, with fds (sent, not consumed: the caller keeps
  // ownership of its descriptors). Never waits for space: returns full / fd_backpressure.
  PutStatus try_put(proto::Kind kind, std::uint8_t flags, const Piece* pieces, std::size_t npieces,
                    const int* fds, std::size_t nfds, unsigned accounting = kCountItem);

  // Publishes up to n frames without handles, one per piece, in one critical section (one lock,
  // one wake-up). Returns how many were published (a prefix of pieces); the rest did not fit.
  std::size_t try_put_many(proto::Kind kind, std::uint8_t flags, const Piece* payloads, std::size_t n,
                           unsigned accounting = kCountItem);

  // -- consumer side: any thread of any process ------------------------------------------------
  // Takes up to max frames in one critical section; sink.take() sees each in order and fds get
  // each frame's handles appended in order (header.nhandles tells how many). Returns the count.
  // Where it may block (the consumer lock held elsewhere, a frame's handles not queued yet, a
  // readiness signaller to wait out) it blocks through hook, if given (blocking.hpp).
  // Throws ProtocolError on a corrupt record (one whose handles are missing or garbled is passed
  // over first), and SysError(EMFILE) when this process cannot hold the next frame's handles:
  // that frame and its handles then stay queued, and the frames before it were taken.
  std::size_t try_get_many(Sink& sink, std::size_t max, std::vector<UniqueFd>& fds, BlockingHook* hook = nullptr);
  // Takes the oldest frame: sink.take() copies its payload, its fds are appended to fds.
  // Returns false if no frame is published. Throws as try_get_many.
  bool try_get(Sink& sink, std::vector<UniqueFd>& fds, BlockingHook* hook = nullptr);

  // For a process whose peers on the ring's other side are not trusted (the C++ Pool with a
  // worker's rings: it is the only producer of the worker's call ring and the only consumer of
  // its result ring; docs/design/security.md, "The C++ Pool and its workers"). Process-local:
  // nothing shared changes, each Ring object decides for itself. From then on this object never
  // waits on what only a peer could hold up, and refuses what no honest peer sends:
  // - its side's lock (producer or consumer) held by anyone else: ProtocolError at once (this
  //   object's caller must be the only producer, or only consumer, in one thread);
  // - a frame's handles not queued when its record is read (an honest producer sends them before
  //   it commits): the record is passed over and ProtocolError thrown, without the usual wait;
  // - a frame with more than max_handles handles: passed over, ProtocolError (its handles are
  //   never installed here);
  // - the readiness eventfd is not refreshed on a take (a peer may have armed it to stall takes).
  // Call before the first put or take; not thread safe against them.
  void distrust_peers(std::uint32_t max_handles) noexcept {
    distrusted_ = true;
    max_handles_ = max_handles;
  }

  // -- waiting: any thread; none of these hold a lock -------------------------------------------
  // Return when the condition may hold (callers re-check), on timeout, or when a signal arrives.
  futex::WaitResult wait_data(std::int64_t timeout_ns);
  futex::WaitResult wait_space(std::size_t record_bytes, std::int64_t timeout_ns);
  futex::WaitResult wait_item_slot(std::int64_t maxsize, std::int64_t timeout_ns);
  futex::WaitResult wait_all_done(std::int64_t timeout_ns);
  // Sleeps until a frame may be published in any of rings (each wait_data's Dekker pairing),
  // `bell` (a futex word private to this process) moves from bell_seen, timeout_ns passes (negative:
  // no limit) or a signal arrives: one futex_waitv(2) for all of them. Beyond kMaxWaitAny - 1
  // rings, the rest are not waited on and the sleep is cut to kWaitAnyOverflowNs (they are seen
  // on the next round); on a kernel without futex_waitv (before 5.16) the same slice, sleeping
  // on the bell alone.
  static futex::WaitResult wait_data_any(Ring* const* rings, std::size_t n, std::atomic<std::uint32_t>* bell,
                                         std::uint32_t bell_seen, std::int64_t timeout_ns);
  static constexpr std::size_t kMaxWaitAny = 128;  // FUTEX_WAITV_MAX
  static constexpr std::int64_t kWaitAnyOverflowNs = 1'000'000;

  // Approximate (racy by nature) state, for polls and qsize().
  bool readable() const noexcept;
  bool writable(std::size_t record_bytes) const noexcept;
  std::int64_t items() const noexcept { return ctl_->items.load(std::memory_order_acquire); }
  // Frames accepted and not yet taken: the item count, or published - taken + pending.
  std::int64_t size() const noexcept {
    if (counts_items_) return items();
    // In unsigned arithmetic: the counters live in shared memory, and a peer that garbles them
    // must get a wrong size, not signed overflow (undefined behaviour; found by fuzz_ring).
    return static_cast<std::int64_t>(committed() - consumed() +
                                     static_cast<std::uint64_t>(ctl_->pending.load(std::memory_order_acquire)));
  }
  bool counts_items() const noexcept { return counts_items_; }
  std::int64_t unfinished() const noexcept { return ctl_->unfinished.load(std::memory_order_acquire); }
  std::uint64_t committed() const noexcept { return ctl_->committed.load(std::memory_order_relaxed); }
  std::uint64_t consumed() const noexcept { return ctl_->consumed.load(std::memory_order_relaxed); }

  // Queue accounting outside put/get (deferred puts count at acceptance, not at publish).
  bool try_acquire_item(std::int64_t maxsize) noexcept;  // items += 1 if items < maxsize
  void add_items(std::int64_t n) noexcept { ctl_->items.fetch_add(n, std::memory_order_acq_rel); }
  // A frame was accepted but is not published yet (with kCountItem accounting): counted in items
  // if the ring counts items, else in pending until published (see published_pending).
  void accept_pending() noexcept {
    (counts_items_ ? ctl_->items : ctl_->pending).fetch_add(1, std::memory_order_acq_rel);
  }
  void published_pending() noexcept {
    if (!counts_items_) ctl_->pending.fetch_sub(1, std::memory_order_acq_rel);
  }
  void add_unfinished(std::int64_t n) noexcept { ctl_->unfinished.fetch_add(n, std::memory_order_acq_rel); }
  // JoinableQueue.task_done: false if it was called more often than put.
  bool task_done() noexcept;

  // An eventfd that is readable whenever a frame is published and not yet taken (arms the
  // producers' signalling on first call; before that, producers skip the syscall). Arming is
  // permanent, so later calls from this process only return the fd: callers may call it before
  // every poll (multiprocessing.connection.wait calls fileno() on each wait).
  // @concurrent thread safe
  int readiness_fd();

  std::size_t capacity() const noexcept { return capacity_; }
  std::size_t inline_max() const noexcept { return inline_max_; }
  static std::size_t record_size(std::size_t payload_len) noexcept {
    return (proto::kHeaderSize + payload_len + 7) & ~std::size_t{7};
  }
  // For tests that simulate a process dying inside a critical section.
  RingControl* control_for_testing() const noexcept { return ctl_; }
  FdChannel& fd_channel_for_testing() noexcept { return fds_; }
  RingHandles handles() const noexcept { return {seg_.fd(), fds_.tx_fd(), fds_.rx_fd(), event_.get()}; }

 private:
  Ring(Segment seg, FdChannel fds, UniqueFd event);
  void notify_data(int n) noexcept;
  void notify_space() noexcept;
  void refresh_readiness(BlockingHook* hook = nullptr);
  void signal_if_readable() noexcept;
  bool finish_signal(std::uint32_t held) noexcept;

 public:
  // RingControl::signaled (the readiness protocol, ring.cpp): its low bits are the state (the
  // eventfd is drained; it is written; a thread holds the signal: it is checking for a frame and
  // writing or draining the eventfd), the bits above a generation that every claim advances.
  static constexpr std::uint32_t kSignalClear = 0, kSignalled = 1, kSignalling = 2, kSignalStateMask = 3;

 private:
  // How long a consumer clearing the readiness waits for a thread in the middle of signalling
  // before taking over: long enough for a preempted signaller to finish on a loaded machine,
  // short enough that one that died there stalls fd waiters only briefly.
  static constexpr std::chrono::milliseconds kSignallerWait{100};

  Segment seg_;
  FdChannel fds_;
  UniqueFd event_;
  RingControl* ctl_ = nullptr;
  std::uint8_t* data_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t mask_ = 0;
  std::size_t inline_max_ = 0;
  bool counts_items_ = false;
  bool distrusted_ = false;        // distrust_peers()
  std::uint32_t max_handles_ = 0;  // and its bound
  // This process has armed the readiness fd (ctl_->poll_armed is set and the frames published
  // before it were signalled). Process-local on purpose: re-arming on every call wrote the
  // control line producers read on each publish, and cost PPE's manager ~4 us per task.
  std::atomic<bool> armed_{false};
};

}  // namespace ringpool
