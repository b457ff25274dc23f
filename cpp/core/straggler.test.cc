// C++-only tests of the closed-form straggler: closed forms of the maximum of
// normals (G = 1 is the normal itself; c_2 = 1/sqrt(pi); Clark's maximum of two
// equal normals), numpy's pairwise sum, a uniform lane worked by hand, the
// ceiling and the layer sum, lanes independent of their neighbours, bad input.
#include "core/straggler.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/test_util.h"

using namespace qs::straggler;

namespace {

constexpr double kPi = 3.141592653589793;

bool close(double a, double b, double rel) { return std::abs(a - b) <= rel * std::max(std::abs(a), std::abs(b)); }

void test_max_iid_closed_forms() {
  CHECK(max_iid_normal(1).mean == 0.0 && max_iid_normal(1).sd == 1.0);  // G = 1: the normal itself
  CHECK(max_iid_normal(0).mean == 0.0 && max_iid_normal(0).sd == 1.0);
  // max of two standard normals: mean 1/sqrt(pi), variance 1 - 1/pi
  CHECK(close(max_iid_normal(2).mean, 1.0 / std::sqrt(kPi), 1e-10));
  CHECK(close(max_iid_normal(2).sd, std::sqrt(1.0 - 1.0 / kPi), 1e-10));
  // max of three: mean 3/(2 sqrt(pi)) (Bose & Gupta 1959)
  CHECK(close(max_iid_normal(3).mean, 1.5 / std::sqrt(kPi), 1e-10));
  // cached: the same bits again; increasing in G, sd decreasing
  CHECK(max_iid_normal(8).mean == max_iid_normal(8).mean);
  for (std::int64_t g = 2; g < 64; ++g) {
    CHECK(max_iid_normal(g + 1).mean > max_iid_normal(g).mean);
    CHECK(max_iid_normal(g + 1).sd < max_iid_normal(g).sd);
  }
}

void test_expected_max_normals() {
  std::vector<double> work;
  const double mu1[] = {3.5}, s1[] = {0.25};
  const MaxIid one = expected_max_normals(mu1, s1, 1, work);  // G = 1: the normal itself
  CHECK(one.mean == 3.5 && one.sd == 0.25);
  // two equal normals N(2, 0.5^2): mean 2 + 0.5/sqrt(pi), sd 0.5 sqrt(1 - 1/pi) (grid error ~1e-6)
  const double mu2[] = {2.0, 2.0}, s2[] = {0.5, 0.5};
  const MaxIid two = expected_max_normals(mu2, s2, 2, work);
  CHECK(std::abs(two.mean - (2.0 + 0.5 / std::sqrt(kPi))) < 1e-5);
  CHECK(std::abs(two.sd - 0.5 * std::sqrt(1.0 - 1.0 / kPi)) < 1e-5);
  // one normal far above the others: the maximum is that normal
  const double mu3[] = {0.0, 100.0, 1.0}, s3[] = {1.0, 2.0, 1.0};
  const MaxIid far = expected_max_normals(mu3, s3, 3, work);
  // (grid step 124/2048 = 0.03 sigma: the sd's O(h^2) discretisation error is ~1.5e-4 relative)
  CHECK(std::abs(far.mean - 100.0) < 1e-6 && std::abs(far.sd - 2.0) < 1e-3);
  // degenerate: equal means, every sigma 0 -> an empty interval: that mean, sd 0
  const double mu4[] = {4.0, 4.0}, s4[] = {0.0, 0.0};
  const MaxIid deg = expected_max_normals(mu4, s4, 2, work);
  CHECK(deg.mean == 4.0 && deg.sd == 0.0);
}

void test_clark() {
  const double mu[] = {1.5}, s[] = {0.5};
  CHECK(clark_max(mu, s, 1).mean == 1.5 && clark_max(mu, s, 1).sd == 0.5);  // C = 1: exact
  // two equal normals N(m, s^2): exact mean m + s/sqrt(pi), variance s^2 (1 - 1/pi)
  const double m2[] = {4.0, 4.0}, s2[] = {0.3, 0.3};
  const MaxIid c = clark_max(m2, s2, 2);
  CHECK(close(c.mean, 4.0 + 0.3 / std::sqrt(kPi), 1e-14));
  CHECK(close(c.sd, 0.3 * std::sqrt(1.0 - 1.0 / kPi), 1e-12));
  // zero variances: the larger mean, whatever the order
  const double m3[] = {1.0, 7.0, 3.0}, s3[] = {0.0, 0.0, 0.0};
  CHECK(clark_max(m3, s3, 3).mean == 7.0 && clark_max(m3, s3, 3).sd == 0.0);
}

void test_pairwise_sum_and_erf() {
  std::vector<double> v;
  for (int n = 0; n < 3000; ++n) {
    double plain = 0;
    for (double x : v) plain += x;
    CHECK(pairwise_sum(v.data(), static_cast<std::int64_t>(v.size())) == plain);  // integers: exact either way
    v.push_back(static_cast<double>(n % 17));
  }
  CHECK(erf_as(0.0) == 0.0);
  for (double z : {-3.0, -0.7, 0.2, 1.0, 2.5}) {
    CHECK(std::abs(erf_as(z) - std::erf(z)) < 1.5e-7);  // A&S 7.1.26
    CHECK(erf_as(-z) == -erf_as(z));
  }
  CHECK(std::isnan(erf_as(std::nan(""))));
}

void test_uniform_lane_by_hand() {
  // E = 8, k = 2, B = 10 tokens, G = 1 GPU: the normal itself, no ceiling binding
  Routing r;
  r.experts = 8;
  r.top_k = 2;
  const double B = 10, a = 1e-6, b = 1e-7;
  const std::int64_t G = 1;
  ClosedFormInput in;
  in.lanes = 1;
  in.tokens = {&B, 0};
  in.a = {&a, 0};
  in.b = {&b, 0};
  in.gpus = {&G, 0};
  double mean = -1, sd = -1;
  closed_form(r, in, &mean, &sd);
  const double p1 = 0.25, touched = 1 - std::pow(1 - p1, B);
  const double mu_u = 8 * touched, var_u = 8 * touched * (1 - touched);
  const double mu_n = B * 2, var_n = 0.0;  // one GPU holds every expert: n = B*k exactly
  const bool use_u = a * mu_u >= b * mu_n;
  CHECK(use_u);
  CHECK(close(mean, a * mu_u, 1e-14));
  CHECK(close(sd, a * std::sqrt(var_u), 1e-12));
  (void)var_n;
  // tokens <= 0: no straggler
  const double zero = 0;
  in.tokens = {&zero, 0};
  closed_form(r, in, &mean, &sd);
  CHECK(mean == 0.0 && sd == 0.0);
}

void test_ceiling_and_quantiles() {
  CHECK(ceiling(4, 8, 10, 1.0, 0.1) == 4.0);     // reading all 4 local experts
  CHECK(ceiling(4, 2, 100, 1.0, 0.1) == 20.0);   // B*min(k, E_g) assignments
  Routing r;
  r.experts = 64;
  r.top_k = 6;
  const double tokens[] = {50.0, 50.0, 800.0};
  const double layers[] = {0.0, 58.0, 58.0}, experts[] = {1.0, 64.0, 64.0}, top_k[] = {1.0, 6.0, 6.0};
  const double ep[] = {1.0, 8.0, 8.0}, red[] = {0.0, 0.0, 0.0}, a[] = {0.0, 2e-6, 2e-6}, b[] = {0.0, 1e-8, 1e-8};
  QuantilesInput q;
  q.lanes = 3;
  q.tokens = {tokens, 1};
  q.moe_layers = {layers, 1};
  q.experts = {experts, 1};
  q.top_k = {top_k, 1};
  q.ep = {ep, 1};
  q.redundant = {red, 1};
  q.a = {a, 1};
  q.b = {b, 1};
  double mean[3], p50[3], p99[3];
  quantiles(r, q, mean, p50, p99);
  CHECK(mean[0] == 0.0 && p99[0] == 0.0);  // dense lane
  for (int i = 1; i < 3; ++i) {
    double m, s;
    const std::int64_t g = 8;
    ClosedFormInput in;
    in.lanes = 1;
    in.tokens = {&tokens[i], 0};
    in.a = {&a[i], 0};
    in.b = {&b[i], 0};
    in.gpus = {&g, 0};
    closed_form(r, in, &m, &s);
    CHECK(mean[i] == 58.0 * m && p50[i] == mean[i]);
    const double cap = 58.0 * ceiling(8.0, 6.0, tokens[i], a[i], b[i]);
    CHECK(p99[i] == std::min(mean[i] + kZ99 * std::sqrt(58.0) * s, std::max(cap, mean[i])));
    CHECK(p99[i] >= mean[i]);
  }
  // MoE lanes that disagree on the routing law are named
  const double experts_bad[] = {1.0, 64.0, 32.0};
  q.experts = {experts_bad, 1};
  CHECK(qs::test::throws_invalid([&] { quantiles(r, q, mean, p50, p99); }, "disagree on experts/top_k"));
}

void test_lanes_independent() {
  // a lane's bits alone equal its bits among other lanes (uniform and popularity)
  std::vector<double> pi(32);
  double sum = 0;
  for (int e = 0; e < 32; ++e) sum += std::pow(e + 1.0, -1.1);
  for (int e = 0; e < 32; ++e) pi[e] = std::min(1.0, 4.0 * std::pow(e + 1.0, -1.1) / sum);
  for (const double* p : {static_cast<const double*>(nullptr), static_cast<const double*>(pi.data())}) {
    Routing r;
    r.experts = 32;
    r.top_k = 4;
    r.pi = p;
    const std::vector<double> B = {3.0, 120.0, 0.0, 9000.0, 17.5};
    const std::vector<std::int64_t> G = {4, 8, 2, 16, 1};
    const std::vector<double> a = {1e-6, 3e-6, 1e-6, 5e-7, 2e-6}, b = {1e-8, 2e-8, 1e-8, 4e-8, 1e-9};
    ClosedFormInput all;
    all.lanes = 5;
    all.tokens = {B.data(), 1};
    all.gpus = {G.data(), 1};
    all.a = {a.data(), 1};
    all.b = {b.data(), 1};
    std::vector<double> m(5), s(5);
    closed_form(r, all, m.data(), s.data());
    for (std::size_t i = 0; i < 5; ++i) {
      ClosedFormInput one;
      one.lanes = 1;
      one.tokens = {&B[i], 0};
      one.gpus = {&G[i], 0};
      one.a = {&a[i], 0};
      one.b = {&b[i], 0};
      double m1, s1;
      closed_form(r, one, &m1, &s1);
      CHECK(m1 == m[i] && s1 == s[i]);
    }
  }
}

void test_bad_input() {
  Routing r;
  r.experts = 16;
  r.top_k = 2;
  double B = 5, a = 1e-6, b = 1e-8, m, s;
  std::int64_t G = 0, R = 4;
  ClosedFormInput in;
  in.lanes = 1;
  in.tokens = {&B, 0};
  in.a = {&a, 0};
  in.b = {&b, 0};
  in.gpus = {&G, 0};
  CHECK(qs::test::throws_invalid([&] { closed_form(r, in, &m, &s); }, "gpus[0] = 0: must be >= 1"));
  G = 4;
  B = std::numeric_limits<double>::quiet_NaN();
  CHECK(qs::test::throws_invalid([&] { closed_form(r, in, &m, &s); }, "tokens[0] = nan: must be finite"));
  B = 5;
  a = -1;
  CHECK(qs::test::throws_invalid([&] { closed_form(r, in, &m, &s); }, "a[0] = -1"));
  a = 1e-6;
  in.redundant = {&R, 0};
  CHECK(qs::test::throws_invalid([&] { closed_form(r, in, &m, &s); }, "no slot layout for gpus = 4, redundant = 4"));
  in.redundant = {};
  G = 3;
  std::vector<double> pi(16, 0.125);
  r.pi = pi.data();
  CHECK(qs::test::throws_invalid([&] { closed_form(r, in, &m, &s); }, "gpus[0] = 3: must divide experts = 16"));
  pi[5] = 1.5;
  CHECK(qs::test::throws_invalid([&] { closed_form(r, in, &m, &s); }, "pi[5] = 1.5"));
  r.pi = nullptr;
  r.top_k = 17;
  CHECK(qs::test::throws_invalid([&] { closed_form(r, in, &m, &s); }, "top_k = 17"));
}

}  // namespace

int main() {
  test_max_iid_closed_forms();
  test_expected_max_normals();
  test_clark();
  test_pairwise_sum_and_erf();
  test_uniform_lane_by_hand();
  test_ceiling_and_quantiles();
  test_lanes_independent();
  test_bad_input();
  return qs::test::report("straggler");
}
