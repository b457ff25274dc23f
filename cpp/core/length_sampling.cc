// qsengine core: request-length sampling on counter-based streams
// (deterministic whatever the thread count). See packing.h.
#include "core/packing.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/errors.h"
#include "core/packing_detail.h"

namespace qs {
namespace packing {

using namespace detail;  // the helpers shared by the packing sources

// ---------------------------------------------------------------- sampling
std::uint64_t stream_key(std::uint64_t key0, std::uint64_t key1, std::uint64_t block, std::uint64_t purpose) {
  return splitmix64(key0 ^ splitmix64(key1 ^ splitmix64(block ^ splitmix64(purpose))));
}

std::uint64_t stream_u64(std::uint64_t key, std::uint64_t index) {
  return splitmix64(key ^ splitmix64(index));
}

std::vector<std::int64_t> sample_lengths(const std::vector<std::int64_t>& values, const std::vector<double>& weights,
                                         std::int64_t n, std::uint64_t key0, std::uint64_t key1, unsigned threads,
                                         const CancelToken* cancel) {
  if (values.empty()) throw InvalidArgument("lengths distribution: no values (the distribution has no mass)");
  if (values.size() != weights.size()) {
    throw InvalidArgument(cat("lengths distribution: ", values.size(), " lengths but ", weights.size(), " weights"));
  }
  if (n < 0) throw InvalidArgument(cat("num_sequences=", n, ": must be >= 0"));
  std::vector<double> cum(values.size());
  double total = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (values[i] < 1) throw InvalidArgument(cat("lengths distribution value[", i, "]=", values[i], ": must be >= 1 token"));
    if (!std::isfinite(weights[i]) || weights[i] < 0) {
      throw InvalidArgument(cat("lengths distribution weight[", i, "]=", weights[i], ": must be finite and >= 0"));
    }
    total += weights[i];
    cum[i] = total;
  }
  if (!(total > 0) || !std::isfinite(total)) {
    throw InvalidArgument(cat("lengths distribution weights sum to ", total, ": the distribution has no mass"));
  }
  constexpr std::uint64_t kPurposeLengths = 0x4c454e47ull;  // "LENG"
  const std::uint64_t n_blocks = static_cast<std::uint64_t>((n + kSampleBlock - 1) / kSampleBlock);
  std::vector<std::int64_t> out;
  out.reserve(static_cast<std::size_t>(n));
  ordered_block_reduce<std::vector<std::int64_t>>(
      n_blocks, threads, out,
      [&](std::uint64_t b) {
        const std::int64_t lo = static_cast<std::int64_t>(b) * kSampleBlock;
        const std::int64_t hi = std::min(n, lo + kSampleBlock);
        const std::uint64_t key = stream_key(key0, key1, b, kPurposeLengths);
        std::vector<std::int64_t> r(static_cast<std::size_t>(hi - lo));
        for (std::int64_t i = lo; i < hi; ++i) {
          const double u = static_cast<double>(stream_u64(key, static_cast<std::uint64_t>(i - lo)) >> 11) * 0x1.0p-53;
          const double x = u * total;
          std::size_t k = static_cast<std::size_t>(std::upper_bound(cum.begin(), cum.end(), x) - cum.begin());
          if (k >= values.size()) k = values.size() - 1;
          while (weights[k] == 0 && k > 0) --k;  // only reachable through rounding at the top
          r[static_cast<std::size_t>(i - lo)] = values[k];
        }
        return r;
      },
      [](std::vector<std::int64_t>& acc, std::vector<std::int64_t>&& r) { acc.insert(acc.end(), r.begin(), r.end()); },
      cancel);
  return out;
}

}  // namespace packing
}  // namespace qs
