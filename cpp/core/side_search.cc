// qsengine core: one side's search for its operating points (see side_search.h).
#include "core/side_search.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/step_kernels.h"

namespace qs {
namespace side {
namespace {

using step::detail::kBlockLanes;
using step::detail::np_max;

// numpy's floor division of int64 (Python semantics: rounds toward -inf).
inline std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  const std::int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

class Search {
 public:
  Search(const SearchInput& in, const SearchOutput& out) : in_(in), out_(out) {}

  void run();

 private:
  void search_rows();
  // time (user TPOT), p99 (user) and the step's mean of rows `rows` at `b` admission units each (a fixed batch
  // where the row has one).
  void evaluate(const std::vector<std::int64_t>& rows, const std::vector<std::int64_t>& b, double* time, double* p99,
                double* step);
  // rows at their HBM-max (or fixed) batch: the top_* outputs, and every other output initialised from them
  void tops(const std::vector<std::int64_t>& rows);
  // the search of the rows of some lanes (every row of each)
  void search_lanes(const std::vector<std::int64_t>& rows);
  // rounds over `cand` (grouped by lane): each round takes from every lane its next row that take(r) accepts
  // (the rows it refuses are passed over) and hands the round to run(round)
  template <class Take, class Run>
  void rounds(const std::vector<std::int64_t>& cand, Take take, Run run);
  // the cluster's tokens/s at row r's answer (the TPOT a user sees)
  double served(std::int64_t r) const {
    return (out_.time[r] > 0 ? static_cast<double>(batch_at(r, out_.units[r])) / out_.time[r] : 0.0) * dp(r);
  }
  void bisect(const std::vector<std::int64_t>& rows_b);
  double dp(std::int64_t r) const { return in_.plans[in_.plan[r]].dp; }
  std::int64_t unit(std::int64_t r) const { return in_.unit[in_.plan[r]]; }
  std::int64_t fixed(std::int64_t r) const { return in_.fixed == nullptr ? 0 : in_.fixed[r]; }
  std::int64_t fixed_rep(std::int64_t r) const {
    return floor_div(fixed(r), static_cast<std::int64_t>(dp(r)));  // a fixed cluster batch split over the replicas
  }
  // sequences per replica of row r at its HBM-max (or fixed) batch, and at `units` admission units
  std::int64_t top_batch(std::int64_t r) const { return fixed(r) > 0 ? fixed_rep(r) : in_.units[r] * unit(r); }
  std::int64_t batch_at(std::int64_t r, std::int64_t units) const {
    return fixed(r) > 0 ? fixed_rep(r) : units * unit(r);
  }
  bool alive(std::int64_t r) const { return bound_[r] * (1.0 + 1e-9) >= best_[in_.lane[r]]; }

  const SearchInput& in_;
  const SearchOutput& out_;
  std::vector<double> best_;   // per lane: the best throughput known
  std::vector<double> bound_;  // per row: its HBM-max throughput
  std::vector<std::uint8_t> seen_;  // per row: bisected (search_lanes; cleared after use)
  bool together_ = true;            // the rows of each lane come together
  // scratch of evaluate
  std::vector<const step::Lane*> lanes_;
  std::vector<double> ffn_, batch_, ctx_, t_, p50_, p99_, tok_;
};

void Search::evaluate(const std::vector<std::int64_t>& rows, const std::vector<std::int64_t>& b, double* time,
                      double* p99, double* step) {
  const auto n = static_cast<std::int64_t>(rows.size());
  const auto cap = static_cast<std::size_t>(std::min(n, kBlockLanes));
  lanes_.resize(cap);
  for (auto* v : {&ffn_, &batch_, &ctx_, &t_, &p50_, &p99_, &tok_}) v->resize(cap);
  for (std::int64_t lo = 0; lo < n; lo += kBlockLanes) {
    const std::int64_t hi = std::min(n, lo + kBlockLanes);
    for (std::int64_t i = lo; i < hi; ++i) {
      const std::int64_t r = rows[static_cast<std::size_t>(i)];
      const auto j = static_cast<std::size_t>(i - lo);
      lanes_[j] = &in_.plans[in_.plan[r]];
      if (in_.ffn != nullptr) ffn_[j] = in_.ffn[r];
      batch_[j] = static_cast<double>(batch_at(r, b[static_cast<std::size_t>(i)]));
      ctx_[j] = in_.context[r];
    }
    step::step_lanes(step::Lanes{lanes_.data(), in_.ffn != nullptr ? ffn_.data() : nullptr}, hi - lo, batch_.data(), ctx_.data(), in_.straggler,
                     step::StepOutput{t_.data(), p50_.data(), p99_.data(), tok_.data()}, step::PassDetail{}, 0);
    for (std::int64_t i = lo; i < hi; ++i) {
      const std::int64_t r = rows[static_cast<std::size_t>(i)];
      const auto j = static_cast<std::size_t>(i - lo);
      step[i] = t_[j];
      if (in_.stall == nullptr) {
        time[i] = t_[j];
        p99[i] = p99_[j];
      } else {
        time[i] = t_[j] + batch_[j] * in_.stall[r];
        p99[i] = p99_[j] + batch_[j] * in_.stall[r];
      }
    }
  }
}

void Search::bisect(const std::vector<std::int64_t>& rows_b) {
  if (rows_b.empty()) return;
  const std::size_t m = rows_b.size();
  // Each row's bracket starts as [1, units]: the value at units is the top evaluation's.
  std::vector<std::int64_t> lo0(m, 1), hi0(m);
  std::vector<double> flo0(m), fhi0(m), t_lo0(m), p_lo0(m), d_lo0(m), t_hi0(m);
  std::vector<std::uint8_t> known_lo(m, 0), out(m, 0);
  for (std::size_t j = 0; j < m; ++j) {
    const std::int64_t r = rows_b[j];
    hi0[j] = out_.units[r];
    fhi0[j] = out_.p99[r] - in_.slo[r];
    t_hi0[j] = out_.time[r];
  }
  // A probe first, for dense rows whose lane already has a best to beat: the batch B_top * s / p99(B_top), where
  // the TPOT would meet the target if it were proportional to the batch. A TPOT with a positive intercept misses
  // there, so the probe usually closes the bracket from above near the answer, and the row stops at once when
  // B * dp / TPOT there is below its lane's best (in-bracket pruning, below): a row that cannot win costs one
  // evaluation. A probe that meets is the bracket's low end (and then one sequence meets too).
  std::vector<std::int64_t> probe_rows, probe_b;
  std::vector<std::size_t> probe_at;
  for (std::size_t j = 0; j < m; ++j) {
    const std::int64_t r = rows_b[j];
    const double p99_top = out_.p99[r], best = best_[in_.lane[r]];
    if (in_.plans[in_.plan[r]].moe_layers != 0 || !(best > 0) || hi0[j] < 3 || !(p99_top > 0) ||
        !std::isfinite(p99_top)) {
      continue;
    }
    const double g = std::floor(static_cast<double>(hi0[j]) * in_.slo[r] / p99_top);
    const double gc = std::min(std::max(g, 1.0), static_cast<double>(hi0[j] - 1));
    if (!std::isfinite(gc)) continue;
    probe_rows.push_back(r);
    probe_b.push_back(static_cast<std::int64_t>(gc));
    probe_at.push_back(j);
  }
  if (!probe_rows.empty()) {
    const std::size_t q = probe_rows.size();
    std::vector<double> pt(q), pp(q), ps(q);
    evaluate(probe_rows, probe_b, pt.data(), pp.data(), ps.data());
    for (std::size_t i = 0; i < q; ++i) {
      const std::size_t j = probe_at[i];
      const std::int64_t r = rows_b[j];
      const double got = pp[i] - in_.slo[r];
      if (got <= 0) {
        lo0[j] = probe_b[i];
        flo0[j] = got;
        t_lo0[j] = pt[i];
        p_lo0[j] = pp[i];
        d_lo0[j] = ps[i];
        known_lo[j] = 1;
        continue;
      }
      hi0[j] = probe_b[i];
      fhi0[j] = got;
      t_hi0[j] = pt[i];
      const double w = static_cast<double>(unit(r)) * dp(r);
      const double cap_hi = (pt[i] > 0 ? static_cast<double>(hi0[j]) / pt[i] : std::numeric_limits<double>::infinity()) * w;
      if (hi0[j] == 1 || cap_hi * (1.0 + 1e-9) < best_[in_.lane[r]]) {  // misses at one unit, or cannot win
        out_.valid[r] = 0;
        out[j] = 1;
      }
    }
  }
  // the other rows at one admission unit: rows that miss the target there are invalid
  std::vector<std::int64_t> one_rows;
  std::vector<std::size_t> one_at;
  for (std::size_t j = 0; j < m; ++j) {
    if (!out[j] && !known_lo[j]) {
      one_rows.push_back(rows_b[j]);
      one_at.push_back(j);
    }
  }
  if (!one_rows.empty()) {
    const std::size_t q = one_rows.size();
    std::vector<double> ft(q), fp(q), fs(q);
    evaluate(one_rows, std::vector<std::int64_t>(q, 1), ft.data(), fp.data(), fs.data());
    for (std::size_t i = 0; i < q; ++i) {
      const std::size_t j = one_at[i];
      const std::int64_t r = rows_b[j];
      if (fp[i] > in_.slo[r]) {
        out_.valid[r] = 0;
        out[j] = 1;
        continue;
      }
      flo0[j] = fp[i] - in_.slo[r];
      t_lo0[j] = ft[i];
      p_lo0[j] = fp[i];
      d_lo0[j] = fs[i];
    }
  }
  std::vector<std::int64_t> act, lo, hi;
  std::vector<double> flo, fhi, t_lo, p_lo, d_lo, t_hi;
  for (std::size_t j = 0; j < m; ++j) {
    if (out[j]) continue;
    act.push_back(rows_b[j]);
    lo.push_back(lo0[j]);
    hi.push_back(hi0[j]);
    flo.push_back(flo0[j]);
    fhi.push_back(fhi0[j]);
    t_lo.push_back(t_lo0[j]);
    p_lo.push_back(p_lo0[j]);
    d_lo.push_back(d_lo0[j]);
    t_hi.push_back(t_hi0[j]);
  }
  const std::size_t k = act.size();
  std::vector<std::uint8_t> halve(k, 0), on(k, 1), mono(k, 0);
  std::vector<std::int8_t> moved(k, 0);  // +1 lo moved last, -1 hi moved last
  std::vector<double> w(k);
  bool prune = false;
  for (std::size_t j = 0; j < k; ++j) {
    const std::int64_t r = act[j];
    w[j] = static_cast<double>(unit(r)) * dp(r);
    mono[j] = in_.plans[in_.plan[r]].moe_layers == 0 ? 1 : 0;
    prune = prune || mono[j] != 0;
  }
  std::vector<std::int64_t> live_rows, mids;
  std::vector<std::size_t> live, open(k);  // open: the rows still searching (the others are done)
  std::iota(open.begin(), open.end(), std::size_t{0});
  std::vector<double> mt, mp, ms;
  const double inf = std::numeric_limits<double>::infinity();
  while (true) {
    if (prune) {
      for (const std::size_t j : open) {
        if (on[j] && mono[j]) {
          const double v = (t_lo[j] > 0 ? static_cast<double>(lo[j]) / t_lo[j] : 0.0) * w[j];
          double& best = best_[in_.lane[act[j]]];
          best = np_max(best, v);
        }
      }
      for (const std::size_t j : open) {
        if (!mono[j]) continue;
        const double cap_hi = (t_hi[j] > 0 ? static_cast<double>(hi[j]) / t_hi[j] : inf) * w[j];
        if (cap_hi * (1.0 + 1e-9) < best_[in_.lane[act[j]]]) on[j] = 0;
      }
    }
    live.clear();
    live_rows.clear();
    mids.clear();
    for (const std::size_t j : open) {
      if (!on[j] || hi[j] - lo[j] <= 1) continue;
      const std::int64_t a = lo[j], b = hi[j];
      const double fa = flo[j], fb = fhi[j];
      // the regula falsi point, clipped to [a + 1, b - 1] (in floating point first: a finite guess lies in
      // [a, b) since fa <= 0 < fb, but the cast must never see an out-of-range value)
      const double g = static_cast<double>(a) + std::floor(static_cast<double>(b - a) * (-fa) / (fb - fa));
      const double gc = std::min(std::max(g, static_cast<double>(a + 1)), static_cast<double>(b - 1));
      const std::int64_t guess = std::isfinite(g) ? static_cast<std::int64_t>(gc) : floor_div(a + b, 2);
      const std::int64_t mid = halve[j] ? floor_div(a + b, 2) : std::min(std::max(guess, a + 1), b - 1);
      live.push_back(j);
      live_rows.push_back(act[j]);
      mids.push_back(mid);
    }
    open = live;  // a row done (closed or pruned) stays done
    if (live.empty()) break;
    mt.resize(live.size());
    mp.resize(live.size());
    ms.resize(live.size());
    evaluate(live_rows, mids, mt.data(), mp.data(), ms.data());
    for (std::size_t q = 0; q < live.size(); ++q) {
      const std::size_t j = live[q];
      const double got = mp[q] - in_.slo[act[j]];
      const bool meets = got <= 0;
      const std::int64_t width = hi[j] - lo[j];
      if (meets) {
        lo[j] = mids[q];
        flo[j] = got;
        t_lo[j] = mt[q];
        p_lo[j] = mp[q];
        d_lo[j] = ms[q];
      } else {
        hi[j] = mids[q];
        fhi[j] = got;
        t_hi[j] = mt[q];
      }
      const std::int8_t side = meets ? 1 : -1;
      if (side == moved[j]) {  // Illinois: the kept end's value halves when the same end moved twice
        if (meets) fhi[j] = fhi[j] / 2;
        else flo[j] = flo[j] / 2;
      }
      moved[j] = side;
      halve[j] = 2 * (hi[j] - lo[j]) > width ? 1 : 0;
    }
  }
  for (std::size_t j = 0; j < k; ++j) {
    const std::int64_t r = act[j];
    if (!on[j]) {  // never chosen: another plan of its lane serves more
      out_.valid[r] = 0;
      continue;
    }
    out_.units[r] = lo[j];
    out_.time[r] = t_lo[j];
    out_.p99[r] = p_lo[j];
    out_.step[r] = d_lo[j];
  }
}

void Search::run() {
  search_rows();
  // the operating points' batches and decode throughputs
  for (std::int64_t r = 0; r < in_.rows; ++r) {
    const std::int64_t top = top_batch(r), at = batch_at(r, out_.units[r]);
    out_.top_batch[r] = top;
    out_.batch[r] = at;
    out_.top_tps[r] = (out_.top_step[r] > 0 ? static_cast<double>(top) / out_.top_step[r] : 0.0) * dp(r);
    out_.tps[r] = (out_.step[r] > 0 ? static_cast<double>(at) / out_.step[r] : 0.0) * dp(r);
  }
}

void Search::tops(const std::vector<std::int64_t>& rows) {
  std::vector<std::int64_t> units(rows.size());
  for (std::size_t j = 0; j < rows.size(); ++j) units[j] = in_.units[rows[j]];
  std::vector<double> t(rows.size()), p(rows.size()), d(rows.size());
  evaluate(rows, units, t.data(), p.data(), d.data());
  for (std::size_t j = 0; j < rows.size(); ++j) {
    const std::int64_t r = rows[j];
    out_.top_time[r] = t[j];
    out_.top_p99[r] = p[j];
    out_.top_step[r] = d[j];
    const std::int64_t fx = fixed(r);
    bool ok = true;
    if (fx > 0) {  // the plan cannot hold the fixed batch, or cannot split it evenly over its replicas
      const std::int64_t rep = fixed_rep(r), u = unit(r);
      const auto dpr = static_cast<std::int64_t>(dp(r));
      ok = !(-floor_div(-rep, u) > in_.units[r] || fx % dpr != 0 || rep < 1);
    }
    out_.top_valid[r] = ok ? 1 : 0;
    out_.valid[r] = ok ? 1 : 0;
    out_.units[r] = in_.units[r];
    out_.time[r] = t[j];
    out_.p99[r] = p[j];
    out_.step[r] = d[j];
    const bool has_slo = !std::isnan(in_.slo[r]) && fx <= 0;
    out_.binds[r] = has_slo && !(p[j] <= in_.slo[r]) ? 1 : 0;
    const double max_batch = static_cast<double>(top_batch(r));
    bound_[r] = (t[j] > 0 ? max_batch / t[j] : 0.0) * dp(r);
  }
}

template <class Take, class Run>
void Search::rounds(const std::vector<std::int64_t>& cand, Take take, Run run) {
  std::vector<std::size_t> next, stop;  // per lane of cand: the position of its next row, the end of its rows
  for (std::size_t j = 0; j < cand.size(); ++j) {
    if (j == 0 || in_.lane[cand[j]] != in_.lane[cand[j - 1]]) {
      if (j > 0) stop.push_back(j);
      next.push_back(j);
    }
  }
  stop.push_back(cand.size());
  std::vector<std::int64_t> round;
  while (true) {
    round.clear();
    for (std::size_t l = 0; l < next.size(); ++l) {
      while (next[l] < stop[l]) {
        const std::int64_t r = cand[next[l]++];
        if (take(r)) {
          round.push_back(r);
          break;
        }
      }
    }
    if (round.empty()) break;
    run(round);
  }
}

// Rows by lane, the largest key first (stable: plan order among equals; NaN last). `together`: the rows of each
// lane already come together (each lane's run is then sorted alone).
void sort_by_lane_then_key(std::vector<std::int64_t>& rows, const std::int64_t* lane, bool together,
                           const std::vector<double>& key) {
  auto by_key = [&](std::int64_t a, std::int64_t b) {
    const double ka = -key[static_cast<std::size_t>(a)], kb = -key[static_cast<std::size_t>(b)];
    if (std::isnan(ka) || std::isnan(kb)) return !std::isnan(ka) && std::isnan(kb);
    return ka < kb;
  };
  if (!together) {
    std::stable_sort(rows.begin(), rows.end(), [&](std::int64_t a, std::int64_t b) {
      if (lane[a] != lane[b]) return lane[a] < lane[b];
      return by_key(a, b);
    });
    return;
  }
  for (std::size_t lo = 0; lo < rows.size();) {
    std::size_t hi = lo + 1;
    while (hi < rows.size() && lane[rows[hi]] == lane[rows[lo]]) ++hi;
    std::stable_sort(rows.begin() + static_cast<std::ptrdiff_t>(lo), rows.begin() + static_cast<std::ptrdiff_t>(hi),
                     by_key);
    lo = hi;
  }
}

void Search::search_lanes(const std::vector<std::int64_t>& rows) {
  tops(rows);
  // the lane's best starts from the rows that meet the target at their maximum
  std::vector<std::int64_t> over;
  for (const std::int64_t r : rows) {
    if (out_.binds[r]) over.push_back(r);
    else if (out_.valid[r]) best_[in_.lane[r]] = np_max(best_[in_.lane[r]], bound_[r]);
  }
  // the binding rows still alive, by lane, the largest maximum first; rounds: each lane bisects its next row
  // still alive (the lane's best raised by every row it finished), so a row is skipped as soon as a plan tried
  // before it serves more than its maximum
  std::vector<std::int64_t> cand;
  for (const std::int64_t r : over) {
    if (alive(r)) cand.push_back(r);
  }
  sort_by_lane_then_key(cand, in_.lane, together_, bound_);
  std::vector<std::uint8_t>& seen = seen_;  // rows of `rows` bisected (all 0 on entry)
  rounds(cand, [&](std::int64_t r) { return alive(r); },
         [&](const std::vector<std::int64_t>& round) {
           for (const std::int64_t r : round) seen[static_cast<std::size_t>(r)] = 1;
           bisect(round);
           for (const std::int64_t r : round) {
             if (out_.valid[r]) best_[in_.lane[r]] = np_max(best_[in_.lane[r]], served(r));
           }
         });
  // binding rows never bisected: another plan of their lane serves more, so they are never chosen
  for (const std::int64_t r : over) {
    if (!seen[static_cast<std::size_t>(r)]) out_.valid[r] = 0;
    seen[static_cast<std::size_t>(r)] = 0;
  }
}

void Search::search_rows() {
  best_.assign(static_cast<std::size_t>(in_.lanes), 0.0);
  bound_.assign(static_cast<std::size_t>(in_.rows), 0.0);
  seen_.assign(static_cast<std::size_t>(in_.rows), 0);
  // Lanes in groups of kGroupLanes, each searched to completion before the next, so a group's rows stay in
  // cache (a round of the search visits one row per lane: across every lane of a call it reads its arrays a row
  // here and there; 1.29 s -> 1.12 s for the dense sides of bench_sweep's grid). The rows of a lane come
  // together (the Python layer lays them out lane by lane); if they do not, all rows are one group.
  constexpr std::int64_t kGroupLanes = 256;
  std::vector<std::uint8_t> seen_lane(static_cast<std::size_t>(in_.lanes), 0);
  bool& together = together_;
  together = true;
  for (std::int64_t r = 0; r < in_.rows && together; ++r) {
    if (r > 0 && in_.lane[r] == in_.lane[r - 1]) continue;
    std::uint8_t& s = seen_lane[static_cast<std::size_t>(in_.lane[r])];
    together = s == 0;
    s = 1;
  }
  std::vector<std::int64_t> group;
  std::int64_t lanes_in = 0;
  for (std::int64_t r = 0; r < in_.rows; ++r) {
    const bool new_lane = r == 0 || in_.lane[r] != in_.lane[r - 1];
    if (together && new_lane && lanes_in == kGroupLanes) {
      search_lanes(group);
      group.clear();
      lanes_in = 0;
    }
    if (new_lane) ++lanes_in;
    group.push_back(r);
  }
  search_lanes(group);
}

}  // namespace

void search(const SearchInput& in, const SearchOutput& out) {
  if (in.rows < 0 || in.lanes < 0 || in.num_plans < 0) {
    throw InvalidArgument("side_search: rows, lanes and plans must be >= 0");
  }
  if (in.rows == 0) return;
  if (!in.plans || !in.unit || !in.plan || !in.lane || !in.context || !in.slo || !in.units || !out.top_time ||
      !out.top_p99 || !out.top_step || !out.top_valid || !out.binds || !out.units || !out.time || !out.p99 ||
      !out.step || !out.valid || !out.top_batch || !out.top_tps || !out.batch || !out.tps) {
    throw InvalidArgument("side_search: an input or output array is missing");
  }
  for (std::int64_t r = 0; r < in.rows; ++r) {
    if (in.plan[r] < 0 || in.plan[r] >= in.num_plans) {
      throw InvalidArgument("side_search: plan[" + std::to_string(r) + "] = " + std::to_string(in.plan[r]) +
                            ": must be in [0, " + std::to_string(in.num_plans) + ")");
    }
    if (in.lane[r] < 0 || in.lane[r] >= in.lanes) {
      throw InvalidArgument("side_search: lane[" + std::to_string(r) + "] = " + std::to_string(in.lane[r]) +
                            ": must be in [0, " + std::to_string(in.lanes) + ")");
    }
    if (in.units[r] < 1) {
      throw InvalidArgument("side_search: units[" + std::to_string(r) + "] = " + std::to_string(in.units[r]) +
                            ": must be >= 1 (rows are plans that pack)");
    }
    if (in.unit[in.plan[r]] < 1 || !(in.plans[in.plan[r]].dp >= 1)) {
      throw InvalidArgument("side_search: plan " + std::to_string(in.plan[r]) + ": unit and dp must be >= 1");
    }
  }
  Search(in, out).run();
}

void in_order_best(std::int64_t rows, const std::int64_t* lane, const double* score, const std::uint8_t* valid,
                   std::int64_t lanes, double* best, std::int64_t* row) {
  for (std::int64_t l = 0; l < lanes; ++l) {
    best[l] = std::numeric_limits<double>::quiet_NaN();
    row[l] = -1;
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t l = lane[r];
    if (l < 0 || l >= lanes) {
      throw InvalidArgument("in_order_best: lane[" + std::to_string(r) + "] = " + std::to_string(l) +
                            ": must be in [0, " + std::to_string(lanes) + ")");
    }
    const double t = score[r];
    if (!valid[r] || std::isnan(t)) continue;
    if (std::isnan(best[l]) || t > best[l] * (1 + 1e-12)) {
      best[l] = t;
      row[l] = r;
    }
  }
}

}  // namespace side
}  // namespace qs
