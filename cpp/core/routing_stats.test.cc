// C++-only tests of the routing engine's streamed statistics: range
// histograms, the quantile rule and the sectioning standard errors against
// their textbook forms.
#include "core/routing_stats.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/test_util.h"

using namespace qs::routing;

namespace {

RangeHist hist(std::int64_t lo, std::vector<std::uint64_t> c) {
  RangeHist h;
  h.lo = lo;
  h.counts = std::move(c);
  return h;
}

bool close(double a, double b, double rel = 1e-12) { return std::abs(a - b) <= rel * std::max(std::abs(a), std::abs(b)); }

void test_absorb_widens_both_ways() {
  RangeHist a = hist(5, {1, 2});
  a.absorb(hist(3, {7}));
  a.absorb(hist(8, {4}));
  a.absorb(RangeHist{});
  CHECK(a.lo == 3);
  CHECK((a.counts == std::vector<std::uint64_t>{7, 0, 1, 2, 0, 4}));
  a.absorb(hist(4, {1, 1}));
  CHECK((a.counts == std::vector<std::uint64_t>{7, 1, 2, 2, 0, 4}));
}

void test_quantile_rule() {
  // values 10..14 with counts; smallest bin with cumulative >= max(1, ceil(q n)).
  const RangeHist h = hist(10, {1, 0, 97, 1, 1});  // n = 100
  CHECK(quantile_bin(h, 0.99) == 13);
  CHECK(quantile_bin(h, 0.5) == 12);
  CHECK(quantile_bin(h, 0.0) == 10);
  CHECK(quantile_bin(h, 1.0) == 14);
  CHECK(quantile_bin(RangeHist{}, 0.5) == -1);
}

void test_sections_match_textbook_sectioning() {
  // 4 equal sections of an integer statistic (values = bin index): the
  // standard error is sqrt(sum_j (theta_j - theta)^2 / (m (m-1))) around the
  // whole-sample estimate theta, for the mean and for the p99.
  std::vector<double> values(100);
  for (int i = 0; i < 100; ++i) values[i] = i;
  Sections s(values, false, 8);
  const std::vector<RangeHist> sec = {hist(10, {50, 50}), hist(10, {40, 60}), hist(10, {0, 90, 10}),
                                      hist(9, {10, 80, 10})};
  for (int j = 0; j < 4; ++j) s.add(j, sec[j], Moments{});
  const Precision p = s.precision(0.99);
  CHECK(p.sections == 4);
  // whole sample: 10 x9, 170 x10, 210 x11, 10 x12 (n = 400)
  const double mean = (9 * 10.0 + 10 * 170.0 + 11 * 210.0 + 12 * 10.0) / 400.0;
  CHECK(close(p.mean, mean));
  CHECK(p.p99 == 12.0);
  const double means[4] = {10.5, 10.6, 11.1, 10.0};
  const double q99[4] = {11, 11, 12, 11};
  double sm = 0, sq = 0;
  for (int j = 0; j < 4; ++j) {
    sm += (means[j] - mean) * (means[j] - mean);
    sq += (q99[j] - 12.0) * (q99[j] - 12.0);
  }
  CHECK(close(p.rse_mean, std::sqrt(sm / 12.0) / mean));
  CHECK(close(p.rse_p99, std::sqrt(sq / 12.0) / 12.0));
  // Folding pairs keeps the whole sample (same estimates), now 2 sections.
  s.fold_pairs();
  const Precision f = s.precision(0.99);
  CHECK(f.sections == 2 && close(f.mean, mean) && f.p99 == 12.0);
  const double m01 = (10.5 + 10.6) / 2, m23 = (11.1 + 10.0) / 2;
  CHECK(close(f.rse_mean, std::sqrt(((m01 - mean) * (m01 - mean) + (m23 - mean) * (m23 - mean)) / 2.0) / mean));
}

void test_sections_weighted_and_exact_moments() {
  // Unequal sections with exact moments: se^2 = m/(m-1) sum_j (n_j/N)^2 (mean_j - mean)^2.
  std::vector<double> values = {1.0, 2.0, 3.0};
  Sections s(values, true, 4);
  Moments a, b;
  for (double x : {1.0, 2.0, 2.0}) a.add(x);
  for (double x : {3.0}) b.add(x);
  s.add(0, hist(0, {1, 2}), a);
  s.add(2, hist(2, {1}), b);  // section 1 stays empty and is skipped
  const Precision p = s.precision(0.5);
  CHECK(p.sections == 2);
  const double mean = 2.0;
  const double se2 = 2.0 * ((0.75 * 0.75) * std::pow(5.0 / 3.0 - mean, 2) + (0.25 * 0.25) * std::pow(3.0 - mean, 2));
  CHECK(close(p.rse_mean, std::sqrt(se2) / mean));
  // A constant statistic has zero standard errors; one section cannot estimate any.
  Sections c(values, false, 2);
  c.add(0, hist(1, {5}), Moments{});
  CHECK(std::isinf(c.precision(0.99).rse_mean));
  c.add(1, hist(1, {7}), Moments{});
  CHECK(c.precision(0.99).rse_mean == 0.0 && c.precision(0.99).rse_p99 == 0.0);
}

}  // namespace

int main() {
  test_absorb_widens_both_ways();
  test_quantile_rule();
  test_sections_match_textbook_sectioning();
  test_sections_weighted_and_exact_moments();
  return qs::test::report("routing_stats");
}
