// qsengine core: the decode step model's one forward pass, over lanes.
//
// One lane is model x precision x accelerator x plan x options flattened to
// numbers (the Python layer's StepParams, qsengine/decode/params.py), at one
// batch and context. pass_lanes computes, per lane, the time of one forward pass
// of one replica piece by piece: attention (full-context and local-window
// layers), dense FFN, router + shared experts, the routed experts' straggler
// (given), LM head, and communication (TP all-reduce, attention-DP
// gather/scatter, EP all-to-all, expert-TP all-reduce, pipeline sends), each by
// the calibrated kernel fits or the roofline. step_lanes / step_time
// (step_time.cc) add the routed tokens, the straggler (closed form or the
// routing Monte Carlo's), two-batch overlap and the speculative draft passes.
// Every formula is written out in docs/model.md.
//
// Lanes are independent and evaluated in order; the arithmetic follows the
// order of docs/model.md's formulas so that a lane's result does not depend on
// the other lanes of the call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/straggler.h"

namespace qs {
namespace step {

// The fields a pass reads, in one list (X-macro): each is a column of the
// Python StepParams of the same name (docs/model.md names them).
#define QS_STEP_FIELDS(X)                                                                                        \
  X(d) X(wb) X(eb) X(ab) X(bw) X(flops) X(scaleup) X(internode) X(link_eff) X(domain) X(tp) X(pp) X(dp) X(ep)    \
  X(etp) X(attn_dp) X(copies) X(layers) X(local) X(window) X(attn_params) X(attn_proj_flops) X(attn_ctx_flops)   \
  X(kv_layer) X(kv_split) X(dense_layers) X(ffn_params) X(moe_layers) X(router_params) X(shared_params)          \
  X(expert_params) X(experts) X(top_k) X(vd) X(latency) X(overlap) X(kern) X(g_bw) X(g_f) X(g_p) X(g_c0)         \
  X(g_pad) X(g_wb) X(g_ab) X(ap_n1) X(ap_k1) X(ap_n2) X(ap_k2) X(ap_n3) X(ap_k3) X(ap_n4) X(ap_k4) X(ffn_mats)  \
  X(ffn_bias) X(sh_n) X(sh_k) X(lm_n) X(at_bw) X(at_f) X(at_p) X(at_c0) X(at_c1) X(at_pad) X(at_split)          \
  X(at_kvb) X(at_h) X(at_kvh) X(at_el) X(at_qo) X(at_fl) X(moe_fix) X(moe_a) X(moe_b) X(ar_a1) X(ar_b1) X(ar_a2) \
  X(ar_b2) X(aa_a1) X(aa_b1) X(aa_a2) X(aa_b2) X(er_a1) X(er_b1) X(er_a2) X(er_b2) X(redundant) X(draft) X(db)   \
  X(cb) X(a2a_torus) X(accept)

enum class Field : int {
#define QS_STEP_ENUM(name) name,
  QS_STEP_FIELDS(QS_STEP_ENUM)
#undef QS_STEP_ENUM
      kCount
};
constexpr int kNumFields = static_cast<int>(Field::kCount);

// The fields' names, in Field order.
const std::vector<std::string>& field_names();

// One lane's value of every field.
struct Lane {
#define QS_STEP_MEMBER(name) double name;
  QS_STEP_FIELDS(QS_STEP_MEMBER)
#undef QS_STEP_MEMBER
};

// A column of one field: one value per lane (stride 1) or one value for every
// lane (stride 0).
struct Column {
  const double* data = nullptr;
  std::ptrdiff_t stride = 0;
};

// The pieces of a pass, in the order they are reported.
enum class Piece : int {
  kAttention,
  kAttentionLocal,
  kDenseFfn,
  kRouterShared,
  kRoutedExperts,
  kLmHead,
  kTpAllReduce,
  kAttnDpGather,
  kEpAllToAll,
  kExpertTpAllReduce,
  kPpSend,
  kCount
};
constexpr int kNumPieces = static_cast<int>(Piece::kCount);

// A piece's name as the step breakdown reports it.
const char* piece_name(Piece p);
// Whether the piece is communication (its bound is the link, not HBM or FLOPs).
bool piece_is_link(Piece p);

// Per-lane outputs (each array lanes long). compute/comm: the compute and
// communication sums; compute_p50/_p99 with the straggler at that quantile.
struct PassOutput {
  double* time = nullptr;
  double* p50 = nullptr;
  double* p99 = nullptr;
  double* compute = nullptr;
  double* compute_p50 = nullptr;
  double* compute_p99 = nullptr;
  double* comm = nullptr;
};

// Per-piece, per-lane detail (each array kNumPieces x lanes, piece-major), or
// all null for none: time, bytes moved, FLOPs, calls, whether the piece exists
// on the lane, and whether HBM bandwidth (not FLOPs) bound it (compute pieces).
struct PassDetail {
  double* time = nullptr;
  double* bytes = nullptr;
  double* flops = nullptr;
  double* count = nullptr;
  std::uint8_t* present = nullptr;
  std::uint8_t* bandwidth_bound = nullptr;
};

// The lanes of a call without copying them: lane i is *lane[i], with its dense-FFN parameters ffn[i] where ffn
// is given (a dense twin line's width, per lane) instead of the struct's.
struct Lanes {
  const Lane* const* lane = nullptr;
  const double* ffn = nullptr;
  const Lane& operator[](std::int64_t i) const { return *lane[i]; }
  double ffn_params(std::int64_t i) const { return ffn != nullptr ? ffn[i] : lane[i]->ffn_params; }
  Lanes from(std::int64_t i) const { return Lanes{lane + i, ffn != nullptr ? ffn + i : nullptr}; }
};

// The pass over `n` lanes at batch[i] sequences of one replica and context[i] cached tokens each; tokens[i]
// routed tokens per EP group per MoE layer (the straggler's B) and moe_mean/p50/p99[i] the routed experts'
// straggler summed over the decode MoE layers (0 for dense lanes), without the grouped GEMM's fixed term
// moe_fix, which the pass adds. Writes out[0, n) and, with detail, piece j of lane i at
// detail.<array>[j * detail_stride + i].
void pass_lanes(Lanes lanes, std::int64_t n, const double* batch, const double* context,
                const double* tokens, const double* moe_mean, const double* moe_p50, const double* moe_p99,
                const PassOutput& out, const PassDetail& detail, std::int64_t detail_stride);
// lanes[i - lo] = lane i of the columns, for i in [lo, hi).
void gather_lanes(const Column* fields, std::int64_t lo, std::int64_t hi, Lane* lanes);
// InvalidArgument naming `who` if a column is missing.
void check_columns(const Column* fields, const char* who);

// ---------------------------------------------------------------------------
// The decode step over lanes (step_time.cc): the routed tokens, the routed
// experts' straggler, the pass, two-batch overlap and the speculative draft
// passes (docs/model.md, "The decode step", "Overlap", "Speculative decoding").
// ---------------------------------------------------------------------------

// Where the routed experts' straggler comes from: the closed form of `routing`
// (independent routing; needed whenever a MoE lane is evaluated, also for the
// draft passes), or, for the verify pass (and the half-batch pass of two-batch
// overlap lanes), given per lane (mean, p50, p99 summed over the MoE layers,
// without the grouped GEMM's fixed term: the routing Monte Carlo's).
struct Straggler {
  const straggler::Routing* routing = nullptr;
  const double* mean = nullptr;  // null: the closed form
  const double* p50 = nullptr;
  const double* p99 = nullptr;
};

// Per-lane outputs of step_time: mean, p50, p99 TPOT (per accepted token for
// speculative lanes) and the routed tokens per EP group of the verify pass (0 on dense lanes).
struct StepOutput {
  double* time = nullptr;
  double* p50 = nullptr;
  double* p99 = nullptr;
  double* tokens = nullptr;
};

// The step's detail pieces: the verify pass's kNumPieces, then the draft
// passes' kNumPieces (d passes summed) and the draft module's MTP projection,
// each per accepted token (so they sum to the time).
constexpr int kNumStepPieces = 2 * kNumPieces + 1;
// Name of detail piece j ("draft: <piece>" for the draft passes').
std::string step_piece_name(int j);
// Whether detail piece j is communication.
bool step_piece_is_link(int j);

// Expected tokens a sequence gains per speculative step with d drafts accepted
// with probability a each (chain acceptance): (1 - a^(d+1)) / (1 - a), d + 1 at
// a >= 1 (Leviathan et al., arXiv:2211.17192, eq. 1).
double accepted_tokens(double draft, double accept);

// The step over `n` lanes; detail (kNumStepPieces rows of stride
// detail_stride, or all null) as in pass_lanes. InvalidArgument if a MoE lane
// needs the closed form without a routing law, or disagrees with it.
void step_lanes(Lanes lanes, std::int64_t n, const double* batch, const double* context,
                const Straggler& straggler, const StepOutput& out, const PassDetail& detail,
                std::int64_t detail_stride);

// Lanes of step_time: the fields as columns, batch and context.
struct StepInput {
  std::int64_t lanes = 0;
  Column fields[kNumFields];
  const double* batch = nullptr;
  const double* context = nullptr;
  Straggler straggler;
};

// The step over every lane of `in` (detail: kNumStepPieces x lanes, or all null).
void step_time(const StepInput& in, const StepOutput& out, const PassDetail& detail);

// The pass's kernels over lanes, for the Python layer's prefill model and draft module.
enum class Kernel : int {
  kRoof,                // x bytes, y FLOPs
  kGemm,                // x = m, y = n, z = k (0 where n <= 0)
  kAttentionCore,       // x = sequences, y = context
  kLinkBandwidth,       // x = group
  kAllReduce,           // x bytes, y group (link model)
  kEpAllToAll,          // x bytes, y group (link model)
  kAllReduceFit,        // x bytes (the fitted TP all-reduce)
  kAllToAllFit,         // x bytes (the fitted EP all-to-all)
  kExpertAllReduceFit,  // x bytes (the fitted expert-TP all-reduce)
  kCount
};
// The kernels' names, in Kernel order.
const std::vector<std::string>& kernel_names();
// value[i] = kernel `kind` of lane i at (x[i], y[i], z[i]); bandwidth_term/compute_term: its two roofline terms
// (roof, gemm, attention core; NaN for the others). Lanes in blocks whose soft maxima run together, as in
// pass_lanes: a lane's result does not depend on the others.
void kernel_over_lanes(Kernel kind, const Column* fields, Column x, Column y, Column z, std::int64_t lanes,
                       double* value, double* bandwidth_term, double* compute_term);

// Kernel times of one lane (scalar forms of the pass's kernels):
// roofline time of `bytes` and `flops` (and whether bandwidth bound it).
double roof_time(double bytes, double flops, double bw, double peak, bool* bandwidth_bound = nullptr);
// (x^p + y^p)^(1/p), the calibrated kernels' soft maximum (soft_max.cc).
double soft_max(double x, double y, double p);
// out[i] = soft_max(x[i], y[i], p[i]) for i < n, the powers in SIMD where the CPU and libm allow: the same
// value for an input wherever it sits in the block.
void soft_max_block(std::int64_t n, const double* x, const double* y, const double* p, double* out);
// Whether soft_max_block runs its powers as SIMD calls on this machine.
bool soft_max_is_vectorised();
// A fitted collective of `bytes`: the faster of two protocols, min_j (alpha_j + bytes/beta_j).
double fitted_collective(double bytes, double a1, double b1, double a2, double b2);
// Per-GPU bandwidth of a collective over `group` GPUs (scale-up inside the domain, else the network).
double link_bandwidth(const Lane& l, double group);
// Ring all-reduce of `bytes` per GPU over `group` GPUs by the link model (0 for one GPU).
double allreduce_time(const Lane& l, double bytes, double group);
// One EP all-to-all (dispatch or combine) of `bytes` sent per GPU over `group` GPUs by the link model.
double ep_alltoall_time(const Lane& l, double bytes, double group);

}  // namespace step
}  // namespace qs
