// qsengine core: Philox4x64-10 counter-based random numbers, bit-identical to
// numpy.random.Philox.
//
// Convention (the same as numpy): a 128-bit key (k0, k1) and a 256-bit counter
// (c0, c1, c2, c3). numpy increments the counter *before* each block of four
// outputs, so `numpy.random.Philox(key=[k0, k1], counter=[c0, c1, c2, c3])`
// yields philox(c0+1, ...), philox(c0+2, ...), ... (with carry into c1).
//
// Streams. qsengine never keys randomness by thread. A stream is named by
//   (seed key, index, purpose)
// and is exactly the numpy stream
//   numpy.random.Philox(key=[k0, k1], counter=[0, 0, index, purpose]),
// i.e. word 0 of the counter counts 4-word outputs inside the stream, word 1
// takes its (never reached) carry, word 2 holds the work-block index (or the
// layer index for per-layer draws) and word 3 the purpose code (see
// routing.cc). Different (index, purpose) pairs therefore never overlap.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "qsengine's PhiloxStream assumes a little-endian target"
#endif

namespace qs {

struct PhiloxKey {
  std::uint64_t k0 = 0;
  std::uint64_t k1 = 0;
};

// GCC/Clang 128-bit integer (marked __extension__ to stay -Wpedantic clean).
__extension__ typedef unsigned __int128 u128;

namespace philox_detail {
constexpr std::uint64_t kM0 = 0xD2E7470EE14C6C93ull;
constexpr std::uint64_t kM1 = 0xCA5A826395121157ull;
constexpr std::uint64_t kW0 = 0x9E3779B97F4A7C15ull;
constexpr std::uint64_t kW1 = 0xBB67AE8584CAA73Bull;

inline void mulhilo(std::uint64_t a, std::uint64_t b, std::uint64_t& hi, std::uint64_t& lo) {
  const u128 p = static_cast<u128>(a) * b;
  hi = static_cast<std::uint64_t>(p >> 64);
  lo = static_cast<std::uint64_t>(p);
}
}  // namespace philox_detail

// One Philox4x64-10 block: 4 output words for counter `ctr` and key `key`.
inline void philox4x64_10(const std::uint64_t ctr[4], PhiloxKey key, std::uint64_t out[4]) {
  using namespace philox_detail;
  std::uint64_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  std::uint64_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    std::uint64_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, hi0, lo0);
    mulhilo(kM1, c2, hi1, lo1);
    const std::uint64_t n0 = hi1 ^ c1 ^ k0;
    const std::uint64_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Two independent Philox blocks for counters (c0+1, c0+2, c1, c2, c3), fully
// unrolled and lane-interleaved so the CPU overlaps the two multiply chains
// (measured fastest on x86-64; more lanes spill registers). out[4*j + w] is
// word w of block j. Requires c0 + 2 not to wrap (a stream would need 2^66
// words).
inline void philox4x64_10_x2(std::uint64_t c0, std::uint64_t c1, std::uint64_t c2, std::uint64_t c3,
                             PhiloxKey key, std::uint64_t out[8]) {
  using namespace philox_detail;
  std::uint64_t a[2] = {c0 + 1, c0 + 2}, b[2] = {c1, c1}, c[2] = {c2, c2}, d[2] = {c3, c3};
  std::uint64_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
#pragma GCC unroll 2
    for (int j = 0; j < 2; ++j) {
      std::uint64_t hi0, lo0, hi1, lo1;
      mulhilo(kM0, a[j], hi0, lo0);
      mulhilo(kM1, c[j], hi1, lo1);
      const std::uint64_t n0 = hi1 ^ b[j] ^ k0;
      const std::uint64_t n2 = hi0 ^ d[j] ^ k1;
      a[j] = n0;
      b[j] = lo1;
      c[j] = n2;
      d[j] = lo0;
    }
  }
  for (int j = 0; j < 2; ++j) {
    out[4 * j + 0] = a[j];
    out[4 * j + 1] = b[j];
    out[4 * j + 2] = c[j];
    out[4 * j + 3] = d[j];
  }
}

// A buffered stream of 64-bit words, equal word for word to
//   numpy.random.Philox(key=[k0, k1], counter=[0, 0, index, purpose]).random_raw()
// 32-bit draws split each word into its low half, then its high half.
class PhiloxStream {
 public:
  static constexpr int kWords = 64;  // 16 Philox blocks per refill

  PhiloxStream() = default;
  PhiloxStream(PhiloxKey key, std::uint64_t index, std::uint64_t purpose) { reset(key, index, purpose); }

  void reset(PhiloxKey key, std::uint64_t index, std::uint64_t purpose) {
    key_ = key;
    index_ = index;
    purpose_ = purpose;
    blocks_done_ = 0;
    pos32_ = 2 * kWords;
  }

  std::uint64_t next64() {
    pos32_ += pos32_ & 1;  // drop an unused high half to stay word aligned
    if (pos32_ >= 2 * kWords) refill();
    const std::uint64_t w = static_cast<std::uint64_t>(half_[pos32_]) | (static_cast<std::uint64_t>(half_[pos32_ + 1]) << 32);
    pos32_ += 2;
    return w;
  }

  std::uint32_t next32() {
    if (pos32_ >= 2 * kWords) refill();
    return half_[pos32_++];
  }

  // Uniform double in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next64() >> 11) * 0x1.0p-53; }

  // Uniform double in (0, 1]: safe for log().
  double uniform_pos() { return (static_cast<double>(next64() >> 11) + 1.0) * 0x1.0p-53; }

  // Exact uniform integer in [0, n), n >= 1 (Lemire's multiply-shift on 64
  // bits with rejection, so there is no bias at all).
  std::uint64_t below(std::uint64_t n) {
    std::uint64_t x = next64();
    u128 m = static_cast<u128>(x) * n;
    std::uint64_t l = static_cast<std::uint64_t>(m);
    if (l < n) {
      const std::uint64_t t = (0 - n) % n;
      while (l < t) {
        x = next64();
        m = static_cast<u128>(x) * n;
        l = static_cast<std::uint64_t>(m);
      }
    }
    return static_cast<std::uint64_t>(m >> 64);
  }

  // Standard normal (Box-Muller, one value per call; deterministic).
  double normal() {
    const double u1 = uniform_pos();
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

 // Bulk access: every 32-bit value still buffered (refilling first if none
  // is), marked consumed. Returns the count; *out points at the values.
  int take_all32(const std::uint32_t** out) {
    if (pos32_ >= 2 * kWords) refill();
    *out = half_ + pos32_;
    const int n = 2 * kWords - pos32_;
    pos32_ = 2 * kWords;
    return n;
  }

  // Hot loops: copy the read position into a local Cursor (kept in a register,
  // immune to aliasing by the caller's stores), draw, then give it back.
  class Cursor {
   public:
    explicit Cursor(PhiloxStream& s) : s_(s), half_(s.half_), pos_(s.pos32_) {}
    ~Cursor() { s_.pos32_ = pos_; }
    Cursor(const Cursor&) = delete;
    Cursor& operator=(const Cursor&) = delete;
    std::uint32_t next32() {
      if (__builtin_expect(pos_ >= 2 * kWords, 0)) {
        s_.refill();
        pos_ = 0;
      }
      return half_[pos_++];
    }
    // For slow paths that need the full stream API.
    PhiloxStream& sync() {
      s_.pos32_ = pos_;
      return s_;
    }
    void resync() { pos_ = s_.pos32_; }

   private:
    PhiloxStream& s_;
    const std::uint32_t* half_;
    int pos_;
  };

 private:
  __attribute__((noinline)) void refill() {
    std::uint64_t w[8];
    for (int q = 0; q < kWords / 8; ++q) {
      philox4x64_10_x2(blocks_done_, 0, index_, purpose_, key_, w);
      blocks_done_ += 2;
      // Little-endian: a word's bytes are its low half, then its high half.
      std::memcpy(half_ + 16 * q, w, sizeof(w));
    }
    pos32_ = 0;
  }

  PhiloxKey key_{};
  std::uint64_t index_ = 0;
  std::uint64_t purpose_ = 0;
  std::uint64_t blocks_done_ = 0;
  int pos32_ = 2 * kWords;
  std::uint32_t half_[2 * kWords];  // word i = half_[2i] | half_[2i+1] << 32
};

}  // namespace qs
