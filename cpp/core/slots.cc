// qsengine core: redundant expert slots, EPLB-style placement. See packing.h.
#include "core/packing.h"

#include <algorithm>
#include <cmath>
#include <queue>
#include <stdexcept>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "core/packing_detail.h"

namespace qs {
namespace packing {

using namespace detail;  // the helpers shared by the packing sources

// ---------------------------------------------------------------- redundant slots (EPLB)
SlotPlacement place_slots(const std::vector<double>& pop, std::int64_t ep, std::int64_t redundant) {
  const std::int64_t E = static_cast<std::int64_t>(pop.size());
  if (E < 1) throw InvalidArgument("popularity: empty (one entry per routed expert)");
  if (ep < 1) throw InvalidArgument(cat("ep=", ep, ": must be >= 1"));
  if (redundant < 0) throw InvalidArgument(cat("redundant=", redundant, ": must be >= 0"));
  if ((E + redundant) % ep != 0) {
    throw InvalidArgument(cat("ep=", ep, ": must divide routed_experts + redundant (", E, " + ", redundant, ")"));
  }
  if (redundant > 0 && (ep == 1 || redundant / (ep - 1) > E || (redundant / (ep - 1) == E && redundant % (ep - 1)))) {
    throw InvalidArgument(cat("redundant=", redundant, ": must be <= routed_experts*(ep-1) (", E, "*", ep - 1,
                              ") and 0 when ep=1: the copies of one expert sit on distinct EP ranks"));
  }
  double total = 0;
  for (std::int64_t e = 0; e < E; ++e) {
    if (!std::isfinite(pop[e]) || pop[e] < 0) throw InvalidArgument(cat("popularity[", e, "]=", pop[e], ": must be finite and >= 0"));
    total += pop[e];
  }
  if (!(total > 0)) throw InvalidArgument("popularity sums to 0: the distribution has no mass");
  SlotPlacement out;
  const std::int64_t m = (E + redundant) / ep;
  out.copies.assign(static_cast<std::size_t>(E), 1);
  // 1. replicate_experts: the largest per-copy load gets the next slot (an expert at ep copies is full).
  using Item = std::pair<double, std::int64_t>;  // (per-copy load, -expert): ties -> lowest expert
  std::priority_queue<Item> heap;
  for (std::int64_t e = 0; e < E; ++e) heap.push({pop[e], -e});
  for (std::int64_t r = 0; r < redundant; ++r) {
    const Item top = heap.top();
    heap.pop();
    const std::int64_t e = -top.second;
    ++out.copies[e];
    if (out.copies[e] < ep) heap.push({pop[e] / static_cast<double>(out.copies[e]), -e});
  }
  // 2. balanced packing, heaviest copy first, no two copies of an expert on one rank.
  struct Copy { double load; std::int64_t expert; };
  std::vector<Copy> items;
  items.reserve(static_cast<std::size_t>(E + redundant));
  for (std::int64_t e = 0; e < E; ++e) {
    for (std::int64_t c = 0; c < out.copies[e]; ++c) items.push_back({pop[e] / static_cast<double>(out.copies[e]), e});
  }
  std::stable_sort(items.begin(), items.end(), [](const Copy& a, const Copy& b) { return a.load > b.load; });
  std::vector<std::vector<std::int64_t>> held(static_cast<std::size_t>(ep));  // experts on each rank
  out.load.assign(static_cast<std::size_t>(ep), 0.0);
  auto holds = [&held](std::int64_t r, std::int64_t e) {
    return std::find(held[r].begin(), held[r].end(), e) != held[r].end();
  };
  for (const Copy& c : items) {
    std::int64_t pick = -1;
    for (std::int64_t r = 0; r < ep; ++r) {
      if (static_cast<std::int64_t>(held[r].size()) >= m || holds(r, c.expert)) continue;
      if (pick < 0 || out.load[r] < out.load[pick]) pick = r;
    }
    if (pick < 0) {
      // Every rank with a free slot already holds this expert: move a placed copy of another
      // expert f from a rank j without c.expert to such a rank h (h lacks f), then take j's slot.
      std::int64_t h = -1;
      for (std::int64_t r = 0; r < ep && h < 0; ++r) if (static_cast<std::int64_t>(held[r].size()) < m) h = r;
      QS_PACKING_INVARIANT(h >= 0, "place_slots: no free slot left for a copy");
      for (std::int64_t j = 0; j < ep && pick < 0; ++j) {
        if (j == h || holds(j, c.expert)) continue;
        for (std::size_t i = 0; i < held[j].size(); ++i) {
          const std::int64_t f = held[j][i];
          if (holds(h, f)) continue;
          const double lf = pop[f] / static_cast<double>(out.copies[f]);
          held[h].push_back(f);
          out.load[h] += lf;
          held[j].erase(held[j].begin() + static_cast<std::ptrdiff_t>(i));
          out.load[j] -= lf;
          pick = j;
          break;
        }
      }
      QS_PACKING_INVARIANT(pick >= 0, "place_slots: no swap frees a rank for a copy (copies <= ep)");
    }
    held[pick].push_back(c.expert);
    out.load[pick] += c.load;
  }
  out.slot_expert.reserve(static_cast<std::size_t>(E + redundant));
  for (std::int64_t r = 0; r < ep; ++r) out.slot_expert.insert(out.slot_expert.end(), held[r].begin(), held[r].end());
  return out;
}

}  // namespace packing
}  // namespace qs
