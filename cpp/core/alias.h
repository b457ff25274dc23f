// qsengine core: packed Walker/Vose alias tables in exact integer arithmetic.
//
// An AliasTable over n outcomes draws outcome i with probability exactly
// (units of i) / (n * 2^32), where the units are the weights' shares of
// n * 2^32 rounded by largest remainders (see vose()). Two draw schemes:
//
// n <= 256 ("small", expert tables): the table is padded with zero-weight
// columns to exactly 256 columns and each draw uses 16 random bits: the low
// byte is the column (exactly uniform, no rejection), the high byte c8 is the
// top byte of a 32-bit coin U compared with the column's threshold T:
// c8 < T>>24 accepts, c8 > T>>24 takes the alias, and on a tie (probability
// <= 1/256) 24 further bits from the block's tie stream complete the exact
// comparison U < T. A whole refill is converted at once (convert16), with
// AVX-512 VBMI when the CPU has it (chosen at run time; the portable loop
// gives identical output, see set_portable_only).
//
// Any n (32-bit scheme, also used for group tables): column floor(x*n/2^32)
// with Lemire's exact rejection, coin = low 32 bits of x*n compared with T
// (bias <= n * 2^-32 per column; see routing.h).
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "core/philox.h"

namespace qs::routing {

struct AliasTable {
  std::uint32_t n = 0;
  std::uint32_t lemire_t = 0;         // 2^32 mod n: reject x*n low words below it
  std::vector<std::uint32_t> thr;     // accept column i iff low word < thr[i]
  std::vector<std::uint32_t> alias;   // otherwise take alias[i]
  std::vector<std::uint64_t> packed;  // thr[i] | alias[i] << 32 (one load per draw)
  std::vector<double> w;              // the exact weights (for the fallback)
  // n <= 256 only: the same weights padded with zeros to exactly 256 columns
  // (zero-weight columns always take their alias), drawn with 16 bits (see the
  // file comment). The decision is exactly U < T.
  bool small = false;
  std::uint32_t sm[256] = {};      // T>>24 | alias << 8 | tie-possible << 16
  std::uint32_t sm_thr[256] = {};  // T (low 24 bits settle a tie)
  std::uint8_t sm_t8[256] = {};    // T>>24 and alias as byte tables (SIMD lookups)
  std::uint8_t sm_al[256] = {};

  // with_small: also build the padded 16-bit table (expert tables, n <= 256;
  // group tables are drawn with 32 bits and skip it).
  void build(const std::vector<double>& weights, bool with_small);

  // One 16-bit draw of a small table (the tie stream supplies rare extra bits).
  std::uint32_t draw16(std::uint32_t x, PhiloxStream& tie) const {
    const std::uint32_t col = x & 0xFFu, c8 = x >> 8;
    const std::uint32_t ent = sm[col];
    const std::uint32_t t8 = ent & 0xFFu;
    const std::uint32_t al = (ent >> 8) & 0xFFu;
    // Arithmetic select: the coin is unpredictable, a branch would mispredict.
    const std::uint32_t use_alias = 0u - static_cast<std::uint32_t>(c8 >= t8);
    std::uint32_t e = col ^ ((col ^ al) & use_alias);
    if (__builtin_expect((c8 == t8) & (ent >> 16), 0)) e = (tie.next32() >> 8) < (sm_thr[col] & 0xFFFFFFu) ? col : al;
    return e;
  }
};

// Bulk conversion of n 16-bit draws (little-endian, low half of each 32-bit
// word first) of a small table to outcomes. A pure function of the draws and
// the tie stream (consumed in draw order): every variant gives identical output.
using Convert16 = void (*)(const AliasTable&, const unsigned char*, int, std::uint8_t*, PhiloxStream&);

namespace alias_detail {
extern std::atomic<bool> g_portable_only;
extern const Convert16 g_convert16_best;
void convert16_portable(const AliasTable& tab, const unsigned char* bytes, int n, std::uint8_t* out,
                        PhiloxStream& tie);
}  // namespace alias_detail

// The fastest conversion this CPU supports (the portable loop under
// set_portable_only(true)).
inline Convert16 convert16() {
  return alias_detail::g_portable_only.load(std::memory_order_relaxed) ? alias_detail::convert16_portable
                                                                       : alias_detail::g_convert16_best;
}

// Tests: use only the portable code paths (no runtime-dispatched SIMD), which
// must give bit-identical results. Process-wide; default off.
void set_portable_only(bool on);

}  // namespace qs::routing
