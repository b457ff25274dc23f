// qsengine core: the full pack of one plan (weights, replicas, paged KV
// admission) behind qsengine.pack. See packing.h and docs/packing.md.
#include "core/packing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>
#include <stdexcept>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "core/packing_detail.h"

namespace qs {
namespace packing {

using namespace detail;  // the helpers shared by the packing sources

// ---------------------------------------------------------------- full pack
namespace {

struct ReplicaPlacement {
  std::vector<std::int64_t> copies, rank_count, replica_expert, replica_rank;
  std::vector<double> load_before, load_after;
  double imbalance_before = 1, imbalance_after = 1;
};

ReplicaPlacement place_replicas(const MemoryDesc& d, const PlanDesc& p, const ReplicaRequest& req,
                                const std::vector<std::int64_t>& rank_capacity,
                                const std::vector<std::int64_t>& rank_witness_gpu,
                                const std::vector<double>& witness_free, const std::vector<double>& witness_bytes) {
  const std::int64_t E = d.routed_experts, ep = p.ep, per_rank = E / ep;
  ReplicaPlacement out;
  const auto& pop = req.popularity;
  double total = 0;
  for (double v : pop) total += v;
  out.copies.assign(static_cast<std::size_t>(E), 1);
  auto no_room = [&]() {
    std::int64_t room = 0, worst = 0;
    for (std::int64_t r = 0; r < ep; ++r) {
      room = rank_capacity[r] >= kBatchCap - room ? kBatchCap : room + rank_capacity[r];  // saturating
      if (rank_capacity[r] < rank_capacity[worst]) worst = r;
    }
    const std::int64_t g = rank_witness_gpu[worst];
    return InvalidArgument(cat(
        "replicas=", req.replicas, ": expert replicas do not fit in free HBM (rule: replicas must fit in the memory ",
        "left after weights); the EP ranks have room for ", room, " replicas in total; e.g. GPU ", g, " has ",
        gb(witness_free[g]), " free and one replica needs ", gb(witness_bytes[g])));
  };
  // 0. Refuse more replicas than the ranks have room for before any O(replicas) work:
  //    step 3 places one copy per replica on a rank with room, so it fails iff replicas > total room.
  {
    std::int64_t room = 0;
    for (std::int64_t r = 0; r < ep && room < req.replicas; ++r) room += std::min(rank_capacity[r], req.replicas);
    if (room < req.replicas) throw no_room();
  }
  // 1. Give each replica to the expert with the largest per-copy load.
  using Item = std::pair<double, std::int64_t>;  // (per-copy load, -expert) max-heap => lowest expert on ties
  std::priority_queue<Item> heap;
  for (std::int64_t e = 0; e < E; ++e) heap.push({pop[e], -e});
  for (std::int64_t r = 0; r < req.replicas; ++r) {
    Item top = heap.top();
    heap.pop();
    const std::int64_t e = -top.second;
    ++out.copies[e];
    heap.push({pop[e] / static_cast<double>(out.copies[e]), -e});
  }
  // 2. Expected load per EP rank: home placement (contiguous blocks) first.
  out.load_before.assign(static_cast<std::size_t>(ep), 0.0);
  out.load_after.assign(static_cast<std::size_t>(ep), 0.0);
  for (std::int64_t e = 0; e < E; ++e) {
    const std::int64_t home = e / per_rank;
    out.load_before[home] += pop[e];
    out.load_after[home] += pop[e] / static_cast<double>(out.copies[e]);
  }
  // 3. Replica copies, heaviest first, each onto the least-loaded rank with room
  //    (pure LPT: a rule such as "avoid ranks already holding the expert" can
  //    raise the maximum load, e.g. 2 equal experts on 2 ranks plus 1 replica).
  struct Copy { double load; std::int64_t expert; };
  std::vector<Copy> copies;
  for (std::int64_t e = 0; e < E; ++e) {
    for (std::int64_t c = 1; c < out.copies[e]; ++c) copies.push_back({pop[e] / static_cast<double>(out.copies[e]), e});
  }
  std::stable_sort(copies.begin(), copies.end(), [](const Copy& a, const Copy& b) { return a.load > b.load; });
  out.rank_count.assign(static_cast<std::size_t>(ep), 0);
  for (const Copy& c : copies) {
    std::int64_t pick = -1;
    for (std::int64_t r = 0; r < ep; ++r) {
      if (out.rank_count[r] >= rank_capacity[r]) continue;
      if (pick < 0 || out.load_after[r] < out.load_after[pick]) pick = r;
    }
    QS_PACKING_INVARIANT(pick >= 0, "a replica found no rank with room after the total-room check");
    out.rank_count[pick] += 1;
    out.load_after[pick] += c.load;
    out.replica_expert.push_back(c.expert);
    out.replica_rank.push_back(pick);
  }
  const double mean = total / static_cast<double>(ep);
  out.imbalance_before = *std::max_element(out.load_before.begin(), out.load_before.end()) / mean;
  out.imbalance_after = *std::max_element(out.load_after.begin(), out.load_after.end()) / mean;
  return out;
}

struct Admission {
  std::vector<std::int64_t> unit_batch;
  bool weights_fit = true;
  std::int64_t binding_gpu = -1;
};

Admission admit(const PackResult& r, const std::vector<double>& free0) {
  Admission a;
  a.unit_batch.assign(static_cast<std::size_t>(r.num_units), kBatchCap);
  std::vector<std::int64_t> unit_gpu(static_cast<std::size_t>(r.num_units), -1);
  std::int64_t overflow_gpu = -1;
  for (std::int64_t g = 0; g < r.num_gpus; ++g) {
    if (free0[g] < 0) {
      a.weights_fit = false;
      if (overflow_gpu < 0 || free0[g] < free0[overflow_gpu]) overflow_gpu = g;
    }
    const double per = r.kv_per_sequence[g];
    if (per > 0) {
      const std::int64_t b = floor_fit(r.kv_fraction * free0[g], per);
      const std::int64_t u = r.unit[g];
      if (b < a.unit_batch[u]) {
        a.unit_batch[u] = b;
        unit_gpu[u] = g;
      }
    }
  }
  for (auto& b : a.unit_batch) if (b == kBatchCap) b = 0;
  if (!a.weights_fit) {
    std::fill(a.unit_batch.begin(), a.unit_batch.end(), 0);
    a.binding_gpu = overflow_gpu;
  } else {
    std::int64_t best = 0;
    for (std::int64_t u = 1; u < r.num_units; ++u) if (a.unit_batch[u] < a.unit_batch[best]) best = u;
    a.binding_gpu = unit_gpu[best];
  }
  return a;
}

void pack_paged(const MemoryDesc& d, PackResult& r, const PagedRequest& req, const std::vector<double>& free0,
                const std::vector<StageMemory>& sms, bool weights_fit, const CancelToken* cancel) {
  if (req.block_size < 1) throw InvalidArgument(cat("block_size=", req.block_size, ": must be >= 1 token"));
  const std::int64_t U = r.num_units, pp = r.plan.pp;
  const std::int64_t bs = req.block_size;
  const double gpus_per_unit_stage = r.plan.attn_dp ? 1.0 : static_cast<double>(r.plan.tp);
  // Per (unit, stage): the smallest free memory among its GPUs (all share the same KV per token).
  std::vector<double> cap(static_cast<std::size_t>(U * pp), std::numeric_limits<double>::infinity());
  for (std::int64_t g = 0; g < r.num_gpus; ++g) {
    double& c = cap[r.unit[g] * pp + r.stage[g]];
    c = std::min(c, d.kv_fraction * free0[g]);
  }
  std::vector<double> a(static_cast<std::size_t>(pp)), b(static_cast<std::size_t>(pp));
  for (std::int64_t s = 0; s < pp; ++s) {
    a[s] = sms[s].kv_per_token_layer * static_cast<double>(sms[s].kv_full_layers);
    b[s] = sms[s].kv_per_token_layer * static_cast<double>(sms[s].kv_local_layers);
  }
  std::vector<double> used(static_cast<std::size_t>(U * pp), 0.0);
  r.unit_sequences.assign(static_cast<std::size_t>(U), 0);
  auto fill = [&](std::int64_t u) {
    double f = 0;
    for (std::int64_t s = 0; s < pp; ++s) {
      if (a[s] == 0 && b[s] == 0 && sms[s].a2a_per_sequence == 0) continue;
      const double c = cap[u * pp + s];
      f = std::max(f, c > 0 ? used[u * pp + s] / c : std::numeric_limits<double>::infinity());
    }
    return f;
  };
  using Item = std::pair<double, std::int64_t>;
  std::priority_queue<Item, std::vector<Item>, std::greater<Item>> heap;
  for (std::int64_t u = 0; u < U; ++u) heap.push({fill(u), u});
  std::int64_t min_rejected = std::numeric_limits<std::int64_t>::max();
  if (!weights_fit) min_rejected = 0;
  std::vector<double> need(static_cast<std::size_t>(pp));
  std::vector<Item> tried;
  const std::int64_t n = static_cast<std::int64_t>(req.lengths.size());
  r.offered = n;
  for (std::int64_t i = 0; i < n; ++i) {
    if ((i & 0xFFFF) == 0 && cancel && cancel->cancelled()) throw Cancelled();
    const std::int64_t len = req.lengths[i];
    if (len < 1) throw InvalidArgument(cat("lengths[", i, "]=", len, ": every context length must be >= 1 token"));
    if (len >= min_rejected) {
      ++r.rejected;
      if (r.first_rejected < 0) r.first_rejected = i;
      continue;
    }
    const std::int64_t local = d.local_window > 0 ? std::min(len, d.local_window) : len;
    const std::int64_t pf = (len + bs - 1) / bs * bs, pl = (local + bs - 1) / bs * bs;
    for (std::int64_t s = 0; s < pp; ++s) {  // its KV blocks and its share of the EP all-to-all buffers
      need[s] = a[s] * static_cast<double>(pf) + b[s] * static_cast<double>(pl) + sms[s].a2a_per_sequence;
    }
    std::int64_t placed_unit = -1;
    tried.clear();
    while (!heap.empty()) {
      Item top = heap.top();
      heap.pop();
      const std::int64_t u = top.second;
      bool ok = true;
      for (std::int64_t s = 0; s < pp && ok; ++s) ok = used[u * pp + s] + need[s] <= cap[u * pp + s];
      if (ok) {
        for (std::int64_t s = 0; s < pp; ++s) used[u * pp + s] += need[s];
        placed_unit = u;
        tried.push_back({fill(u), u});
        break;
      }
      tried.push_back(top);
    }
    for (const Item& t : tried) heap.push(t);
    if (placed_unit < 0) {
      ++r.rejected;
      if (r.first_rejected < 0) r.first_rejected = i;
      min_rejected = std::min(min_rejected, len);
      continue;
    }
    ++r.placed;
    ++r.unit_sequences[placed_unit];
    r.tokens_placed += len;
    for (std::int64_t s = 0; s < pp; ++s) {
      r.fragmentation_bytes += gpus_per_unit_stage * (a[s] * static_cast<double>(pf - len) +
                                                      b[s] * static_cast<double>(pl - local));
    }
  }
  r.kv_placed_bytes = 0;
  for (std::int64_t g = 0; g < r.num_gpus; ++g) {
    r.kv_bytes[g] = used[r.unit[g] * pp + r.stage[g]];
    r.a2a_bytes[g] = static_cast<double>(r.unit_sequences[r.unit[g]]) * r.a2a_per_sequence[g];
    r.kv_placed_bytes += r.kv_bytes[g] - r.a2a_bytes[g];
  }
}

}  // namespace

PackResult pack(const MemoryDesc& d, const PlanDesc& p, std::int64_t num_gpus, std::int64_t context,
                const ReplicaRequest* replicas, const PagedRequest* paged, const CancelToken* cancel) {
  validate_desc(d);
  validate_plan(d, p, num_gpus);
  check_context(context);
  PackResult r;
  r.plan = p;
  r.num_gpus = num_gpus;
  r.num_units = p.num_units();
  r.context = context;
  r.capacity = d.hbm_bytes;
  r.usable = d.usable_bytes();
  r.kv_fraction = d.kv_fraction;
  const std::int64_t G = num_gpus, tp = p.tp, pp = p.pp;
  const bool moe = d.is_moe();
  const std::int64_t etp = moe ? p.expert_tp() : 1;
  std::vector<StageMemory> sms;
  for (std::int64_t s = 0; s < pp; ++s) sms.push_back(stage_memory(d, p, s));

  auto sz = static_cast<std::size_t>(G);
  r.unit.resize(sz); r.stage.resize(sz); r.dp_rank.resize(sz); r.tp_rank.resize(sz); r.ep_rank.resize(sz);
  for (auto& w : r.weights) w.resize(sz);
  r.replica_bytes.assign(sz, 0.0); r.kv_bytes.assign(sz, 0.0); r.kv_per_sequence.resize(sz);
  r.a2a_per_sequence.resize(sz); r.a2a_bytes.assign(sz, 0.0);
  r.reserve.assign(sz, d.reserve_bytes); r.unusable.assign(sz, d.hbm_bytes - d.hbm_bytes * d.usable_fraction);
  r.free.resize(sz); r.overflow.assign(sz, 0.0); r.replica_count.assign(sz, 0);
  std::vector<double> free0(sz);
  for (std::int64_t g = 0; g < G; ++g) {
    const std::int64_t dpr = g / (pp * tp), s = (g / tp) % pp, t = g % tp;
    const std::int64_t local = dpr * tp + t;  // index among the stage's dp*tp GPUs
    r.dp_rank[g] = dpr; r.stage[g] = s; r.tp_rank[g] = t;
    r.unit[g] = p.attn_dp ? local : dpr;
    r.ep_rank[g] = moe ? (local % (p.ep * etp)) / etp : 0;
    for (int c = 0; c < kNumComponents; ++c) r.weights[c][g] = sms[s].weights[c];
    r.kv_per_sequence[g] = kv_per_sequence(sms[s], context, d.local_window);
    r.a2a_per_sequence[g] = sms[s].a2a_per_sequence;
    free0[g] = r.usable - sms[s].weight_total;
  }

  // Admission without replicas (for the batch that replication costs).
  Admission base = admit(r, free0);
  std::int64_t base_cluster = 0;
  for (auto b : base.unit_batch) base_cluster += b;
  r.cluster_batch_without_replicas = base_cluster;

  if (replicas && p.redundant > 0) {
    if (replicas->replicas > 0) {
      throw InvalidArgument(cat("replicas=", replicas->replicas, ": plan ", p.label(), " already holds redundant=",
                                p.redundant, " expert slots (counted in routed_experts); pass replicas=0 or a plan "
                                "without redundant slots"));
    }
    if (static_cast<std::int64_t>(replicas->popularity.size()) != d.routed_experts) {
      throw InvalidArgument(cat("popularity has ", replicas->popularity.size(),
                                " entries: must have one per routed expert (", d.routed_experts, ")"));
    }
    // The plan's slots, placed EPLB-style from the popularity (their bytes are already in routed_experts).
    const SlotPlacement sp = place_slots(replicas->popularity, p.ep, p.redundant);
    const std::int64_t E = d.routed_experts, m = (E + p.redundant) / p.ep;
    double total = 0;
    for (double v : replicas->popularity) total += v;
    r.has_replicas = true;
    r.replicas = p.redundant;
    r.expert_copies = sp.copies;
    r.load_before.assign(static_cast<std::size_t>(p.ep), 0.0);  // contiguous, one copy each: e on rank e*ep/E
    for (std::int64_t e = 0; e < E; ++e) r.load_before[e * p.ep / E] += replicas->popularity[e];
    r.load_after = sp.load;
    std::vector<std::int64_t> seen(static_cast<std::size_t>(E), 0), rank_replicas(static_cast<std::size_t>(p.ep), 0);
    for (std::int64_t sl = 0; sl < E + p.redundant; ++sl) {  // copies after an expert's first slot are its replicas
      const std::int64_t e = sp.slot_expert[sl];
      if (seen[e]++ > 0) {
        r.replica_expert.push_back(e);
        r.replica_rank.push_back(sl / m);
        ++rank_replicas[sl / m];
      }
    }
    for (std::int64_t g = 0; g < G; ++g) r.replica_count[g] = rank_replicas[r.ep_rank[g]];
    const double mean = total / static_cast<double>(p.ep);
    r.imbalance_before = *std::max_element(r.load_before.begin(), r.load_before.end()) / mean;
    r.imbalance_after = *std::max_element(r.load_after.begin(), r.load_after.end()) / mean;
    // What the slots cost: the admission with the bytes of R/ep slots per GPU (on average) given back.
    std::vector<double> free_without(free0);
    const double per_gpu = static_cast<double>(p.redundant) / static_cast<double>(p.ep);
    for (std::int64_t g = 0; g < G; ++g) free_without[g] += per_gpu * sms[r.stage[g]].replica_bytes;
    const Admission without = admit(r, free_without);
    r.cluster_batch_without_replicas = 0;
    for (auto b : without.unit_batch) r.cluster_batch_without_replicas += b;
  } else if (replicas) {
    if (!moe) {
      if (replicas->replicas > 0 || !replicas->popularity.empty()) {
        throw InvalidArgument("replicas/popularity: expert replication needs a MoE model (this model has no routed experts)");
      }
    } else {
      const std::int64_t E = d.routed_experts;
      if (replicas->replicas < 0) throw InvalidArgument(cat("replicas=", replicas->replicas, ": must be >= 0"));
      if (static_cast<std::int64_t>(replicas->popularity.size()) != E) {
        throw InvalidArgument(cat("popularity has ", replicas->popularity.size(),
                                  " entries: must have one per routed expert (", E, ")"));
      }
      double total = 0;
      for (std::size_t e = 0; e < replicas->popularity.size(); ++e) {
        const double v = replicas->popularity[e];
        if (!std::isfinite(v) || v < 0) {
          throw InvalidArgument(cat("popularity[", e, "]=", v, ": must be finite and >= 0"));
        }
        total += v;
      }
      if (!(total > 0)) throw InvalidArgument("popularity sums to 0: the distribution has no mass");
      // Room for replicas on each EP rank: the tightest GPU of that rank.
      std::vector<std::int64_t> cap(static_cast<std::size_t>(p.ep), kBatchCap), witness(static_cast<std::size_t>(p.ep), 0);
      std::vector<double> wbytes(sz);
      for (std::int64_t g = 0; g < G; ++g) {
        const double rb = sms[r.stage[g]].replica_bytes;
        wbytes[g] = rb;
        if (rb <= 0) continue;
        const std::int64_t c = floor_fit(free0[g], rb);
        const std::int64_t er = r.ep_rank[g];
        if (c < cap[er]) { cap[er] = c; witness[er] = g; }
      }
      ReplicaPlacement pl = place_replicas(d, p, *replicas, cap, witness, free0, wbytes);
      r.has_replicas = true;
      r.replicas = replicas->replicas;
      r.expert_copies = pl.copies;
      r.replica_expert = pl.replica_expert;
      r.replica_rank = pl.replica_rank;
      r.load_before = pl.load_before;
      r.load_after = pl.load_after;
      r.imbalance_before = pl.imbalance_before;
      r.imbalance_after = pl.imbalance_after;
      for (std::int64_t g = 0; g < G; ++g) {
        r.replica_count[g] = pl.rank_count[r.ep_rank[g]];
        r.replica_bytes[g] = static_cast<double>(r.replica_count[g]) * sms[r.stage[g]].replica_bytes;
        free0[g] -= r.replica_bytes[g];
        QS_PACKING_INVARIANT(r.replica_count[g] == 0 || free0[g] >= 0, cat("replicas overfill GPU ", g));
      }
    }
  }

  Admission adm = r.has_replicas ? admit(r, free0) : base;
  r.unit_batch = adm.unit_batch;
  r.binding_gpu = adm.binding_gpu;
  r.admissible_batch = *std::min_element(r.unit_batch.begin(), r.unit_batch.end());
  r.cluster_batch = 0;
  for (auto b : r.unit_batch) r.cluster_batch += b;
  r.feasible = adm.weights_fit && r.admissible_batch >= 1;
  const std::int64_t bg = r.binding_gpu;
  if (!adm.weights_fit) {
    const double w = r.usable - free0[bg];
    r.binding = "weights";
    r.reason = cat("weights", (r.has_replicas && r.replica_bytes[bg] > 0) ? " and expert replicas" : "", " need ",
                   gb(w), " on GPU ", bg, " (stage ", r.stage[bg], ") but only ", gb(r.usable),
                   " is usable (hbm*usable_fraction - runtime reserve) under plan ", p.label());
  } else if (bg >= 0) {
    r.binding = "kv";
    if (r.admissible_batch < 1) {
      r.reason = cat("one sequence of ", context, " tokens needs ", gb(r.kv_per_sequence[bg]), " of KV cache",
                     r.a2a_per_sequence[bg] > 0 ? " and EP all-to-all buffer" : "", " on GPU ",
                     bg, " (stage ", r.stage[bg], ") but only ", gb(free0[bg]), " is free after weights",
                     r.has_replicas ? " and replicas" : "", " under plan ", p.label());
    } else {
      r.reason = cat("KV cache fills GPU ", bg, " (stage ", r.stage[bg], ") at ", r.admissible_batch,
                     " sequences of ", context, " tokens per replica");
    }
  }

  if (paged) {
    r.has_paged = true;
    r.block_size = paged->block_size;
    pack_paged(d, r, *paged, free0, sms, adm.weights_fit, cancel);
  } else if (adm.weights_fit) {
    for (std::int64_t g = 0; g < G; ++g) {
      r.kv_bytes[g] = static_cast<double>(r.unit_batch[r.unit[g]]) * r.kv_per_sequence[g];
      r.a2a_bytes[g] = static_cast<double>(r.unit_batch[r.unit[g]]) * r.a2a_per_sequence[g];
    }
  }

  for (std::int64_t g = 0; g < G; ++g) {
    const double f = free0[g] - r.kv_bytes[g];
    if (f >= 0) {
      r.free[g] = f;
    } else {
      // Only weights that do not fit may overflow; then nothing else is placed.
      QS_PACKING_INVARIANT(r.kv_bytes[g] == 0 && r.replica_bytes[g] == 0,
                           cat("GPU ", g, " over capacity by ", -f, " bytes after placing KV/replicas"));
      r.free[g] = 0;
      r.overflow[g] = -f;
    }
  }
  return r;
}

}  // namespace packing
}  // namespace qs
