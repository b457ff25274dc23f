// qsengine core, internal to the step model (step.cc, step_time.cc, side_search.cc): the
// calibrated kernels' shared arithmetic and the tape that batches their soft maxima
// (see step.h and docs/model.md, "Calibrated kernels"). Not part of the core's API.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/step.h"

namespace qs {
namespace step {
namespace detail {

// Lanes per block of the pass (their soft maxima are evaluated together).
constexpr std::int64_t kBlockLanes = 256;

// numpy's maximum/minimum: a NaN in either argument gives NaN.
inline double np_max(double a, double b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a >= b ? a : b;
}
inline double np_min(double a, double b) {
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a <= b ? a : b;
}

// The soft maxima of a block of lanes, recorded and evaluated together so that
// their powers run as SIMD calls (soft_max_block); see pass_lanes.
class SoftMaxTape {
 public:
  // Records (x, y, p) and returns 0, or on replay the recorded call's soft maximum.
  double operator()(double x, double y, double p) {
    if (!replay_) {
      x_.push_back(x);
      y_.push_back(y);
      p_.push_back(p);
      return 0.0;
    }
    return r_[at_++];
  }
  void evaluate_and_replay() {
    r_.resize(x_.size());
    soft_max_block(static_cast<std::int64_t>(x_.size()), x_.data(), y_.data(), p_.data(), r_.data());
    replay_ = true;
    at_ = 0;
  }
  void reset() {
    x_.clear();
    y_.clear();
    p_.clear();
    replay_ = false;
    at_ = 0;
  }

 private:
  std::vector<double> x_, y_, p_, r_;
  std::size_t at_ = 0;
  bool replay_ = false;
};

// Python's float floor division a // b for the values the pass meets (b may be 0: inf or nan, as numpy).
inline double floor_div(double a, double b) { return std::floor(a / b); }

// Summed calibrated GEMMs of shapes (n_j, k_j) at m rows; *bw_bound: the summed bandwidth terms >= the compute terms.
inline double gemm_impl(const Lane& l, double m, double n, double k, double* tb, double* tf, SoftMaxTape& sm) {
  const double ne = n + l.g_pad;
  const double nb = m * k * l.g_ab + k * ne * l.g_wb + 2.0 * m * ne;
  const double fl = 2.0 * m * ne * k;
  *tb = nb / l.g_bw;
  *tf = fl / l.g_f;
  return n > 0 ? l.g_c0 + sm(*tb, *tf, l.g_p) : 0.0;
}

inline double attention_impl(const Lane& l, double seqs, double ctx, double* tb, double* tf, SoftMaxTape& sm) {
  const double streams = seqs * l.at_kvh * ctx + l.at_pad * np_min(ctx, l.at_split);
  const double nb = streams * l.at_el * l.at_kvb + seqs * l.at_h * l.at_qo;
  const double fl = seqs * ctx * l.at_h * l.at_fl;
  *tb = nb / l.at_bw;
  *tf = fl / l.at_f;
  return l.at_c0 + l.at_c1 * (seqs * l.at_h) + sm(*tb, *tf, l.at_p);
}

template <int N>
inline double gemms(const Lane& l, double m, const double (&n)[N], const double (&k)[N], bool* bw_bound,
                    SoftMaxTape& sm) {
  double t = 0.0, sb = 0.0, sf = 0.0;
  for (int j = 0; j < N; ++j) {
    double gb = 0.0, gf = 0.0;
    t = t + gemm_impl(l, m, n[j], k[j], &gb, &gf, sm);
    if (n[j] > 0) {
      sb = sb + gb;
      sf = sf + gf;
    }
  }
  *bw_bound = sb >= sf;
  return t;
}

}  // namespace detail
}  // namespace step
}  // namespace qs
