// qsengine core: packed alias tables (see alias.h).
#include "core/alias.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QS_ROUTING_X86_DISPATCH 1
#endif

namespace qs::routing {

namespace {

// Vose's construction in exact integer arithmetic: column capacity 2^32
// units, total m * 2^32 units shared out by weight (floor, then the
// remaining units to the largest fractional parts). Every pairing is exact,
// so no column is left over by rounding (a floating-point Vose can leave a
// zero-weight column "full" of itself, which would draw it).
void vose(const std::vector<double>& weights, std::vector<std::uint32_t>& thr,
          std::vector<std::uint32_t>& alias) {
  const std::uint32_t m = static_cast<std::uint32_t>(weights.size());
  constexpr std::int64_t kCap = std::int64_t{1} << 32;
  thr.assign(m, 0);
  alias.assign(m, 0);
  double total = 0.0;
  for (double x : weights) total += x;
  std::vector<std::int64_t> q(m);
  std::vector<double> frac(m);
  const double scale = static_cast<double>(m) * 4294967296.0 / total;
  std::int64_t sum = 0;
  std::uint32_t biggest = 0;
  for (std::uint32_t i = 0; i < m; ++i) {
    const double x = weights[i] * scale;
    q[i] = static_cast<std::int64_t>(std::floor(x));
    frac[i] = weights[i] > 0.0 ? x - static_cast<double>(q[i]) : -1.0;  // zero weights get no units
    sum += q[i];
    if (q[i] > q[biggest]) biggest = i;
  }
  std::int64_t deficit = static_cast<std::int64_t>(m) * kCap - sum;
  if (deficit > 0) {
    std::vector<std::uint32_t> order(m);
    for (std::uint32_t i = 0; i < m; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) { return frac[a] > frac[b]; });
    for (std::uint32_t j = 0; j < m && deficit > 0 && frac[order[j]] >= 0.0; ++j, --deficit) ++q[order[j]];
  }
  q[biggest] += deficit;  // whatever is left (double rounding of huge columns): negligible
  std::vector<std::uint32_t> small, large;
  for (std::uint32_t i = 0; i < m; ++i) (q[i] < kCap ? small : large).push_back(i);
  while (!small.empty() && !large.empty()) {
    const std::uint32_t s = small.back();
    small.pop_back();
    const std::uint32_t l = large.back();
    thr[s] = static_cast<std::uint32_t>(q[s]);
    alias[s] = l;
    q[l] -= kCap - q[s];
    if (q[l] < kCap) {
      large.pop_back();
      small.push_back(l);
    }
  }
  // Exact arithmetic: every column left holds exactly kCap units.
  for (std::uint32_t i : large) {
    thr[i] = 0xFFFFFFFFu;
    alias[i] = i;  // a full column: the coin does not matter
  }
  for (std::uint32_t i : small) {  // unreachable unless the units did not add up
    thr[i] = 0xFFFFFFFFu;
    alias[i] = i;
  }
}

}  // namespace

void AliasTable::build(const std::vector<double>& weights, bool with_small) {
  n = static_cast<std::uint32_t>(weights.size());
  lemire_t = static_cast<std::uint32_t>((0x100000000ull) % n);
  w = weights;
  vose(weights, thr, alias);
  packed.resize(n);
  for (std::uint32_t i = 0; i < n; ++i) packed[i] = thr[i] | (static_cast<std::uint64_t>(alias[i]) << 32);
  small = with_small && n <= 256;
  if (small) {
    std::vector<double> padded(weights);
    padded.resize(256, 0.0);
    std::vector<std::uint32_t> t, a;
    vose(padded, t, a);
    for (std::uint32_t i = 0; i < 256; ++i) {
      const bool tie = (t[i] & 0xFFFFFFu) != 0 && a[i] != i;
      sm[i] = (t[i] >> 24) | (a[i] << 8) | (static_cast<std::uint32_t>(tie) << 16);
      sm_thr[i] = t[i];
      sm_t8[i] = static_cast<std::uint8_t>(t[i] >> 24);
      sm_al[i] = static_cast<std::uint8_t>(a[i]);
    }
  }
}

namespace alias_detail {

std::atomic<bool> g_portable_only{false};

void convert16_portable(const AliasTable& tab, const unsigned char* bytes, int n, std::uint8_t* out,
                        PhiloxStream& tie) {
  for (int i = 0; i < n; ++i) {
    std::uint16_t x;
    std::memcpy(&x, bytes + 2 * i, sizeof(x));  // little-endian: low half of each word first
    out[i] = static_cast<std::uint8_t>(tab.draw16(x, tie));
  }
}

#ifdef QS_ROUTING_X86_DISPATCH
// AVX-512 VBMI: 32 draws per step; the 256-byte threshold and alias tables are
// looked up with two 128-byte vpermi2b each. Lanes whose coin byte equals the
// threshold byte are redone by the scalar draw16 (in lane order), which
// consumes tie bits exactly when the portable loop would.
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void convert16_vbmi(const AliasTable& tab,
                                                                          const unsigned char* bytes, int n,
                                                                          std::uint8_t* out, PhiloxStream& tie) {
  const std::uint8_t* t8 = tab.sm_t8;
  const std::uint8_t* al = tab.sm_al;
  const __m512i tA = _mm512_loadu_si512(t8), tB = _mm512_loadu_si512(t8 + 64);
  const __m512i tC = _mm512_loadu_si512(t8 + 128), tD = _mm512_loadu_si512(t8 + 192);
  const __m512i aA = _mm512_loadu_si512(al), aB = _mm512_loadu_si512(al + 64);
  const __m512i aC = _mm512_loadu_si512(al + 128), aD = _mm512_loadu_si512(al + 192);
  const __m512i lowbyte = _mm512_set1_epi16(0x00FF);
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i x = _mm512_loadu_si512(bytes + 2 * i);
    const __m512i col = _mm512_and_si512(x, lowbyte);
    const __m512i c8 = _mm512_srli_epi16(x, 8);
    const __mmask64 hi = _mm512_movepi8_mask(col);  // column >= 128
    const __m512i thr = _mm512_and_si512(
        _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(tA, col, tB), _mm512_permutex2var_epi8(tC, col, tD)),
        lowbyte);
    const __m512i ali = _mm512_and_si512(
        _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(aA, col, aB), _mm512_permutex2var_epi8(aC, col, aD)),
        lowbyte);
    const __mmask32 keep = _mm512_cmplt_epu16_mask(c8, thr);
    const __mmask32 tie_lanes = _mm512_cmpeq_epu16_mask(c8, thr);
    const __m512i e = _mm512_mask_blend_epi16(keep, ali, col);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_mask_cvtepi16_epi8(_mm256_setzero_si256(), 0xFFFFFFFFu, e));
    for (std::uint32_t m = tie_lanes; m != 0; m &= m - 1) {
      const int j = i + __builtin_ctz(m);
      std::uint16_t xv;
      std::memcpy(&xv, bytes + 2 * j, sizeof(xv));
      out[j] = static_cast<std::uint8_t>(tab.draw16(xv, tie));
    }
  }
  convert16_portable(tab, bytes + 2 * i, n - i, out + i, tie);
}
#endif

Convert16 pick_convert16() {
#ifdef QS_ROUTING_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vbmi"))
    return convert16_vbmi;
#endif
  return convert16_portable;
}

const Convert16 g_convert16_best = pick_convert16();

}  // namespace alias_detail

void set_portable_only(bool on) { alias_detail::g_portable_only.store(on, std::memory_order_relaxed); }

}  // namespace qs::routing
