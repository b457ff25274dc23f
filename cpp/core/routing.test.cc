// C++-only tests of the routing engine (no Python): closed forms, invariants,
// thread-count determinism, trace replay, validation.
#include "core/routing.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "core/errors.h"
#include "core/test_util.h"

using namespace qs::routing;

namespace {


RouteRequest base_request(std::int64_t E, std::int64_t k, std::int64_t B, std::int64_t mb, std::int64_t G) {
  RouteRequest r;
  r.experts = E;
  r.top_k = k;
  r.batch = B;
  r.microbatches = mb;
  r.placement.gpus = G;
  r.placement.expert_gpus.resize(E);
  for (std::int64_t e = 0; e < E; ++e) r.placement.expert_gpus[e] = {static_cast<std::int32_t>(e * G / E)};
  r.key = {12345, 678};
  r.threads = 1;
  return r;
}

double mean_of(const std::vector<std::uint64_t>& h) {
  double s = 0, n = 0;
  for (std::size_t i = 0; i < h.size(); ++i) {
    s += static_cast<double>(i) * static_cast<double>(h[i]);
    n += static_cast<double>(h[i]);
  }
  return s / n;
}

void test_uniform_mean() {
  RouteRequest r = base_request(64, 4, 16, 20000, 4);
  RouteResult res = route(r);
  const double p = std::pow(1.0 - 4.0 / 64.0, 16.0);
  const double expected = 64.0 * (1.0 - p);
  const double got = mean_of(res.unique_hist);
  std::printf("uniform E[u]: got %.4f expected %.4f\n", got, expected);
  CHECK(std::fabs(got - expected) < 0.05);
}

void test_invariants_and_threads() {
  for (int kind = 0; kind < 4; ++kind) {
    RouteRequest r = base_request(32, 3, 10, 3000, 4);
    r.layers = 2;
    if (kind == 1) {
      r.model.base.kind = WeightKind::PowerLaw;
      r.model.base.alpha = 1.2;
      r.model.base.ranks = RankOrder::PerLayer;
    } else if (kind == 2) {
      r.model.kind = ModelKind::GroupLimited;
      r.model.groups = 8;
      r.model.top_groups = 2;
      r.model.base.kind = WeightKind::Dirichlet;
      r.model.base.concentration = {0.3};
    } else if (kind == 3) {
      r.model.kind = ModelKind::Sticky;
      r.model.rho = 0.7;
    }
    r.cost.enabled = true;
    r.cost.a.assign(4, 1e-4);
    r.cost.b.assign(4, 1e-6);
    RouteResult a = route(r);
    std::uint64_t total = 0;
    for (std::size_t u = 0; u < a.unique_hist.size(); ++u) {
      total += a.unique_hist[u];
      if (a.unique_hist[u]) CHECK(u >= 3 && u <= 30);
    }
    CHECK(total == 6000);
    std::uint64_t nsum = 0;
    for (auto v : a.gpu_assign_sum) nsum += v;
    CHECK(nsum == 6000ull * 30);
    r.threads = 2;
    RouteResult b = route(r);
    r.threads = 8;
    RouteResult c = route(r);
    CHECK(a.unique_hist == b.unique_hist && a.unique_hist == c.unique_hist);
    CHECK(a.gpu_assign_max_hist == c.gpu_assign_max_hist && a.tokens_per_expert_hist == c.tokens_per_expert_hist);
    CHECK(a.layer_time.mean == c.layer_time.mean && a.layer_time.m2 == c.layer_time.m2);
    CHECK(a.step_time_hist.counts == c.step_time_hist.counts);
  }
}

void test_trace() {
  RouteRequest r = base_request(4, 2, 2, 2, 2);
  r.model.kind = ModelKind::Trace;
  r.model.trace = {0, 1, 0, 1, /*step 1*/ 0, 1, 2, 3};
  r.model.trace_steps = 2;
  r.model.trace_tokens = 2;
  r.model.trace_k = 2;
  RouteResult res = route(r);
  CHECK(res.unique_hist[2] == 1 && res.unique_hist[4] == 1);
  // GPU 0 holds experts 0,1. Step 0: n = (4, 0); step 1: (2, 2).
  CHECK(res.gpu_assign_sum[0] == 6 && res.gpu_assign_sum[1] == 2);
  CHECK(res.gpu_assign_max_hist[4] == 1 && res.gpu_assign_max_hist[2] == 1);
  // tokens per expert: step 0 -> {2,2,0,0}; step 1 -> {1,1,1,1}.
  CHECK(res.tokens_per_expert_hist[0] == 2 && res.tokens_per_expert_hist[1] == 4 && res.tokens_per_expert_hist[2] == 2);
}

void test_validation() {
  auto expect_throw = [](RouteRequest r, const char* needle) {
    try {
      route(r);
      std::fprintf(stderr, "no exception for %s\n", needle);
      ++qs::test::failures;
    } catch (const qs::InvalidArgument& e) {
      if (std::string(e.what()).find(needle) == std::string::npos) {
        std::fprintf(stderr, "message '%s' lacks '%s'\n", e.what(), needle);
        ++qs::test::failures;
      }
    }
  };
  RouteRequest r = base_request(8, 9, 4, 10, 1);
  expect_throw(r, "top_k=9");
  r = base_request(8, 2, 0, 10, 1);
  expect_throw(r, "batch=0");
  r = base_request(8, 2, 4, 10, 1);
  r.model.base.kind = WeightKind::Popularity;
  r.model.base.weights = {1, 0, 0, 0, 0, 0, 0, 0};
  expect_throw(r, "only 1 positive");
  r.model.base.weights = {1, NAN, 0, 0, 0, 0, 0, 0};
  expect_throw(r, "routing.weights[1]");
}

// The runtime-dispatched SIMD paths and the portable code give identical
// results (every histogram), for small (<= 256, padded) and large alias tables
// and for every stochastic model.
void test_portable_equals_dispatched() {
  struct Case {
    std::int64_t E, k, B;
    int model;
  };
  const Case cases[] = {{256, 8, 256, 0}, {200, 6, 64, 1}, {7, 7, 9, 0}, {300, 8, 32, 0},
                        {64, 8, 32, 2},   {64, 6, 16, 3},  {256, 40, 16, 0}, {10, 9, 16, 4}};
  for (const Case& c : cases) {
    RouteRequest r = base_request(c.E, c.k, c.B, 700, 8 < c.E ? 8 : 1);
    r.layers = 2;
    r.model.base.kind = WeightKind::PowerLaw;
    r.model.base.alpha = c.model == 0 ? 1.0 : 2.0;
    if (c.model == 1) {
      r.model.base.kind = WeightKind::Dirichlet;
      r.model.base.concentration = {0.2};
    } else if (c.model == 2) {
      r.model.kind = ModelKind::GroupLimited;
      r.model.groups = 8;
      r.model.top_groups = 3;
    } else if (c.model == 3) {
      r.model.kind = ModelKind::Sticky;
      r.model.rho = 0.5;
    } else if (c.model == 4) {  // remaining mass tiny: the exact sequential fallback runs
      r.model.base.kind = WeightKind::Popularity;
      r.model.base.weights.clear();
      for (int e = 0; e < c.E; ++e) r.model.base.weights.push_back(std::pow(1e-3, e));
    }
    r.threads = 2;
    set_portable_only(true);
    RouteResult a = route(r);
    set_portable_only(false);
    RouteResult b = route(r);
    const bool same = a.unique_hist == b.unique_hist && a.gpu_unique_max_hist == b.gpu_unique_max_hist &&
                      a.gpu_assign_max_hist == b.gpu_assign_max_hist &&
                      a.tokens_per_expert_hist == b.tokens_per_expert_hist && a.gpu_unique_sum == b.gpu_unique_sum &&
                      a.gpu_assign_sum == b.gpu_assign_sum;
    if (!same) std::fprintf(stderr, "portable != dispatched for E=%lld k=%lld model %d\n", (long long)c.E, (long long)c.k, c.model);
    CHECK(same);
  }
}

void test_precision_target() {
  // rtol: the stopping point and every statistic are the same for 1 and 3
  // threads; the cap holds; an unreachable target runs to the cap.
  for (int model = 0; model < 2; ++model) {
    RouteRequest r = base_request(32, 3, 40, 200000, 4);
    r.layers = 3;
    r.cost.enabled = true;
    r.cost.a = {1e-6, 1.2e-6, 0.9e-6, 1.1e-6};
    r.cost.b = {2e-7, 2.1e-7, 1.9e-7, 2.2e-7};
    if (model == 1) {
      r.model.kind = ModelKind::Sticky;
      r.model.rho = 0.8;
      r.cost.enabled = false;  // the straggler statistic
    }
    r.rtol = 2e-3;
    r.threads = 1;
    const RouteResult a = route(r);
    r.threads = 3;
    const RouteResult b = route(r);
    CHECK(a.target_reached && a.rse_mean <= r.rtol && a.rse_p99 <= r.rtol);
    CHECK(a.microbatches == b.microbatches && a.microbatches < r.microbatches && a.checkpoints == b.checkpoints);
    CHECK(a.rse_mean == b.rse_mean && a.rse_p99 == b.rse_p99 && a.unique_hist == b.unique_hist &&
          a.gpu_assign_max_hist == b.gpu_assign_max_hist && a.step_time_hist.counts == b.step_time_hist.counts);
    CHECK(a.step_time.mean == b.step_time.mean && a.step_time.m2 == b.step_time.m2);
    std::uint64_t n = 0;
    for (std::uint64_t c : a.gpu_assign_max_hist) n += c;
    CHECK(n == static_cast<std::uint64_t>(a.microbatches * r.layers));
    r.rtol = 1e-9;
    r.microbatches = 3001;
    const RouteResult c = route(r);
    CHECK(!c.target_reached && c.microbatches == 3001 && c.rse_mean > 1e-9);
  }
  RouteRequest r = base_request(32, 3, 40, 100, 4);
  for (double bad : {-0.1, 1.0, 3.0, std::nan("")}) {
    r.rtol = bad;
    CHECK(qs::test::throws_invalid([&] { validate(r); }, "rtol="));
  }
}

}  // namespace

int main() {
  test_uniform_mean();
  test_invariants_and_threads();
  test_trace();
  test_validation();
  test_portable_equals_dispatched();
  test_precision_target();
  return qs::test::report("routing");
}
