// A keyed hash for tables whose keys come from untrusted input (internal to the runtime).
//
// Why keyed: with an unkeyed hash (std::hash, an identity on integers, or a public mixing
// function) a sender can choose many distinct keys with the same hash, or the same bucket, and
// every lookup in a hash table turns into a scan: decoding n such keys costs O(n^2). SipHash-1-3
// with a random key drawn once per process (what CPython uses for str since 3.11) makes the
// hashes unpredictable to a sender who does not know the key, so lookups stay O(1) expected for
// any input. Children forked from this process share the key, as they share everything else.
#pragma once

#include <sys/random.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>

namespace ringpool::detail {

struct SipKey {
  std::uint64_t k0, k1;
};

// Drawn on first use. getrandom() does not block once the kernel's pool is initialized (long
// before any worker runs); random_device is the fallback for a kernel without the syscall.
inline const SipKey& process_hash_key() {
  static const SipKey key = [] {
    SipKey k{};
    if (::getrandom(&k, sizeof k, 0) != static_cast<ssize_t>(sizeof k)) {
      std::random_device rd;
      k.k0 = (std::uint64_t{rd()} << 32) ^ rd();
      k.k1 = (std::uint64_t{rd()} << 32) ^ rd();
    }
    return k;
  }();
  return key;
}

// Streaming SipHash-c-d (Aumasson and Bernstein; c compression and d finalization rounds):
// feed bytes with update(), read the hash with finish(). SipHasher is SipHash-1-3.
template <int C, int D>
class SipHashCD {
 public:
  explicit SipHashCD(const SipKey& key = process_hash_key())
      : v0_(key.k0 ^ 0x736f6d6570736575ULL),
        v1_(key.k1 ^ 0x646f72616e646f6dULL),
        v2_(key.k0 ^ 0x6c7967656e657261ULL),
        v3_(key.k1 ^ 0x7465646279746573ULL) {}

  SipHashCD& update(const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    total_ += n;
    while (n > 0) {
      const std::size_t take = n < 8 - fill_ ? n : 8 - fill_;
      for (std::size_t i = 0; i < take; ++i) tail_ |= std::uint64_t{p[i]} << (8 * (fill_ + i));
      fill_ += take;
      p += take;
      n -= take;
      if (fill_ == 8) {
        compress(tail_);
        tail_ = 0;
        fill_ = 0;
      }
    }
    return *this;
  }
  SipHashCD& update_u64(std::uint64_t x) {
    unsigned char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(x >> (8 * i));
    return update(b, sizeof b);
  }

  std::uint64_t finish() const {
    SipHashCD s = *this;
    s.compress(s.tail_ | (static_cast<std::uint64_t>(s.total_ & 0xff) << 56));
    s.v2_ ^= 0xff;
    for (int i = 0; i < D; ++i) s.round();
    return s.v0_ ^ s.v1_ ^ s.v2_ ^ s.v3_;
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int b) { return (x << b) | (x >> (64 - b)); }
  void round() {
    v0_ += v1_; v1_ = rotl(v1_, 13); v1_ ^= v0_; v0_ = rotl(v0_, 32);
    v2_ += v3_; v3_ = rotl(v3_, 16); v3_ ^= v2_;
    v0_ += v3_; v3_ = rotl(v3_, 21); v3_ ^= v0_;
    v2_ += v1_; v1_ = rotl(v1_, 17); v1_ ^= v2_; v2_ = rotl(v2_, 32);
  }
  void compress(std::uint64_t m) {
    v3_ ^= m;
    for (int i = 0; i < C; ++i) round();
    v0_ ^= m;
  }

  std::uint64_t v0_, v1_, v2_, v3_;
  std::uint64_t tail_ = 0;  // the bytes of an incomplete 8-byte word, little-endian
  std::size_t fill_ = 0;    // how many of them
  std::uint64_t total_ = 0;
};
using SipHasher = SipHashCD<1, 3>;

// The hasher for std::unordered_map keys that an input chooses (pickle memo indices).
struct KeyedIntHash {
  std::size_t operator()(std::uint64_t x) const noexcept {
    return static_cast<std::size_t>(SipHasher().update_u64(x).finish());
  }
};

}  // namespace ringpool::detail
