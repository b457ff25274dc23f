// qsengine core: the routed experts' closed-form straggler, over lanes.
//
// One MoE layer's straggler is the slowest GPU of its EP group,
// max_g max(a*u_g, b*n_g) (u_g experts touched, n_g token-expert assignments on
// GPU g; a, b seconds per touched expert and per assignment). Under independent
// routing each GPU's cost is taken normal and the maximum is closed-form:
//   uniform routing     - G identical normals: mean mu + sigma*c_G, sd sigma*s_G
//                         (max_iid_normal);
//   expert popularity   - per-expert inclusion probabilities pi: G different
//                         normals, the maximum's CDF integrated numerically
//                         (expected_max_normals);
//   redundant EPLB slots - GPUs grouped in classes of identical slot loads
//                         (the layout is given: Python's slot_layout), each
//                         class's maximum as in the uniform case, the classes
//                         folded by Clark's moment matching (clark_max);
// capped by the physical ceiling (ceiling) and summed over a lane's MoE layers
// (quantiles). Every formula: docs/model.md, "Routed experts" and "Redundant
// expert slots"; the Python layer is qsengine/decode/straggler.py.
//
// The arithmetic follows the numpy implementation it replaced (kept as the test
// oracle tests/reference_straggler.py) operation by operation, sums included
// (numpy's pairwise summation), so results agree to rounding of exp/log1p/expm1.
// Lanes are independent: a lane's result never depends on the other lanes.
#pragma once

#include <cstdint>
#include <vector>

namespace qs {
namespace straggler {

// z of the normal 0.99 quantile (p99 = mean + kZ99 * sd of the summed straggler).
inline constexpr double kZ99 = 2.3263478740408408;

// Grid points of expected_max_normals' integral.
inline constexpr int kGrid = 2049;

// A per-lane input: one value per lane (stride 1) or one for every lane (stride 0).
template <class T>
struct Column {
  const T* data = nullptr;
  std::int64_t stride = 1;
  T operator[](std::int64_t i) const { return data[stride * i]; }
};

// Mean c_G and standard deviation s_G of the maximum of G independent standard
// normals: c_G = integral of x*G*phi(x)*Phi(x)^(G-1) on [-12, 12] (trapezoid,
// 24 001 points), likewise the second moment; (0, 1) for G <= 1. Computed once
// per G and cached (thread-safe).
struct MaxIid {
  double mean;
  double sd;
};
MaxIid max_iid_normal(std::int64_t g);

// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
double erf_as(double z);

// Numpy's pairwise summation of a[0..n) (numpy/_core/src/umath/loops_utils.h.src,
// pairwise_sum: blocks of 128 summed with 8 accumulators, halves recursively).
double pairwise_sum(const double* a, std::int64_t n);

// Mean and sd of the maximum of g independent normals N(mu[j], sigma[j]^2),
// by numerical integration of its CDF prod_j Phi((x - mu_j)/sigma_j) on kGrid
// points over [min(mu - 8 sigma), max(mu + 8 sigma)] (density by central
// differences with first-order edges, moments by the trapezoid rule).
// `work` is scratch space (resized as needed).
MaxIid expected_max_normals(const double* mu, const double* sigma, std::int64_t g, std::vector<double>& work);

// Mean and sd of the maximum of c independent normals by Clark's moment
// matching (C. E. Clark, Operations Research 9(2), 1961, 145-162), folding the
// columns in descending order of mean (stable).
MaxIid clark_max(const double* mu, const double* sigma, std::int64_t c);

// The physical ceiling of one layer's straggler: max(a*E_g, b*B*min(k, E_g)).
double ceiling(double experts_per_gpu, double top_k, double tokens, double a, double b);

// The slots of one EP group of `gpus` GPUs with `redundant` extra slots, by
// class: class_expert / class_share (classes x per_gpu, row-major) are the
// slots of one GPU of each class (expert index, fraction of that expert's
// tokens the slot serves), class_count how many GPUs the class stands for.
struct SlotClasses {
  std::int64_t gpus = 0;
  std::int64_t redundant = 0;
  std::int64_t classes = 0;
  std::int64_t per_gpu = 0;
  const std::int64_t* class_expert = nullptr;
  const double* class_share = nullptr;
  const std::int64_t* class_count = nullptr;
};

// The routing law of one call, shared by all its lanes: E experts, top-k;
// pi (E entries; nullptr: uniform k/E); the slot layouts of every
// (gpus, redundant > 0) pair a live lane uses.
struct Routing {
  std::int64_t experts = 0;
  std::int64_t top_k = 0;
  const double* pi = nullptr;
  std::vector<SlotClasses> slots;
};

// Lanes of straggler_closed_form: routed tokens B, GPUs G of the EP group,
// cost a, b, redundant slots R (data nullptr: 0).
struct ClosedFormInput {
  std::int64_t lanes = 0;
  Column<double> tokens, a, b;
  Column<std::int64_t> gpus, redundant;
};

// Mean and sd of one layer's straggler per lane (0 where B <= 0). Throws
// qs::InvalidArgument naming the argument on bad input (checked before any
// lane is computed).
void closed_form(const Routing& routing, const ClosedFormInput& in, double* mean, double* sd);

// Lanes of straggler_quantiles: the StepParams columns (float, as the Python
// layer holds them) and the routed tokens per lane.
struct QuantilesInput {
  std::int64_t lanes = 0;
  Column<double> tokens, moe_layers, experts, top_k, ep, redundant, a, b;
};

// (mean, p50, p99) of the straggler summed over each lane's L MoE layers: mean
// L*m, sd sqrt(L)*s, p99 = mean + kZ99*sd capped at L times the ceiling (not
// below the mean); 0 on dense lanes (L = 0). MoE lanes must agree on experts
// and top-k (routing.experts / top_k, which are taken from them).
void quantiles(const Routing& routing, const QuantilesInput& in, double* mean, double* p50, double* p99);

}  // namespace straggler
}  // namespace qs
