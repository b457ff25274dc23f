// qsengine core: HBM packing. See packing.h and docs/packing.md.
#include "core/packing.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <queue>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "core/errors.h"

namespace qs {
namespace packing {

namespace {

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

std::string gb(double bytes) {
  std::ostringstream os;
  os.setf(std::ios::fixed);
  os.precision(2);
  os << bytes / 1e9 << " GB";
  return os.str();
}

std::vector<std::int64_t> divisors(std::int64_t n) {
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

void check_finite_nonneg(double v, const char* field) {
  if (!std::isfinite(v) || v < 0) {
    throw InvalidArgument(cat("memory description ", field, "=", v, ": must be a finite number >= 0"));
  }
}

// What divides the non-expert weights of one GPU: 1 with attn_dp (replicated), else tp.
double stage_shard(const PlanDesc& p) { return p.attn_dp ? 1.0 : static_cast<double>(p.tp); }

// What divides the dense-FFN, embedding and LM-head weights of one GPU. A dense
// model under attn_dp runs attention data-parallel over the tp GPUs of a replica
// (attention weights and norms replicated, each GPU its own sequences' KV) and
// its FFN, embedding and LM head tensor-parallel over the same tp GPUs (SGLang's
// DP attention: dense MLPs stay TP, `moe_dense_tp_size` defaults to the TP size,
// https://docs.sglang.ai/advanced_features/server_arguments.html). An MoE under
// attn_dp keeps them replicated, as DeepSeek-V3's deployment does for its dense
// MLPs (arXiv:2412.19437, section 3.4.2: "1-way tensor parallelism for the dense
// MLPs in shallow layers").
double ffn_shard(const MemoryDesc& d, const PlanDesc& p) {
  return (p.attn_dp && !d.is_moe()) ? static_cast<double>(p.tp) : stage_shard(p);
}

// Dense-FFN bytes on one GPU of a stage with `dense_layers` dense layers.
double dense_ffn_weight(std::int64_t dense_layers, double dense_ffn_bytes, double shard) {
  return static_cast<double>(dense_layers) * dense_ffn_bytes / shard;
}

// Sum of a GPU's weights, in component order (the order fixes the rounding).
double component_sum(const std::array<double, kNumComponents>& w) {
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

}  // namespace

const char* component_name(int c) {
  static const char* names[kNumComponents] = {"attention", "dense_ffn", "routed_experts", "shared_experts",
                                              "router",    "norms",     "embedding",      "lm_head"};
  if (c < 0 || c >= kNumComponents) throw InvalidArgument(cat("component index ", c, " out of range"));
  return names[c];
}

bool MemoryDesc::is_moe() const {
  if (routed_experts <= 0) return false;
  return std::any_of(layer_is_moe.begin(), layer_is_moe.end(), [](int v) { return v != 0; });
}

std::string PlanDesc::label() const {
  std::string s = cat("tp", tp, "-pp", pp, "-dp", dp, "-ep", ep);
  if (etp > 0 && etp != (ep == 1 ? tp : 1)) s += cat("-etp", etp);
  if (redundant > 0) s += cat("-red", redundant);
  if (attn_dp) s += "-adp";
  return s;
}

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

// ---------------------------------------------------------------- per stage
StageMemory stage_memory(const MemoryDesc& d, const PlanDesc& p, std::int64_t s) {
  StageMemory m;
  const std::int64_t L = d.num_layers();
  m.first_layer = s * L / p.pp;
  const std::int64_t end = (s + 1) * L / p.pp;
  m.layers = end - m.first_layer;
  for (std::int64_t i = m.first_layer; i < end; ++i) {
    if (d.layer_is_moe[i]) ++m.moe_layers; else ++m.dense_layers;
    if (d.layer_has_kv[i]) {
      if (d.layer_is_local[i]) ++m.kv_local_layers; else ++m.kv_full_layers;
    }
  }
  const bool first = s == 0, last = s == p.pp - 1;
  const double shard = stage_shard(p);
  const double fshard = ffn_shard(d, p);
  const bool moe = d.is_moe();
  const std::int64_t etp = moe ? p.expert_tp() : 1;
  auto& w = m.weights;
  w[kAttention] = static_cast<double>(m.layers) * d.attention_bytes / shard;
  w[kDenseFfn] = dense_ffn_weight(m.dense_layers, d.dense_ffn_bytes, fshard);
  w[kRoutedExperts] =
      moe ? static_cast<double>(m.moe_layers * ((d.routed_experts + p.redundant) / p.ep)) * d.expert_bytes /
                static_cast<double>(etp)
          : 0.0;
  w[kSharedExperts] = static_cast<double>(m.moe_layers) * d.shared_expert_bytes / shard;
  w[kRouter] = static_cast<double>(m.moe_layers) * d.router_bytes / shard;
  w[kNorms] = (static_cast<double>(m.layers) * d.norm_bytes_per_layer + (last ? d.final_norm_bytes : 0.0)) / shard;
  w[kEmbedding] = first ? d.embedding_bytes / fshard : 0.0;
  w[kLmHead] = last ? (d.lm_head_bytes + ((d.tie_embeddings && p.pp > 1) ? d.embedding_bytes : 0.0)) / fshard : 0.0;
  m.weight_total = component_sum(w);
  // KV: MLA latent and attn_dp keep the whole per-token KV on the GPU; MHA/GQA
  // split the KV heads over tp ranks, down to one head per rank.
  if (d.mla || p.attn_dp) {
    m.kv_per_token_layer = d.kv_bytes_per_token_per_layer;
  } else {
    const std::int64_t heads_per_rank = p.tp <= d.num_kv_heads ? d.num_kv_heads / p.tp : 1;
    m.kv_per_token_layer = d.kv_bytes_per_token_per_layer * static_cast<double>(heads_per_rank) /
                           static_cast<double>(d.num_kv_heads);
  }
  m.replica_bytes = moe ? static_cast<double>(m.moe_layers) * d.expert_bytes / static_cast<double>(etp) : 0.0;
  return m;
}

double kv_per_sequence(const StageMemory& sm, std::int64_t context, std::int64_t local_window) {
  const std::int64_t local_tokens = local_window > 0 ? std::min(context, local_window) : context;
  const std::int64_t tokens = sm.kv_full_layers * context + sm.kv_local_layers * local_tokens;
  return sm.kv_per_token_layer * static_cast<double>(tokens);
}

std::int64_t floor_fit(double free, double per) {
  if (!(free >= 0) || !(per > 0)) return 0;
  double q = std::floor(free / per);
  std::int64_t b = q >= static_cast<double>(kBatchCap) ? kBatchCap : static_cast<std::int64_t>(q);
  while (b > 0 && static_cast<double>(b) * per > free) --b;
  while (b < kBatchCap && static_cast<double>(b + 1) * per <= free) ++b;
  return b;
}

// ---------------------------------------------------------------- plans
namespace {

// Admission of one serving unit, folded over the pipeline stages of a plan in
// stage order. evaluate_plan and admissible_batches both fold their stages
// through add() and read the result here, so they agree bit for bit.
struct StageFold {
  double usable;
  std::int64_t batch = kBatchCap;  // min over stages holding KV of floor_fit(free, per)
  std::int64_t batch_stage = 0, fullest_stage = 0;
  double wmax = -1;                // weights on the fullest stage's GPU

  explicit StageFold(double usable_bytes) : usable(usable_bytes) {}

  // Stage s: weight_total bytes of weights and `per` bytes of KV per sequence on one GPU.
  void add(std::int64_t s, double weight_total, double per) {
    if (weight_total > wmax) {
      wmax = weight_total;
      fullest_stage = s;
    }
    if (per > 0) {
      const std::int64_t b = floor_fit(usable - weight_total, per);
      if (b < batch) {
        batch = b;
        batch_stage = s;
      }
    }
  }
  bool weights_fit() const { return wmax <= usable; }
  // Admissible sequences per serving unit: 0 when the weights do not fit or no stage holds KV.
  std::int64_t unit_batch() const { return !weights_fit() || batch == kBatchCap ? 0 : batch; }
  std::int64_t binding_stage() const { return weights_fit() ? batch_stage : fullest_stage; }
};

}  // namespace

PlanEval evaluate_plan(const MemoryDesc& d, const PlanDesc& p, std::int64_t num_gpus, std::int64_t context) {
  PlanEval e;
  e.plan = p;
  e.num_gpus = num_gpus;
  e.units = p.num_units();
  StageFold fold(d.usable_bytes());
  for (std::int64_t s = 0; s < p.pp; ++s) {
    const StageMemory sm = stage_memory(d, p, s);
    fold.add(s, sm.weight_total, kv_per_sequence(sm, context, d.local_window));
  }
  e.weight_bytes_max = fold.wmax;
  e.weights_fit = fold.weights_fit();
  e.unit_batch = fold.unit_batch();
  e.binding_stage = fold.binding_stage();
  e.cluster_batch = e.unit_batch * e.units;
  e.feasible = e.unit_batch >= 1;
  return e;
}

// ---------------------------------------------------------------- batched admission
AdmissionTable::AdmissionTable(const MemoryDesc& d, const std::vector<PlanDesc>& plan_list, std::int64_t g)
    : num_gpus(g), usable(d.usable_bytes()), local_window(d.local_window), plans(plan_list) {
  validate_desc(d);
  shard.reserve(plans.size());
  stage_begin.reserve(plans.size() + 1);
  stage_begin.push_back(0);
  for (std::size_t i = 0; i < plans.size(); ++i) {
    // A plan may use fewer GPUs than the cluster (the rest idle): it is checked on its own GPUs.
    const std::int64_t own = plans[i].num_gpus();
    const std::string v = own > g ? cat("plan.num_gpus=", own, ": must be <= the cluster's ", g, " GPUs")
                                  : plan_violation(d, plans[i], own);
    if (!v.empty()) throw InvalidArgument(cat("plans[", i, "] (", plans[i].label(), "): ", v));
    shard.push_back(ffn_shard(d, plans[i]));
    for (std::int64_t s = 0; s < plans[i].pp; ++s) stages.push_back(stage_memory(d, plans[i], s));
    stage_begin.push_back(static_cast<std::int64_t>(stages.size()));
  }
}

namespace {
constexpr std::int64_t kAdmissionBlock = 16384;  // lanes per parallel block
struct NoResult {};
}  // namespace

void admissible_batches(const AdmissionTable& t, std::int64_t n, const std::int64_t* plan_index,
                        const std::int64_t* context, const double* dense_ffn_bytes, std::int64_t* batch,
                        std::uint8_t* fit, double* weight_max, unsigned threads, const CancelToken* cancel) {
  if (n < 0) throw InvalidArgument(cat("admissible_batches: n=", n, " lanes: must be >= 0"));
  const std::int64_t P = t.num_plans();
  QS_PACKING_INVARIANT(static_cast<std::int64_t>(t.shard.size()) == P &&
                           static_cast<std::int64_t>(t.stage_begin.size()) == P + 1,
                       "admission table: shard/stage_begin do not match the plans");
  auto lane = [&](std::int64_t i) {
    const std::int64_t p = plan_index[i];
    if (p < 0 || p >= P) {
      throw InvalidArgument(cat("admissible_batches: lane ", i, ": plan_index=", p, " out of range (the table has ",
                                P, " plans: need 0 <= plan_index < ", P, ")"));
    }
    const std::int64_t ctx = context[i];
    if (ctx < 1 || ctx > kMaxAdmissionContext) {
      throw InvalidArgument(cat("admissible_batches: lane ", i, ": context=", ctx,
                                ": must be a positive number of tokens <= 2^53"));
    }
    StageFold fold(t.usable);
    const StageMemory* first = t.stages.data() + t.stage_begin[p];
    const std::int64_t pp = t.stage_begin[p + 1] - t.stage_begin[p];
    if (dense_ffn_bytes == nullptr) {
      for (std::int64_t s = 0; s < pp; ++s) {
        fold.add(s, first[s].weight_total, kv_per_sequence(first[s], ctx, t.local_window));
      }
    } else {
      const double ffn = dense_ffn_bytes[i];
      if (!std::isfinite(ffn) || ffn < 0) {
        throw InvalidArgument(cat("admissible_batches: lane ", i, ": dense_ffn_bytes=", ffn,
                                  ": must be a finite number >= 0"));
      }
      for (std::int64_t s = 0; s < pp; ++s) {
        std::array<double, kNumComponents> w = first[s].weights;
        w[kDenseFfn] = dense_ffn_weight(first[s].dense_layers, ffn, t.shard[p]);
        fold.add(s, component_sum(w), kv_per_sequence(first[s], ctx, t.local_window));
      }
    }
    batch[i] = fold.unit_batch();
    fit[i] = fold.weights_fit() ? 1 : 0;
    if (weight_max != nullptr) weight_max[i] = fold.wmax;
  };
  NoResult none;
  ordered_block_reduce<NoResult>(
      static_cast<std::uint64_t>((n + kAdmissionBlock - 1) / kAdmissionBlock), threads, none,
      [&](std::uint64_t b) {
        const std::int64_t lo = static_cast<std::int64_t>(b) * kAdmissionBlock;
        const std::int64_t hi = std::min(n, lo + kAdmissionBlock);
        for (std::int64_t i = lo; i < hi; ++i) lane(i);  // each lane writes only its own outputs
        return NoResult{};
      },
      [](NoResult&, NoResult&&) {}, cancel);
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
void check_context(std::int64_t context) {
  if (context < 1) throw InvalidArgument(cat("context=", context, ": must be a positive number of tokens"));
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
      const std::int64_t b = floor_fit(free0[g], per);
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
    c = std::min(c, free0[g]);
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
      if (a[s] == 0 && b[s] == 0) continue;
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
    for (std::int64_t s = 0; s < pp; ++s) need[s] = a[s] * static_cast<double>(pf) + b[s] * static_cast<double>(pl);
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
    r.kv_placed_bytes += r.kv_bytes[g];
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
  const std::int64_t G = num_gpus, tp = p.tp, pp = p.pp;
  const bool moe = d.is_moe();
  const std::int64_t etp = moe ? p.expert_tp() : 1;
  std::vector<StageMemory> sms;
  for (std::int64_t s = 0; s < pp; ++s) sms.push_back(stage_memory(d, p, s));

  auto sz = static_cast<std::size_t>(G);
  r.unit.resize(sz); r.stage.resize(sz); r.dp_rank.resize(sz); r.tp_rank.resize(sz); r.ep_rank.resize(sz);
  for (auto& w : r.weights) w.resize(sz);
  r.replica_bytes.assign(sz, 0.0); r.kv_bytes.assign(sz, 0.0); r.kv_per_sequence.resize(sz);
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
      r.reason = cat("one sequence of ", context, " tokens needs ", gb(r.kv_per_sequence[bg]), " of KV cache on GPU ",
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
