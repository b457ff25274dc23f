// Throughput of the routing engine (built with -DQSENGINE_BUILD_TESTS=ON as
// routing_perf; not a test). Usage: routing_perf [microbatches] [threads] [portable]
// ("portable" disables the runtime-dispatched SIMD paths).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>

#include "core/routing.h"

int main(int argc, char** argv) {
  using namespace qs::routing;
  const std::int64_t mb = argc > 1 ? std::atoll(argv[1]) : 200000;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  if (argc > 3 && std::string(argv[3]) == "portable") set_portable_only(true);
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
  // CPU time as well as wall time: on a shared machine the wall time also
  // counts the time other processes held the core.
  auto cpu_now = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  };
  const double c0 = cpu_now();
  const auto t0 = std::chrono::steady_clock::now();
  RouteResult res = route(r);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double cpu = cpu_now() - c0;
  double mean = 0;
  for (std::size_t u = 0; u < res.unique_hist.size(); ++u) mean += static_cast<double>(u * res.unique_hist[u]);
  mean /= static_cast<double>(res.samples);
  // A checksum of every histogram, to confirm that two builds agree exactly.
  std::uint64_t sum = 1469598103934665603ull;
  for (const auto* h : {&res.unique_hist, &res.gpu_unique_max_hist, &res.gpu_assign_max_hist, &res.tokens_per_expert_hist,
                        &res.gpu_unique_sum, &res.gpu_assign_sum})
    for (std::uint64_t v : *h) sum = (sum ^ v) * 1099511628211ull;
  const double work = static_cast<double>(mb) * 2048.0;
  std::printf(
      "E=256 k=8 B=256 PowerLaw(1.0) microbatches=%lld threads=%d: %.3f s, %.1f M assignments/s wall, "
      "%.1f M/s per CPU-second, E[u]=%.3f, checksum %016llx\n",
      static_cast<long long>(mb), threads, s, work / s / 1e6, work / cpu / 1e6, mean, static_cast<unsigned long long>(sum));
  return 0;
}
