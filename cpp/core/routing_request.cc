// qsengine core: the routing request's rules (validate), its memory bound and
// its work-block size (see routing.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/routing.h"
#include "core/samplers.h"

namespace qs::routing {

namespace {

template <class... Args>
[[noreturn]] void fail(Args&&... parts) {
  std::ostringstream os;
  os.precision(17);
  (os << ... << parts);
  throw InvalidArgument(os.str());
}

void check_weights(const char* name, const std::vector<double>& w, std::int64_t E, std::int64_t k) {
  if (static_cast<std::int64_t>(w.size()) != E)
    fail(name, ": has length ", w.size(), ", must have length experts=", E);
  std::int64_t positive = 0;
  for (std::size_t i = 0; i < w.size(); ++i) {
    if (!std::isfinite(w[i]) || w[i] < 0.0)
      fail(name, "[", i, "]=", w[i], ": weights must be finite and >= 0");
    if (w[i] > 0.0) ++positive;
  }
  if (positive == 0) fail(name, ": all weights are zero; at least top_k=", k, " must be positive");
  if (positive < k)
    fail(name, ": only ", positive, " positive weights, need at least top_k=", k,
         " (each token picks top_k distinct experts)");
}

}  // namespace

std::int64_t block_size(const RouteRequest& req) {
  const double work = static_cast<double>(std::max<std::int64_t>(req.batch, 1)) *
                      static_cast<double>(std::max<std::int64_t>(req.top_k, 1)) *
                      static_cast<double>(std::max<std::int64_t>(req.layers, 1));
  std::int64_t m = static_cast<std::int64_t>(std::floor(262144.0 / work));
  m = std::clamp<std::int64_t>(m, 1, 1024);
  if (req.model.kind == ModelKind::Sticky) m = std::max(m, kStickyMinBlock);
  return m;
}

void validate(const RouteRequest& req) {
  const std::int64_t E = req.experts, k = req.top_k, B = req.batch;
  if (E < 1 || E > (1 << 24)) fail("experts=", E, ": must be between 1 and 16777216");
  if (k < 1) fail("top_k=", k, ": must be >= 1");
  if (k > E) fail("top_k=", k, ": must be <= experts=", E, " (each token picks top_k distinct experts)");
  if (B < 1) fail("batch=", B, ": must be >= 1");
  if (B > (std::int64_t{1} << 31) / k) {
    // The product itself may not fit in int64: print it unsigned (or as "> 2^64").
    const auto ub = static_cast<std::uint64_t>(B), uk = static_cast<std::uint64_t>(k);
    if (ub > UINT64_MAX / uk) fail("batch=", B, ": batch*top_k > 2^64 must be < 2^31");
    fail("batch=", B, ": batch*top_k=", ub * uk, " must be < 2^31");
  }
  if (req.microbatches < 1) fail("microbatches=", req.microbatches, ": must be >= 1");
  if (req.layers < 1 || req.layers > (1 << 20)) fail("layers=", req.layers, ": must be between 1 and 1048576");
  if (req.microbatches > (std::int64_t{1} << 62) / req.layers)
    fail("microbatches=", req.microbatches, ": microbatches*layers must be < 2^62");
  if (req.threads < 0) fail("threads=", req.threads, ": must be >= 1 (or None for all hardware threads)");

  const ModelSpec& m = req.model;
  const WeightSpec& w = m.base;
  if (m.kind != ModelKind::Trace) {
    switch (w.kind) {
      case WeightKind::Uniform:
        break;
      case WeightKind::PowerLaw:
        if (!std::isfinite(w.alpha) || w.alpha < 0.0) fail("routing.alpha=", w.alpha, ": must be finite and >= 0");
        break;
      case WeightKind::Popularity:
        check_weights("routing.weights", w.weights, E, k);
        break;
      case WeightKind::Dirichlet: {
        if (w.concentration.size() != 1 && static_cast<std::int64_t>(w.concentration.size()) != E)
          fail("routing.concentration: has length ", w.concentration.size(), ", must be a scalar or have length experts=",
               E);
        for (std::size_t i = 0; i < w.concentration.size(); ++i)
          if (!std::isfinite(w.concentration[i]) || w.concentration[i] <= 0.0)
            fail("routing.concentration[", i, "]=", w.concentration[i], ": must be finite and > 0");
        break;
      }
    }
  }
  if (m.kind == ModelKind::GroupLimited) {
    if (m.groups < 1 || m.groups > E) fail("routing.groups=", m.groups, ": must be between 1 and experts=", E);
    if (E % m.groups != 0) fail("routing.groups=", m.groups, ": must divide experts=", E);
    if (m.top_groups < 1 || m.top_groups > m.groups)
      fail("routing.top_groups=", m.top_groups, ": must be between 1 and groups=", m.groups);
    const std::int64_t gs = E / m.groups;
    if (m.top_groups * gs < k)
      fail("routing.top_groups=", m.top_groups, ": top_groups*(experts/groups)=", m.top_groups * gs,
           " must be >= top_k=", k);
    if (w.kind == WeightKind::Popularity) {
      std::vector<std::int64_t> pos;
      for (std::int64_t g = 0; g < m.groups; ++g) {
        std::int64_t c = 0;
        for (std::int64_t e = g * gs; e < (g + 1) * gs; ++e) c += w.weights[e] > 0.0;
        if (c > 0) pos.push_back(c);
      }
      if (static_cast<std::int64_t>(pos.size()) < m.top_groups)
        fail("routing.base.weights: only ", pos.size(), " groups have positive weight, need top_groups=", m.top_groups);
      std::sort(pos.begin(), pos.end());
      std::int64_t worst = 0;
      for (std::int64_t i = 0; i < m.top_groups; ++i) worst += pos[i];
      if (worst < k)
        fail("routing.base.weights: some choice of top_groups=", m.top_groups, " groups holds only ", worst,
             " positive-weight experts, fewer than top_k=", k);
    }
  }
  if (m.kind == ModelKind::Sticky) {
    if (!std::isfinite(m.rho) || m.rho < 0.0 || m.rho > 1.0) fail("routing.rho=", m.rho, ": must be in [0, 1]");
  }
  if (m.kind == ModelKind::Trace) {
    if (m.trace_steps < 1 || m.trace_tokens < 1 || m.trace_k < 1)
      fail("routing.expert_ids: shape (", m.trace_steps, ", ", m.trace_tokens, ", ", m.trace_k,
           ") must be [steps, tokens, k] with every size >= 1");
    if (static_cast<std::int64_t>(m.trace.size()) != m.trace_steps * m.trace_tokens * m.trace_k)
      fail("routing.expert_ids: holds ", m.trace.size(), " ids, shape says ", m.trace_steps * m.trace_tokens * m.trace_k);
    if (m.trace_tokens != B)
      fail("batch=", B, ": must equal the trace's tokens per step (", m.trace_tokens, ")");
    if (m.trace_k != k) fail("top_k=", k, ": must equal the trace's experts per token (", m.trace_k, ")");
    if (req.microbatches > m.trace_steps / req.layers)
      fail("microbatches=", req.microbatches, ": microbatches*layers=", req.microbatches * req.layers,
           " exceeds the trace's steps=", m.trace_steps);
    std::vector<std::int64_t> seen(static_cast<std::size_t>(E), -1);
    for (std::int64_t row = 0; row < m.trace_steps * m.trace_tokens; ++row) {
      for (std::int64_t j = 0; j < k; ++j) {
        const std::int64_t id = m.trace[row * k + j];
        if (id < 0 || id >= E)
          fail("routing.expert_ids[", row / m.trace_tokens, "][", row % m.trace_tokens, "][", j, "]=", id,
               ": expert ids must be in [0, experts=", E, ")");
        if (seen[id] == row)
          fail("routing.expert_ids[", row / m.trace_tokens, "][", row % m.trace_tokens, "][", j, "]=", id,
               ": expert ", id, " appears twice among the token's top_k=", k, " experts; they must be distinct");
        seen[id] = row;
      }
    }
  }

  if (!std::isfinite(req.rtol) || req.rtol < 0.0 || req.rtol >= 1.0)
    fail("rtol=", req.rtol, ": must be in (0, 1) (or 0 / None: run all microbatches)");
  if (req.rtol > 0.0 && m.kind == ModelKind::Trace)
    fail("rtol=", req.rtol, ": not available with a Trace (a replay of fixed selections has no Monte Carlo error)");

  const PlacementSpec& p = req.placement;
  if (p.gpus < 1 || p.gpus > (1 << 20)) fail("placement.gpus=", p.gpus, ": must be between 1 and 1048576");
  if (static_cast<std::int64_t>(p.expert_gpus.size()) != E)
    fail("placement: maps ", p.expert_gpus.size(), " experts, must map every one of experts=", E);
  for (std::int64_t e = 0; e < E; ++e) {
    const auto& gl = p.expert_gpus[e];
    if (gl.empty()) fail("placement: expert ", e, " is on no GPU; every expert needs at least one");
    for (std::size_t i = 0; i < gl.size(); ++i) {
      if (gl[i] < 0 || gl[i] >= p.gpus)
        fail("placement: expert ", e, " on GPU ", gl[i], ", GPU ids must be in [0, gpus=", p.gpus, ")");
      for (std::size_t j = 0; j < i; ++j)
        if (gl[j] == gl[i]) fail("placement: expert ", e, " has two replicas on GPU ", gl[i]);
    }
  }
  if (req.cost.enabled) {
    const char* names[2] = {"cost.a", "cost.b"};
    const std::vector<double>* v[2] = {&req.cost.a, &req.cost.b};
    for (int q = 0; q < 2; ++q) {
      if (static_cast<std::int64_t>(v[q]->size()) != p.gpus)
        fail(names[q], ": has length ", v[q]->size(), ", must have one entry per GPU (gpus=", p.gpus, ")");
      for (std::size_t i = 0; i < v[q]->size(); ++i)
        if (!std::isfinite((*v[q])[i]) || (*v[q])[i] <= 0.0)
          fail(names[q], "[", i, "]=", (*v[q])[i], ": must be finite and > 0 (seconds)");
    }
  }
}

std::uint64_t estimate_memory(const RouteRequest& req, unsigned threads) {
  const double E = static_cast<double>(req.experts), B = static_cast<double>(req.batch);
  const double bk = B * static_cast<double>(req.top_k), G = static_cast<double>(req.placement.gpus);
  const double L = static_cast<double>(req.layers);
  double slots = 0;
  for (const auto& gl : req.placement.expert_gpus) slots += static_cast<double>(gl.size());
  double bins = 0;
  if (req.cost.enabled) bins = 2.0 * 20000.0;  // generous: log bins of layer and step time
  const double hists = 8.0 * (2.0 * (E + 1) + (bk + 1) + (B + 1) + 2.0 * G + bins);
  // Per table: the E-column tables (plus group tables) and the fixed-size
  // 256-column arrays every AliasTable carries (sm, sm_thr, sm_t8, sm_al).
  const double tables = static_cast<double>(std::max<std::int64_t>(weight_tables(req), 1)) * (E * 32.0 + 2.0 * 2600.0);
  double scratch = hists + 4.0 * (3.0 * E + slots + bk) + 8.0 * 2.0 * G + 64.0 * 8.0;
  if (req.model.kind == ModelKind::Sticky) scratch += 4.0 * L * bk;
  const double t = static_cast<double>(std::max(1u, threads));
  double total = hists + tables + t * scratch + 4.0 * t * hists + 4.0 * static_cast<double>(req.model.trace.size()) +
                 E * 16.0 + slots * 8.0;
  if (req.record)
    total += 4.0 * static_cast<double>(req.microbatches) * L * bk;
  if (req.rtol > 0.0) {
    // Precision sections (at most 2*kPrecisionSections, plus one merged copy),
    // each at worst a full histogram of the precision statistic.
    const double stat_bins = req.cost.enabled ? 20000.0 : bk + 1;
    total += 8.0 * (2.0 * kPrecisionSections + 1.0) * stat_bins;
  }
  return total >= 1.8e19 ? std::numeric_limits<std::uint64_t>::max() : static_cast<std::uint64_t>(total);
}

}  // namespace qs::routing
