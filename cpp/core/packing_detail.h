// qsengine core, internal to the packing sources (packing.cc, plan_rules.cc,
// pack.cc, slots.cc, length_sampling.cc): the helpers they share. Not part of
// the public interface (packing.h); never included outside cpp/core.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/packing.h"

namespace qs {
namespace packing {
namespace detail {


constexpr std::int64_t kBatchCap = std::int64_t{1} << 62;

// Broken invariants are bugs, not bad input: they must never pass silently,
// so they throw in every build type (assert() vanishes in Release).
#define QS_PACKING_INVARIANT(cond, msg)                                               \
  do {                                                                                \
    if (!(cond)) throw std::logic_error(std::string("qsengine packing invariant: ") + (msg)); \
  } while (0)

template <class... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  os.precision(17);
  (os << ... << args);
  return os.str();
}

inline std::string gb(double bytes) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(2);
  os << bytes / 1e9 << " GB";
  return os.str();
}

inline std::vector<std::int64_t> divisors(std::int64_t n) {
  std::vector<std::int64_t> lo, hi;
  for (std::int64_t d = 1; d * d <= n; ++d) {
    if (n % d == 0) {
      lo.push_back(d);
      if (d != n / d) hi.push_back(n / d);
    }
  }
  lo.insert(lo.end(), hi.rbegin(), hi.rend());
  return lo;
}

inline void check_finite_nonneg(double v, const char* field) {
  if (!std::isfinite(v) || v < 0) {
    throw InvalidArgument(cat("memory description ", field, "=", v, ": must be a finite number >= 0"));
  }
}

// What divides the non-expert weights of one GPU: 1 with attn_dp (replicated), else tp.
inline double stage_shard(const PlanDesc& p) { return p.attn_dp ? 1.0 : static_cast<double>(p.tp); }

// What divides the dense-FFN, embedding and LM-head weights of one GPU. A dense
// model under attn_dp runs attention data-parallel over the tp GPUs of a replica
// (attention weights and norms replicated, each GPU its own sequences' KV) and
// its FFN, embedding and LM head tensor-parallel over the same tp GPUs (SGLang's
// DP attention: dense MLPs stay TP, `moe_dense_tp_size` defaults to the TP size,
// https://docs.sglang.ai/advanced_features/server_arguments.html). An MoE under
// attn_dp keeps them replicated, as DeepSeek-V3's deployment does for its dense
// MLPs (arXiv:2412.19437, section 3.4.2: "1-way tensor parallelism for the dense
// MLPs in shallow layers").
inline double ffn_shard(const MemoryDesc& d, const PlanDesc& p) {
  return (p.attn_dp && !d.is_moe()) ? static_cast<double>(p.tp) : stage_shard(p);
}

// Dense-FFN bytes on one GPU of a stage with `dense_layers` dense layers.
inline double dense_ffn_weight(std::int64_t dense_layers, double dense_ffn_bytes, double shard) {
  return static_cast<double>(dense_layers) * dense_ffn_bytes / shard;
}

// Sum of a GPU's weights, in component order (the order fixes the rounding).
inline double component_sum(const std::array<double, kNumComponents>& w) {
  double total = 0.0;
  for (int c = 0; c < kNumComponents; ++c) total += w[c];
  return total;
}

inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}


inline void check_context(std::int64_t context) {
  if (context < 1) throw InvalidArgument(cat("context=", context, ": must be a positive number of tokens"));
}

}  // namespace detail
}  // namespace packing
}  // namespace qs
