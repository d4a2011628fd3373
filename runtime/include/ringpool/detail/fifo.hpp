// ringpool::detail::Fifo: the task queues' container (the scheduler's backlog and each worker's
// queue of unanswered calls). Internal to the runtime: not public API.
#pragma once

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

namespace ringpool::detail {

// A first-in first-out queue in one circular buffer that doubles when full. Tasks pass through
// the backlog and a worker's queue at hundreds of thousands a second; std::deque allocates and
// frees a node every few of them, and those frees (from another thread than the allocations)
// kept glibc consolidating its free lists. This allocates only to grow; trim() gives a large
// buffer back once a burst is over. T is default-constructible and movable; a slot keeps its
// moved-from element until it is reused or cleared.
template <class T>
class Fifo {
 public:
  bool empty() const noexcept { return size_ == 0; }
  std::size_t size() const noexcept { return size_; }
  T& operator[](std::size_t i) noexcept { return slots_[(head_ + i) & (slots_.size() - 1)]; }
  const T& operator[](std::size_t i) const noexcept { return slots_[(head_ + i) & (slots_.size() - 1)]; }
  T& front() noexcept { return (*this)[0]; }
  T& back() noexcept { return (*this)[size_ - 1]; }
  void push_back(T&& v) { append() = std::move(v); }
  // A new last slot, to be filled in place (it holds a default or moved-from T).
  T& append() {
    if (size_ == slots_.size()) grow();
    return (*this)[size_++];
  }
  void push_front(T&& v) {
    if (size_ == slots_.size()) grow();
    head_ = (head_ + slots_.size() - 1) & (slots_.size() - 1);
    slots_[head_] = std::move(v);
    ++size_;
  }
  T take_front() {
    T v = std::move(front());
    drop_front();
    return v;
  }
  // Forgets the first element (its slot keeps it until reused).
  void drop_front() noexcept {
    head_ = (head_ + 1) & (slots_.size() - 1);
    --size_;
  }
  // Removes element i, moving the ones after it forward (O(size - i): for rare corrections).
  void erase(std::size_t i) {
    for (std::size_t j = i; j + 1 < size_; ++j) (*this)[j] = std::move((*this)[j + 1]);
    (*this)[size_ - 1] = T();
    --size_;
  }
  void clear() {
    for (std::size_t i = 0; i < size_; ++i) (*this)[i] = T();
    head_ = size_ = 0;
  }
  // Room for n more elements in one step (a batch about to be appended), instead of doubling
  // its way there.
  void reserve(std::size_t n) {
    std::size_t cap = std::max<std::size_t>(16, slots_.size());
    while (cap < size_ + n) cap *= 2;
    if (cap != slots_.size()) grow_to(cap);
  }
  // Gives the buffer back if the queue is empty and holds more than kKeep slots (after a burst).
  void trim() {
    if (size_ == 0 && slots_.size() > kKeep) std::vector<T>().swap(slots_);
    head_ = 0;
  }

 private:
  static constexpr std::size_t kKeep = std::size_t{1} << 16;
  void grow() { grow_to(std::max<std::size_t>(16, slots_.size() * 2)); }
  void grow_to(std::size_t cap) {
    std::vector<T> bigger(cap);
    for (std::size_t i = 0; i < size_; ++i) bigger[i] = std::move((*this)[i]);
    slots_.swap(bigger);
    head_ = 0;
  }
  std::vector<T> slots_;  // a power of two in size
  std::size_t head_ = 0, size_ = 0;
};

}  // namespace ringpool::detail
