// qsengine core: streamed statistics of the routing engine (see routing_stats.h).
#include "core/routing_stats.h"

#include <algorithm>
#include <cmath>
#include <utility>

namespace qs::routing {

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

LogHistogram LogHistogram::covering(double lo, double hi) {
  LogHistogram h;
  h.lo = lo * (1.0 - 1e-9);
  h.hi = hi * (1.0 + 1e-9);
  h.bins = static_cast<std::int64_t>(std::ceil(std::log(h.hi / h.lo) / std::log(kLogBinRatio))) + 1;
  return h;
}

void RangeHist::absorb(const RangeHist& r) {
  if (r.counts.empty()) return;
  if (counts.empty()) {
    *this = r;
    return;
  }
  const std::int64_t n = static_cast<std::int64_t>(counts.size()), rn = static_cast<std::int64_t>(r.counts.size());
  const std::int64_t new_lo = std::min(lo, r.lo), new_hi = std::max(lo + n, r.lo + rn);
  if (new_lo < lo || new_hi > lo + n) {
    std::vector<std::uint64_t> c(static_cast<std::size_t>(new_hi - new_lo), 0);
    std::copy(counts.begin(), counts.end(), c.begin() + (lo - new_lo));
    counts = std::move(c);
    lo = new_lo;
  }
  for (std::int64_t i = 0; i < rn; ++i) counts[static_cast<std::size_t>(r.lo - lo + i)] += r.counts[i];
}

RangeHist TrackedHist::take() {
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

void add_range(std::vector<std::uint64_t>& acc, const RangeHist& r) {
  for (std::size_t i = 0; i < r.counts.size(); ++i) acc[r.lo + i] += r.counts[i];
}

std::int64_t quantile_bin(const RangeHist& h, double q) {
  std::uint64_t n = 0;
  for (std::uint64_t c : h.counts) n += c;
  if (n == 0) return -1;
  const double t = std::ceil(q * static_cast<double>(n));
  const std::uint64_t target = std::max<std::uint64_t>(1, static_cast<std::uint64_t>(t));
  std::uint64_t cum = 0;
  for (std::size_t i = 0; i < h.counts.size(); ++i) {
    cum += h.counts[i];
    if (cum >= target) return h.lo + static_cast<std::int64_t>(i);
  }
  return h.lo + static_cast<std::int64_t>(h.counts.size()) - 1;
}

Sections::Sections(std::vector<double> values, bool exact_moments, std::int64_t count)
    : values_(std::move(values)), exact_(exact_moments), hist_(static_cast<std::size_t>(count)),
      mom_(static_cast<std::size_t>(count)) {}

void Sections::add(std::int64_t section, const RangeHist& h, const Moments& m) {
  hist_[static_cast<std::size_t>(section)].absorb(h);
  if (exact_) mom_[static_cast<std::size_t>(section)].merge(m);
}

void Sections::fold_pairs() {
  const std::size_t m = hist_.size();
  for (std::size_t j = 0; j < m / 2; ++j) {
    RangeHist h = std::move(hist_[2 * j]);
    h.absorb(hist_[2 * j + 1]);
    Moments mo = mom_[2 * j];
    mo.merge(mom_[2 * j + 1]);
    hist_[j] = std::move(h);
    mom_[j] = mo;
  }
  for (std::size_t j = m / 2; j < m; ++j) {
    hist_[j] = RangeHist{};
    mom_[j] = Moments{};
  }
}

std::uint64_t Sections::bytes() const {
  std::uint64_t b = 0;
  for (const RangeHist& h : hist_) b += 8 * h.counts.size();
  return b;
}

double Sections::mean_of(const RangeHist& h, const Moments& m, std::uint64_t n) const {
  if (exact_) return m.mean;
  // Integer statistic: the histogram is exact; sum in long double for accuracy.
  long double s = 0.0L;
  for (std::size_t i = 0; i < h.counts.size(); ++i)
    s += static_cast<long double>(h.counts[i]) * static_cast<long double>(values_[h.lo + i]);
  return static_cast<double>(s / static_cast<long double>(n));
}

Precision Sections::precision(double q) const {
  Precision p;
  RangeHist all;
  Moments all_m;
  std::vector<std::uint64_t> n(hist_.size(), 0);
  std::uint64_t N = 0;
  for (std::size_t j = 0; j < hist_.size(); ++j) {
    for (std::uint64_t c : hist_[j].counts) n[j] += c;
    N += n[j];
    all.absorb(hist_[j]);
    all_m.merge(mom_[j]);
    if (n[j] > 0) ++p.sections;
  }
  if (N == 0) {
    p.rse_mean = p.rse_p99 = std::numeric_limits<double>::infinity();
    return p;
  }
  p.mean = mean_of(all, all_m, N);
  p.p99 = values_[quantile_bin(all, q)];
  if (p.sections < 2) {
    p.rse_mean = p.rse_p99 = std::numeric_limits<double>::infinity();
    return p;
  }
  double s_mean = 0.0, s_q = 0.0;
  for (std::size_t j = 0; j < hist_.size(); ++j) {
    if (n[j] == 0) continue;
    const double w = static_cast<double>(n[j]) / static_cast<double>(N);
    const double dm = mean_of(hist_[j], mom_[j], n[j]) - p.mean;
    const double dq = values_[quantile_bin(hist_[j], q)] - p.p99;
    s_mean += w * w * dm * dm;
    s_q += w * w * dq * dq;
  }
  const double ms = static_cast<double>(p.sections);
  const double se_mean = std::sqrt(ms / (ms - 1.0) * s_mean), se_q = std::sqrt(ms / (ms - 1.0) * s_q);
  auto rel = [](double se, double x) {
    if (se == 0.0) return 0.0;
    return x == 0.0 ? std::numeric_limits<double>::infinity() : se / std::abs(x);
  };
  p.rse_mean = rel(se_mean, p.mean);
  p.rse_p99 = rel(se_q, p.p99);
  return p;
}

}  // namespace qs::routing
