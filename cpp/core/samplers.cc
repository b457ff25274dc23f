// qsengine core: the routing models (see samplers.h and routing.h).
#include "core/samplers.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

namespace qs::routing {

namespace {

constexpr double kTinyWeight = 1e-300;  // floor for underflowing generated weights

}  // namespace

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

Sampler::Sampler(const RouteRequest& req, const CancelToken* cancel, bool replicas)
    : req_(req), cancel_(cancel), replicas_(replicas), record_(req.record) {
  E_ = req.experts;
  k_ = req.top_k;
  B_ = req.batch;
  L_ = req.layers;
  bk_ = B_ * k_;
  const std::int64_t W = weight_tables(req);
  tables_.resize(static_cast<std::size_t>(W));
  if (req.model.kind == ModelKind::GroupLimited) {
    groups_ = req.model.groups;
    group_size_ = E_ / groups_;
    // Group of each expert (and of the sentinel E: groups, a valid group_mark
    // slot): a table lookup instead of a 64-bit division per candidate.
    group_of_.resize(static_cast<std::size_t>(E_) + 1);
    for (std::int64_t e = 0; e <= E_; ++e) group_of_[e] = static_cast<std::uint32_t>(e / group_size_);
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
}

void Sampler::init_scratch(SamplerScratch& s) const {
  s.mark.assign(E_ + 1, 0);  // mark[E] is a sentinel, always "chosen"
  s.cnt.assign(E_, 0);
  s.group_mark.assign(static_cast<std::size_t>(std::max<std::int64_t>(groups_, 1)) + 1, 0);
  s.sel.assign(static_cast<std::size_t>(bk_), 0);
  if (req_.model.kind == ModelKind::Sticky) s.prev.assign(static_cast<std::size_t>(L_ * bk_), 0);
}

void Sampler::begin_block(SamplerScratch& s, std::int64_t b) const {
  std::fill(s.mark.begin(), s.mark.end(), 0);
  std::fill(s.group_mark.begin(), s.group_mark.end(), 0);
  s.stamp = 0;
  s.cand_table = nullptr;
  s.cand_pos = s.cand_end = 0;
  s.tie.reset(req_.key, static_cast<std::uint64_t>(b), kPurposeTie);
  s.pos_base = 0;
  s.ind_bytes = nullptr;
  s.ind_pos = s.ind_end = 0;
}

std::uint32_t Sampler::next_stamp(std::uint32_t& stamp, std::vector<std::uint32_t>& marks) {
  if (++stamp == 0) {
    std::fill(marks.begin(), marks.end(), 0);
    stamp = 1;
  }
  return stamp;
}

// Refill the candidate buffer from the stream (branch-free conversion).
void Sampler::fill_candidates(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s) {
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
void Sampler::draw_experts(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s, std::uint32_t stamp,
                           std::int32_t* out, std::int64_t have) const {
  if (s.cand_table != &tab) {
    s.cand_table = &tab;
    s.cand_pos = s.cand_end = 0;
  }
  std::uint32_t* mark = s.mark.data();
  const std::uint32_t* gmark = s.group_mark.data();
  const std::uint32_t* group_of = group_of_.data();
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
    if constexpr (kGroups) fresh &= static_cast<std::uint32_t>(gmark[group_of[e]] == stamp);
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
void Sampler::sample_independent(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s) const {
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
void Sampler::dispatch_independent(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s) const {
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
std::uint32_t Sampler::finish_token(const AliasTable& tab, SamplerScratch& s, std::uint32_t c, std::uint32_t tok_end,
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
std::int32_t Sampler::sequential_pick(const AliasTable& tab, PhiloxStream& rng, SamplerScratch& s,
                                      std::uint32_t stamp) const {
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
// The same draws and decisions as the plain rejection loop (per pick: draw
// until a group not yet chosen comes up; after kRejectBudget consecutive
// rejections, one exact sequential pick), written without a branch on the
// accept/reject outcome: with skewed group weights most draws are rejected
// and that branch would mispredict several times per token.
void Sampler::draw_groups(const AliasTable& gt, PhiloxStream& cur, SamplerScratch& s, std::uint32_t stamp) const {
  const std::uint64_t n = gt.n;
  const std::uint32_t* thr = gt.thr.data();
  const std::uint32_t* alias = gt.alias.data();
  std::uint32_t* gmark = s.group_mark.data();
  std::int64_t need = req_.model.top_groups;
  std::int64_t tries = 0;
  while (need > 0) {
    const std::uint64_t m = static_cast<std::uint64_t>(cur.next32()) * n;
    const std::uint32_t low = static_cast<std::uint32_t>(m);
    if (low < gt.lemire_t) continue;
    const std::uint32_t col = static_cast<std::uint32_t>(m >> 32);
    const std::uint32_t g = low < thr[col] ? col : alias[col];
    const std::int64_t fresh = gmark[g] != stamp;
    gmark[g] = stamp;  // unchanged if g was already chosen
    need -= fresh;
    tries = (tries + 1) & (fresh - 1);  // consecutive rejections of this pick
    if (__builtin_expect(tries >= kRejectBudget, 0)) {
      double total = 0.0;
      std::int64_t last = -1;
      for (std::uint32_t q = 0; q < gt.n; ++q)
        if (gmark[q] != stamp && gt.w[q] > 0.0) {
          total += gt.w[q];
          last = q;
        }
      double u = cur.uniform() * total;
      std::int64_t pick = last;
      for (std::uint32_t q = 0; q < gt.n; ++q)
        if (gmark[q] != stamp && gt.w[q] > 0.0) {
          u -= gt.w[q];
          if (u < 0.0) {
            pick = q;
            break;
          }
        }
      gmark[pick] = stamp;
      --need;
      tries = 0;
    }
  }
}

// Fill s.sel with the selections of microbatch m (global index), layer l.
void Sampler::sample(std::int64_t m, std::int64_t l, bool chain_start, PhiloxStream& stream, SamplerScratch& s) const {
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

}  // namespace qs::routing
