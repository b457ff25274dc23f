// qsengine core: the routing Monte Carlo engine.
//
// Per microbatch of B tokens and per MoE layer, each token picks k distinct
// experts out of E; the engine streams exact statistics of how the batch
// fragments over experts and over the GPUs of an expert-parallel group.
//
// Randomness. Streams are PhiloxStream(key, index, purpose) (philox.h):
//   purpose kPurposeRouting    (1), index = work block  -> all draws of a block
//   purpose kPurposePopularity (2), index = layer       -> per-layer popularity
//   purpose kPurposeTie        (3), index = work block  -> rare extra coin bits
//                                                          and fallback uniforms
// Work blocks hold a fixed number of microbatches that depends only on the
// request (never on the thread count); block results are merged in block
// order by ordered_block_reduce, so results are bit-identical for any threads.
//
// Selection of k distinct experts is Plackett-Luce (sequential draws without
// replacement, each proportional to weight among the experts not yet chosen),
// implemented as: draw from the full distribution with a Walker/Vose alias
// table and reject experts already chosen, which is exactly the conditional
// law of each sequential draw. When the remaining mass is tiny (k close to E,
// or very skewed weights) a token's remaining picks fall back to exact
// sequential inversion over the remaining experts in double precision, after
// kRejectBudget + 4k consecutive rejections (GroupLimited, Sticky) or when the
// token is still unfinished at two consecutive stream refills (Independent).
// Either rule is a stopping time that does not depend on which remaining
// expert would have been accepted, so the law is unchanged.
//
// Alias tables are built in exact integer arithmetic: each column holds 2^32
// units, an expert's units are its weight share of E * 2^32 rounded (largest
// remainders), and each column's threshold T is a 32-bit integer: the column's
// own expert is taken with probability exactly T / 2^32.
//
// E <= 256 (the common case): the table is padded with zero-weight columns to
// exactly 256 columns and each draw uses 16 random bits (four per Philox word,
// low half first): the low byte is the column (exactly uniform, no rejection),
// the high byte c8 is the top byte of a 32-bit coin U compared with T:
// c8 < T>>24 accepts, c8 > T>>24 takes the alias, and on a tie (probability
// <= 1/256) 24 further bits from the block's tie stream complete the exact
// comparison U < T. So each column is taken with probability exactly T/2^32:
// the only approximation is rounding the weights to multiples of 2^-32 / 256.
// A whole refill (256 draws) is converted at once, with AVX-512 VBMI when the
// CPU has it (chosen at run time; the portable loop gives identical output,
// see set_portable_only).
//
// E > 256: each draw uses 32 random bits (two per Philox word): the column is
// floor(x*E/2^32) with Lemire's exact rejection (so the column is exactly
// uniform) and the coin is the low 32 bits of x*E compared with T.
// Conditioned on the column, those low bits form an arithmetic progression of
// step E, so each alias column's acceptance probability differs from T/2^32 by
// at most E * 2^-32, far below the Monte Carlo error of any feasible run.
// Group draws (GroupLimited) use this 32-bit scheme for any number of groups.
// Bernoulli coins (Sticky's rho) likewise use 32 bits: bias <= 2^-32.
#pragma once

#include <cstdint>
#include <vector>

#include "core/parallel.h"
#include "core/philox.h"
#include "core/routing_stats.h"

namespace qs::routing {

constexpr std::uint64_t kPurposeRouting = 1;
constexpr std::uint64_t kPurposePopularity = 2;
constexpr std::uint64_t kPurposeTie = 3;
constexpr int kRejectBudget = 64;

enum class WeightKind : int { Uniform = 0, PowerLaw = 1, Popularity = 2, Dirichlet = 3 };
// PowerLaw: which expert holds which popularity rank.
//   Fixed:    expert i has rank i+1 (weight (i+1)^-alpha) in every layer.
//   PerLayer: a uniformly random permutation per layer, drawn from the
//             (key, layer, kPurposePopularity) stream (same for all blocks).
enum class RankOrder : int { Fixed = 0, PerLayer = 1 };
enum class ModelKind : int { Independent = 0, GroupLimited = 1, Sticky = 2, Trace = 3 };

// Per-expert weights of one layer (the base of every stochastic model).
struct WeightSpec {
  WeightKind kind = WeightKind::Uniform;
  double alpha = 1.0;                 // PowerLaw exponent, >= 0
  RankOrder ranks = RankOrder::Fixed;  // PowerLaw rank assignment
  std::vector<double> weights;        // Popularity: length E, finite, >= 0
  std::vector<double> concentration;  // Dirichlet: length 1 (symmetric) or E, > 0
};

// The routing model.
//   Independent:  every token draws k experts Plackett-Luce from `base`.
//   GroupLimited: experts are split into `groups` contiguous groups of E/groups
//                 (DeepSeek-V3 style). Each token first draws `top_groups`
//                 distinct groups Plackett-Luce with group weight = sum of its
//                 base weights, then k experts Plackett-Luce from `base`
//                 restricted to the union of the chosen groups.
//   Sticky:       the same B sequences decode microbatch after microbatch. In
//                 each layer a token keeps each of its previous step's experts
//                 independently with probability rho; the others are redrawn
//                 Plackett-Luce from `base` excluding the kept ones. Each work
//                 block starts a fresh chain from a plain base draw (blocks of
//                 at least kStickyMinBlock microbatches).
//   Trace:        replay of recorded ids [steps, tokens, k]; microbatch m,
//                 layer l uses step m*layers + l.
struct ModelSpec {
  ModelKind kind = ModelKind::Independent;
  WeightSpec base;
  std::int64_t groups = 1;
  std::int64_t top_groups = 1;
  double rho = 0.0;
  std::vector<std::int32_t> trace;  // row-major [trace_steps, trace_tokens, trace_k]
  std::int64_t trace_steps = 0;
  std::int64_t trace_tokens = 0;
  std::int64_t trace_k = 0;
};
constexpr std::int64_t kStickyMinBlock = 256;

// Where experts live. expert_gpus[e] lists the GPUs holding a replica of
// expert e (first = primary). Token-split policy for replicated experts: the
// assignment of token t (index within the microbatch) to expert e goes to
// replica t mod r_e, where r_e = expert_gpus[e].size().
struct PlacementSpec {
  std::int64_t gpus = 1;
  std::vector<std::vector<std::int32_t>> expert_gpus;  // size E
};

// Optional straggler cost: GPU g spends max(a[g]*u_g, b[g]*n_g) seconds on a
// layer; the layer time is the max over GPUs; a microbatch's step time is the
// sum of its `layers` layer times.
struct CostSpec {
  bool enabled = false;
  std::vector<double> a;  // seconds per touched expert (replica), length G, > 0
  std::vector<double> b;  // seconds per token-expert assignment, length G, > 0
};

struct RouteRequest {
  std::int64_t experts = 0;
  std::int64_t top_k = 0;
  std::int64_t batch = 0;
  std::int64_t microbatches = 0;
  std::int64_t layers = 1;
  ModelSpec model;
  PlacementSpec placement;
  CostSpec cost;
  PhiloxKey key;
  int threads = 0;  // <= 0: all hardware threads
  std::uint64_t memory_limit = 4ull << 30;
  bool record = false;  // also return every selection (tests; small runs only)
  // Precision target (0: off). When > 0, `microbatches` is the maximum: work
  // blocks run in rounds and the run stops at the first checkpoint where the
  // relative standard errors of both the mean and the p99 of the precision
  // statistic are <= rtol (see "Precision-targeted runs" below).
  double rtol = 0.0;
};

// Precision-targeted runs (rtol > 0). The precision statistic is the step time
// when a cost is given, else the straggler assignment count max_g n_g of each
// microbatch-layer sample. Its mean and p99 get standard errors by sectioning
// over whole work blocks (routing_stats.h, class Sections): kPrecisionSections
// sections of equal numbers of blocks, each holding at least
// kMinSectionSamples samples at the first checkpoint. Checkpoints: the first
// after kPrecisionSections sections, then after every further
// kPrecisionSections/4 sections; when 2*kPrecisionSections sections exist,
// neighbours are merged pairwise (so there are always between
// kPrecisionSections and 2*kPrecisionSections sections and each round adds
// 12.5% to 25% more work). The schedule and the statistics (merged in block
// order) depend only on the request, so the stopping point is the same for
// any thread count. The last round stops at the cap (microbatches).
constexpr std::int64_t kPrecisionSections = 32;
constexpr std::int64_t kMinSectionSamples = 32;

struct RouteResult {
  std::int64_t experts = 0, top_k = 0, batch = 0, microbatches = 0, layers = 0, gpus = 0;
  std::int64_t block_size = 0;  // microbatches per work block
  std::int64_t blocks = 0;
  std::uint64_t samples = 0;  // microbatches * layers
  std::vector<std::uint64_t> unique_hist;             // [E+1]: u
  std::vector<std::uint64_t> gpu_unique_max_hist;     // [E+1]: max_g u_g
  std::vector<std::uint64_t> gpu_assign_max_hist;     // [B*k+1]: max_g n_g
  std::vector<std::uint64_t> tokens_per_expert_hist;  // [B+1]: over experts and samples
  std::vector<std::uint64_t> gpu_unique_sum;          // [G]: sum over samples of u_g
  std::vector<std::uint64_t> gpu_assign_sum;          // [G]: sum over samples of n_g
  std::vector<double> layer_weights;                  // [weight_tables, E], normalised
  std::int64_t weight_tables = 0;
  bool has_cost = false;
  Moments layer_time, step_time;
  LogHistogram layer_time_hist, step_time_hist;
  std::vector<std::int32_t> selections;  // [microbatches, layers, B, k] if record
  // Precision-targeted runs only (rtol > 0); microbatches above = run.
  double rtol = 0.0;
  bool target_reached = false;
  double rse_mean = 0.0, rse_p99 = 0.0;  // relative standard errors reached
  std::int64_t precision_sections = 0;   // sections behind them
  std::int64_t checkpoints = 0;          // stopping checks made
};

// Throws qs::InvalidArgument naming the argument, its value and the rule.
void validate(const RouteRequest& req);
// Bytes the run would hold at its peak (approximate upper bound).
std::uint64_t estimate_memory(const RouteRequest& req, unsigned threads);
// Microbatches per work block (a function of the request only).
std::int64_t block_size(const RouteRequest& req);
// Validates, checks memory (qs::ResourceLimitExceeded), runs. Throws Cancelled.
RouteResult route(const RouteRequest& req, const CancelToken* cancel = nullptr);
// Tests: use only the portable code paths (no runtime-dispatched SIMD), which
// must give bit-identical results. Process-wide; default off (alias.cc).
void set_portable_only(bool on);

}  // namespace qs::routing
