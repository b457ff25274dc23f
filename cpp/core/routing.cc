// qsengine core: the routing Monte Carlo engine (see routing.h for the model).
#include "core/routing.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>

#include "core/errors.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define QS_ROUTING_X86_DISPATCH 1
#endif

namespace qs::routing {

namespace {

constexpr double kTinyWeight = 1e-300;  // floor for underflowing generated weights

template <class... Args>
[[noreturn]] void fail(Args&&... parts) {
  std::ostringstream os;
  os.precision(17);
  (os << ... << parts);
  throw InvalidArgument(os.str());
}

// ---------------------------------------------------------------------------
// Per-layer sampling tables
// ---------------------------------------------------------------------------

// Walker/Vose alias table over n outcomes, 32-bit coins (see routing.h).
struct AliasTable {
  std::uint32_t n = 0;
  std::uint32_t lemire_t = 0;         // 2^32 mod n: reject x*n low words below it
  std::vector<std::uint32_t> thr;     // accept column i iff low word < thr[i]
  std::vector<std::uint32_t> alias;   // otherwise take alias[i]
  std::vector<std::uint64_t> packed;  // thr[i] | alias[i] << 32 (one load per draw)
  std::vector<double> w;              // the exact weights (for the fallback)
  // n <= 256 only: the same weights padded with zeros to exactly 256 columns
  // (zero-weight columns always take their alias), drawn with 16 bits: the low
  // byte is the column (exactly uniform, no rejection), the high byte c8 the
  // top byte of a 32-bit coin U compared with the column's 32-bit threshold T:
  // c8 < T>>24 accepts, c8 > T>>24 takes the alias, and on a tie (c8 == T>>24,
  // the low 24 bits of T nonzero, alias != column) 24 fresh bits from the
  // block's tie stream finish the comparison. The decision is exactly U < T.
  bool small = false;
  std::uint32_t sm[256] = {};      // T>>24 | alias << 8 | tie-possible << 16
  std::uint32_t sm_thr[256] = {};  // T (low 24 bits settle a tie)
  std::uint8_t sm_t8[256] = {};    // T>>24 and alias as byte tables (SIMD lookups)
  std::uint8_t sm_al[256] = {};

  // with_small: also build the padded 16-bit table (expert tables, n <= 256;
  // group tables are drawn with 32 bits and skip it).
  void build(const std::vector<double>& weights, bool with_small) {
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

 private:
  // Vose's construction in exact integer arithmetic: column capacity 2^32
  // units, total m * 2^32 units shared out by weight (floor, then the
  // remaining units to the largest fractional parts). Every pairing is exact,
  // so no column is left over by rounding (a floating-point Vose can leave a
  // zero-weight column "full" of itself, which would draw it).
  static void vose(const std::vector<double>& weights, std::vector<std::uint32_t>& thr,
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
};

// ---------------------------------------------------------------------------
// Bulk conversion of 16-bit draws to experts (small tables). The result is a
// pure function of the draws and the tie stream (consumed in draw order), so
// the SIMD variant and the portable loop give identical output.
// ---------------------------------------------------------------------------

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

using Convert16 = void (*)(const AliasTable&, const unsigned char*, int, std::uint8_t*, PhiloxStream&);

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

inline Convert16 convert16() { return g_portable_only.load(std::memory_order_relaxed) ? convert16_portable : g_convert16_best; }

struct LayerTable {
  AliasTable experts;
  AliasTable groups;  // GroupLimited only
};

double gamma_log_sample(PhiloxStream& rng, double shape) {
  // log of a Gamma(shape, 1) variate (Marsaglia-Tsang; shape < 1 boosted).
  double boost = 0.0;
  if (shape < 1.0) {
    boost = std::log(rng.uniform_pos()) / shape;
    shape += 1.0;
  }
  const double d = shape - 1.0 / 3.0;
  const double c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    const double x = rng.normal();
    double v = 1.0 + c * x;
    if (v <= 0.0) continue;
    v = v * v * v;
    const double u = rng.uniform_pos();
    if (std::log(u) < 0.5 * x * x + d - d * v + d * std::log(v)) return std::log(d * v) + boost;
  }
}

std::vector<double> layer_weights(const RouteRequest& req, std::int64_t layer) {
  const std::int64_t E = req.experts;
  const WeightSpec& ws = req.model.base;
  std::vector<double> w(static_cast<std::size_t>(E), 1.0);
  PhiloxStream rng(req.key, static_cast<std::uint64_t>(layer), kPurposePopularity);
  switch (ws.kind) {
    case WeightKind::Uniform:
      break;
    case WeightKind::Popularity:
      w = ws.weights;
      break;
    case WeightKind::PowerLaw: {
      std::vector<std::int64_t> rank(static_cast<std::size_t>(E));
      for (std::int64_t i = 0; i < E; ++i) rank[i] = i;
      if (ws.ranks == RankOrder::PerLayer) {
        for (std::int64_t i = E - 1; i > 0; --i) std::swap(rank[i], rank[rng.below(static_cast<std::uint64_t>(i + 1))]);
      }
      for (std::int64_t i = 0; i < E; ++i)
        w[i] = std::max(kTinyWeight, std::exp(-ws.alpha * std::log(static_cast<double>(rank[i] + 1))));
      break;
    }
    case WeightKind::Dirichlet: {
      std::vector<double> lw(static_cast<std::size_t>(E));
      double mx = -std::numeric_limits<double>::infinity();
      for (std::int64_t i = 0; i < E; ++i) {
        const double a = ws.concentration.size() == 1 ? ws.concentration[0] : ws.concentration[i];
        lw[i] = gamma_log_sample(rng, a);
        mx = std::max(mx, lw[i]);
      }
      for (std::int64_t i = 0; i < E; ++i) w[i] = std::max(kTinyWeight, std::exp(lw[i] - mx));
      break;
    }
  }
  double total = 0.0;
  for (double x : w) total += x;
  // A positive weight must stay positive after normalising (e.g. 5e-324 among
  // weights ~1 underflows to 0): the exact fallback draws only positive
  // weights, and with k close to E it must still find k of them.
  for (double& x : w) x = x > 0.0 ? std::max(x / total, std::numeric_limits<double>::denorm_min()) : 0.0;
  return w;
}

std::int64_t weight_tables(const RouteRequest& req) {
  const WeightSpec& ws = req.model.base;
  if (req.model.kind == ModelKind::Trace) return 0;
  if (ws.kind == WeightKind::Dirichlet || (ws.kind == WeightKind::PowerLaw && ws.ranks == RankOrder::PerLayer))
    return req.layers;
  return 1;
}

// ---------------------------------------------------------------------------
// Scratch (reused across blocks) and block results
// ---------------------------------------------------------------------------

// A slice [lo, lo + counts.size()) of an integer histogram.
struct RangeHist {
  std::int64_t lo = 0;
  std::vector<std::uint64_t> counts;
};

// A full-size histogram that remembers the range it touched, so that taking
// its contents (and zeroing it) costs only that range.
struct TrackedHist {
  std::vector<std::uint64_t> c;
  std::int64_t lo = std::numeric_limits<std::int64_t>::max();
  std::int64_t hi = -1;
  void resize(std::int64_t n) { c.assign(static_cast<std::size_t>(n), 0); }
  void add(std::int64_t i, std::uint64_t k = 1) {
    c[i] += k;
    if (i < lo) lo = i;
    if (i > hi) hi = i;
  }
  void note(std::int64_t i) {
    if (i < lo) lo = i;
    if (i > hi) hi = i;
  }
  RangeHist take() {
    RangeHist r;
    if (hi >= lo) {
      r.lo = lo;
      r.counts.assign(c.begin() + lo, c.begin() + hi + 1);
      std::fill(c.begin() + lo, c.begin() + hi + 1, 0);
    }
    lo = std::numeric_limits<std::int64_t>::max();
    hi = -1;
    return r;
  }
};

void add_range(std::vector<std::uint64_t>& acc, const RangeHist& r) {
  for (std::size_t i = 0; i < r.counts.size(); ++i) acc[r.lo + i] += r.counts[i];
}

struct BlockResult {
  RangeHist unique, umax, nmax, tpe, layer_t, step_t;
  std::vector<std::uint64_t> gpu_u, gpu_n;
  Moments layer_m, step_m;
};

struct Scratch {
  std::vector<std::uint32_t> mark;        // [E] token stamp: expert chosen by this token
  std::vector<std::uint32_t> group_mark;  // [groups] token stamp: group chosen
  std::vector<std::uint32_t> cnt;         // [E] tokens of this sample per expert
  std::vector<std::uint32_t> slot_mark;   // [slots] sample stamp (replicas only)
  std::vector<std::int32_t> touched;      // experts touched in this sample
  std::vector<std::int64_t> u_g, n_g;     // [G]
  std::vector<std::int32_t> sel;          // [B*k] selections of one sample
  std::vector<std::int32_t> prev;         // [layers*B*k] Sticky chain state
  TrackedHist unique, umax, nmax, tpe, layer_t, step_t;
  std::uint32_t stamp = 0, slot_stamp = 0;
  // Expert candidates: i.i.d. draws from the current layer's alias table,
  // converted a whole Philox refill at a time (E = a rejected Lemire draw).
  std::uint32_t cand[4 * PhiloxStream::kWords];  // 16-bit draws: four per word
  std::size_t cand_pos = 0, cand_end = 0;
  const AliasTable* cand_table = nullptr;
  PhiloxStream tie;             // the block's tie stream (kPurposeTie)
  std::uint32_t pos_base = 0;   // Independent: accepted picks so far in this block (mod resets)
  const unsigned char* ind_bytes = nullptr;  // Independent: the stream buffer being drawn from,
  std::uint32_t ind_pos = 0, ind_end = 0;    // its next and end 16- (or 32-) bit draw
  unsigned ind_refills = 0;
  alignas(64) std::uint8_t cand8[4 * PhiloxStream::kWords];  // small tables: converted candidates
  bool counted = false;  // cnt already holds this sample's per-expert counts
};

class ScratchPool {
 public:
  template <class Make>
  std::unique_ptr<Scratch> acquire(Make make) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        auto s = std::move(free_.back());
        free_.pop_back();
        return s;
      }
    }
    return make();
  }
  void release(std::unique_ptr<Scratch> s) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(s));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Scratch>> free_;
};

// ---------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------

class Engine {
 public:
  Engine(const RouteRequest& req, const CancelToken* cancel) : req_(req), cancel_(cancel) {
    E_ = req.experts;
    k_ = req.top_k;
    B_ = req.batch;
    L_ = req.layers;
    G_ = req.placement.gpus;
    bk_ = B_ * k_;
    block_ = block_size(req);
    // Placement -> slots (expert replicas).
    slot_base_.resize(E_);
    reps_.resize(E_);
    std::int64_t s = 0;
    for (std::int64_t e = 0; e < E_; ++e) {
      const auto& gl = req.placement.expert_gpus[e];
      slot_base_[e] = static_cast<std::int32_t>(s);
      reps_[e] = static_cast<std::int32_t>(gl.size());
      if (gl.size() > 1) replicas_ = true;
      for (std::int32_t g : gl) slot_gpu_.push_back(g);
      s += static_cast<std::int64_t>(gl.size());
    }
    slots_ = s;
    gpu_of_.resize(E_);
    for (std::int64_t e = 0; e < E_; ++e) gpu_of_[e] = slot_gpu_[slot_base_[e]];
    // Weight tables.
    const std::int64_t W = weight_tables(req);
    tables_.resize(static_cast<std::size_t>(W));
    if (req.model.kind == ModelKind::GroupLimited) {
      groups_ = req.model.groups;
      group_size_ = E_ / groups_;
    }
    for (std::int64_t t = 0; t < W; ++t) {
      std::vector<double> w = layer_weights(req, t);
      layer_weights_.insert(layer_weights_.end(), w.begin(), w.end());
      tables_[t].experts.build(w, true);
      if (req.model.kind == ModelKind::GroupLimited) {
        std::vector<double> gw(static_cast<std::size_t>(groups_), 0.0);
        for (std::int64_t e = 0; e < E_; ++e) gw[e / group_size_] += w[e];
        tables_[t].groups.build(gw, false);
      }
    }
    per_layer_tables_ = W > 1;
    if (req.model.kind == ModelKind::Sticky) {
      const double r = std::ldexp(req.model.rho, 32);
      rho_thr_ = r >= 4294967296.0 ? 0x100000000ull : static_cast<std::uint64_t>(std::llround(r));
    }
    // Cost bounds -> log-histogram layout.
    if (req.cost.enabled) {
      double min_a = std::numeric_limits<double>::infinity(), min_b = min_a, hi = 0.0;
      std::vector<std::int64_t> slots_on(static_cast<std::size_t>(G_), 0);
      for (std::int32_t g : slot_gpu_) ++slots_on[g];
      for (std::int64_t g = 0; g < G_; ++g) {
        min_a = std::min(min_a, req.cost.a[g]);
        min_b = std::min(min_b, req.cost.b[g]);
        hi = std::max(hi, std::max(req.cost.a[g] * static_cast<double>(std::min(slots_on[g], bk_)),
                                   req.cost.b[g] * static_cast<double>(bk_)));
      }
      const double lo = std::max(min_b * static_cast<double>(bk_) / static_cast<double>(G_),
                                 min_a * static_cast<double>(k_) / static_cast<double>(G_));
      layer_hist_ = make_log_hist(lo, hi);
      step_hist_ = make_log_hist(lo * static_cast<double>(L_), hi * static_cast<double>(L_));
    }
  }

  static LogHistogram make_log_hist(double lo, double hi) {
    LogHistogram h;
    h.lo = lo * (1.0 - 1e-9);
    h.hi = hi * (1.0 + 1e-9);
    h.bins = static_cast<std::int64_t>(std::ceil(std::log(h.hi / h.lo) / std::log(kLogBinRatio))) + 1;
    return h;
  }

  std::unique_ptr<Scratch> make_scratch() const {
    auto s = std::make_unique<Scratch>();
    s->mark.assign(E_ + 1, 0);  // mark[E] is a sentinel, always "chosen"
    s->cnt.assign(E_, 0);
    s->group_mark.assign(static_cast<std::size_t>(std::max<std::int64_t>(groups_, 1)) + 1, 0);
    if (replicas_) s->slot_mark.assign(static_cast<std::size_t>(slots_), 0);
    s->touched.assign(static_cast<std::size_t>(E_ + 1), 0);
    s->u_g.assign(G_, 0);
    s->n_g.assign(G_, 0);
    s->sel.assign(static_cast<std::size_t>(bk_), 0);
    if (req_.model.kind == ModelKind::Sticky) s->prev.assign(static_cast<std::size_t>(L_ * bk_), 0);
    s->unique.resize(E_ + 1);
    s->umax.resize(E_ + 1);
    s->nmax.resize(bk_ + 1);
    s->tpe.resize(B_ + 1);
    if (req_.cost.enabled) {
      s->layer_t.resize(layer_hist_.bins);
      s->step_t.resize(step_hist_.bins);
    }
    return s;
  }

  RouteResult run() {
    RouteResult res;
    res.experts = E_;
    res.top_k = k_;
    res.batch = B_;
    res.microbatches = req_.microbatches;
    res.layers = L_;
    res.gpus = G_;
    res.block_size = block_;
    res.blocks = (req_.microbatches + block_ - 1) / block_;
    res.samples = static_cast<std::uint64_t>(req_.microbatches) * static_cast<std::uint64_t>(L_);
    res.unique_hist.assign(E_ + 1, 0);
    res.gpu_unique_max_hist.assign(E_ + 1, 0);
    res.gpu_assign_max_hist.assign(bk_ + 1, 0);
    res.tokens_per_expert_hist.assign(B_ + 1, 0);
    res.gpu_unique_sum.assign(G_, 0);
    res.gpu_assign_sum.assign(G_, 0);
    res.layer_weights = layer_weights_;
    res.weight_tables = static_cast<std::int64_t>(tables_.size());
    res.has_cost = req_.cost.enabled;
    if (res.has_cost) {
      res.layer_time_hist = layer_hist_;
      res.layer_time_hist.counts.assign(layer_hist_.bins, 0);
      res.step_time_hist = step_hist_;
      res.step_time_hist.counts.assign(step_hist_.bins, 0);
    }
    if (req_.record)
      res.selections.assign(static_cast<std::size_t>(res.samples) * static_cast<std::size_t>(bk_), 0);
    record_ = req_.record ? res.selections.data() : nullptr;

    ScratchPool pool;
    auto compute = [&](std::uint64_t b) -> BlockResult {
      auto s = pool.acquire([&] { return make_scratch(); });
      BlockResult r = run_block(static_cast<std::int64_t>(b), *s);
      pool.release(std::move(s));
      return r;
    };
    auto merge = [&](RouteResult& acc, BlockResult&& r) {
      add_range(acc.unique_hist, r.unique);
      add_range(acc.gpu_unique_max_hist, r.umax);
      add_range(acc.gpu_assign_max_hist, r.nmax);
      add_range(acc.tokens_per_expert_hist, r.tpe);
      for (std::int64_t g = 0; g < G_; ++g) {
        acc.gpu_unique_sum[g] += r.gpu_u[g];
        acc.gpu_assign_sum[g] += r.gpu_n[g];
      }
      if (acc.has_cost) {
        add_range(acc.layer_time_hist.counts, r.layer_t);
        add_range(acc.step_time_hist.counts, r.step_t);
        acc.layer_time.merge(r.layer_m);
        acc.step_time.merge(r.step_m);
      }
    };
    ordered_block_reduce<BlockResult>(static_cast<std::uint64_t>(res.blocks), resolve_threads(req_.threads), res,
                                      compute, merge, cancel_);
    return res;
  }

 private:
  void check_cancel() const {
    if (cancel_ && cancel_->cancelled()) throw Cancelled();
  }

  static std::uint32_t next_stamp(std::uint32_t& stamp, std::vector<std::uint32_t>& marks) {
    if (++stamp == 0) {
      std::fill(marks.begin(), marks.end(), 0);
      stamp = 1;
    }
    return stamp;
  }

  // Refill the candidate buffer from the stream (branch-free conversion).
  static void fill_candidates(const AliasTable& tab, PhiloxStream& rng, Scratch& s) {
    const std::uint32_t* raw;
    const int n = rng.take_all32(&raw);
    std::uint32_t* cand = s.cand;
    if (tab.small) {
      // Two 16-bit draws per 32-bit value, low half first.
      convert16()(tab, reinterpret_cast<const unsigned char*>(raw), 2 * n, s.cand8, s.tie);
      for (int i = 0; i < 2 * n; ++i) cand[i] = s.cand8[i];
      s.cand_pos = 0;
      s.cand_end = static_cast<std::size_t>(2 * n);
      return;
    }
    const std::uint64_t E = tab.n;
    const std::uint32_t lt = tab.lemire_t;
    const std::uint64_t* packed = tab.packed.data();
    // Arithmetic selects: a compiled branch here would mispredict constantly.
    for (int i = 0; i < n; ++i) {
      const std::uint64_t m = static_cast<std::uint64_t>(raw[i]) * E;
      const std::uint32_t low = static_cast<std::uint32_t>(m);
      const std::uint32_t col = static_cast<std::uint32_t>(m >> 32);
      const std::uint64_t entry = packed[col];
      const std::uint32_t use_alias = 0u - static_cast<std::uint32_t>(low >= static_cast<std::uint32_t>(entry));
      std::uint32_t e = col ^ ((col ^ static_cast<std::uint32_t>(entry >> 32)) & use_alias);
      const std::uint32_t rejected = 0u - static_cast<std::uint32_t>(low < lt);  // Lemire rejection -> sentinel E
      e = (e & ~rejected) | (static_cast<std::uint32_t>(E) & rejected);
      cand[i] = e;
    }
    s.cand_pos = 0;
    s.cand_end = static_cast<std::size_t>(n);
  }

  // Draw picks [have, k) for one token, Plackett-Luce from `tab`: accept the
  // next i.i.d. candidate unless already chosen (marked with `stamp`) or, if
  // kGroups, outside the token's chosen groups. Branch-free accept; after
  // kRejectBudget + 4k rejections the remaining picks are drawn by exact
  // sequential inversion instead.
  template <bool kGroups>
  void draw_experts(const AliasTable& tab, PhiloxStream& rng, Scratch& s, std::uint32_t stamp, std::int32_t* out,
                    std::int64_t have) const {
    if (s.cand_table != &tab) {
      s.cand_table = &tab;
      s.cand_pos = s.cand_end = 0;
    }
    std::uint32_t* mark = s.mark.data();
    const std::uint32_t* gmark = s.group_mark.data();
    mark[E_] = stamp;  // the sentinel is never fresh
    const std::uint32_t* cand = s.cand;
    std::size_t pos = s.cand_pos, end = s.cand_end;
    std::int64_t n = have;
    std::int64_t rejects = 0;
    const std::int64_t budget = kRejectBudget + 4 * k_;
    while (n < k_) {
      if (pos == end) {
        fill_candidates(tab, rng, s);
        pos = 0;
        end = s.cand_end;
      }
      const std::uint32_t e = cand[pos++];
      std::uint32_t fresh = mark[e] != stamp;
      if constexpr (kGroups) fresh &= static_cast<std::uint32_t>(gmark[e / group_size_] == stamp);
      out[n] = static_cast<std::int32_t>(e);
      mark[e] = stamp;
      n += fresh;
      rejects += 1 - static_cast<std::int64_t>(fresh);
      if (__builtin_expect(rejects > budget, 0)) {
        if constexpr (kGroups) {
          // Ineligible experts were marked above; only true picks stay marked.
          for (std::int64_t e2 = 0; e2 < E_; ++e2)
            if (mark[e2] == stamp) mark[e2] = stamp - 1;
          for (std::int64_t j = 0; j < n; ++j) mark[out[j]] = stamp;
        }
        for (std::int64_t j = n; j < k_; ++j) out[j] = sequential_pick<kGroups>(tab, rng, s, stamp);
        break;
      }
    }
    s.cand_pos = pos;
    s.cand_end = end;
  }

  // Independent model: the picks of all B tokens of one sample in a single
  // loop over candidates, with no per-token branch to mispredict. c counts the
  // picks accepted so far in the block (from s.pos_base); the current token's
  // picks end at tok_end. mark[e] holds the tok_end of the last token that
  // drew e, so e is fresh for the current token iff mark[e] <= c. Each
  // candidate is written at sel[c - base] and kept only if fresh (c advances).
  // Candidates come from the stream buffer (kept across samples of the block);
  // a token still unfinished at two consecutive buffer refills (it has drawn
  // at least a whole buffer of candidates: remaining mass tiny) gets its
  // remaining picks by exact sequential inversion; that stopping time does not
  // depend on which expert would have been accepted, so the law is unchanged.
  // Where the time goes (E=256, k=8, B=256, PowerLaw(1.0): 1.17 candidates per
  // pick, ~2.5 ns per pick on one 3 GHz core): this loop ~50% (about 3 cycles
  // per candidate: c is carried through compare, set and add, and mark/cnt of
  // popular experts are re-read right after being stored), the Philox refill
  // ~30% (Philox4x64-10 needs 20 64x64->128 multiplies per 4 words: ~27
  // cycles per block, 16 bits per candidate), the SIMD conversion ~9%, the
  // per-sample statistics ~10%.
  // kCount: count per expert while drawing; kSel: store the selections (for
  // record or replicas); kPow2: k is a power of two, so the current token's
  // end is (c | (k-1)) + 1 (base is a multiple of k), cheaper than tracking it.
  template <bool kSmall, bool kCount, bool kSel, bool kPow2>
  void sample_independent(const AliasTable& tab, PhiloxStream& rng, Scratch& s) const {
    std::uint32_t* mark = s.mark.data();
    std::uint32_t* cnt = s.cnt.data();
    std::int32_t* sel = s.sel.data();
    const std::uint32_t k = static_cast<std::uint32_t>(k_);
    const std::uint32_t bk = static_cast<std::uint32_t>(bk_);
    if (static_cast<std::uint64_t>(s.pos_base) + bk + k >= 0xFFFFFFFFull) {
      std::fill(s.mark.begin(), s.mark.end(), 0);
      s.pos_base = 0;
    }
    const std::uint32_t base = s.pos_base;
    const std::uint32_t stop = base + bk;
    const std::uint64_t E = tab.n;
    const std::uint32_t lt = tab.lemire_t;
    const std::uint64_t* packed = tab.packed.data();
    std::uint32_t c = base, tok_end = base + k, tok_at_refill = 0;
    const Convert16 convert = convert16();
    const unsigned char* bytes = s.ind_bytes;
    std::uint32_t pos = s.ind_pos, end = s.ind_end;
    for (;;) {
      if (pos == end) {
        if ((++s.ind_refills & 255u) == 0) check_cancel();
        const std::uint32_t* raw;
        end = static_cast<std::uint32_t>(rng.take_all32(&raw));
        bytes = reinterpret_cast<const unsigned char*>(raw);
        if constexpr (kSmall) {
          end *= 2;
          convert(tab, bytes, static_cast<int>(end), s.cand8, s.tie);
          bytes = s.cand8;
        }
        pos = 0;
        if (__builtin_expect(tok_end == tok_at_refill, 0)) {
          c = finish_token(tab, s, c, tok_end, sel, base, kCount);
          tok_end += k;
          if (c == stop) break;
        }
        tok_at_refill = tok_end;
      }
      // At most one pick per candidate: n candidates cannot overshoot stop.
      const std::uint32_t n = std::min(end - pos, stop - c);
      const std::uint32_t pend = pos + n;
      for (; pos < pend; ++pos) {
        std::uint32_t e;
        if constexpr (kSmall) {
          e = bytes[pos];
        } else {
          std::uint32_t x;
          std::memcpy(&x, bytes + 4 * pos, sizeof(x));
          const std::uint64_t m = static_cast<std::uint64_t>(x) * E;
          const std::uint32_t low = static_cast<std::uint32_t>(m);
          if (__builtin_expect(low < lt, 0)) continue;  // Lemire rejection: the column would be biased
          const std::uint32_t col = static_cast<std::uint32_t>(m >> 32);
          const std::uint64_t entry = packed[col];
          const std::uint32_t use_alias = 0u - static_cast<std::uint32_t>(low >= static_cast<std::uint32_t>(entry));
          e = col ^ ((col ^ static_cast<std::uint32_t>(entry >> 32)) & use_alias);
        }
        if constexpr (kPow2) tok_end = (c | (k - 1)) + 1;
        const std::uint32_t fresh = mark[e] <= c;
        if constexpr (kSel) sel[c - base] = static_cast<std::int32_t>(e);
        mark[e] = tok_end;
        if constexpr (kCount) cnt[e] += fresh;
        c += fresh;
        // Token boundary without a branch (it would mispredict once per token).
        if constexpr (!kPow2) tok_end += k & (0u - static_cast<std::uint32_t>(c == tok_end));
      }
      if constexpr (kPow2) tok_end = (c | (k - 1)) + 1;
      if (c == stop) break;
    }
    s.ind_bytes = bytes;
    s.ind_pos = pos;
    s.ind_end = end;
    s.pos_base = stop;
    s.counted = kCount;
  }

  // Count per expert while drawing unless replicas need the token index;
  // store the selections only when they are recorded or replicas need them.
  template <bool kSmall>
  void dispatch_independent(const AliasTable& tab, PhiloxStream& rng, Scratch& s) const {
    const bool pow2 = (k_ & (k_ - 1)) == 0;
    if (replicas_) {
      pow2 ? sample_independent<kSmall, false, true, true>(tab, rng, s)
           : sample_independent<kSmall, false, true, false>(tab, rng, s);
    } else if (record_) {
      pow2 ? sample_independent<kSmall, true, true, true>(tab, rng, s)
           : sample_independent<kSmall, true, true, false>(tab, rng, s);
    } else {
      pow2 ? sample_independent<kSmall, true, false, true>(tab, rng, s)
           : sample_independent<kSmall, true, false, false>(tab, rng, s);
    }
  }

  // Remaining picks of the token ending at tok_end (c picks made so far) by
  // exact sequential inversion over the experts it has not drawn; returns tok_end.
  static std::uint32_t finish_token(const AliasTable& tab, Scratch& s, std::uint32_t c, std::uint32_t tok_end,
                                    std::int32_t* sel, std::uint32_t base, bool count) {
    std::uint32_t* mark = s.mark.data();
    while (c < tok_end) {
      double total = 0.0;
      std::int64_t last = -1;
      for (std::uint32_t q = 0; q < tab.n; ++q)
        if (mark[q] <= c && tab.w[q] > 0.0) {
          total += tab.w[q];
          last = q;
        }
      double u = s.tie.uniform() * total;
      std::int64_t pick = last;
      for (std::uint32_t q = 0; q < tab.n; ++q)
        if (mark[q] <= c && tab.w[q] > 0.0) {
          u -= tab.w[q];
          if (u < 0.0) {
            pick = q;
            break;
          }
        }
      mark[pick] = tok_end;
      if (count) ++s.cnt[pick];
      sel[c - base] = static_cast<std::int32_t>(pick);
      ++c;
    }
    return c;
  }

  // Exact draw proportional to weight among the eligible, unchosen experts.
  template <bool kGroups>
  std::int32_t sequential_pick(const AliasTable& tab, PhiloxStream& rng, Scratch& s, std::uint32_t stamp) const {
    auto eligible = [&](std::int64_t e) {
      if (s.mark[e] == stamp || !(tab.w[e] > 0.0)) return false;
      if constexpr (kGroups) return s.group_mark[e / group_size_] == stamp;
      return true;
    };
    double total = 0.0;
    std::int64_t last = -1;
    for (std::int64_t e = 0; e < static_cast<std::int64_t>(tab.n); ++e)
      if (eligible(e)) {
        total += tab.w[e];
        last = e;
      }
    double u = rng.uniform() * total;
    std::int64_t pick = last;
    for (std::int64_t e = 0; e < static_cast<std::int64_t>(tab.n); ++e)
      if (eligible(e)) {
        u -= tab.w[e];
        if (u < 0.0) {
          pick = e;
          break;
        }
      }
    s.mark[pick] = stamp;
    return static_cast<std::int32_t>(pick);
  }

  // Groups for one token (GroupLimited), marked with `stamp` in s.group_mark.
  void draw_groups(const AliasTable& gt, PhiloxStream& cur, Scratch& s, std::uint32_t stamp) const {
    const std::uint64_t n = gt.n;
    for (std::int64_t j = 0; j < req_.model.top_groups; ++j) {
      int tries = 0;
      for (;;) {
        const std::uint64_t m = static_cast<std::uint64_t>(cur.next32()) * n;
        const std::uint32_t low = static_cast<std::uint32_t>(m);
        if (low < gt.lemire_t) continue;
        const std::uint32_t col = static_cast<std::uint32_t>(m >> 32);
        const std::uint32_t g = low < gt.thr[col] ? col : gt.alias[col];
        if (s.group_mark[g] != stamp) {
          s.group_mark[g] = stamp;
          break;
        }
        if (++tries >= kRejectBudget) {
          PhiloxStream& rng = cur;
          double total = 0.0;
          std::int64_t last = -1;
          for (std::uint32_t q = 0; q < gt.n; ++q)
            if (s.group_mark[q] != stamp && gt.w[q] > 0.0) {
              total += gt.w[q];
              last = q;
            }
          double u = rng.uniform() * total;
          std::int64_t pick = last;
          for (std::uint32_t q = 0; q < gt.n; ++q)
            if (s.group_mark[q] != stamp && gt.w[q] > 0.0) {
              u -= gt.w[q];
              if (u < 0.0) {
                pick = q;
                break;
              }
            }
          s.group_mark[pick] = stamp;
          break;
        }
      }
    }
  }

  // Fill s.sel with the selections of microbatch m (global index), layer l.
  void sample(std::int64_t m, std::int64_t l, bool chain_start, PhiloxStream& stream, Scratch& s) const {
    std::int32_t* sel = s.sel.data();
    const ModelSpec& model = req_.model;
    if (model.kind == ModelKind::Trace) {
      const std::int64_t step = m * L_ + l;
      std::memcpy(sel, model.trace.data() + step * bk_, static_cast<std::size_t>(bk_) * sizeof(std::int32_t));
      return;
    }
    const LayerTable& tab = tables_[per_layer_tables_ ? l : 0];
    PhiloxStream& rng = stream;
    if (model.kind == ModelKind::Independent) {
      if (tab.experts.small)
        dispatch_independent<true>(tab.experts, rng, s);
      else
        dispatch_independent<false>(tab.experts, rng, s);
      return;
    }
    for (std::int64_t t = 0; t < B_; ++t) {
      if ((t & 16383) == 16383) check_cancel();
      const std::uint32_t stamp = next_stamp(s.stamp, s.mark);
      std::int32_t* out = sel + t * k_;
      switch (model.kind) {
        case ModelKind::Independent:
          draw_experts<false>(tab.experts, rng, s, stamp, out, 0);
          break;
        case ModelKind::GroupLimited:
          if (stamp == 1) std::fill(s.group_mark.begin(), s.group_mark.end(), 0);
          draw_groups(tab.groups, rng, s, stamp);
          draw_experts<true>(tab.experts, rng, s, stamp, out, 0);
          break;
        case ModelKind::Sticky: {
          std::int32_t* prev = s.prev.data() + (l * B_ + t) * k_;
          std::int64_t have = 0;
          if (!chain_start) {
            for (std::int64_t j = 0; j < k_; ++j)
              if (static_cast<std::uint64_t>(rng.next32()) < rho_thr_) {
                out[have++] = prev[j];
                s.mark[prev[j]] = stamp;
              }
          }
          draw_experts<false>(tab.experts, rng, s, stamp, out, have);
          std::memcpy(prev, out, static_cast<std::size_t>(k_) * sizeof(std::int32_t));
          break;
        }
        case ModelKind::Trace:
          break;
      }
    }
  }

  // Statistics of s.sel into the scratch accumulators; returns the layer time.
  template <bool kReplicas>
  double account(Scratch& s, BlockResult& r) const {
    const std::int32_t* sel = s.sel.data();
    std::uint32_t* cnt = s.cnt.data();
    std::int64_t* u_g = s.u_g.data();
    std::int64_t* n_g = s.n_g.data();
    const std::int32_t* gpu_of = gpu_of_.data();
    std::int32_t* touched = s.touched.data();
    std::int64_t nt = 0;
    if constexpr (kReplicas) {
      // Each (expert, replica) slot counts once per sample on its GPU.
      const std::uint32_t sstamp = next_stamp(s.slot_stamp, s.slot_mark);
      for (std::int64_t t = 0; t < B_; ++t) {
        for (std::int64_t j = 0; j < k_; ++j) {
          const std::int32_t e = sel[t * k_ + j];
          const std::int32_t slot = slot_base_[e] + static_cast<std::int32_t>(t % reps_[e]);
          const std::int32_t g = slot_gpu_[slot];
          ++n_g[g];
          if (s.slot_mark[slot] != sstamp) {
            s.slot_mark[slot] = sstamp;
            ++u_g[g];
          }
          touched[nt] = e;
          nt += cnt[e]++ == 0;
        }
      }
    } else if (s.counted) {
      // Counts already made while drawing (Independent): one pass over the
      // experts gives u, u_g, n_g and the tokens-per-expert histogram.
      std::uint64_t* tpe = s.tpe.c.data();
      std::uint32_t u = 0, cmax = 0;
      for (std::int64_t e = 0; e < E_; ++e) {
        const std::uint32_t c = cnt[e];
        cnt[e] = 0;
        const std::uint32_t nz = c != 0;
        const std::int32_t g = gpu_of[e];
        u += nz;
        u_g[g] += nz;
        n_g[g] += c;
        ++tpe[c];
        cmax = std::max(cmax, c);
      }
      s.counted = false;
      s.unique.add(u);
      s.tpe.note(0);
      s.tpe.note(cmax);
      return finish_account(s, r);
    } else {
      // Branch-free first-touch detection; per-GPU figures follow from the
      // per-expert counts of the touched experts.
      for (std::int64_t i = 0; i < bk_; ++i) {
        const std::int32_t e = sel[i];
        touched[nt] = e;
        nt += cnt[e]++ == 0;
      }
      for (std::int64_t i = 0; i < nt; ++i) {
        const std::int32_t e = touched[i];
        const std::int32_t g = gpu_of[e];
        ++u_g[g];
        n_g[g] += cnt[e];
      }
    }
    const std::int64_t u = nt;
    s.unique.add(u);
    std::uint32_t cmax = 0, cmin = 0xFFFFFFFFu;
    std::uint64_t* tpe = s.tpe.c.data();
    for (std::int64_t i = 0; i < nt; ++i) {
      const std::int32_t e = touched[i];
      const std::uint32_t c = cnt[e];
      ++tpe[c];
      cmax = std::max(cmax, c);
      cmin = std::min(cmin, c);
      cnt[e] = 0;
    }
    s.tpe.note(cmin);  // the range taken at block end must cover every count written
    s.tpe.note(cmax);
    if (u < E_) s.tpe.add(0, static_cast<std::uint64_t>(E_ - u));
    return finish_account(s, r);
  }

  // Per-GPU maxima and sums of one sample (u_g, n_g), reset; the layer time.
  double finish_account(Scratch& s, BlockResult& r) const {
    std::int64_t* u_g = s.u_g.data();
    std::int64_t* n_g = s.n_g.data();
    std::int64_t umax = 0, nmax = 0;
    double lt = 0.0;
    for (std::int64_t g = 0; g < G_; ++g) {
      umax = std::max(umax, u_g[g]);
      nmax = std::max(nmax, n_g[g]);
      r.gpu_u[g] += static_cast<std::uint64_t>(u_g[g]);
      r.gpu_n[g] += static_cast<std::uint64_t>(n_g[g]);
      if (req_.cost.enabled)
        lt = std::max(lt, std::max(req_.cost.a[g] * static_cast<double>(u_g[g]),
                                   req_.cost.b[g] * static_cast<double>(n_g[g])));
      u_g[g] = 0;
      n_g[g] = 0;
    }
    s.umax.add(umax);
    s.nmax.add(nmax);
    return lt;
  }

  BlockResult run_block(std::int64_t b, Scratch& s) const {
    BlockResult r;
    r.gpu_u.assign(G_, 0);
    r.gpu_n.assign(G_, 0);
    PhiloxStream rng(req_.key, static_cast<std::uint64_t>(b), kPurposeRouting);
    // Fresh stamps per block: the block's result must not depend on which
    // blocks this scratch served before.
    std::fill(s.mark.begin(), s.mark.end(), 0);
    std::fill(s.group_mark.begin(), s.group_mark.end(), 0);
    std::fill(s.slot_mark.begin(), s.slot_mark.end(), 0);
    s.stamp = 0;
    s.slot_stamp = 0;
    s.cand_table = nullptr;
    s.cand_pos = s.cand_end = 0;
    s.tie.reset(req_.key, static_cast<std::uint64_t>(b), kPurposeTie);
    s.pos_base = 0;
    s.ind_bytes = nullptr;
    s.ind_pos = s.ind_end = 0;
    const std::int64_t m0 = b * block_;
    const std::int64_t m1 = std::min(req_.microbatches, m0 + block_);
    for (std::int64_t m = m0; m < m1; ++m) {
      double step = 0.0;
      for (std::int64_t l = 0; l < L_; ++l) {
        check_cancel();
        sample(m, l, m == m0, rng, s);
        if (record_) {
          std::memcpy(record_ + (m * L_ + l) * bk_, s.sel.data(), static_cast<std::size_t>(bk_) * sizeof(std::int32_t));
        }
        const double lt = replicas_ ? account<true>(s, r) : account<false>(s, r);
        if (req_.cost.enabled) {
          r.layer_m.add(lt);
          s.layer_t.add(layer_hist_.bin_of(lt));
          step += lt;
        }
      }
      if (req_.cost.enabled) {
        r.step_m.add(step);
        s.step_t.add(step_hist_.bin_of(step));
      }
    }
    r.unique = s.unique.take();
    r.umax = s.umax.take();
    r.nmax = s.nmax.take();
    r.tpe = s.tpe.take();
    if (req_.cost.enabled) {
      r.layer_t = s.layer_t.take();
      r.step_t = s.step_t.take();
    }
    return r;
  }

  const RouteRequest& req_;
  const CancelToken* cancel_;
  std::int64_t E_ = 0, k_ = 0, B_ = 0, L_ = 0, G_ = 0, bk_ = 0, block_ = 1;
  std::int64_t groups_ = 0, group_size_ = 1;
  std::vector<std::int32_t> slot_base_, reps_, slot_gpu_, gpu_of_;
  std::int64_t slots_ = 0;
  bool replicas_ = false;
  std::vector<LayerTable> tables_;
  std::vector<double> layer_weights_;
  bool per_layer_tables_ = false;
  std::uint64_t rho_thr_ = 0;
  LogHistogram layer_hist_, step_hist_;
  std::int32_t* record_ = nullptr;
};

void check_weights(const char* name, const std::vector<double>& w, std::int64_t E, std::int64_t k) {
  if (static_cast<std::int64_t>(w.size()) != E)
    fail(name, ": has length ", w.size(), ", must have length experts=", E);
  std::int64_t positive = 0;
  for (std::size_t i = 0; i < w.size(); ++i) {
    if (!std::isfinite(w[i]) || w[i] < 0.0)
      fail(name, "[", i, "]=", w[i], ": weights must be finite and >= 0");
    if (w[i] > 0.0) ++positive;
  }
  if (positive == 0) fail(name, ": all weights are zero; at least top_k=", k, " must be positive");
  if (positive < k)
    fail(name, ": only ", positive, " positive weights, need at least top_k=", k,
         " (each token picks top_k distinct experts)");
}

}  // namespace

void set_portable_only(bool on) { g_portable_only.store(on, std::memory_order_relaxed); }

void Moments::merge(const Moments& o) {
  if (o.n == 0) return;
  if (n == 0) {
    *this = o;
    return;
  }
  const double na = static_cast<double>(n), nb = static_cast<double>(o.n), nt = na + nb;
  const double d = o.mean - mean;
  mean += d * (nb / nt);
  m2 += o.m2 + d * d * (na * nb / nt);
  n += o.n;
}

std::int64_t LogHistogram::bin_of(double x) const {
  if (!(x > lo)) return 0;
  const std::int64_t i = static_cast<std::int64_t>(std::log(x / lo) / std::log(kLogBinRatio));
  return std::min(std::max<std::int64_t>(i, 0), bins - 1);
}

std::int64_t block_size(const RouteRequest& req) {
  const double work = static_cast<double>(std::max<std::int64_t>(req.batch, 1)) *
                      static_cast<double>(std::max<std::int64_t>(req.top_k, 1)) *
                      static_cast<double>(std::max<std::int64_t>(req.layers, 1));
  std::int64_t m = static_cast<std::int64_t>(std::floor(262144.0 / work));
  m = std::clamp<std::int64_t>(m, 1, 1024);
  if (req.model.kind == ModelKind::Sticky) m = std::max(m, kStickyMinBlock);
  return m;
}

void validate(const RouteRequest& req) {
  const std::int64_t E = req.experts, k = req.top_k, B = req.batch;
  if (E < 1 || E > (1 << 24)) fail("experts=", E, ": must be between 1 and 16777216");
  if (k < 1) fail("top_k=", k, ": must be >= 1");
  if (k > E) fail("top_k=", k, ": must be <= experts=", E, " (each token picks top_k distinct experts)");
  if (B < 1) fail("batch=", B, ": must be >= 1");
  if (B > (std::int64_t{1} << 31) / k) {
    // The product itself may not fit in int64: print it unsigned (or as "> 2^64").
    const auto ub = static_cast<std::uint64_t>(B), uk = static_cast<std::uint64_t>(k);
    if (ub > UINT64_MAX / uk) fail("batch=", B, ": batch*top_k > 2^64 must be < 2^31");
    fail("batch=", B, ": batch*top_k=", ub * uk, " must be < 2^31");
  }
  if (req.microbatches < 1) fail("microbatches=", req.microbatches, ": must be >= 1");
  if (req.layers < 1 || req.layers > (1 << 20)) fail("layers=", req.layers, ": must be between 1 and 1048576");
  if (req.microbatches > (std::int64_t{1} << 62) / req.layers)
    fail("microbatches=", req.microbatches, ": microbatches*layers must be < 2^62");
  if (req.threads < 0) fail("threads=", req.threads, ": must be >= 1 (or None for all hardware threads)");

  const ModelSpec& m = req.model;
  const WeightSpec& w = m.base;
  if (m.kind != ModelKind::Trace) {
    switch (w.kind) {
      case WeightKind::Uniform:
        break;
      case WeightKind::PowerLaw:
        if (!std::isfinite(w.alpha) || w.alpha < 0.0) fail("routing.alpha=", w.alpha, ": must be finite and >= 0");
        break;
      case WeightKind::Popularity:
        check_weights("routing.weights", w.weights, E, k);
        break;
      case WeightKind::Dirichlet: {
        if (w.concentration.size() != 1 && static_cast<std::int64_t>(w.concentration.size()) != E)
          fail("routing.concentration: has length ", w.concentration.size(), ", must be a scalar or have length experts=",
               E);
        for (std::size_t i = 0; i < w.concentration.size(); ++i)
          if (!std::isfinite(w.concentration[i]) || w.concentration[i] <= 0.0)
            fail("routing.concentration[", i, "]=", w.concentration[i], ": must be finite and > 0");
        break;
      }
    }
  }
  if (m.kind == ModelKind::GroupLimited) {
    if (m.groups < 1 || m.groups > E) fail("routing.groups=", m.groups, ": must be between 1 and experts=", E);
    if (E % m.groups != 0) fail("routing.groups=", m.groups, ": must divide experts=", E);
    if (m.top_groups < 1 || m.top_groups > m.groups)
      fail("routing.top_groups=", m.top_groups, ": must be between 1 and groups=", m.groups);
    const std::int64_t gs = E / m.groups;
    if (m.top_groups * gs < k)
      fail("routing.top_groups=", m.top_groups, ": top_groups*(experts/groups)=", m.top_groups * gs,
           " must be >= top_k=", k);
    if (w.kind == WeightKind::Popularity) {
      std::vector<std::int64_t> pos;
      for (std::int64_t g = 0; g < m.groups; ++g) {
        std::int64_t c = 0;
        for (std::int64_t e = g * gs; e < (g + 1) * gs; ++e) c += w.weights[e] > 0.0;
        if (c > 0) pos.push_back(c);
      }
      if (static_cast<std::int64_t>(pos.size()) < m.top_groups)
        fail("routing.base.weights: only ", pos.size(), " groups have positive weight, need top_groups=", m.top_groups);
      std::sort(pos.begin(), pos.end());
      std::int64_t worst = 0;
      for (std::int64_t i = 0; i < m.top_groups; ++i) worst += pos[i];
      if (worst < k)
        fail("routing.base.weights: some choice of top_groups=", m.top_groups, " groups holds only ", worst,
             " positive-weight experts, fewer than top_k=", k);
    }
  }
  if (m.kind == ModelKind::Sticky) {
    if (!std::isfinite(m.rho) || m.rho < 0.0 || m.rho > 1.0) fail("routing.rho=", m.rho, ": must be in [0, 1]");
  }
  if (m.kind == ModelKind::Trace) {
    if (m.trace_steps < 1 || m.trace_tokens < 1 || m.trace_k < 1)
      fail("routing.expert_ids: shape (", m.trace_steps, ", ", m.trace_tokens, ", ", m.trace_k,
           ") must be [steps, tokens, k] with every size >= 1");
    if (static_cast<std::int64_t>(m.trace.size()) != m.trace_steps * m.trace_tokens * m.trace_k)
      fail("routing.expert_ids: holds ", m.trace.size(), " ids, shape says ", m.trace_steps * m.trace_tokens * m.trace_k);
    if (m.trace_tokens != B)
      fail("batch=", B, ": must equal the trace's tokens per step (", m.trace_tokens, ")");
    if (m.trace_k != k) fail("top_k=", k, ": must equal the trace's experts per token (", m.trace_k, ")");
    if (req.microbatches > m.trace_steps / req.layers)
      fail("microbatches=", req.microbatches, ": microbatches*layers=", req.microbatches * req.layers,
           " exceeds the trace's steps=", m.trace_steps);
    std::vector<std::int64_t> seen(static_cast<std::size_t>(E), -1);
    for (std::int64_t row = 0; row < m.trace_steps * m.trace_tokens; ++row) {
      for (std::int64_t j = 0; j < k; ++j) {
        const std::int64_t id = m.trace[row * k + j];
        if (id < 0 || id >= E)
          fail("routing.expert_ids[", row / m.trace_tokens, ", ", row % m.trace_tokens, ", ", j, "]=", id,
               ": expert ids must be in [0, experts=", E, ")");
        if (seen[id] == row)
          fail("routing.expert_ids[", row / m.trace_tokens, ", ", row % m.trace_tokens, "]: expert ", id,
               " appears twice; a token's k experts must be distinct");
        seen[id] = row;
      }
    }
  }

  const PlacementSpec& p = req.placement;
  if (p.gpus < 1 || p.gpus > (1 << 20)) fail("placement.gpus=", p.gpus, ": must be between 1 and 1048576");
  if (static_cast<std::int64_t>(p.expert_gpus.size()) != E)
    fail("placement: maps ", p.expert_gpus.size(), " experts, must map every one of experts=", E);
  for (std::int64_t e = 0; e < E; ++e) {
    const auto& gl = p.expert_gpus[e];
    if (gl.empty()) fail("placement: expert ", e, " is on no GPU; every expert needs at least one");
    for (std::size_t i = 0; i < gl.size(); ++i) {
      if (gl[i] < 0 || gl[i] >= p.gpus)
        fail("placement: expert ", e, " on GPU ", gl[i], ", GPU ids must be in [0, gpus=", p.gpus, ")");
      for (std::size_t j = 0; j < i; ++j)
        if (gl[j] == gl[i]) fail("placement: expert ", e, " has two replicas on GPU ", gl[i]);
    }
  }
  if (req.cost.enabled) {
    const char* names[2] = {"cost.a", "cost.b"};
    const std::vector<double>* v[2] = {&req.cost.a, &req.cost.b};
    for (int q = 0; q < 2; ++q) {
      if (static_cast<std::int64_t>(v[q]->size()) != p.gpus)
        fail(names[q], ": has length ", v[q]->size(), ", must have one entry per GPU (gpus=", p.gpus, ")");
      for (std::size_t i = 0; i < v[q]->size(); ++i)
        if (!std::isfinite((*v[q])[i]) || (*v[q])[i] <= 0.0)
          fail(names[q], "[", i, "]=", (*v[q])[i], ": must be finite and > 0 (seconds)");
    }
  }
}

std::uint64_t estimate_memory(const RouteRequest& req, unsigned threads) {
  const double E = static_cast<double>(req.experts), B = static_cast<double>(req.batch);
  const double bk = B * static_cast<double>(req.top_k), G = static_cast<double>(req.placement.gpus);
  const double L = static_cast<double>(req.layers);
  double slots = 0;
  for (const auto& gl : req.placement.expert_gpus) slots += static_cast<double>(gl.size());
  double bins = 0;
  if (req.cost.enabled) bins = 2.0 * 20000.0;  // generous: log bins of layer and step time
  const double hists = 8.0 * (2.0 * (E + 1) + (bk + 1) + (B + 1) + 2.0 * G + bins);
  // Per table: the E-column tables (plus group tables) and the fixed-size
  // 256-column arrays every AliasTable carries (sm, sm_thr, sm_t8, sm_al).
  const double tables = static_cast<double>(std::max<std::int64_t>(weight_tables(req), 1)) * (E * 32.0 + 2.0 * 2600.0);
  double scratch = hists + 4.0 * (3.0 * E + slots + bk) + 8.0 * 2.0 * G + 64.0 * 8.0;
  if (req.model.kind == ModelKind::Sticky) scratch += 4.0 * L * bk;
  const double t = static_cast<double>(std::max(1u, threads));
  double total = hists + tables + t * scratch + 4.0 * t * hists + 4.0 * static_cast<double>(req.model.trace.size()) +
                 E * 16.0 + slots * 8.0;
  if (req.record)
    total += 4.0 * static_cast<double>(req.microbatches) * L * bk;
  return total >= 1.8e19 ? std::numeric_limits<std::uint64_t>::max() : static_cast<std::uint64_t>(total);
}

RouteResult route(const RouteRequest& req, const CancelToken* cancel) {
  validate(req);
  const unsigned threads = resolve_threads(req.threads);
  const std::uint64_t need = estimate_memory(req, threads);
  if (need > req.memory_limit) {
    std::ostringstream os;
    os << "route(experts=" << req.experts << ", top_k=" << req.top_k << ", batch=" << req.batch
       << ", microbatches=" << req.microbatches << ", layers=" << req.layers << ", threads=" << threads
       << ") would need about " << need << " bytes, above the memory limit of " << req.memory_limit
       << " bytes (qsengine.set_memory_limit or QSENGINE_MAX_MEMORY)";
    throw ResourceLimitExceeded(os.str());
  }
  Engine engine(req, cancel);
  return engine.run();
}

}  // namespace qs::routing
