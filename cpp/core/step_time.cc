// qsengine core: the decode step over lanes (see step.h and docs/model.md, "The
// decode step", "Routed experts", "Overlap", "Speculative decoding"): the routed
// tokens, the routed experts' straggler, the pass (step.cc), two-batch overlap
// and the speculative draft passes with the draft module's MTP projection.
//
// Every value follows the operation order of the formulas in docs/model.md
// lane by lane, so a lane's result does not depend on the other lanes of a call.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/step.h"
#include "core/step_kernels.h"

namespace qs {
namespace step {
namespace {

using namespace detail;  // NOLINT: the step model's own kernels

// Tokens one expert copy's EP group routes per step: the replica's microbatch
// batch/pp over its dp replicas' share of the expert copies, times the 1 + d
// token rows of a speculative verify pass (docs/model.md, "Routed experts").
inline double routed_tokens(const Lane& l, double batch) { return batch / l.pp * l.dp / l.copies * (1.0 + l.draft); }

// Per-lane scratch of one block.
struct Block {
  std::vector<double> tokens, mean, p50, p99, r[7];
  explicit Block(std::size_t n) : tokens(n), mean(n), p50(n), p99(n) {
    for (auto& v : r) v.resize(n);
  }
  PassOutput out() { return {r[0].data(), r[1].data(), r[2].data(), r[3].data(), r[4].data(), r[5].data(), r[6].data()}; }
};

// The straggler (mean, p50, p99) of lanes `l` at `tokens`: given (where a lane is MoE) or the closed form.
void straggler_of(const Lane* l, std::int64_t n, const double* tokens, const Straggler& s, bool given, Block& b,
                  const std::int64_t* rows = nullptr) {
  bool any_moe = false;
  for (std::int64_t i = 0; i < n; ++i) any_moe = any_moe || l[i].moe_layers > 0;
  if (given) {  // rows: the lanes' positions in the given arrays
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t at = rows == nullptr ? i : rows[i];
      const bool moe = l[i].moe_layers > 0;
      b.mean[i] = moe ? s.mean[at] : 0.0;
      b.p50[i] = moe ? s.p50[at] : 0.0;
      b.p99[i] = moe ? s.p99[at] : 0.0;
    }
    return;
  }
  if (!any_moe) {
    std::fill(b.mean.begin(), b.mean.begin() + n, 0.0);
    std::fill(b.p50.begin(), b.p50.begin() + n, 0.0);
    std::fill(b.p99.begin(), b.p99.begin() + n, 0.0);
    return;
  }
  if (s.routing == nullptr) throw InvalidArgument("step_time: MoE lanes need a routing law for the closed-form straggler");
  std::vector<double> cols[7];
  for (auto& c : cols) c.resize(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const auto j = static_cast<std::size_t>(i);
    cols[0][j] = l[i].moe_layers;
    cols[1][j] = l[i].experts;
    cols[2][j] = l[i].top_k;
    cols[3][j] = l[i].ep;
    cols[4][j] = l[i].redundant;
    cols[5][j] = l[i].moe_a;
    cols[6][j] = l[i].moe_b;
  }
  straggler::QuantilesInput in;
  in.lanes = n;
  in.tokens = {tokens, 1};
  in.moe_layers = {cols[0].data(), 1};
  in.experts = {cols[1].data(), 1};
  in.top_k = {cols[2].data(), 1};
  in.ep = {cols[3].data(), 1};
  in.redundant = {cols[4].data(), 1};
  in.a = {cols[5].data(), 1};
  in.b = {cols[6].data(), 1};
  straggler::quantiles(*s.routing, in, b.mean.data(), b.p50.data(), b.p99.data());
}

PassDetail offset(const PassDetail& d, std::int64_t by) {
  if (d.time == nullptr) return d;
  return PassDetail{d.time + by, d.bytes + by, d.flops + by, d.count + by, d.present + by, d.bandwidth_bound + by};
}

// One block (n <= kBlockLanes lanes) of step_lanes.
void step_block(const Lane* L, std::int64_t n, const double* batch, const double* ctx, const Straggler& s,
                const StepOutput& out, const PassDetail& detail, std::int64_t stride) {
  const auto un = static_cast<std::size_t>(n);
  const bool want_detail = detail.time != nullptr;
  const bool given = s.mean != nullptr;
  // the (verify) pass
  Block v(un);
  for (std::int64_t i = 0; i < n; ++i) v.tokens[static_cast<std::size_t>(i)] = routed_tokens(L[i], batch[i]);
  straggler_of(L, n, v.tokens.data(), s, given, v);
  pass_lanes(L, n, batch, ctx, v.tokens.data(), v.mean.data(), v.p50.data(), v.p99.data(), v.out(), detail, stride);
  double* time = v.r[0].data();
  double* p50 = v.r[1].data();
  double* p99 = v.r[2].data();

  // Two-batch overlap (SGLang TBO, https://lmsys.org/blog/2025-05-05-large-scale-ep/; DeepSeek's dual micro-batch
  // overlap, https://github.com/deepseek-ai/profile-data): two microbatches of B/2 alternate between compute C and
  // communication M of one half-batch step: T = 2 max(C, M) + min(C, M)/L; quantiles take C at the quantile. The
  // Monte Carlo's straggler is already of one microbatch (it runs at half the tokens).
  std::vector<std::int64_t> rows;
  for (std::int64_t i = 0; i < n; ++i) {
    if (L[i].overlap == 2) rows.push_back(i);
  }
  if (!rows.empty()) {
    const auto m = static_cast<std::int64_t>(rows.size());
    std::vector<Lane> sub(rows.size());
    std::vector<double> hb(rows.size()), hc(rows.size());
    Block h(rows.size());
    for (std::size_t j = 0; j < rows.size(); ++j) {
      sub[j] = L[rows[j]];
      sub[j].overlap = 0.0;
      hb[j] = batch[rows[j]] / 2.0;
      hc[j] = ctx[rows[j]];
      h.tokens[j] = routed_tokens(sub[j], hb[j]);
    }
    straggler_of(sub.data(), m, h.tokens.data(), s, given, h, rows.data());
    pass_lanes(sub.data(), m, hb.data(), hc.data(), h.tokens.data(), h.mean.data(), h.p50.data(), h.p99.data(),
               h.out(), PassDetail{}, 0);
    for (std::size_t j = 0; j < rows.size(); ++j) {
      const double comm = h.r[6][j], layers = sub[j].layers;
      const double c[3] = {h.r[3][j], h.r[4][j], h.r[5][j]};
      double* dst[3] = {time, p50, p99};
      for (int q = 0; q < 3; ++q) dst[q][rows[j]] = 2.0 * np_max(c[q], comm) + np_min(c[q], comm) / layers;
    }
  }

  // Speculative decoding: the verify pass plus d passes of the one-block draft module (its own one-layer KV cache,
  // the shared LM head, one layer's collectives, no pipeline sends, no two-batch overlap; DeepSeek-V3 report
  // arXiv:2412.19437 §2.2) and its 2d x d projection of [norm(h); norm(emb)], at the microbatch B/pp, its routed
  // experts by the closed form; every value per accepted token. With detail every lane's draft pieces are
  // computed (0 where d = 0), so the pieces sum to the time on every lane.
  rows.clear();
  for (std::int64_t i = 0; i < n; ++i) {
    if (L[i].draft > 0 || want_detail) rows.push_back(i);
  }
  std::vector<double> acc(un, 1.0);
  if (!rows.empty()) {
    const auto m = static_cast<std::int64_t>(rows.size());
    std::vector<Lane> q(rows.size());
    std::vector<double> micro(rows.size()), qc(rows.size());
    Block d(rows.size());
    for (std::size_t j = 0; j < rows.size(); ++j) {
      const Lane& l = L[rows[j]];
      const bool is_moe = l.moe_layers > 0;
      q[j] = l;
      q[j].layers = 1.0;
      q[j].local = 0.0;
      q[j].window = 0.0;
      q[j].pp = 1.0;
      q[j].draft = 0.0;
      q[j].overlap = l.overlap == 2 ? 0.0 : l.overlap;
      q[j].moe_layers = is_moe ? 1.0 : 0.0;
      q[j].dense_layers = is_moe ? 0.0 : 1.0;
      micro[j] = batch[rows[j]] / l.pp;
      qc[j] = ctx[rows[j]];
      d.tokens[j] = routed_tokens(q[j], micro[j]);
    }
    straggler_of(q.data(), m, d.tokens.data(), s, false, d);
    // the draft pieces go to rows kNumPieces.. of the detail; the lanes are sparse there only without detail
    PassDetail dd;
    std::vector<std::int64_t> dense_rows;
    if (want_detail) dd = offset(detail, static_cast<std::int64_t>(kNumPieces) * stride);
    pass_lanes(q.data(), m, micro.data(), qc.data(), d.tokens.data(), d.mean.data(), d.p50.data(), d.p99.data(),
               d.out(), dd, stride);
    // the MTP projection: a GEMM of `seqs` rows, n = d/shard, k = 2d (calibrated), or its roofline
    SoftMaxTape sm;
    std::vector<double> proj_t(rows.size()), proj_w(rows.size()), proj_fl(rows.size());
    std::vector<std::uint8_t> proj_bw(rows.size());
    for (int pass = 0; pass < 2; ++pass) {
      for (std::size_t j = 0; j < rows.size(); ++j) {
        const Lane& l = L[rows[j]];
        const double shard = l.attn_dp > 0 ? 1.0 : l.tp;
        const double seqs = l.attn_dp > 0 ? micro[j] / l.tp : micro[j];
        const double proj = 2.0 * l.d * l.d;
        const double w = proj * l.wb / shard;
        const double fl = 2.0 * seqs * proj / shard;
        bool b_r = false;
        const double t_r = roof_time(w, fl, l.bw, l.flops, &b_r);
        double tb = 0.0, tf = 0.0;
        const double t_c = gemm_impl(l, seqs, l.d / shard, 2.0 * l.d, &tb, &tf, sm);
        if (pass == 0) continue;
        const bool cal = l.kern > 0;
        proj_t[j] = cal ? t_c : t_r;
        proj_w[j] = w;
        proj_fl[j] = fl;
        proj_bw[j] = (cal ? tb >= tf : b_r) ? 1 : 0;
      }
      if (pass == 0) sm.evaluate_and_replay();
    }
    for (std::size_t j = 0; j < rows.size(); ++j) {
      const std::int64_t i = rows[j];
      const Lane& l = L[i];
      const double t = proj_t[j];
      const double dv[3] = {d.r[0][j] + t, d.r[1][j] + t, d.r[2][j] + t};  // one draft pass
      if (l.draft > 0) {
        const double a = accepted_tokens(l.draft, l.accept);
        acc[static_cast<std::size_t>(i)] = a;
        time[i] = (time[i] + l.draft * dv[0]) / a;
        p50[i] = (p50[i] + l.draft * dv[1]) / a;
        p99[i] = (p99[i] + l.draft * dv[2]) / a;
      }
      if (!want_detail) continue;
      const std::int64_t at = static_cast<std::int64_t>(2 * kNumPieces) * stride + i;
      detail.time[at] = t;
      detail.bytes[at] = proj_w[j];
      detail.flops[at] = proj_fl[j];
      detail.count[at] = 1.0;
      detail.present[at] = 1;
      detail.bandwidth_bound[at] = proj_bw[j];
    }
  }
  if (want_detail) {  // per accepted token: the verify pieces / acc, the draft pieces x d / acc
    for (std::int64_t i = 0; i < n; ++i) {
      const double a = acc[static_cast<std::size_t>(i)], dr = L[i].draft;
      const bool spec = dr > 0;
      for (int j = 0; j < kNumPieces; ++j) {
        const std::int64_t at = j * stride + i;
        detail.time[at] = detail.time[at] / a;
        detail.bytes[at] = detail.bytes[at] / a;
        detail.flops[at] = detail.flops[at] / a;
      }
      for (int j = kNumPieces; j < kNumStepPieces; ++j) {
        const std::int64_t at = j * stride + i;
        detail.time[at] = detail.time[at] * dr / a;
        detail.bytes[at] = detail.bytes[at] * dr / a;
        detail.flops[at] = detail.flops[at] * dr / a;
        detail.count[at] = detail.count[at] * dr;
        detail.present[at] = (detail.present[at] != 0 && spec) ? 1 : 0;
      }
    }
  }
  for (std::int64_t i = 0; i < n; ++i) {
    const auto j = static_cast<std::size_t>(i);
    out.time[i] = time[i];
    out.p50[i] = p50[i];
    out.p99[i] = p99[i];
    out.tokens[i] = L[i].moe_layers > 0 ? v.tokens[j] : 0.0;
  }
}

}  // namespace

std::string step_piece_name(int j) {
  if (j < 0 || j >= kNumStepPieces) return "?";
  if (j < kNumPieces) return piece_name(static_cast<Piece>(j));
  if (j < 2 * kNumPieces) return std::string("draft: ") + piece_name(static_cast<Piece>(j - kNumPieces));
  return "draft: mtp projection";
}

bool step_piece_is_link(int j) {
  if (j < kNumPieces) return piece_is_link(static_cast<Piece>(j));
  if (j < 2 * kNumPieces) return piece_is_link(static_cast<Piece>(j - kNumPieces));
  return false;
}

double accepted_tokens(double draft, double accept) {
  return accept >= 1.0 ? draft + 1.0 : (1.0 - std::pow(accept, draft + 1.0)) / (1.0 - accept);
}

void step_lanes(const Lane* lanes, std::int64_t n, const double* batch, const double* context,
                const Straggler& straggler, const StepOutput& out, const PassDetail& detail,
                std::int64_t detail_stride) {
  for (std::int64_t lo = 0; lo < n; lo += kBlockLanes) {
    const std::int64_t hi = std::min(n, lo + kBlockLanes);
    Straggler s = straggler;
    if (s.mean != nullptr) s = Straggler{s.routing, s.mean + lo, s.p50 + lo, s.p99 + lo};
    step_block(lanes + lo, hi - lo, batch + lo, context + lo, s,
               StepOutput{out.time + lo, out.p50 + lo, out.p99 + lo, out.tokens + lo}, offset(detail, lo),
               detail_stride);
  }
}

void step_time(const StepInput& in, const StepOutput& out, const PassDetail& detail) {
  if (in.lanes < 0) throw InvalidArgument("step_time: lanes = " + std::to_string(in.lanes) + ": must be >= 0");
  if (in.lanes == 0) return;
  check_columns(in.fields, in.index, "step_time");
  if (!in.batch || !in.context || !out.time || !out.p50 || !out.p99 || !out.tokens) {
    throw InvalidArgument("step_time: a per-lane input or output array is missing");
  }
  const Straggler& s = in.straggler;
  if ((s.mean == nullptr) != (s.p50 == nullptr) || (s.mean == nullptr) != (s.p99 == nullptr)) {
    throw InvalidArgument("step_time: a given straggler needs its mean, p50 and p99");
  }
  std::vector<Lane> block(static_cast<std::size_t>(std::min(in.lanes, kBlockLanes)));
  for (std::int64_t lo = 0; lo < in.lanes; lo += kBlockLanes) {
    const std::int64_t hi = std::min(in.lanes, lo + kBlockLanes);
    gather_lanes(in.fields, in.index, lo, hi, block.data());
    Straggler sb = s;
    if (s.mean != nullptr) sb = Straggler{s.routing, s.mean + lo, s.p50 + lo, s.p99 + lo};
    step_block(block.data(), hi - lo, in.batch + lo, in.context + lo, sb,
               StepOutput{out.time + lo, out.p50 + lo, out.p99 + lo, out.tokens + lo}, offset(detail, lo),
               in.lanes);
  }
}

}  // namespace step
}  // namespace qs
