#include "ringpool/ring.hpp"

#include <stdexcept>
#include <string>

#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <chrono>
#include <cstring>
#include <new>
#include <string>

#include "ringpool/error.hpp"

namespace ringpool {

namespace {

// Holds a robust, process-shared mutex. If the previous owner died holding it (EOWNERDEAD), the
// data it protects is still consistent by construction (see ring.hpp); recovered() says so, and
// the caller repairs the frame counters from the intent its predecessor left.
class RobustLock {
 public:
  // With a hook, a lock another thread or process holds is waited for through it (the Python
  // bindings release the GIL there: see BlockingHook).
  // wait false: a lock held elsewhere is a ProtocolError instead (Ring::distrust_peers).
  explicit RobustLock(pthread_mutex_t* m, BlockingHook* hook = nullptr, bool wait = true) : m_(m) {
    int r = ::pthread_mutex_trylock(m_);
    if (r == EBUSY && !wait) throw ProtocolError("a ring lock of this side is held by another process");
    if (r == EBUSY) run_blocking(hook, [&] { r = ::pthread_mutex_lock(m_); });
    if (r == EOWNERDEAD) {
      ::pthread_mutex_consistent(m_);
      recovered_ = true;
    } else if (r != 0) {
      throw SysError(r, "pthread_mutex_lock(ring)");
    }
  }
  ~RobustLock() { ::pthread_mutex_unlock(m_); }
  RobustLock(const RobustLock&) = delete;
  RobustLock& operator=(const RobustLock&) = delete;
  bool recovered() const noexcept { return recovered_; }

 private:
  pthread_mutex_t* m_;
  bool recovered_ = false;
};

// A producer died inside a put: if it did not publish, the frames it counted were not committed.
void repair_producer_side(RingControl* c) noexcept {
  if (c->tail.load(std::memory_order_relaxed) != c->prod_intent_tail.load(std::memory_order_relaxed))
    c->committed.store(c->prod_intent_committed.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

// Counts n frames the put in progress is about to publish up to new_tail; the intent comes
// first, so that a producer killed before the tail store is undone by repair_producer_side.
void count_committed(RingControl* c, std::uint64_t n, std::uint64_t new_tail) noexcept {
  const std::uint64_t before = c->committed.load(std::memory_order_relaxed);
  c->prod_intent_committed.store(before, std::memory_order_relaxed);
  c->prod_intent_tail.store(new_tail, std::memory_order_relaxed);
  c->committed.store(before + n, std::memory_order_relaxed);
}

// A consumer died taking a frame: if it did not move head, it did not take the frame.
void repair_consumer_side(RingControl* c) noexcept {
  if (c->head.load(std::memory_order_relaxed) != c->cons_intent_head.load(std::memory_order_relaxed))
    c->consumed.store(c->cons_intent_consumed.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

void init_robust_mutex(pthread_mutex_t* m) {
  pthread_mutexattr_t a;
  ::pthread_mutexattr_init(&a);
  ::pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  ::pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  int r = ::pthread_mutex_init(m, &a);
  ::pthread_mutexattr_destroy(&a);
  if (r != 0) throw SysError(r, "pthread_mutex_init(ring)");
}

std::size_t round_capacity(std::size_t c) {
  std::size_t cap = page_size();
  while (cap < c) cap <<= 1;
  return cap;
}

void eventfd_signal(int fd) noexcept {
  std::uint64_t one = 1;
  ssize_t r;
  do r = ::write(fd, &one, sizeof one);
  while (r < 0 && errno == EINTR);
}

void eventfd_drain(int fd) noexcept {
  std::uint64_t v;
  ssize_t r;
  do r = ::read(fd, &v, sizeof v);
  while (r < 0 && errno == EINTR);
}

}  // namespace

std::shared_ptr<Ring> Ring::create(const RingOptions& opts) {
  if (opts.capacity == 0 || opts.capacity > kMaxRingCapacity)
    throw std::invalid_argument("ring capacity must be 1 to " + std::to_string(kMaxRingCapacity) + " bytes, not " +
                                std::to_string(opts.capacity));
  const std::size_t cap = round_capacity(opts.capacity);
  const std::size_t off = page_size();
  UniqueFd memfd = create_memfd("ringpool-ring", off + cap);
  // Pre-fault the control page and the head of the data area now: first touch of a page costs
  // microseconds on these machines and should not land on the hot path. Not the whole ring: a
  // 1 MiB ring costs ~1 ms to populate (allocating and zeroing 256 pages), and most rings (a
  // DataLoader's index and result queues, a Pipe) never carry more than a few KiB before they
  // are closed. Pages past the head fault in once, on the first pass of the cursors over them.
  Segment seg(std::move(memfd), off + cap, off, /*populate=*/false);
  seg.populate(0, off + std::min(cap, kRingPrefaultBytes));
  auto* ctl = new (seg.base()) RingControl{};
  ctl->magic = kRingMagic;
  ctl->layout_version = kRingLayoutVersion;
  ctl->capacity = cap;
  ctl->data_offset = off;
  std::size_t inl = opts.inline_max != 0 ? opts.inline_max : cap / 8;
  if (record_size(inl) > cap) inl = cap - proto::kHeaderSize - 8;
  ctl->inline_max = inl;
  ctl->options = opts.count_items ? kOptCountItems : 0;
  init_robust_mutex(&ctl->prod_lock);
  init_robust_mutex(&ctl->cons_lock);
  ctl->next_seq.store(1, std::memory_order_relaxed);
  UniqueFd ev(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!ev) throw_errno("eventfd");
  return std::shared_ptr<Ring>(new Ring(std::move(seg), FdChannel::create(), std::move(ev)));
}

std::shared_ptr<Ring> Ring::attach(UniqueFd memfd, UniqueFd tx, UniqueFd rx, UniqueFd event) {
  const std::size_t off = page_size();
  // Before any mapping: sealed (a peer cannot truncate it under us), and a control page plus at
  // least one data page, at most the largest ring create() makes.
  const std::size_t total = check_received_memfd(memfd.get(), 2 * off, off + kMaxRingCapacity, "ring segment");
  // Read the control block through a private probe mapping before trusting its numbers.
  RingControl probe{};
  {
    Segment head(dup_cloexec(memfd.get()), off, 0, false);
    std::memcpy(static_cast<void*>(&probe), head.base(), offsetof(RingControl, reserved0));
  }
  if (probe.magic != kRingMagic) throw ProtocolError("not a ringpool ring segment (bad magic)");
  if (probe.layout_version != kRingLayoutVersion) throw ProtocolError("ring segment has an unsupported layout version");
  const std::size_t cap = probe.capacity;
  if (probe.data_offset != off || cap == 0 || (cap & (cap - 1)) != 0 || off + cap != total)
    throw ProtocolError("ring segment geometry does not match its size");
  Segment seg(std::move(memfd), total, off, /*populate=*/false);
  seg.populate(0, off + std::min(cap, kRingPrefaultBytes));  // as in create
  return std::shared_ptr<Ring>(new Ring(std::move(seg), FdChannel(std::move(tx), std::move(rx)), std::move(event)));
}

Ring::Ring(Segment seg, FdChannel fds, UniqueFd event)
    : seg_(std::move(seg)), fds_(std::move(fds)), event_(std::move(event)) {
  ctl_ = reinterpret_cast<RingControl*>(seg_.base());
  capacity_ = ctl_->capacity;
  mask_ = capacity_ - 1;
  data_ = seg_.base() + ctl_->data_offset;
  inline_max_ = ctl_->inline_max;
  counts_items_ = (ctl_->options & kOptCountItems) != 0;
}

Ring::PutStatus Ring::try_put(proto::Kind kind, std::uint8_t flags, const Piece* pieces, std::size_t npieces,
                              const int* fds, std::size_t nfds, unsigned accounting) {
  std::size_t len = 0;
  for (std::size_t i = 0; i < npieces; ++i) len += pieces[i].len;
  const std::size_t rec = record_size(len);
  if (rec > capacity_ || nfds > proto::kMaxHandles) return PutStatus::too_large;
  {
    RobustLock lock(&ctl_->prod_lock, nullptr, !distrusted_);
    if (lock.recovered()) repair_producer_side(ctl_);
    const std::uint64_t t = ctl_->tail.load(std::memory_order_relaxed);  // only written under this lock
    // head_cache lags head, so it only ever understates the room: reading head (the consumers'
    // cache line) is needed only when the cached value says the record does not fit.
    std::uint64_t h = ctl_->head_cache.load(std::memory_order_relaxed);
    if (t + rec - h > capacity_) {
      // Acquire pairs with the consumer's release store of head after it copied a record out:
      // the bytes we are about to overwrite are no longer being read.
      h = ctl_->head.load(std::memory_order_acquire);
      ctl_->head_cache.store(h, std::memory_order_relaxed);
      if (t + rec - h > capacity_) return PutStatus::full;
    }
    const std::uint64_t seq = ctl_->next_seq.load(std::memory_order_relaxed);
    // Burn the sequence number before any fd leaves: if we die after sending, the next producer
    // uses seq+1 and consumers drop our packets as orphans.
    ctl_->next_seq.store(seq + 1, std::memory_order_relaxed);
    if (nfds != 0 && fds_.send(seq, fds, nfds) == FdChannel::SendStatus::would_block)
      return PutStatus::fd_backpressure;
    std::uint8_t* p = data_ + (t & mask_);  // contiguous thanks to the mirror mapping
    proto::FrameHeader hd = proto::make_header(kind, flags, len, seq, static_cast<std::uint32_t>(nfds));
    std::memcpy(p, &hd, proto::kHeaderSize);
    p += proto::kHeaderSize;
    for (std::size_t i = 0; i < npieces; ++i) {
      if (pieces[i].len != 0) std::memcpy(p, pieces[i].data, pieces[i].len);
      p += pieces[i].len;
    }
    if ((accounting & kCountItem) && counts_items_) ctl_->items.fetch_add(1, std::memory_order_relaxed);
    if (accounting & kCountTask) ctl_->unfinished.fetch_add(1, std::memory_order_relaxed);
    count_committed(ctl_, 1, t + rec);
    // The publish. Release pairs with the consumer's acquire load of tail: the record bytes (and
    // the accounting above) are visible before the cursor that exposes them.
    ctl_->tail.store(t + rec, std::memory_order_release);
  }
  notify_data(1);
  return PutStatus::ok;
}

std::size_t Ring::try_put_many(proto::Kind kind, std::uint8_t flags, const Piece* payloads, std::size_t n,
                               unsigned accounting) {
  std::size_t done = 0;
  {
    RobustLock lock(&ctl_->prod_lock, nullptr, !distrusted_);
    if (lock.recovered()) repair_producer_side(ctl_);
    std::uint64_t t = ctl_->tail.load(std::memory_order_relaxed);
    const std::uint64_t h = ctl_->head.load(std::memory_order_acquire);  // as in try_put
    ctl_->head_cache.store(h, std::memory_order_relaxed);
    std::uint64_t seq = ctl_->next_seq.load(std::memory_order_relaxed);
    for (; done < n; ++done) {
      const std::size_t rec = record_size(payloads[done].len);
      if (t + rec - h > capacity_) break;
      std::uint8_t* p = data_ + (t & mask_);
      proto::FrameHeader hd = proto::make_header(kind, flags, payloads[done].len, seq++, 0);
      std::memcpy(p, &hd, proto::kHeaderSize);
      if (payloads[done].len != 0) std::memcpy(p + proto::kHeaderSize, payloads[done].data, payloads[done].len);
      t += rec;
    }
    if (done == 0) return 0;
    ctl_->next_seq.store(seq, std::memory_order_relaxed);
    if ((accounting & kCountItem) && counts_items_)
      ctl_->items.fetch_add(static_cast<std::int64_t>(done), std::memory_order_relaxed);
    if (accounting & kCountTask) ctl_->unfinished.fetch_add(static_cast<std::int64_t>(done), std::memory_order_relaxed);
    count_committed(ctl_, done, t);
    // One publish for the whole batch (release: pairs with the consumer's acquire of tail).
    ctl_->tail.store(t, std::memory_order_release);
  }
  notify_data(static_cast<int>(done));
  return done;
}

bool Ring::try_get(Sink& sink, std::vector<UniqueFd>& fds, BlockingHook* hook) {
  return try_get_many(sink, 1, fds, hook) == 1;
}

std::size_t Ring::try_get_many(Sink& sink, std::size_t max, std::vector<UniqueFd>& fds, BlockingHook* hook) {
  std::size_t got = 0;
  std::exception_ptr broken;  // a record with broken handles was passed over: thrown at the end
  {
    RobustLock lock(&ctl_->cons_lock, hook, !distrusted_);
    if (lock.recovered()) {
      repair_consumer_side(ctl_);
      fds_.reset_peek_offset();  // the dead consumer may have died inside a multi-packet peek
    }
    std::uint64_t h = ctl_->head.load(std::memory_order_relaxed);  // only written under this lock
    // tail_cache lags tail, so it only ever understates what is published; read tail (the
    // producers' cache line) only when the cached value says the ring is empty.
    std::uint64_t t = ctl_->tail_cache.load(std::memory_order_relaxed);
    if (h == t) {
      // Acquire pairs with the producer's release store of tail: the records are fully written.
      t = ctl_->tail.load(std::memory_order_acquire);
      ctl_->tail_cache.store(t, std::memory_order_relaxed);
    }
    // Moves head past the record at h (taken, or dropped): the one place consumed and head move.
    const auto advance = [&](std::size_t rsize) {
      h += rsize;
      if (counts_items_) ctl_->items.fetch_sub(1, std::memory_order_relaxed);
      const std::uint64_t c = ctl_->consumed.load(std::memory_order_relaxed);
      ctl_->cons_intent_consumed.store(c, std::memory_order_relaxed);
      ctl_->cons_intent_head.store(h, std::memory_order_relaxed);
      ctl_->consumed.store(c + 1, std::memory_order_relaxed);
      // Release pairs with the producer's acquire load of head: we are done reading these bytes.
      ctl_->head.store(h, std::memory_order_release);
    };
    while (got < max && h != t) {
      const std::uint8_t* rec = data_ + (h & mask_);
      proto::FrameHeader hd;
      std::memcpy(&hd, rec, proto::kHeaderSize);
      proto::DecodeError err = proto::check_header(hd, capacity_ - proto::kHeaderSize);
      if (err != proto::DecodeError::ok)
        throw ProtocolError("corrupt ring record: " + std::string(proto::to_string(err)));
      const std::size_t rsize = record_size(hd.payload_len);
      if (rsize > t - h) throw ProtocolError("corrupt ring record: runs past the published tail");
      std::vector<UniqueFd> staged;
      if (hd.nhandles != 0) {
        if (got != 0) break;  // hand over what we have; handles go one frame at a time
        if (distrusted_ && hd.nhandles > max_handles_) {
          // Never installed here: its packets are orphans the next peek drops.
          advance(rsize);
          broken = std::make_exception_ptr(ProtocolError(
              "ring record with " + std::to_string(hd.nhandles) + " handles (at most " +
              std::to_string(max_handles_) + " accepted from this producer)"));
          break;
        }
        // The handles first, by a peek that consumes nothing: a process out of descriptors gets
        // SysError(EMFILE) here with the record and its handles still queued. An untrusted
        // producer's must be queued already (it sent them before committing).
        try {
          staged = distrusted_ ? fds_.peek(hd.seq, hd.nhandles, hook, 0) : fds_.peek(hd.seq, hd.nhandles, hook);
        } catch (const ProtocolError&) {
          // Handles missing or garbled: this record can never be delivered whole. Pass over it
          // (a corrupt record costs itself, not the ring), then report it.
          advance(rsize);
          broken = std::current_exception();
          break;
        }
      }
      sink.take(hd, rec + proto::kHeaderSize);  // may throw: this record stays, earlier ones are taken
      advance(rsize);
      ++got;
      // After the head moved: if we die here the packet is an orphan the next consumer drops (the
      // descriptors the peek installed die with us).
      if (hd.nhandles != 0) {
        if (distrusted_)
          fds_.finish(hd.seq, hd.nhandles, staged, fds, hook, 0);
        else
          fds_.finish(hd.seq, hd.nhandles, staged, fds, hook);
        break;
      }
    }
  }
  if (got == 0 && !broken) return 0;
  notify_space();
  if (!distrusted_ && ctl_->poll_armed.load(std::memory_order_relaxed) != 0) refresh_readiness(hook);
  if (broken) std::rethrow_exception(broken);
  return got;
}

void Ring::notify_data(int n) noexcept {
  // Pairs with the seq_cst increment of data_waiters in wait_data (a Dekker pair): either we see
  // the waiter and wake it, or the waiter's re-check after its increment sees our new tail.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (ctl_->data_waiters.load(std::memory_order_relaxed) != 0) {
    ctl_->data_futex.fetch_add(1, std::memory_order_release);
    futex::wake(&ctl_->data_futex, n);
  }
  if (ctl_->poll_armed.load(std::memory_order_relaxed) != 0) signal_if_readable();
}

void Ring::notify_space() noexcept {
  // Same Dekker pairing as notify_data, with space_waiters / item_waiters in wait_space /
  // wait_item_slot. Producers waiting for bytes are woken only once the ring is at most half
  // full: a consumer draining a full ring then wakes them once per half ring, not per frame (a
  // wake-up costs the consumer a syscall). They sleep only while their record does not fit, so
  // the hysteresis never strands them (and their sleeps are bounded by the caller's slices).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const bool bytes_waiters = ctl_->space_waiters.load(std::memory_order_relaxed) != 0;
  const bool slot_waiters = ctl_->item_waiters.load(std::memory_order_relaxed) != 0;
  if (slot_waiters || (bytes_waiters && ctl_->tail.load(std::memory_order_acquire) -
                                                ctl_->head.load(std::memory_order_acquire) <= capacity_ / 2)) {
    ctl_->space_futex.fetch_add(1, std::memory_order_release);
    futex::wake(&ctl_->space_futex, INT32_MAX);
  }
}

// The readiness protocol (ring.md, "Readiness"): the eventfd is readable exactly while a frame is
// published, so that a poll()/select() caller's next get never blocks. `signaled` holds a state in
// its low bits, kSignalClear (the eventfd is drained), kSignalling (one thread holds the signal: it
// is checking for a frame, draining or writing the eventfd; everyone else leaves the signal to it)
// or kSignalled (written), and above them a generation that every claim advances, so that a holder
// that was taken over (refresh_readiness) can no longer change the state: each of its transitions
// is a compare-exchange against the exact word it claimed. A producer signals after it publishes,
// so it can find its own frame already taken by a consumer that woke for an earlier one: it must
// not write then (the eventfd would be readable over an empty ring: a recv() after a wait() would
// block).
namespace {
constexpr std::uint32_t signal_state(std::uint32_t word) noexcept { return word & Ring::kSignalStateMask; }
// The word a claim of `word` writes: the next generation, held.
constexpr std::uint32_t signal_claim(std::uint32_t word) noexcept {
  return ((word & ~Ring::kSignalStateMask) + Ring::kSignalStateMask + 1) | Ring::kSignalling;
}
constexpr std::uint32_t signal_with(std::uint32_t held, std::uint32_t state) noexcept {
  return (held & ~Ring::kSignalStateMask) | state;
}
}  // namespace

void Ring::signal_if_readable() noexcept {
  for (;;) {
    std::uint32_t word = ctl_->signaled.load(std::memory_order_seq_cst);
    if (signal_state(word) != kSignalClear) return;  // held or written: not ours to do
    const std::uint32_t held = signal_claim(word);
    if (!ctl_->signaled.compare_exchange_strong(word, held, std::memory_order_seq_cst)) continue;
    if (!finish_signal(held)) return;
  }
}

bool Ring::finish_signal(std::uint32_t held) noexcept {
  // With the signal held (the word `held`). Seq_cst: pairs with the producers' fence between
  // their publish and their look at signaled (notify_data): a producer that saw the signal held
  // and left it to us published before we look, or before we release below.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  std::uint32_t expected = held;
  if (readable()) {
    eventfd_signal(event_.get());
    // Fails only if a consumer took the signal over meanwhile: it drains and re-checks itself.
    ctl_->signaled.compare_exchange_strong(expected, signal_with(held, kSignalled), std::memory_order_seq_cst);
    return false;
  }
  // Nothing to signal (the frame we came for was taken): release, then look again for a frame
  // whose producer saw the signal held (the same Dekker pairing); true: claim again for it.
  if (!ctl_->signaled.compare_exchange_strong(expected, signal_with(held, kSignalClear), std::memory_order_seq_cst))
    return false;
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return readable();
}

void Ring::refresh_readiness(BlockingHook* hook) {
  // After a take: if the ring is now empty, hold the signal, drain the eventfd and re-check
  // (finish_signal). Holding it while we drain means no write can land in between and be eaten
  // by the drain (a lost wake-up); a producer that publishes meanwhile leaves the signal to us,
  // and we see its frame. A thread that holds the signal is waited out, so that its write cannot
  // land after our drain. The wait is bounded: a holder that died there (or stalls longer) is
  // taken over (a claim of the next generation, so none of its own transitions can succeed any
  // more); one that merely stalled may then still write once over an empty ring.
  if (readable()) return;
  const auto deadline = std::chrono::steady_clock::now() + kSignallerWait;
  const auto holder_busy = [&] {
    return signal_state(ctl_->signaled.load(std::memory_order_seq_cst)) == kSignalling &&
           std::chrono::steady_clock::now() < deadline;
  };
  std::uint32_t held;
  for (;;) {
    std::uint32_t word = ctl_->signaled.load(std::memory_order_seq_cst);
    if (signal_state(word) == kSignalling && std::chrono::steady_clock::now() < deadline) {
      // Usually a few instructions away from done; a preempted or dead holder takes longer, so
      // the wait runs through the hook (without the caller's GIL).
      run_blocking(hook, [&] {
        while (holder_busy()) ::sched_yield();
      });
      continue;
    }
    held = signal_claim(word);
    if (ctl_->signaled.compare_exchange_weak(word, held, std::memory_order_seq_cst)) break;
  }
  eventfd_drain(event_.get());
  if (finish_signal(held)) signal_if_readable();
}

int Ring::readiness_fd() {
  // poll_armed is never cleared, so once armed every later publish signals for itself: nothing
  // below needs doing twice. Relaxed: the flag guards no data of ours, only repeated work (two
  // threads arming at once both do the idempotent sweep below).
  if (armed_.load(std::memory_order_relaxed)) return event_.get();
  ctl_->poll_armed.store(1, std::memory_order_seq_cst);
  // Frames published before producers saw poll_armed were not signalled: signal for them.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  signal_if_readable();
  armed_.store(true, std::memory_order_relaxed);
  return event_.get();
}

bool Ring::readable() const noexcept {
  return ctl_->head.load(std::memory_order_acquire) != ctl_->tail.load(std::memory_order_acquire);
}

bool Ring::writable(std::size_t record_bytes) const noexcept {
  const std::uint64_t t = ctl_->tail.load(std::memory_order_acquire);
  const std::uint64_t h = ctl_->head.load(std::memory_order_acquire);
  return t + record_bytes - h <= capacity_;
}

namespace {

// The waiting half of every Dekker pair in this file: register as a waiter (seq_cst, pairs with
// the notifier's fence + load of the waiter count), read the futex word, re-check the condition
// (so a notification between the check and the sleep is never lost: the word moved and
// FUTEX_WAIT returns at once), sleep, unregister.
template <class Cond>
futex::WaitResult wait_on(std::atomic<std::uint32_t>& waiters, std::atomic<std::uint32_t>& word, Cond&& done,
                          std::int64_t timeout_ns) {
  waiters.fetch_add(1, std::memory_order_seq_cst);
  const std::uint32_t v = word.load(std::memory_order_acquire);
  futex::WaitResult r = futex::WaitResult::woken;
  if (!done()) r = futex::wait(&word, v, timeout_ns);
  waiters.fetch_sub(1, std::memory_order_relaxed);
  return r;
}

}  // namespace

futex::WaitResult Ring::wait_data(std::int64_t timeout_ns) {
  return wait_on(ctl_->data_waiters, ctl_->data_futex, [&] { return readable(); }, timeout_ns);
}

futex::WaitResult Ring::wait_data_any(Ring* const* rings, std::size_t n, std::atomic<std::uint32_t>* bell,
                                      std::uint32_t bell_seen, std::int64_t timeout_ns) {
  // Each ring's half of wait_data's Dekker pair (register, read the word, re-check), then one
  // sleep on all the words; the bell is this process's own (a private futex).
  const std::size_t waited = std::min(n, kMaxWaitAny - 1);
  if (waited < n && (timeout_ns < 0 || timeout_ns > kWaitAnyOverflowNs)) timeout_ns = kWaitAnyOverflowNs;
  futex_waitv w[kMaxWaitAny];
  for (std::size_t i = 0; i < waited; ++i) {
    RingControl* c = rings[i]->ctl_;
    c->data_waiters.fetch_add(1, std::memory_order_seq_cst);
    w[i] = futex_waitv{c->data_futex.load(std::memory_order_acquire),
                       reinterpret_cast<std::uintptr_t>(&c->data_futex), FUTEX_32, 0};
  }
  w[waited] = futex_waitv{bell_seen, reinterpret_cast<std::uintptr_t>(bell), FUTEX_32 | FUTEX_PRIVATE_FLAG, 0};
  bool ready = bell->load(std::memory_order_acquire) != bell_seen;
  for (std::size_t i = 0; i < n && !ready; ++i) ready = rings[i]->readable();
  futex::WaitResult r = futex::WaitResult::woken;
  if (!ready) r = futex::wait_any(w, waited + 1, timeout_ns);
  for (std::size_t i = 0; i < waited; ++i) rings[i]->ctl_->data_waiters.fetch_sub(1, std::memory_order_relaxed);
  return r;
}

futex::WaitResult Ring::wait_space(std::size_t record_bytes, std::int64_t timeout_ns) {
  return wait_on(ctl_->space_waiters, ctl_->space_futex, [&] { return writable(record_bytes); }, timeout_ns);
}

futex::WaitResult Ring::wait_item_slot(std::int64_t maxsize, std::int64_t timeout_ns) {
  return wait_on(ctl_->item_waiters, ctl_->space_futex, [&] { return items() < maxsize; }, timeout_ns);
}

bool Ring::try_acquire_item(std::int64_t maxsize) noexcept {
  std::int64_t c = ctl_->items.load(std::memory_order_relaxed);
  while (c < maxsize)
    if (ctl_->items.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) return true;
  return false;
}

bool Ring::task_done() noexcept {
  std::int64_t c = ctl_->unfinished.load(std::memory_order_relaxed);
  do {
    if (c <= 0) return false;
  } while (!ctl_->unfinished.compare_exchange_weak(c, c - 1, std::memory_order_acq_rel));
  if (c == 1) {
    // Dekker pair with join_waiters in wait_all_done, as in notify_data.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (ctl_->join_waiters.load(std::memory_order_relaxed) != 0) {
      ctl_->join_futex.fetch_add(1, std::memory_order_release);
      futex::wake(&ctl_->join_futex, INT32_MAX);
    }
  }
  return true;
}

futex::WaitResult Ring::wait_all_done(std::int64_t timeout_ns) {
  return wait_on(ctl_->join_waiters, ctl_->join_futex, [&] { return unfinished() <= 0; }, timeout_ns);
}

}  // namespace ringpool
