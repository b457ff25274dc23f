// qsengine core: streamed statistics of the routing engine.
//
// Moments (count, mean, M2) merged with Chan's formula; integer and log-binned
// histograms, taken per work block by touched range and merged in block order;
// and the precision (standard errors) of a mean and a p99 by sectioning.
// Everything here is merged in block order by the engine, so every figure is
// bit-identical for any thread count.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

namespace qs::routing {

// Relative width of a log-binned cost histogram bin: quantiles reported at the
// geometric bin centre are within sqrt(1.001) - 1 < 0.05% of the truth.
constexpr double kLogBinRatio = 1.001;

// Mean and M2 (sum of squared deviations), merged with Chan's formula in block
// order, so the result does not depend on the thread count.
struct Moments {
  std::uint64_t n = 0;
  double mean = 0.0;
  double m2 = 0.0;
  void add(double x) {
    ++n;
    const double d = x - mean;
    mean += d / static_cast<double>(n);
    m2 += d * (x - mean);
  }
  void merge(const Moments& o);
};

// Histogram on log-spaced bins [lo*r^i, lo*r^(i+1)), r = kLogBinRatio.
struct LogHistogram {
  double lo = 0.0;
  double hi = 0.0;
  std::int64_t bins = 0;
  std::vector<std::uint64_t> counts;
  std::int64_t bin_of(double x) const;
  // Bins covering [lo, hi] (slightly widened so both ends fall inside).
  static LogHistogram covering(double lo, double hi);
};

// A slice [lo, lo + counts.size()) of an integer histogram.
struct RangeHist {
  std::int64_t lo = 0;
  std::vector<std::uint64_t> counts;
  // Adds r, widening this slice to cover r's range.
  void absorb(const RangeHist& r);
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
  RangeHist take();
};

// acc[r.lo + i] += r.counts[i].
void add_range(std::vector<std::uint64_t>& acc, const RangeHist& r);

// Smallest bin i with cumulative count >= max(1, ceil(q * n)) (the quantile
// rule of qsengine.Distribution.quantile); -1 for an empty histogram.
std::int64_t quantile_bin(const RangeHist& h, double q);

// Precision of the mean and the p99 of one statistic by sectioning
// (Asmussen & Glynn, Stochastic Simulation, Springer 2007, sec. III.5a): the
// run's work blocks are cut into contiguous sections; the estimate is the
// full-sample one, and its variance is estimated from the spread of the
// per-section estimates around it:
//   se^2 = m/(m-1) * sum_j (n_j/N)^2 (theta_j - theta)^2
// (n_j samples in section j, N in all, m nonempty sections; with equal n_j
// this is the textbook sum_j (theta_j - theta)^2 / (m(m-1))). For the mean
// this is the batch-means estimator (Schmeiser, Oper. Res. 30, 1982) with
// batches = sections. Work blocks are independent (each has its own streams
// and Sticky restarts its chain per block), so sections of whole blocks are
// independent and the estimate stays honest when samples within a block are
// correlated (Sticky chains, the layers of one microbatch).
struct Precision {
  double mean = 0.0, p99 = 0.0;          // full-sample estimates
  double rse_mean = 0.0, rse_p99 = 0.0;  // standard error / |estimate| (inf if the estimate is 0 and se > 0)
  std::int64_t sections = 0;             // nonempty sections used
};

// Section accumulators of one statistic: an integer histogram over value bins
// (bin -> value through `value`) and, when given, exact moments.
class Sections {
 public:
  // values[i]: the value of bin i (ascending); exact_moments: add() receives
  // the statistic's exact moments (else the mean comes from the histogram).
  Sections(std::vector<double> values, bool exact_moments, std::int64_t count);
  void add(std::int64_t section, const RangeHist& h, const Moments& m);
  // Sections 2j and 2j+1 become section j (j < count/2); the rest empty.
  void fold_pairs();
  Precision precision(double q) const;
  std::int64_t count() const { return static_cast<std::int64_t>(hist_.size()); }
  std::uint64_t bytes() const;

 private:
  double mean_of(const RangeHist& h, const Moments& m, std::uint64_t n) const;
  std::vector<double> values_;
  bool exact_;
  std::vector<RangeHist> hist_;
  std::vector<Moments> mom_;
};

}  // namespace qs::routing
