// qsengine core: one side's search for its operating points (docs/model.md,
// "Best batch and plan"): every row (a lane x one of its plans that packs) is
// evaluated at its HBM-maximum (or fixed) batch; rows whose p99 TPOT misses the
// lane's target are bisected to the largest batch that meets it, skipping rows
// that provably cannot beat another plan of their lane (exact pruning, below).
// The Python layer (qsengine/decode/sides.py) builds the rows (admission,
// caps, prefill stalls) and chooses each lane's plan from the rows' results.
//
// The search: a row's throughput is B*dp/TPOT. Pruning (exact, tolerance 1e-9
// relative): a row's throughput under the target is at most its HBM-max
// throughput, so a row whose maximum is below the best its lane already has
// is not bisected. The lane's best starts from the rows that meet the target
// at their maximum; the binding row with the largest maximum per lane is
// bisected first (first round), then the others still alive (second round).
// Inside a bisection, dense rows (whose B*dp/TPOT provably grows with B: every
// piece of their step is a nonnegative intercept plus a nonnegative slope in
// B, combined by sums, max, min and the kernels' p-norms) stop as soon as the
// throughput at the bracket's missing end is below the lane's best; MoE rows
// are not pruned there (a straggler's spread can jump where its binding
// resource switches). Pruned rows are reported invalid: never chosen.
//
// The bisection: the bracket [lo meets, hi misses] shrinks by regula falsi
// with the Illinois modification (the p99 is close to affine in the batch),
// falling back to the midpoint whenever a step did not halve the bracket: the
// same answer as bisection, the largest batch that meets the target, in fewer
// steps. Rows advance in synchronous rounds (each round's evaluations as one
// call of the step), so the result does not depend on how rows are grouped;
// lanes are searched in groups of 256, each to completion, so a group's rows
// stay in cache.
#pragma once

#include <cstdint>

#include "core/step.h"

namespace qs {
namespace side {

// The rows of one side. Rows of a lane may be anywhere; `lanes` bounds the lane ids.
struct SearchInput {
  const step::Lane* plans = nullptr;  // the plans' step lanes (the stacked families' table)
  std::int64_t num_plans = 0;
  const std::int64_t* unit = nullptr;  // per plan: sequences per admission unit (tp under attention-DP, else 1)
  std::int64_t rows = 0;
  std::int64_t lanes = 0;
  const std::int64_t* plan = nullptr;   // per row: its plan
  const std::int64_t* lane = nullptr;   // per row: its lane, in [0, lanes)
  const double* ffn = nullptr;          // per row: dense-FFN parameters replacing the plan's (null: the plan's)
  const double* context = nullptr;      // per row: tokens each sequence's step reads
  const double* slo = nullptr;          // per row: the p99 TPOT target, s (NaN: none)
  const std::int64_t* units = nullptr;  // per row: admission units its HBM (and any cap) holds, >= 1
  const std::int64_t* fixed = nullptr;  // per row: a fixed cluster batch (0: none; null: none anywhere)
  const double* stall = nullptr;        // per row: colocated prefill stall per sequence and step (null: 0)
  step::Straggler straggler;            // the routing law (closed form)
};

// Per row. top_*: at the HBM-max (or fixed) batch; time/p99 are the TPOT a user
// sees (the step plus batch x stall), step the decode step's mean alone.
struct SearchOutput {
  double* top_time = nullptr;
  double* top_p99 = nullptr;
  double* top_step = nullptr;
  std::uint8_t* top_valid = nullptr;  // 0: the plan cannot hold the fixed batch (or split it over its replicas)
  std::uint8_t* binds = nullptr;      // 1: a target is set and the top batch misses it
  std::int64_t* units = nullptr;      // the answer: admission units (the input's where the target does not bind)
  double* time = nullptr;
  double* p99 = nullptr;
  double* step = nullptr;
  std::uint8_t* valid = nullptr;  // 0: top_valid 0, misses the target at one unit, or pruned (never chosen)
  // sequences per replica (the fixed batch's share, or units x unit) and decode tokens/s of the cluster's
  // replicas, batch x dp / step (stalls not counted), at the top and at the answer
  std::int64_t* top_batch = nullptr;
  double* top_tps = nullptr;
  std::int64_t* batch = nullptr;
  double* tps = nullptr;
};

// InvalidArgument on a missing array, a row's plan or lane out of range, or units < 1.
void search(const SearchInput& in, const SearchOutput& out);

// Each lane's choice among its rows: an in-order scan (rows in array order, so each lane's rows in plan order)
// in which a row with a score (valid, not NaN) replaces the lane's best only if better by a relative 1e-12, so
// earlier plans win near-ties. best[l]: the chosen score (NaN: none); row[l]: the chosen row (-1: none).
// InvalidArgument if a row's lane is out of [0, lanes).
void in_order_best(std::int64_t rows, const std::int64_t* lane, const double* score, const std::uint8_t* valid,
                   std::int64_t lanes, double* best, std::int64_t* row);

}  // namespace side
}  // namespace qs
