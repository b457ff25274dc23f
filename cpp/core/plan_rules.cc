// qsengine core: memory-description validation, the plan rules (one meaning,
// shared with Python through the bindings), plan labels, plan enumeration,
// ranking and search. See packing.h.
#include "core/packing.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "core/packing_detail.h"

namespace qs {
namespace packing {

using namespace detail;  // the helpers shared by the packing sources

// ---------------------------------------------------------------- validation
void validate_desc(const MemoryDesc& d) {
  check_finite_nonneg(d.attention_bytes, "attention_bytes");
  check_finite_nonneg(d.dense_ffn_bytes, "dense_ffn_bytes");
  check_finite_nonneg(d.expert_bytes, "expert_bytes");
  check_finite_nonneg(d.shared_expert_bytes, "shared_expert_bytes");
  check_finite_nonneg(d.router_bytes, "router_bytes");
  check_finite_nonneg(d.norm_bytes_per_layer, "norm_bytes_per_layer");
  check_finite_nonneg(d.final_norm_bytes, "final_norm_bytes");
  check_finite_nonneg(d.embedding_bytes, "embedding_bytes");
  check_finite_nonneg(d.lm_head_bytes, "lm_head_bytes");
  check_finite_nonneg(d.kv_bytes_per_token_per_layer, "kv_bytes_per_token_per_layer");
  check_finite_nonneg(d.a2a_bytes_per_token, "a2a_bytes_per_token");
  if (!(std::isfinite(d.a2a_rows_per_sequence) && d.a2a_rows_per_sequence >= 1)) {
    throw InvalidArgument(cat("memory description a2a_rows_per_sequence=", d.a2a_rows_per_sequence,
                              ": must be a finite number >= 1 (token rows per sequence per step)"));
  }
  check_finite_nonneg(d.reserve_bytes, "reserve_bytes (accelerator.runtime_reserve_bytes)");
  const std::int64_t L = d.num_layers();
  if (L < 1) throw InvalidArgument("memory description: the model has no layers (num_layers must be >= 1)");
  if (static_cast<std::int64_t>(d.layer_has_kv.size()) != L || static_cast<std::int64_t>(d.layer_is_local.size()) != L) {
    throw InvalidArgument(cat("memory description: layer_is_moe, layer_has_kv and layer_is_local must all have ",
                              "num_layers=", L, " entries (got ", d.layer_has_kv.size(), " and ",
                              d.layer_is_local.size(), ")"));
  }
  std::int64_t kv_layers = 0, local = 0;
  for (std::int64_t i = 0; i < L; ++i) {
    kv_layers += d.layer_has_kv[i] != 0;
    if (d.layer_is_local[i] != 0) {
      ++local;
      if (d.layer_has_kv[i] == 0) {
        throw InvalidArgument(cat("memory description: layer ", i, " is local but caches no KV"));
      }
    }
  }
  if (kv_layers == 0) {
    throw InvalidArgument("memory description: no decode layer caches KV (the model has no decoder layers)");
  }
  if (!(d.kv_bytes_per_token_per_layer > 0)) {
    throw InvalidArgument(cat("memory description kv_bytes_per_token_per_layer=", d.kv_bytes_per_token_per_layer,
                              ": must be > 0"));
  }
  if (local > 0 && d.local_window < 1) {
    throw InvalidArgument(cat("attention.local_window=", d.local_window, ": must be >= 1 when there are ", local,
                              " local layers"));
  }
  if (d.num_heads < 1) throw InvalidArgument(cat("attention.num_heads=", d.num_heads, ": must be >= 1"));
  if (d.num_kv_heads < 1) throw InvalidArgument(cat("attention.num_kv_heads=", d.num_kv_heads, ": must be >= 1"));
  if (d.routed_experts < 0) throw InvalidArgument(cat("routed_experts=", d.routed_experts, ": must be >= 0"));
  if (d.is_moe() && d.moe_intermediate < 1) {
    throw InvalidArgument(cat("moe_intermediate=", d.moe_intermediate, ": must be >= 1 for a MoE model"));
  }
  if (!std::isfinite(d.hbm_bytes) || !(d.hbm_bytes > 0)) {
    throw InvalidArgument(cat("accelerator.hbm_bytes=", d.hbm_bytes, ": must be a finite number > 0"));
  }
  if (!std::isfinite(d.usable_fraction) || !(d.usable_fraction > 0) || d.usable_fraction > 1) {
    throw InvalidArgument(cat("accelerator.usable_hbm_fraction=", d.usable_fraction, ": must be in (0, 1]"));
  }
  if (!std::isfinite(d.kv_fraction) || !(d.kv_fraction > 0) || d.kv_fraction > 1) {
    throw InvalidArgument(cat("kv_fraction=", d.kv_fraction, ": must be in (0, 1]"));
  }
  if (!(d.usable_bytes() > 0)) {
    throw InvalidArgument(cat("accelerator: usable HBM = hbm_bytes*usable_hbm_fraction - runtime_reserve_bytes = ",
                              d.usable_bytes(), " bytes: must be > 0"));
  }
}

// ---------------------------------------------------------------- plan rules
PlanRule plan_shape_rule(const PlanDesc& p) {
  if (p.tp < 1 || p.pp < 1 || p.dp < 1 || p.ep < 1 || p.etp < 0) return PlanRule::kDegrees;
  if (p.redundant < 0 || p.redundant > kMaxPlanDegree) return PlanRule::kDegrees;
  // tp*pp*dp <= 2^53 and ep*etp <= 2^53, by division (no overflow)
  if (p.pp > kMaxPlanDegree / p.tp || p.dp > kMaxPlanDegree / (p.tp * p.pp)) return PlanRule::kDegrees;
  if (p.expert_tp() > kMaxPlanDegree / p.ep) return PlanRule::kDegrees;
  if ((p.dp * p.tp) % (p.ep * p.expert_tp()) != 0) return PlanRule::kStageExperts;
  return PlanRule::kOk;
}

PlanRule plan_rule(const MemoryDesc& d, const PlanDesc& p, std::int64_t num_gpus) {
  const PlanRule shape = plan_shape_rule(p);
  if (shape != PlanRule::kOk) return shape;
  if (p.num_gpus() != num_gpus) return PlanRule::kClusterGpus;
  if (p.pp > d.num_layers()) return PlanRule::kPipeline;
  // tp divides the heads: for TP attention, and for a dense model's TP FFN
  // under attn_dp (the TP degrees engines accept; the FFN width is not checked)
  if ((!p.attn_dp || !d.is_moe()) && (d.num_heads < 1 || d.num_heads % p.tp != 0)) return PlanRule::kHeads;
  if (!p.attn_dp) {
    if (!d.mla && (d.num_kv_heads < 1 || (d.num_kv_heads % p.tp != 0 && p.tp % d.num_kv_heads != 0))) {
      return PlanRule::kKvHeads;
    }
  }
  if (!d.is_moe()) {
    if (p.ep != 1) return PlanRule::kDenseEp;
    return p.redundant != 0 ? PlanRule::kRedundant : PlanRule::kOk;
  }
  if ((d.routed_experts + p.redundant) % p.ep != 0) return PlanRule::kExpertsEp;  // both <= 2^53: no overflow
  if (d.moe_intermediate < 1 || d.moe_intermediate % p.expert_tp() != 0) return PlanRule::kExpertWidth;
  // redundant <= E*(ep-1), by division (no overflow)
  if (p.redundant > 0 && (p.ep == 1 || p.redundant / (p.ep - 1) > d.routed_experts ||
                          (p.redundant / (p.ep - 1) == d.routed_experts && p.redundant % (p.ep - 1) != 0))) {
    return PlanRule::kRedundant;
  }
  return PlanRule::kOk;
}

PlanViolation describe_plan_rule(const MemoryDesc& d, const PlanDesc& p, std::int64_t num_gpus, PlanRule rule) {
  PlanViolation v;
  v.rule = rule;
  auto set = [&v](const char* field, auto value, std::string text) {
    v.field = field;
    v.value = cat(value);
    v.text = std::move(text);
  };
  switch (rule) {
    case PlanRule::kOk:
      break;
    case PlanRule::kDegrees:
      if (p.tp < 1) set("tp", p.tp, "must be positive");
      else if (p.pp < 1) set("pp", p.pp, "must be positive");
      else if (p.dp < 1) set("dp", p.dp, "must be positive");
      else if (p.ep < 1) set("ep", p.ep, "must be positive");
      else if (p.etp < 0) set("etp", p.etp, "must be positive (or unset for the default)");
      else if (p.redundant < 0) set("redundant", p.redundant, "must be >= 0 (redundant expert slots per EP group)");
      else if (p.redundant > kMaxPlanDegree) set("redundant", p.redundant, "must be <= 2^53");
      else if (p.pp > kMaxPlanDegree / p.tp || p.dp > kMaxPlanDegree / (p.tp * p.pp))
        set("tp*pp*dp", cat(p.tp, "*", p.pp, "*", p.dp), "must be <= 2^53 GPUs");
      else set("ep*etp", cat(p.ep, "*", p.expert_tp()), "must be <= 2^53 GPUs");
      break;
    case PlanRule::kStageExperts:
      set("ep", p.ep,
          cat("ep x etp (", p.ep, " x ", p.expert_tp(), ") must divide dp x tp (", p.dp, " x ", p.tp,
              "), the GPUs of one pipeline stage"));
      break;
    case PlanRule::kClusterGpus:
      set("tp*pp*dp", p.num_gpus(), cat("must equal the cluster's GPUs (", num_gpus, ")"));
      break;
    case PlanRule::kPipeline:
      set("pp", p.pp, cat("must be <= the model's layers (", d.num_layers(), "): every pipeline stage holds a layer"));
      break;
    case PlanRule::kHeads:
      set("tp", p.tp, cat("must divide num_heads (", d.num_heads, ")"));
      break;
    case PlanRule::kKvHeads:
      if (p.tp <= d.num_kv_heads) {
        set("tp", p.tp, cat("must divide num_kv_heads (", d.num_kv_heads, ") (KV heads are split over the tp ranks)"));
      } else {
        set("tp", p.tp, cat("exceeds num_kv_heads (", d.num_kv_heads,
                            ") and must be a multiple of it (KV heads are replicated)"));
      }
      break;
    case PlanRule::kDenseEp:
      set("ep", p.ep, "must be 1 for a dense model (no routed experts)");
      break;
    case PlanRule::kExpertsEp:
      if (p.redundant == 0) {
        set("ep", p.ep, cat("must divide routed_experts (", d.routed_experts, ")"));
      } else {
        set("ep", p.ep, cat("must divide routed_experts + redundant (", d.routed_experts, " + ", p.redundant,
                            " expert slots per EP group)"));
      }
      break;
    case PlanRule::kExpertWidth:
      set("etp", p.expert_tp(), cat("must divide moe_intermediate (", d.moe_intermediate, ")"));
      break;
    case PlanRule::kRedundant:
      if (!d.is_moe()) {
        set("redundant", p.redundant, "must be 0 for a dense model (no routed experts to replicate)");
      } else if (p.ep == 1) {
        set("redundant", p.redundant, "must be 0 without expert parallelism (ep=1: a replica on the same GPU balances nothing)");
      } else {
        set("redundant", p.redundant,
            cat("must be <= routed_experts*(ep-1) (", d.routed_experts, "*", p.ep - 1,
                "): the copies of one expert sit on distinct EP ranks"));
      }
      break;
  }
  return v;
}

std::string PlanViolation::message() const {
  if (rule == PlanRule::kOk) return "";
  return cat("plan.", field, "=", value, ": ", text);
}

bool is_canonical(const MemoryDesc& d, const PlanDesc& p) {
  // attn_dp only with tp > 1 (at tp = 1 it is the plain plan)
  if (!d.is_moe()) return p.ep == 1 && p.etp == 0 && p.redundant == 0 && (!p.attn_dp || p.tp > 1);
  return p.etp > 0 && (!p.attn_dp || p.tp > 1) &&
         p.redundant == searched_redundant(d.routed_experts, p.ep, p.dp * p.tp);
}

std::string plan_violation(const MemoryDesc& d, const PlanDesc& p, std::int64_t num_gpus) {
  const PlanRule rule = plan_rule(d, p, num_gpus);
  return rule == PlanRule::kOk ? std::string() : describe_plan_rule(d, p, num_gpus, rule).message();
}

void validate_plan(const MemoryDesc& d, const PlanDesc& p, std::int64_t num_gpus) {
  std::string v = plan_violation(d, p, num_gpus);
  if (!v.empty()) throw InvalidArgument(v);
}

PlanDesc parse_plan_label(const std::string& text) {
  static const char* kForm = "a label looks like tp8-pp1-dp1-ep8[-etp1][-red8][-adp]";
  if (text.empty()) throw InvalidArgument(cat("plan label is empty: ", kForm));
  PlanDesc p;
  constexpr int kKeys = 6, kAdp = kKeys;
  bool seen[kKeys + 1] = {false, false, false, false, false, false, false};
  static const char* keys[kKeys] = {"tp", "pp", "dp", "ep", "etp", "red"};
  std::size_t begin = 0;
  while (true) {
    const std::size_t dash = text.find('-', begin);
    const std::string part = text.substr(begin, dash == std::string::npos ? std::string::npos : dash - begin);
    int key = -1;
    std::string digits;
    if (part == "adp") {
      key = kAdp;
    } else {
      for (int k = 0; k < kKeys; ++k) {
        const std::string name = keys[k];
        if (part.size() > name.size() && part.compare(0, name.size(), name) == 0 &&
            part.find_first_not_of("0123456789", name.size()) == std::string::npos) {
          key = k;
          digits = part.substr(name.size());
        }
      }
    }
    if (key < 0) {
      throw InvalidArgument(cat("plan label part '", part,
                                "' is not tp<n>, pp<n>, dp<n>, ep<n>, etp<n>, red<n> or adp (", kForm, ")"));
    }
    if (seen[key]) throw InvalidArgument(cat("plan label part '", part, "' repeats ", key == kAdp ? "adp" : keys[key]));
    seen[key] = true;
    if (key == kAdp) {
      p.attn_dp = true;
    } else {
      const std::size_t nz = std::min(digits.find_first_not_of('0'), digits.size());
      const std::string sig = digits.substr(nz);
      std::int64_t v = 0;
      if (sig.size() > 16) {
        v = kMaxPlanDegree + 1;
      } else {
        for (char c : sig) v = v * 10 + (c - '0');
      }
      if (v > kMaxPlanDegree) throw InvalidArgument(cat("plan label part '", part, "': ", keys[key], " must be <= 2^53"));
      std::int64_t* field[kKeys] = {&p.tp, &p.pp, &p.dp, &p.ep, &p.etp, &p.redundant};
      *field[key] = v;
      if (key == 4 && v == 0) throw InvalidArgument(cat("plan label part '", part, "': etp must be positive"));
    }
    if (dash == std::string::npos) break;
    begin = dash + 1;
  }
  return p;
}

std::vector<PlanDesc> enumerate_plans(const MemoryDesc& d, std::int64_t num_gpus) {
  std::vector<PlanDesc> out;
  if (num_gpus < 1) return out;
  // Every degree divides num_gpus: the divisors of n | num_gpus are those of
  // num_gpus that divide n (filtered into reused buffers, no allocation per level).
  const std::vector<std::int64_t> all = divisors(num_gpus);
  std::vector<std::int64_t> pps, eps, etps;
  auto divisors_of = [&all](std::int64_t n, std::vector<std::int64_t>& into) {
    into.clear();
    for (std::int64_t x : all) {
      if (x > n) break;
      if (n % x == 0) into.push_back(x);
    }
  };
  for (std::int64_t tp : all) {
    divisors_of(num_gpus / tp, pps);
    for (std::int64_t pp : pps) {
      const std::int64_t dp = num_gpus / (tp * pp);
      const std::int64_t stage_gpus = dp * tp;
      if (plan_rule(d, PlanDesc{tp, pp, dp, 1, 0, true}, num_gpus) == PlanRule::kPipeline) break;  // pp ascending
      divisors_of(stage_gpus, eps);
      for (std::int64_t ep : eps) {
        divisors_of(stage_gpus / ep, etps);
        etps.insert(etps.begin(), 0);  // 0: the default expert TP
        const std::int64_t redundant = d.is_moe() ? searched_redundant(d.routed_experts, ep, stage_gpus) : 0;
        for (std::int64_t etp : etps) {
          for (bool attn_dp : {false, true}) {
            const PlanDesc p{tp, pp, dp, ep, etp, attn_dp, redundant};
            if (!is_canonical(d, p)) continue;
            const PlanRule rule = plan_rule(d, p, num_gpus);
            if (rule == PlanRule::kDenseEp || rule == PlanRule::kExpertsEp) goto next_ep;  // they read only ep
            if (rule == PlanRule::kOk) out.push_back(p);
          }
        }
      next_ep:;
      }
    }
  }
  return out;
}

std::int64_t redundant_candidate(std::int64_t experts, std::int64_t ep) {
  if (experts < 1 || ep < 1) return 0;
  return (ep - experts % ep) % ep;
}

std::int64_t searched_redundant(std::int64_t experts, std::int64_t ep, std::int64_t stage_gpus) {
  return ep == stage_gpus ? redundant_candidate(experts, ep) : 0;
}

bool ranks_before(const PlanEval& a, const PlanEval& b) {
  if (a.cluster_batch != b.cluster_batch) return a.cluster_batch > b.cluster_batch;
  if (a.feasible != b.feasible) return a.feasible;
  if (!a.feasible) {  // both infeasible: the least overfull plan first
    if (a.weights_fit != b.weights_fit) return a.weights_fit;
    if (a.weight_bytes_max != b.weight_bytes_max) return a.weight_bytes_max < b.weight_bytes_max;
  }
  const std::int64_t ca = a.plan.tp * a.plan.pp, cb = b.plan.tp * b.plan.pp;
  if (ca != cb) return ca < cb;
  if (a.plan.ep != b.plan.ep) return a.plan.ep < b.plan.ep;
  if (a.plan.tp != b.plan.tp) return a.plan.tp < b.plan.tp;
  if (a.plan.expert_tp() != b.plan.expert_tp()) return a.plan.expert_tp() < b.plan.expert_tp();
  if (a.plan.redundant != b.plan.redundant) return a.plan.redundant < b.plan.redundant;
  return !a.plan.attn_dp && b.plan.attn_dp;
}

namespace {
std::vector<PlanEval> ranked_for(const MemoryDesc& d, std::int64_t g, std::int64_t context) {
  std::vector<PlanEval> evals;
  for (const PlanDesc& p : enumerate_plans(d, g)) evals.push_back(evaluate_plan(d, p, g, context));
  std::stable_sort(evals.begin(), evals.end(), ranks_before);
  return evals;
}
}  // namespace

std::vector<PlanEval> search_plans(const MemoryDesc& d, std::int64_t g_lo, std::int64_t g_hi, std::int64_t context,
                                   unsigned threads, const CancelToken* cancel) {
  validate_desc(d);
  check_context(context);
  if (g_lo < 1 || g_hi < g_lo) {
    throw InvalidArgument(cat("GPU range [", g_lo, ", ", g_hi, "]: need 1 <= g_lo <= g_hi"));
  }
  std::vector<PlanEval> out;
  ordered_block_reduce<std::vector<PlanEval>>(
      static_cast<std::uint64_t>(g_hi - g_lo + 1), threads, out,
      [&](std::uint64_t b) { return ranked_for(d, g_lo + static_cast<std::int64_t>(b), context); },
      [](std::vector<PlanEval>& acc, std::vector<PlanEval>&& r) { acc.insert(acc.end(), r.begin(), r.end()); },
      cancel);
  return out;
}

std::int64_t min_gpus(const MemoryDesc& d, std::int64_t context, std::int64_t max_gpus, PlanEval* best,
                      const CancelToken* cancel) {
  validate_desc(d);
  check_context(context);
  if (max_gpus < 1) throw InvalidArgument(cat("max_gpus=", max_gpus, ": must be >= 1"));
  for (std::int64_t g = 1; g <= max_gpus; ++g) {
    if (cancel && cancel->cancelled()) throw Cancelled();
    std::vector<PlanEval> r = ranked_for(d, g, context);
    if (!r.empty() && r.front().feasible) {
      if (best) *best = r.front();
      return g;
    }
  }
  return 0;
}

}  // namespace packing
}  // namespace qs
