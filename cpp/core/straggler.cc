// qsengine core: the routed experts' closed-form straggler (straggler.h).
// Formulas: docs/model.md, "Routed experts" and "Redundant expert slots".
#include "core/straggler.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <map>
#include <mutex>
#include <numeric>
#include <string>

#include "core/errors.h"

namespace qs {
namespace straggler {

namespace {

constexpr double kSqrt2 = 1.4142135623730951;           // math.sqrt(2.0)
constexpr double kSqrt2Pi = 2.5066282746310002;         // math.sqrt(2.0 * math.pi)
constexpr double kMaxInclusion = 1.0 - 1e-15;           // pi capped below 1 before log1p

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// max(x, y) / min(x, y) as numpy's maximum / minimum (NaN propagates).
double np_max(double x, double y) { return (std::isnan(x) || x >= y) ? x : y; }
double np_min(double x, double y) { return (std::isnan(x) || x <= y) ? x : y; }

MaxIid integrate_max_iid(std::int64_t g) {
  // numpy.linspace(-12, 12, 24001): x_i = i*step + start, the last point = stop.
  constexpr int n = 24001;
  const double step = 24.0 / (n - 1);
  std::vector<double> x(n), y1(n), y2(n), t1(n - 1), t2(n - 1);
  const double gd = static_cast<double>(g);
  for (int i = 0; i < n; ++i) x[i] = static_cast<double>(i) * step + -12.0;
  x[n - 1] = 12.0;
  for (int i = 0; i < n; ++i) {
    const double v = x[i];
    const double cdf = 0.5 * std::erfc(-v / kSqrt2);
    const double pw = g == 2 ? cdf : g == 3 ? cdf * cdf : std::pow(cdf, gd - 1.0);
    const double pdf = gd * std::exp(-0.5 * v * v) / kSqrt2Pi * pw;
    y1[i] = v * pdf;
    y2[i] = v * v * pdf;
  }
  for (int i = 0; i + 1 < n; ++i) {  // numpy.trapezoid: sum(diff(x) * (y[1:] + y[:-1]) / 2)
    const double d = x[i + 1] - x[i];
    t1[i] = d * (y1[i + 1] + y1[i]) / 2.0;
    t2[i] = d * (y2[i + 1] + y2[i]) / 2.0;
  }
  const double m1 = pairwise_sum(t1.data(), n - 1), m2 = pairwise_sum(t2.data(), n - 1);
  return {m1, std::sqrt(std::max(m2 - m1 * m1, 0.0))};
}

// The moments of one GPU (or slot class): touched experts mu_u/var_u and
// assignments mu_n/var_n, turned into the binding resource's normal (mu, sigma).
void binding_normal(double mu_u, double var_u, double mu_n, double var_n, double a, double b, double* mu,
                    double* sigma) {
  const bool use_u = a * mu_u >= b * mu_n;
  *mu = use_u ? a * mu_u : b * mu_n;
  *sigma = use_u ? a * std::sqrt(var_u) : b * std::sqrt(var_n);
}

// Scratch space of one call.
struct Work {
  std::vector<double> t, t2, mu, sig, cmu, csd, grid;
};

// Uniform routing: G identical GPUs of E//G experts each.
MaxIid uniform_lane(std::int64_t experts, std::int64_t top_k, double lp, double B, std::int64_t G, double a,
                    double b, const MaxIid& c) {
  const double p1 = static_cast<double>(top_k) / static_cast<double>(experts);
  const double touched = -std::expm1(B * lp);
  const double per = static_cast<double>(experts / G);
  const double mu_u = per * touched;
  const double var_u = per * (touched * (1 - touched));
  const double mu_n = B * (per * p1);
  const double frac = per / static_cast<double>(experts);
  const double var_tok = static_cast<double>(top_k) * frac * (1 - frac) * static_cast<double>(experts - top_k) /
                         static_cast<double>(std::max<std::int64_t>(experts - 1, 1));
  const double var_n = B * var_tok;
  double mu, sig;
  binding_normal(mu_u, var_u, mu_n, var_n, a, b, &mu, &sig);
  const double cap = np_max(ceiling(per, static_cast<double>(top_k), B, a, b), mu);
  return {np_min(mu + sig * c.mean, cap), sig * c.sd};
}

// Expert popularity pi: GPU g holds experts [g*per, (g+1)*per).
MaxIid popularity_lane(const Routing& r, const double* lp, double B, std::int64_t G, double a, double b, Work& w) {
  const std::int64_t per = r.experts / G;
  w.t.resize(static_cast<std::size_t>(per));
  w.t2.resize(static_cast<std::size_t>(per));
  w.mu.resize(static_cast<std::size_t>(G));
  w.sig.resize(static_cast<std::size_t>(G));
  double mu_max = -HUGE_VAL;
  for (std::int64_t g = 0; g < G; ++g) {
    const std::int64_t e0 = g * per;
    for (std::int64_t j = 0; j < per; ++j) {
      const double t = -std::expm1(B * lp[e0 + j]);
      w.t[j] = t;
      w.t2[j] = t * (1 - t);
    }
    const double mu_u = pairwise_sum(w.t.data(), per), var_u = pairwise_sum(w.t2.data(), per);
    for (std::int64_t j = 0; j < per; ++j) {
      const double p = r.pi[e0 + j];
      w.t[j] = p;
      w.t2[j] = p * (1 - p);
    }
    const double mu_n = B * pairwise_sum(w.t.data(), per), var_n = B * pairwise_sum(w.t2.data(), per);
    binding_normal(mu_u, var_u, mu_n, var_n, a, b, &w.mu[g], &w.sig[g]);
    mu_max = g == 0 ? w.mu[0] : np_max(mu_max, w.mu[g]);
  }
  MaxIid m = expected_max_normals(w.mu.data(), w.sig.data(), G, w.grid);
  m.mean = np_min(m.mean, np_max(ceiling(static_cast<double>(per), static_cast<double>(r.top_k), B, a, b), mu_max));
  return m;
}

// Redundant slots: classes of identical GPUs, each GPU's slots from the layout.
MaxIid slots_lane(const SlotClasses& lay, const MaxIid* class_max, const double* load, const double* lp, double B,
                  double a, double b, Work& w) {
  const std::int64_t per = lay.per_gpu, c = lay.classes;
  w.cmu.resize(static_cast<std::size_t>(c));
  w.csd.resize(static_cast<std::size_t>(c));
  std::vector<double>& u = w.grid;  // (4 x per) scratch: touched, its variance, assignments, their variance
  u.resize(static_cast<std::size_t>(4 * per));
  for (std::int64_t k = 0; k < c; ++k) {
    for (std::int64_t j = 0; j < per; ++j) {
      const std::int64_t s = k * per + j;
      const std::int64_t e = lay.class_expert[s];
      const double Bs = B * lay.class_share[s];  // the tokens this slot serves
      const double t = -std::expm1(Bs * lp[e]);
      const double ps = load[e];
      u[j] = t;
      u[per + j] = t * (1 - t);
      u[2 * per + j] = Bs * ps;
      u[3 * per + j] = Bs * ps * (1 - ps);
    }
    double mu, sig;
    binding_normal(pairwise_sum(&u[0], per), pairwise_sum(&u[per], per), pairwise_sum(&u[2 * per], per),
                   pairwise_sum(&u[3 * per], per), a, b, &mu, &sig);
    const MaxIid& cs = class_max[k];  // max_iid_normal(class_count[k])
    w.cmu[k] = mu + sig * cs.mean;
    w.csd[k] = sig * cs.sd;
  }
  return clark_max(w.cmu.data(), w.csd.data(), c);
}

void check_routing(const Routing& r, const char* who) {
  if (r.experts < 1) throw InvalidArgument(std::string(who) + ": experts = " + std::to_string(r.experts) + ": must be >= 1");
  if (r.top_k < 1 || r.top_k > r.experts) {
    throw InvalidArgument(std::string(who) + ": top_k = " + std::to_string(r.top_k) + ": must be in [1, experts = " +
                          std::to_string(r.experts) + "]");
  }
  if (r.pi != nullptr) {
    for (std::int64_t e = 0; e < r.experts; ++e) {
      const double p = r.pi[e];
      if (!(p >= 0.0 && p <= 1.0)) {
        throw InvalidArgument(std::string(who) + ": pi[" + std::to_string(e) + "] = " + num(p) +
                              ": an inclusion probability must be in [0, 1]");
      }
    }
  }
  for (const SlotClasses& s : r.slots) {
    const std::string tag = std::string(who) + ": slot layout (gpus = " + std::to_string(s.gpus) +
                            ", redundant = " + std::to_string(s.redundant) + ")";
    if (s.gpus < 1 || s.redundant < 1) throw InvalidArgument(tag + ": gpus and redundant must be >= 1");
    if (s.per_gpu * s.gpus != r.experts + s.redundant) {
      throw InvalidArgument(tag + ": per_gpu = " + std::to_string(s.per_gpu) + ": per_gpu * gpus must equal experts + redundant = " +
                            std::to_string(r.experts + s.redundant));
    }
    if (s.classes < 1) throw InvalidArgument(tag + ": class_count is empty: a layout has at least one class");
    std::int64_t total = 0;
    for (std::int64_t k = 0; k < s.classes; ++k) {
      if (s.class_count[k] < 1) {
        throw InvalidArgument(tag + ": class_count[" + std::to_string(k) + "] = " + std::to_string(s.class_count[k]) +
                              ": must be >= 1");
      }
      total += s.class_count[k];
    }
    if (total != s.gpus) {
      throw InvalidArgument(tag + ": class_count sums to " + std::to_string(total) + ": must sum to gpus");
    }
    for (std::int64_t i = 0; i < s.classes * s.per_gpu; ++i) {
      if (s.class_expert[i] < 0 || s.class_expert[i] >= r.experts) {
        throw InvalidArgument(tag + ": class_expert holds " + std::to_string(s.class_expert[i]) +
                              ": expert indices must be in [0, experts)");
      }
      if (!(s.class_share[i] > 0.0 && s.class_share[i] <= 1.0)) {
        throw InvalidArgument(tag + ": class_share holds " + num(s.class_share[i]) + ": shares must be in (0, 1]");
      }
    }
  }
}

std::ptrdiff_t find_layout(const Routing& r, std::int64_t G, std::int64_t R) {
  for (std::size_t k = 0; k < r.slots.size(); ++k) {
    if (r.slots[k].gpus == G && r.slots[k].redundant == R) return static_cast<std::ptrdiff_t>(k);
  }
  return -1;
}

}  // namespace

double erf_as(double z) {
  // numpy: sign(z) * (1 - poly * exp(-x*x)), x = |z|, t = 1/(1 + p*x) (A&S 7.1.26).
  const double sign = z > 0 ? 1.0 : z < 0 ? -1.0 : z;  // numpy.sign: 0 -> 0, NaN -> NaN
  const double x = std::fabs(z);
  const double t = 1.0 / (1.0 + 0.3275911 * x);
  const double poly =
      t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
  return sign * (1.0 - poly * std::exp(-x * x));
}

double pairwise_sum(const double* a, std::int64_t n) {
  if (n < 8) {
    double res = 0.0;  // numpy: -0.0 for an all -0.0 row is not a case here
    for (std::int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    std::int64_t i = 8;
    for (; i < n - (n % 8); i += 8) {
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    }
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  std::int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

MaxIid max_iid_normal(std::int64_t g) {
  if (g <= 1) return {0.0, 1.0};
  static std::mutex mu;
  static std::map<std::int64_t, MaxIid> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(g);
    if (it != cache.end()) return it->second;
  }
  const MaxIid got = integrate_max_iid(g);  // outside the lock: two threads may both compute it, identically
  std::lock_guard<std::mutex> lock(mu);
  cache.emplace(g, got);
  return got;
}

MaxIid expected_max_normals(const double* mu, const double* sigma_in, std::int64_t g, std::vector<double>& work) {
  const auto sig = [&](std::int64_t j) { return np_max(sigma_in[j], 1e-300); };
  if (g == 1) return {mu[0], sig(0)};
  double lo = 0, hi = 0, m1 = 0;
  for (std::int64_t j = 0; j < g; ++j) {
    const double l = mu[j] - 8 * sig(j), h = mu[j] + 8 * sig(j);
    lo = j == 0 ? l : np_min(lo, l);
    hi = j == 0 ? h : np_max(hi, h);
    m1 = j == 0 ? mu[0] : np_max(m1, mu[j]);
  }
  if (!(hi > lo)) return {m1, 0.0};
  constexpr int n = kGrid;
  work.resize(4 * n);
  double* x = &work[0];
  double* cdf = &work[n];
  double* t1 = &work[2 * n];
  double* t2 = &work[3 * n];
  const double span = hi - lo;
  for (int i = 0; i < n; ++i) x[i] = lo + span * (static_cast<double>(i) * (1.0 / (n - 1)));  // numpy.linspace(0, 1)
  x[n - 1] = lo + span * 1.0;
  for (int i = 0; i < n; ++i) cdf[i] = 1.0;
  // erf_as split in three passes (its arithmetic unchanged) so that the two without exp vectorise
  double* ex = t1;  // exp(-x*x) of each point, then the factor's sign*(1 - poly*e)
  double* poly = t2;
  for (std::int64_t j = 0; j < g; ++j) {
    const double m = mu[j], s = sig(j) * kSqrt2;
    for (int i = 0; i < n; ++i) {
      const double z = (x[i] - m) / s, ax = std::fabs(z);
      const double t = 1.0 / (1.0 + 0.3275911 * ax);
      poly[i] = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
      ex[i] = -ax * ax;
    }
    for (int i = 0; i < n; ++i) ex[i] = std::exp(ex[i]);
    for (int i = 0; i < n; ++i) {
      const double z = (x[i] - m) / s;
      const double sign = z > 0 ? 1.0 : z < 0 ? -1.0 : z;
      cdf[i] *= 0.5 * (1.0 + sign * (1.0 - poly[i] * ex[i]));
    }
  }
  // pdf = gradient(cdf) / gradient(x) (numpy.gradient, unit spacing, edge_order=1), then
  // trapezoid moments sum(diff(x) * (a[1:] + a[:-1]) / 2) of a1 = x*pdf and a2 = x*a1.
  const auto pdf = [&](int i) {
    if (i == 0) return (cdf[1] - cdf[0]) / 1.0 / ((x[1] - x[0]) / 1.0);
    if (i == n - 1) return (cdf[n - 1] - cdf[n - 2]) / 1.0 / ((x[n - 1] - x[n - 2]) / 1.0);
    return ((cdf[i + 1] - cdf[i - 1]) / 2.0) / ((x[i + 1] - x[i - 1]) / 2.0);
  };
  double a1_prev = x[0] * pdf(0);
  double a2_prev = x[0] * a1_prev;
  for (int i = 1; i < n; ++i) {
    const double a1 = x[i] * pdf(i), a2 = x[i] * a1;
    const double dx = x[i] - x[i - 1];
    t1[i - 1] = dx * (a1 + a1_prev) / 2.0;
    t2[i - 1] = dx * (a2 + a2_prev) / 2.0;
    a1_prev = a1;
    a2_prev = a2;
  }
  const double e1 = pairwise_sum(t1, n - 1), e2 = pairwise_sum(t2, n - 1);
  return {e1, std::sqrt(std::max(e2 - e1 * e1, 0.0))};
}

MaxIid clark_max(const double* mu_in, const double* sigma_in, std::int64_t c) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(c));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t i, std::int64_t j) { return -mu_in[i] < -mu_in[j]; });
  const auto var = [&](std::int64_t j) { const double s = sigma_in[order[j]]; return s * s; };
  double m = mu_in[order[0]], v = var(0);
  for (std::int64_t j = 1; j < c; ++j) {
    const double m2 = mu_in[order[j]], v2 = var(j);
    const double theta = std::sqrt(v + v2);
    const bool pos = theta > 0;
    const double th = pos ? theta : 1.0;
    const double al = (m - m2) / th;
    const double cdf = 0.5 * (1.0 + erf_as(al / kSqrt2));
    const double pdf = std::exp(-0.5 * al * al) / kSqrt2Pi;
    const double e1 = m * cdf + m2 * (1 - cdf) + th * pdf;
    const double e2 = (m * m + v) * cdf + (m2 * m2 + v2) * (1 - cdf) + (m + m2) * th * pdf;
    const double m_new = pos ? e1 : np_max(m, m2);
    const double v_new = pos ? std::max(e2 - e1 * e1, 0.0) : 0.0;
    m = m_new;
    v = v_new;
  }
  return {m, std::sqrt(v)};
}

double ceiling(double experts_per_gpu, double top_k, double tokens, double a, double b) {
  return np_max(a * experts_per_gpu, b * tokens * np_min(top_k, experts_per_gpu));
}

void closed_form(const Routing& r, const ClosedFormInput& in, double* mean, double* sd) {
  const char* who = "straggler_closed_form";
  check_routing(r, who);
  // Check every lane first, so that a bad lane leaves no output half-written.
  const auto bad = [who](const char* field, std::int64_t i, const std::string& value, const std::string& rule) {
    throw InvalidArgument(std::string(who) + ": " + field + "[" + std::to_string(i) + "] = " + value + ": " + rule);
  };
  for (std::int64_t i = 0; i < in.lanes; ++i) {
    const double B = in.tokens[i], a = in.a[i], b = in.b[i];
    const std::int64_t G = in.gpus[i];
    const std::int64_t R = in.redundant.data ? in.redundant[i] : 0;
    if (std::isnan(B) || std::isinf(B)) bad("tokens", i, num(B), "must be finite");
    if (!(a >= 0.0 && a < HUGE_VAL)) bad("a", i, num(a), "must be finite and >= 0");
    if (!(b >= 0.0 && b < HUGE_VAL)) bad("b", i, num(b), "must be finite and >= 0");
    if (G < 1) bad("gpus", i, std::to_string(G), "must be >= 1");
    if (R < 0) bad("redundant", i, std::to_string(R), "must be >= 0");
    if (!(B > 0)) continue;
    if (R > 0) {
      if (find_layout(r, G, R) < 0) {
        throw InvalidArgument(std::string(who) + ": layouts has no slot layout for gpus = " + std::to_string(G) +
                              ", redundant = " + std::to_string(R) + " (lane " + std::to_string(i) + ")");
      }
    } else if (r.pi != nullptr && r.experts % G != 0) {
      bad("gpus", i, std::to_string(G), "must divide experts = " + std::to_string(r.experts) + " under popularity routing");
    }
  }
  std::vector<double> lp, load;
  const double* ld = r.pi;
  if (ld == nullptr && !r.slots.empty()) {
    load.assign(static_cast<std::size_t>(r.experts), static_cast<double>(r.top_k) / static_cast<double>(r.experts));
    ld = load.data();
  }
  if (ld != nullptr) {
    lp.resize(static_cast<std::size_t>(r.experts));
    for (std::int64_t e = 0; e < r.experts; ++e) lp[e] = std::log1p(-std::min(ld[e], kMaxInclusion));
  }
  // uniform routing: log(1 - k/E), one per call
  const double lp_uniform =
      std::log1p(-std::min(static_cast<double>(r.top_k) / static_cast<double>(r.experts), kMaxInclusion));
  // each layout's classes: the maximum of class_count iid normals, looked up once per call
  std::vector<std::vector<MaxIid>> class_max(r.slots.size());
  for (std::size_t k = 0; k < r.slots.size(); ++k) {
    for (std::int64_t c = 0; c < r.slots[k].classes; ++c) class_max[k].push_back(max_iid_normal(r.slots[k].class_count[c]));
  }
  Work w;
  std::int64_t last_g = -1;
  MaxIid last_c{0.0, 1.0};
  for (std::int64_t i = 0; i < in.lanes; ++i) {
    const double B = in.tokens[i];
    if (!(B > 0)) {
      mean[i] = 0.0;
      sd[i] = 0.0;
      continue;
    }
    const std::int64_t G = in.gpus[i];
    const std::int64_t R = in.redundant.data ? in.redundant[i] : 0;
    MaxIid m;
    if (R > 0) {
      const auto k = static_cast<std::size_t>(find_layout(r, G, R));
      m = slots_lane(r.slots[k], class_max[k].data(), ld, lp.data(), B, in.a[i], in.b[i], w);
    } else if (r.pi != nullptr) {
      m = popularity_lane(r, lp.data(), B, G, in.a[i], in.b[i], w);
    } else {
      if (G != last_g) {  // lanes of one G come in runs: skip the shared cache's lock
        last_g = G;
        last_c = max_iid_normal(G);
      }
      m = uniform_lane(r.experts, r.top_k, lp_uniform, B, G, in.a[i], in.b[i], last_c);
    }
    mean[i] = m.mean;
    sd[i] = m.sd;
  }
}

void quantiles(const Routing& r, const QuantilesInput& in, double* mean, double* p50, double* p99) {
  std::vector<std::int64_t> rows;
  for (std::int64_t i = 0; i < in.lanes; ++i) {
    if (in.moe_layers[i] > 0) rows.push_back(i);
  }
  for (const std::int64_t i : rows) {
    if (in.experts[i] != static_cast<double>(r.experts) || in.top_k[i] != static_cast<double>(r.top_k)) {
      throw InvalidArgument("step_time: MoE lanes disagree on experts/top_k (lane " + std::to_string(i) + ": experts = " +
                            num(in.experts[i]) + ", top_k = " + num(in.top_k[i]) + "; expected " +
                            std::to_string(r.experts) + ", " + std::to_string(r.top_k) +
                            "); the closed-form straggler takes one routing law per call (split the lanes)");
    }
  }
  const auto n = static_cast<std::size_t>(rows.size());
  std::vector<double> tok(n), a(n), b(n), m(n, 0.0), s(n, 0.0);
  std::vector<std::int64_t> gpus(n), red(n);
  for (std::size_t j = 0; j < n; ++j) {
    const std::int64_t i = rows[j];
    tok[j] = in.tokens[i];
    a[j] = in.a[i];
    b[j] = in.b[i];
    gpus[j] = static_cast<std::int64_t>(in.ep[i]);  // numpy astype(int64): truncation
    red[j] = static_cast<std::int64_t>(in.redundant[i]);
  }
  if (n > 0) {
    ClosedFormInput cf;
    cf.lanes = static_cast<std::int64_t>(n);
    cf.tokens = {tok.data(), 1};
    cf.a = {a.data(), 1};
    cf.b = {b.data(), 1};
    cf.gpus = {gpus.data(), 1};
    cf.redundant = {red.data(), 1};
    closed_form(r, cf, m.data(), s.data());
  }
  std::size_t j = 0;
  for (std::int64_t i = 0; i < in.lanes; ++i) {
    const double L = in.moe_layers[i];
    const bool moe = L > 0;
    const double mi = moe ? m[j] : 0.0, si = moe ? s[j] : 0.0;
    if (moe) ++j;
    const double mn = moe ? L * mi : 0.0;
    const double sdv = std::sqrt(L) * si;
    // (E + R) // max(ep, 1), numpy floor division of floats
    const double slots = in.experts[i] + in.redundant[i], g = np_max(in.ep[i], 1.0);
    const double per = std::floor((slots - std::fmod(slots, g)) / g);
    const double cap = L * ceiling(per, in.top_k[i], in.tokens[i], in.a[i], in.b[i]);
    mean[i] = mn;
    p50[i] = mn;
    p99[i] = moe ? np_min(mn + kZ99 * sdv, np_max(cap, mn)) : 0.0;
  }
}

}  // namespace straggler
}  // namespace qs
