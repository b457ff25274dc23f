// qsengine core: HBM packing per stage and per plan (the memory of one stage,
// plan evaluation, batched admission). See packing.h and docs/packing.md; the
// plan rules and search are in plan_rules.cc, the full pack in pack.cc.
#include "core/packing.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/packing_detail.h"

namespace qs {
namespace packing {

using namespace detail;  // the helpers shared by the packing sources

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

// ---------------------------------------------------------------- per stage
StageMemory stage_memory(const MemoryDesc& d, const PlanDesc& p, std::int64_t s) {
  StageMemory m;
  const std::int64_t L = d.num_layers();
  m.first_layer = s * L / p.pp;
  const std::int64_t end = (s + 1) * L / p.pp;
  m.layers = end - m.first_layer;
  std::int64_t decode_moe = 0;  // MoE layers that run in decode (not encoder layers)
  for (std::int64_t i = m.first_layer; i < end; ++i) {
    if (d.layer_is_moe[i]) ++m.moe_layers; else ++m.dense_layers;
    if (d.layer_is_moe[i] && d.layer_has_kv[i]) ++decode_moe;
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
  // EP all-to-all buffers: sized for the tokens this GPU dispatches per step, (1 + drafts)/pp per
  // sequence of its unit, split over the tp GPUs that share a replica's tokens (one GPU's own under attn_dp)
  if (moe && p.ep > 1 && decode_moe > 0) {
    m.a2a_per_sequence = d.a2a_bytes_per_token * d.a2a_rows_per_sequence / (static_cast<double>(p.pp) * shard);
  }
  return m;
}

double kv_per_sequence(const StageMemory& sm, std::int64_t context, std::int64_t local_window) {
  const std::int64_t local_tokens = local_window > 0 ? std::min(context, local_window) : context;
  const std::int64_t tokens = sm.kv_full_layers * context + sm.kv_local_layers * local_tokens;
  return sm.kv_per_token_layer * static_cast<double>(tokens) + sm.a2a_per_sequence;
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
  double kv_fraction;              // of the memory left after weights, for the KV cache
  std::int64_t batch = kBatchCap;  // min over stages holding KV of floor_fit(free, per)
  std::int64_t batch_stage = 0, fullest_stage = 0;
  double wmax = -1;                // weights on the fullest stage's GPU

  StageFold(double usable_bytes, double kv_frac) : usable(usable_bytes), kv_fraction(kv_frac) {}

  // Stage s: weight_total bytes of weights and `per` bytes of KV per sequence on one GPU.
  void add(std::int64_t s, double weight_total, double per) {
    if (weight_total > wmax) {
      wmax = weight_total;
      fullest_stage = s;
    }
    if (per > 0) {
      const std::int64_t b = floor_fit(kv_fraction * (usable - weight_total), per);
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
  StageFold fold(d.usable_bytes(), d.kv_fraction);
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
    : num_gpus(g), usable(d.usable_bytes()), kv_fraction(d.kv_fraction), local_window(d.local_window),
      plans(plan_list) {
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
    StageFold fold(t.usable, t.kv_fraction);
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


}  // namespace packing
}  // namespace qs
