// qsengine core: HBM packing. Decides what sits on each GPU's HBM for a model
// served on a cluster under a parallel plan: weights by component, expert
// replicas, runtime reserve and the KV cache of the sequences each GPU serves.
//
// The input is a flat numeric MemoryDesc built by the Python layer from the
// specs (per-layer bytes of each component, a per-layer structure mask, KV bytes
// per token per layer, HBM numbers). All formulas are written out in
// docs/packing.md; the short version:
//
//   GPU g = (dp rank d, pipeline stage s, tp rank t), g = (d*pp + s)*tp + t.
//   Stage s holds layers [floor(s*L/pp), floor((s+1)*L/pp)); stage 0 the
//   embedding, the last stage the final norm and the LM head (with tied
//   embeddings and pp > 1 the last stage holds its own copy of the table).
//   Non-expert weights (attention, dense FFN, shared experts, router, norms,
//   embedding, LM head) are split tp ways, or replicated on every GPU of the
//   stage with attn_dp; a dense model under attn_dp replicates only attention
//   and norms and keeps its FFN, embedding and LM head split tp ways
//   (attention data-parallel, FFN tensor-parallel). Routed experts: E/ep whole experts per EP rank, each
//   split etp ways. KV per token per layer is split over tp ranks for MHA/GQA
//   down to one KV head per rank (then replicated), never for MLA's latent,
//   never with attn_dp (each GPU holds the full KV of its own sequences).
//   usable = hbm * usable_fraction - reserve; a GPU is full when
//   weights + replicas + KV > usable. The KV cache may use only kv_fraction of
//   the memory left after weights and replicas (TensorRT-LLM's
//   free_gpu_memory_fraction; 1 = all of it).
//
// Every function is deterministic; the multithreaded ones reduce in block order.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "core/parallel.h"

namespace qs {
namespace packing {

// Weight components, in the order used by every per-GPU map.
enum Component : int {
  kAttention = 0,
  kDenseFfn,
  kRoutedExperts,
  kSharedExperts,
  kRouter,
  kNorms,
  kEmbedding,
  kLmHead,
  kNumComponents
};

// Name of a component ("attention", "dense_ffn", ...), as in Model.params_by_component().
const char* component_name(int c);

// The model x precision x accelerator, flattened to numbers. Bytes are per
// block (one layer's attention, one routed expert, ...), unsharded.
struct MemoryDesc {
  double attention_bytes = 0;        // one attention block
  double dense_ffn_bytes = 0;        // one dense FFN block
  double expert_bytes = 0;           // one routed expert
  double shared_expert_bytes = 0;    // all shared experts of one MoE layer
  double router_bytes = 0;           // one MoE layer's router
  double norm_bytes_per_layer = 0;   // norm gains of one layer
  double final_norm_bytes = 0;       // the final norm
  double embedding_bytes = 0;        // input embedding table
  double lm_head_bytes = 0;          // untied LM head (0 when tied)
  bool tie_embeddings = false;       // LM head reuses the embedding table

  // Per-layer structure, length = number of layers (encoder layers included).
  std::vector<int> layer_is_moe;     // 1: MoE FFN, 0: dense FFN
  std::vector<int> layer_has_kv;     // 1: decode layer that caches KV (0: encoder layer)
  std::vector<int> layer_is_local;   // 1: sliding/chunked layer (KV capped at local_window)

  std::int64_t routed_experts = 0;
  std::int64_t moe_intermediate = 0;  // expert FFN width (etp must divide it)
  std::int64_t num_heads = 1;
  std::int64_t num_kv_heads = 1;
  bool mla = false;                   // MLA latent KV: not split across TP ranks
  double kv_bytes_per_token_per_layer = 0;  // unsharded, one full-attention layer
  std::int64_t local_window = 0;      // tokens; 0 when there are no local layers
  // EP all-to-all communication buffers (DeepEP low-latency layout, docs/packing.md "All-to-all
  // buffers"): bytes one GPU allocates per token it dispatches in one step; a GPU of a stage with
  // MoE layers under ep > 1 holds them for the tokens of its sequences, i.e. per admitted sequence
  // a2a_bytes_per_token * a2a_rows_per_sequence / (pp * stage shard). 0: no buffers.
  double a2a_bytes_per_token = 0;
  double a2a_rows_per_sequence = 1;   // token rows per sequence per step (1 + draft tokens)

  double hbm_bytes = 0;
  double usable_fraction = 1.0;
  double reserve_bytes = 0;
  double kv_fraction = 1.0;  // of usable - weights - replicas, for the KV cache (0, 1]

  std::int64_t num_layers() const { return static_cast<std::int64_t>(layer_is_moe.size()); }
  bool is_moe() const;
  // hbm_bytes * usable_fraction - reserve_bytes
  double usable_bytes() const { return hbm_bytes * usable_fraction - reserve_bytes; }
};

// A parallel plan (see python/qsengine/specs/plan.py).
struct PlanDesc {
  std::int64_t tp = 1;
  std::int64_t pp = 1;
  std::int64_t dp = 1;
  std::int64_t ep = 1;
  std::int64_t etp = 0;  // 0: default = tp without EP, 1 with EP
  bool attn_dp = false;
  // Redundant expert slots per EP group (DeepSeek EPLB, https://github.com/deepseek-ai/EPLB):
  // the group holds E + redundant physical expert slots, (E + redundant)/ep per EP rank,
  // the extra slots holding replicas of the most loaded experts (place_slots).
  std::int64_t redundant = 0;

  std::int64_t expert_tp() const { return etp > 0 ? etp : (ep == 1 ? tp : 1); }
  std::int64_t num_gpus() const { return tp * pp * dp; }
  // Serving units (independent admission domains): dp replicas, or dp*tp
  // attention replicas with attn_dp.
  std::int64_t num_units() const { return attn_dp ? dp * tp : dp; }
  std::string label() const;
};

// Throws InvalidArgument naming the field, the value and the rule.
void validate_desc(const MemoryDesc& desc);

// ---- plan labels: the one format of a plan as text (Python's Plan.label and
// Plan.from_label call these). "tp<n>-pp<n>-dp<n>-ep<n>[-etp<n>][-red<n>][-adp]"; etp
// appears only when it differs from the default (tp without EP, 1 with EP),
// red (redundant expert slots) only when > 0.
// parse_plan_label accepts the parts in any order, each at most once, missing
// parts taking their default (tp, pp, dp, ep = 1, etp = default, red = 0, no adp), so
// parse_plan_label(p.label()) == p for every plan p whose etp is 0 or not the
// default. Throws InvalidArgument naming the part and the rule.
PlanDesc parse_plan_label(const std::string& text);

// ---- plan rules. The one implementation of what makes a plan valid, used by
// plan_violation / validate_plan (every core entry point), enumerate_plans
// (which lists exactly the valid, canonical plans) and the Python layer
// (Plan.__post_init__ and Plan.validate_for through _core.check_plan*).
// Checked in this order; the first broken rule is reported:
enum class PlanRule : int {
  kOk = 0,
  // model independent (plan_shape_rule):
  kDegrees,       // tp, pp, dp, ep >= 1; etp >= 1 or 0 (the default); redundant >= 0; tp*pp*dp, ep*etp,
                  // redundant <= 2^53
  kStageExperts,  // ep*etp divides dp*tp, the GPUs of one pipeline stage
  // the plan on a model and a number of GPUs:
  kClusterGpus,   // tp*pp*dp == num_gpus (every GPU serves; no idle GPUs, no whole extra copies)
  kPipeline,      // pp <= num_layers (every stage holds at least one layer)
  kHeads,         // tp divides num_heads (unless attn_dp on a MoE)
  kKvHeads,       // MHA/GQA without attn_dp: tp divides num_kv_heads or is a multiple of it (MLA: no rule)
  kDenseEp,       // a dense model: ep == 1
  kExpertsEp,     // a MoE: ep divides routed_experts + redundant (the EP group's expert slots)
  kExpertWidth,   // a MoE: etp divides moe_intermediate
  kRedundant,     // redundant > 0 only for a MoE with ep > 1, and redundant <= routed_experts*(ep-1)
                  // (the copies of one expert sit on distinct EP ranks: place_slots)
};
// The rule broken, as text in the package's format: field, value, rule.
struct PlanViolation {
  PlanRule rule = PlanRule::kOk;
  std::string field;  // "tp", "tp*pp*dp", ...
  std::string value;  // the value of `field` (decimal)
  std::string text;   // the rule, e.g. "must divide num_heads (30)"
  // "plan.<field>=<value>: <text>" ("" when rule == kOk).
  std::string message() const;
};
// Largest tp*pp*dp and ep*etp (exact in double, no int64 overflow).
constexpr std::int64_t kMaxPlanDegree = std::int64_t{1} << 53;
// The first model-independent rule `plan` breaks (kOk, kDegrees or kStageExperts).
PlanRule plan_shape_rule(const PlanDesc& plan);
// The first rule `plan` breaks for the model on `num_gpus` GPUs (kOk if none). Cheap: no allocation.
PlanRule plan_rule(const MemoryDesc& desc, const PlanDesc& plan, std::int64_t num_gpus);
// The violation of `rule` (from plan_rule / plan_shape_rule on the same arguments) as text.
PlanViolation describe_plan_rule(const MemoryDesc& desc, const PlanDesc& plan, std::int64_t num_gpus,
                                 PlanRule rule);
// Whether a valid plan is the canonical one of its equivalence class, i.e.
// listed by enumerate_plans: a dense model's plans have ep = 1 and the default
// etp (0) and no redundant slots; attn_dp needs tp > 1 (with tp = 1 it is the
// plan without it). Expert degrees of a MoE are listed explicitly (etp > 0),
// with redundant = searched_redundant(E, ep, dp*tp) (other redundant counts are valid
// plans a user may ask for, but the search does not list them).
bool is_canonical(const MemoryDesc& desc, const PlanDesc& plan);
// "" when `plan` is valid for the model on `num_gpus` GPUs, else the rule broken.
std::string plan_violation(const MemoryDesc& desc, const PlanDesc& plan, std::int64_t num_gpus);
void validate_plan(const MemoryDesc& desc, const PlanDesc& plan, std::int64_t num_gpus);

// What one GPU of pipeline stage s holds (every GPU of a stage is identical
// before replicas are added).
struct StageMemory {
  std::int64_t first_layer = 0, layers = 0, dense_layers = 0, moe_layers = 0;
  std::int64_t kv_full_layers = 0, kv_local_layers = 0;
  std::array<double, kNumComponents> weights{};  // bytes per GPU
  double weight_total = 0;                        // sum of weights, component order
  double kv_per_token_layer = 0;  // bytes per cached token per layer on one GPU
  double a2a_per_sequence = 0;    // EP all-to-all buffer bytes per admitted sequence on one GPU
  double replica_bytes = 0;       // one extra copy of one expert in every MoE layer of the stage, per GPU
};
StageMemory stage_memory(const MemoryDesc& desc, const PlanDesc& plan, std::int64_t stage);

// Bytes of one sequence of `context` tokens on one GPU of the stage: its KV cache
// plus its share of the EP all-to-all buffers (sm.a2a_per_sequence).
double kv_per_sequence(const StageMemory& sm, std::int64_t context, std::int64_t local_window);
// Largest b >= 0 with b * per <= free (exact in double arithmetic); per > 0.
std::int64_t floor_fit(double free, double per);

// Fast evaluation of a valid plan at a fixed context (no per-GPU map).
struct PlanEval {
  PlanDesc plan;
  std::int64_t num_gpus = 0;
  std::int64_t units = 0;
  std::int64_t unit_batch = 0;     // admissible sequences per serving unit
  std::int64_t cluster_batch = 0;  // units * unit_batch
  bool feasible = false;
  bool weights_fit = false;
  std::int64_t binding_stage = 0;
  double weight_bytes_max = 0;     // weights on the fullest GPU
};
PlanEval evaluate_plan(const MemoryDesc& desc, const PlanDesc& plan, std::int64_t num_gpus, std::int64_t context);

// Batched admission: the stages of a list of valid plans of one model x
// precision x cluster, computed once (stage_memory), from which
// admissible_batches evaluates many (plan, context) lanes.
struct AdmissionTable {
  // Validates the description and every plan (InvalidArgument naming plans[i]):
  // a plan may use fewer GPUs than num_gpus (the others idle) and is checked on its own.
  AdmissionTable(const MemoryDesc& desc, const std::vector<PlanDesc>& plans, std::int64_t num_gpus);

  std::int64_t num_gpus = 0;
  double usable = 0;               // desc.usable_bytes()
  double kv_fraction = 1.0;        // desc.kv_fraction
  std::int64_t local_window = 0;   // desc.local_window
  std::vector<PlanDesc> plans;
  std::vector<double> shard;       // per plan: what divides the dense-FFN weights (ffn_shard: tp, or 1 for an MoE with attn_dp)
  std::vector<std::int64_t> stage_begin;  // per plan + 1: plan i's stages are stages[stage_begin[i], stage_begin[i+1])
  std::vector<StageMemory> stages;

  std::int64_t num_plans() const { return static_cast<std::int64_t>(plans.size()); }
};

// Largest context admissible_batches accepts (as the Python layer's contexts).
constexpr std::int64_t kMaxAdmissionContext = std::int64_t{1} << 53;

// For lanes i in [0, n): batch[i] = evaluate_plan(desc, plans[plan_index[i]],
// num_gpus, context[i]).unit_batch and fit[i] = its weights_fit (0/1), in the
// same double arithmetic. With dense_ffn_bytes (nullable; per lane) each
// stage's dense-FFN weight is dense_layers * dense_ffn_bytes[i] / shard and
// its weight total the component-order sum, exactly as stage_memory with
// desc.dense_ffn_bytes = dense_ffn_bytes[i]. weight_max (nullable) gets the
// weight bytes on the lane's fullest GPU (evaluate_plan's weight_bytes_max,
// i.e. max(pack(...).weight_bytes)). Pure per-lane work, in blocks
// over `threads` threads: the result does not depend on the thread count.
// Throws InvalidArgument naming the first bad lane (plan index out of range,
// context outside [1, 2^53], dense_ffn_bytes not finite or negative).
void admissible_batches(const AdmissionTable& table, std::int64_t n, const std::int64_t* plan_index,
                        const std::int64_t* context, const double* dense_ffn_bytes, std::int64_t* batch,
                        std::uint8_t* fit, double* weight_max, unsigned threads,
                        const CancelToken* cancel = nullptr);

// Every valid canonical plan for `num_gpus` GPUs: the candidates tp | G,
// pp | G/tp, dp = G/(tp*pp), ep | dp*tp, etp | dp*tp/ep, attn_dp in {no, yes},
// in that nesting order (ascending; no attn_dp first), each ep with one
// redundant count, searched_redundant: R = 0, except when EP spans the whole
// stage (ep = dp*tp) and does not divide E: then ep*ceil(E/ep) - E, the EPLB
// slots that let EP fill the stage's GPUs (DeepSeek-V3 on 72 GPUs: EP72, R = 32),
// filtered by plan_rule
// == kOk and is_canonical. A new kind of plan is a new candidate dimension here
// plus its rule in plan_rule.
std::vector<PlanDesc> enumerate_plans(const MemoryDesc& desc, std::int64_t num_gpus);
// The redundant slots enumerate_plans pairs with `ep` for a MoE of E routed experts:
// (E - E mod ep) mod ep, i.e. 0 when ep | E, else ep*ceil(E/ep) - E.
std::int64_t redundant_candidate(std::int64_t experts, std::int64_t ep);
// The redundant count the search pairs with `ep` on a stage of `stage_gpus` (= dp*tp) GPUs:
// redundant_candidate(experts, ep) when ep == stage_gpus, else 0.
std::int64_t searched_redundant(std::int64_t experts, std::int64_t ep, std::int64_t stage_gpus);
// All plans for G in [g_lo, g_hi], evaluated; grouped by G, each group ranked
// (cluster batch desc; infeasible plans after feasible ones, least overfull
// first; then tp*pp, ep, tp, etp, redundant, attn_dp asc). Block-parallel
// over G, bit-identical for any thread count.
std::vector<PlanEval> search_plans(const MemoryDesc& desc, std::int64_t g_lo, std::int64_t g_hi, std::int64_t context,
                                   unsigned threads, const CancelToken* cancel = nullptr);
// Ranking order used by search_plans and plan="auto": true if a ranks before b.
bool ranks_before(const PlanEval& a, const PlanEval& b);
// Smallest G in [1, max_gpus] with a feasible plan (0 if none); *best gets the
// best-ranked feasible plan at that G.
std::int64_t min_gpus(const MemoryDesc& desc, std::int64_t context, std::int64_t max_gpus, PlanEval* best,
                      const CancelToken* cancel = nullptr);

// Counter-based random stream: SplitMix64 of (key, block, purpose, index).
std::uint64_t stream_key(std::uint64_t key0, std::uint64_t key1, std::uint64_t block, std::uint64_t purpose);
std::uint64_t stream_u64(std::uint64_t key, std::uint64_t index);
// n context lengths drawn from the discrete distribution (values, weights),
// in blocks of kSampleBlock keyed by block number.
constexpr std::int64_t kSampleBlock = 65536;
std::vector<std::int64_t> sample_lengths(const std::vector<std::int64_t>& values, const std::vector<double>& weights,
                                         std::int64_t n, std::uint64_t key0, std::uint64_t key1, unsigned threads,
                                         const CancelToken* cancel = nullptr);

struct ReplicaRequest {
  std::vector<double> popularity;  // E expected token shares (any positive scale)
  std::int64_t replicas = 0;       // extra expert copies per EP group (per MoE layer)
};

struct PagedRequest {
  std::vector<std::int64_t> lengths;  // context length of each arriving sequence
  std::int64_t block_size = 16;       // tokens per KV block
};

// The full per-GPU memory map.
struct PackResult {
  PlanDesc plan;
  std::int64_t num_gpus = 0, num_units = 0, context = 0;
  double capacity = 0, usable = 0, kv_fraction = 1.0;
  // per GPU (length num_gpus)
  std::vector<std::int64_t> unit, stage, dp_rank, tp_rank, ep_rank;
  std::array<std::vector<double>, kNumComponents> weights;
  // kv_bytes / kv_per_sequence count each sequence's share of the EP all-to-all buffers
  // (a2a_per_sequence of it per sequence; a2a_bytes of it placed)
  std::vector<double> replica_bytes, kv_bytes, kv_per_sequence, a2a_per_sequence, a2a_bytes, reserve, unusable, free,
      overflow;
  std::vector<std::int64_t> replica_count;
  // fixed-context admission
  std::vector<std::int64_t> unit_batch;
  std::int64_t admissible_batch = 0;  // min over units
  std::int64_t cluster_batch = 0;     // sum over units
  bool feasible = false;
  std::string reason, binding;
  std::int64_t binding_gpu = -1;
  // expert replication
  bool has_replicas = false;
  std::int64_t replicas = 0;
  std::vector<std::int64_t> expert_copies;             // per expert, in one EP group
  std::vector<std::int64_t> replica_expert, replica_rank;
  std::vector<double> load_before, load_after;         // per EP rank
  double imbalance_before = 1, imbalance_after = 1;
  // without the replicas' bytes; for a plan with redundant slots: with R/ep slots' bytes per GPU freed
  std::int64_t cluster_batch_without_replicas = 0;
  // paged mixed-length packing
  bool has_paged = false;
  std::int64_t block_size = 0, offered = 0, placed = 0, rejected = 0, first_rejected = -1;
  double kv_placed_bytes = 0, fragmentation_bytes = 0;
  std::int64_t tokens_placed = 0;
  std::vector<std::int64_t> unit_sequences;
};

// EPLB-style placement of E + redundant expert slots on `ep` ranks of (E + redundant)/ep slots
// each (https://github.com/deepseek-ai/EPLB, eplb.py: replicate_experts, balanced_packing):
// 1. each redundant slot goes to the expert of largest per-copy load popularity[e]/copies[e]
//    (ties: lowest expert), never beyond ep copies;
// 2. the E + redundant copies (load popularity[e]/copies[e] each), heaviest first (ties: expert,
//    then copy order), each onto the least-loaded rank (ties: lowest rank) that has a free slot
//    and does not hold a copy of that expert yet. Unlike EPLB's balanced_packing, two copies of
//    one expert never share a rank (a copy beside its twin balances nothing, and the routing
//    engine's Placement refuses it); if the greedy step finds no such rank it swaps a placed copy
//    of another expert onto the blocked rank (always possible while copies <= ep).
// The copy index of an expert counts its copies in placement order (0 = primary).
struct SlotPlacement {
  std::vector<std::int64_t> slot_expert;  // (E + redundant), rank-major: rank r holds slots [r*m, (r+1)*m)
  std::vector<std::int64_t> copies;       // per expert
  std::vector<double> load;               // expected load per rank (sum of popularity/copies)
};
SlotPlacement place_slots(const std::vector<double>& popularity, std::int64_t ep, std::int64_t redundant);

PackResult pack(const MemoryDesc& desc, const PlanDesc& plan, std::int64_t num_gpus, std::int64_t context,
                const ReplicaRequest* replicas, const PagedRequest* paged, const CancelToken* cancel = nullptr);

}  // namespace packing
}  // namespace qs
