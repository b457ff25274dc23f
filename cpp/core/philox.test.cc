// Known-answer tests of qs::PhiloxStream against numpy.random.Philox.
// Expected words were produced by
//   numpy.random.Philox(key=np.array([k0, k1], dtype=np.uint64),
//                       counter=np.array([0, 0, index, purpose], dtype=np.uint64)).random_raw(8)
// (pass uint64 arrays: a Python int above 2**63 in a plain list loses bits).
#include "core/philox.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "core/test_util.h"

namespace {


void check_stream(qs::PhiloxKey key, std::uint64_t index, std::uint64_t purpose, const std::uint64_t (&expected)[8]) {
  qs::PhiloxStream s(key, index, purpose);
  for (int i = 0; i < 8; ++i) {
    const std::uint64_t got = s.next64();
    if (got != expected[i]) {
      std::fprintf(stderr, "philox mismatch key=(%llx,%llx) index=%llu purpose=%llu word %d: got %016llx want %016llx\n",
                   (unsigned long long)key.k0, (unsigned long long)key.k1, (unsigned long long)index,
                   (unsigned long long)purpose, i, (unsigned long long)got, (unsigned long long)expected[i]);
      ++qs::test::failures;
    }
  }
}

void check_split32() {
  qs::PhiloxStream a({1, 2}, 0, 0), b({1, 2}, 0, 0);
  for (int i = 0; i < 300; ++i) {
    const std::uint64_t w = a.next64();
    const std::uint32_t lo = b.next32(), hi = b.next32();
    if (lo != static_cast<std::uint32_t>(w) || hi != static_cast<std::uint32_t>(w >> 32)) {
      std::fprintf(stderr, "next32 split mismatch at word %d\n", i);
      ++qs::test::failures;
      return;
    }
  }
}

void check_below() {
  qs::PhiloxStream s({3, 4}, 1, 1);
  long counts[7] = {0};
  for (int i = 0; i < 70000; ++i) ++counts[s.below(7)];
  for (long c : counts)
    if (c < 9500 || c > 10500) {
      std::fprintf(stderr, "below(7) frequency out of range: %ld\n", c);
      ++qs::test::failures;
    }
}

}  // namespace

int main() {
  check_stream({1, 2}, 0, 0,
               {0x4f2f4313b5536b09ull, 0x5b617be3219ff32aull, 0x097293476f9275cbull, 0xf63f3bf4962c3942ull,
                0x04dcc60473aa0f43ull, 0x6d905c9b986b0028ull, 0x559a6c953d16fe9dull, 0xbd24fd1da9945eeaull});
  check_stream({0x0123456789abcdefull, 0xfedcba9876543210ull}, 7, 3,
               {0x59c7f5465ac70500ull, 0xee54e14a98aeb75bull, 0xb2ddede6c6e2d0acull, 0xa5ea53c1e9f8d0efull,
                0xa12302b012b4de8cull, 0x2b17ba479ce9e2c2ull, 0x9580db6793fe3b15ull, 0xc1a644a113dba122ull});
  check_split32();
  check_below();
  return qs::test::report("philox");
}
