// Throughput of the routing engine (built with -DQSENGINE_BUILD_TESTS=ON as
// routing_perf; not a test). Usage: routing_perf [microbatches] [threads]
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "core/routing.h"

int main(int argc, char** argv) {
  using namespace qs::routing;
  const std::int64_t mb = argc > 1 ? std::atoll(argv[1]) : 200000;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  RouteRequest r;
  r.experts = 256;
  r.top_k = 8;
  r.batch = 256;
  r.microbatches = mb;
  r.placement.gpus = 8;
  r.placement.expert_gpus.resize(256);
  for (int e = 0; e < 256; ++e) r.placement.expert_gpus[e] = {e / 32};
  r.model.base.kind = WeightKind::PowerLaw;
  r.model.base.alpha = 1.0;
  r.key = {1, 2};
  r.threads = threads;
  const auto t0 = std::chrono::steady_clock::now();
  RouteResult res = route(r);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double mean = 0;
  for (std::size_t u = 0; u < res.unique_hist.size(); ++u) mean += static_cast<double>(u * res.unique_hist[u]);
  mean /= static_cast<double>(res.samples);
  std::printf("E=256 k=8 B=256 PowerLaw(1.0) microbatches=%lld threads=%d: %.3f s, %.1f M assignments/s, E[u]=%.3f\n",
              static_cast<long long>(mb), threads, s, static_cast<double>(mb) * 2048.0 / s / 1e6, mean);
  return 0;
}
