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

// Per-lane scratch of one block of lanes.
struct Block {
  std::vector<double> tokens, mean, p50, p99, r[7];
  Block() : tokens(kBlockLanes), mean(kBlockLanes), p50(kBlockLanes), p99(kBlockLanes) {
    for (auto& v : r) v.resize(kBlockLanes);
  }
  PassOutput out() { return {r[0].data(), r[1].data(), r[2].data(), r[3].data(), r[4].data(), r[5].data(), r[6].data()}; }
};

// A thread's scratch of step_block, allocated once: the verify pass (v), the two-batch-overlap half pass (h),
// the draft pass (d), the straggler's columns, the derived lanes and their pointers.
struct Scratch {
  Block v, h, d;
  std::vector<double> cols[7], batch, ctx, acc, proj_t, proj_w, proj_fl;
  std::vector<std::uint8_t> proj_bw;
  std::vector<double> dt, db, df, dc;  // the draft pass's detail (pieces x kBlockLanes), with detail only
  std::vector<std::uint8_t> dp, dw;
  std::vector<std::int64_t> rows;
  std::vector<Lane> derived;
  std::vector<const Lane*> refs;
  SoftMaxTape tape;
  Scratch() {
    for (auto& c : cols) c.resize(kBlockLanes);
    for (auto* v : {&batch, &ctx, &acc, &proj_t, &proj_w, &proj_fl}) v->resize(kBlockLanes);
    proj_bw.resize(kBlockLanes);
    rows.reserve(kBlockLanes);
    derived.resize(kBlockLanes);
    refs.resize(kBlockLanes);
    for (std::size_t j = 0; j < derived.size(); ++j) refs[j] = &derived[j];
  }
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// The straggler (mean, p50, p99) of lanes `l` at `tokens`: given (where a lane is MoE) or the closed form.
void straggler_of(Lanes l, std::int64_t n, const double* tokens, const Straggler& s, bool given, Block& b,
                  std::vector<double> (&cols)[7], const std::int64_t* rows = nullptr) {
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
void step_block(Lanes L, std::int64_t n, const double* batch, const double* ctx, const Straggler& s,
                const StepOutput& out, const PassDetail& detail, std::int64_t stride, Scratch& w) {
  const bool want_detail = detail.time != nullptr;
  const bool given = s.mean != nullptr;
  // the (verify) pass
  Block& v = w.v;
  for (std::int64_t i = 0; i < n; ++i) v.tokens[static_cast<std::size_t>(i)] = routed_tokens(L[i], batch[i]);
  straggler_of(L, n, v.tokens.data(), s, given, v, w.cols);
  pass_lanes(L, n, batch, ctx, v.tokens.data(), v.mean.data(), v.p50.data(), v.p99.data(), v.out(), detail, stride);
  double* time = v.r[0].data();
  double* p50 = v.r[1].data();
  double* p99 = v.r[2].data();
  const Lanes derived{w.refs.data()};  // lanes derived from L's (their FFN parameters resolved)

  // Two-batch overlap (SGLang TBO, https://lmsys.org/blog/2025-05-05-large-scale-ep/; DeepSeek's dual micro-batch
  // overlap, https://github.com/deepseek-ai/profile-data): two microbatches of B/2 alternate between compute C and
  // communication M of one half-batch step: T = 2 max(C, M) + min(C, M)/L; quantiles take C at the quantile. The
  // Monte Carlo's straggler is already of one microbatch (it runs at half the tokens).
  auto& rows = w.rows;
  rows.clear();
  for (std::int64_t i = 0; i < n; ++i) {
    if (L[i].overlap == 2) rows.push_back(i);
  }
  if (!rows.empty()) {
    const auto m = static_cast<std::int64_t>(rows.size());
    Block& h = w.h;
    for (std::size_t j = 0; j < rows.size(); ++j) {
      w.derived[j] = L[rows[j]];
      w.derived[j].ffn_params = L.ffn_params(rows[j]);
      w.derived[j].overlap = 0.0;
      w.batch[j] = batch[rows[j]] / 2.0;
      w.ctx[j] = ctx[rows[j]];
      h.tokens[j] = routed_tokens(w.derived[j], w.batch[j]);
    }
    straggler_of(derived, m, h.tokens.data(), s, given, h, w.cols, rows.data());
    pass_lanes(derived, m, w.batch.data(), w.ctx.data(), h.tokens.data(), h.mean.data(), h.p50.data(),
               h.p99.data(), h.out(), PassDetail{}, 0);
    for (std::size_t j = 0; j < rows.size(); ++j) {
      const double comm = h.r[6][j], layers = w.derived[j].layers;
      const double c[3] = {h.r[3][j], h.r[4][j], h.r[5][j]};
      double* dst[3] = {time, p50, p99};
      for (int q = 0; q < 3; ++q) dst[q][rows[j]] = 2.0 * np_max(c[q], comm) + np_min(c[q], comm) / layers;
    }
  }

  // Speculative decoding: the verify pass plus d passes of the one-block draft module (its own one-layer KV cache,
  // the shared LM head, one layer's collectives, no pipeline sends, no two-batch overlap; DeepSeek-V3 report
  // arXiv:2412.19437 §2.2) and its 2d x d projection of [norm(h); norm(emb)], at the microbatch B/pp, its routed
  // experts by the closed form; every value per accepted token. With detail, a lane without drafts reports its
  // draft pieces absent and 0, so the pieces sum to the time on every lane.
  rows.clear();
  for (std::int64_t i = 0; i < n; ++i) {
    if (L[i].draft > 0) {
      rows.push_back(i);
    } else if (want_detail) {
      for (int j = kNumPieces; j < kNumStepPieces; ++j) {
        const std::int64_t at = j * stride + i;
        detail.time[at] = detail.bytes[at] = detail.flops[at] = detail.count[at] = 0.0;
        detail.present[at] = detail.bandwidth_bound[at] = 0;
      }
    }
  }
  double* acc = w.acc.data();
  std::fill(acc, acc + n, 1.0);
  if (!rows.empty()) {
    const auto m = static_cast<std::int64_t>(rows.size());
    Block& d = w.d;
    double* micro = w.batch.data();
    for (std::size_t j = 0; j < rows.size(); ++j) {
      const Lane& l = L[rows[j]];
      const bool is_moe = l.moe_layers > 0;
      Lane& q = w.derived[j];
      q = l;
      q.ffn_params = L.ffn_params(rows[j]);
      q.layers = 1.0;
      q.local = 0.0;
      q.window = 0.0;
      q.pp = 1.0;
      q.draft = 0.0;
      q.overlap = l.overlap == 2 ? 0.0 : l.overlap;
      q.moe_layers = is_moe ? 1.0 : 0.0;
      q.dense_layers = is_moe ? 0.0 : 1.0;
      micro[j] = batch[rows[j]] / l.pp;
      w.ctx[j] = ctx[rows[j]];
      d.tokens[j] = routed_tokens(q, micro[j]);
    }
    straggler_of(derived, m, d.tokens.data(), s, false, d, w.cols);
    // the draft pieces go to rows kNumPieces.. of the detail, through a dense scratch (rows are sparse)
    PassDetail dd;
    if (want_detail) {
      for (auto* a : {&w.dt, &w.db, &w.df, &w.dc}) a->resize(static_cast<std::size_t>(kNumPieces) * kBlockLanes);
      w.dp.resize(static_cast<std::size_t>(kNumPieces) * kBlockLanes);
      w.dw.resize(static_cast<std::size_t>(kNumPieces) * kBlockLanes);
      dd = PassDetail{w.dt.data(), w.db.data(), w.df.data(), w.dc.data(), w.dp.data(), w.dw.data()};
    }
    pass_lanes(derived, m, micro, w.ctx.data(), d.tokens.data(), d.mean.data(), d.p50.data(), d.p99.data(),
               d.out(), dd, kBlockLanes);
    if (want_detail) {
      for (std::size_t j = 0; j < rows.size(); ++j) {
        for (int p = 0; p < kNumPieces; ++p) {
          const std::size_t from = static_cast<std::size_t>(p) * kBlockLanes + j;
          const std::int64_t at = (kNumPieces + p) * stride + rows[j];
          detail.time[at] = w.dt[from];
          detail.bytes[at] = w.db[from];
          detail.flops[at] = w.df[from];
          detail.count[at] = w.dc[from];
          detail.present[at] = w.dp[from];
          detail.bandwidth_bound[at] = w.dw[from];
        }
      }
    }
    // the MTP projection: a GEMM of `seqs` rows, n = d/shard, k = 2d (calibrated), or its roofline
    SoftMaxTape& sm = w.tape;
    sm.reset();
    for (int pass = 0; pass < 2; ++pass) {
      for (std::size_t j = 0; j < rows.size(); ++j) {
        const Lane& l = L[rows[j]];
        const double shard = l.attn_dp > 0 ? 1.0 : l.tp;
        const double seqs = l.attn_dp > 0 ? micro[j] / l.tp : micro[j];
        const double proj = 2.0 * l.d * l.d;
        const double pw = proj * l.wb / shard;
        const double fl = 2.0 * seqs * proj / shard;
        bool b_r = false;
        const double t_r = roof_time(pw, fl, l.bw, l.flops, &b_r);
        double tb = 0.0, tf = 0.0;
        const double t_c = gemm_impl(l, seqs, l.d / shard, 2.0 * l.d, &tb, &tf, sm);
        if (pass == 0) continue;
        const bool cal = l.kern > 0;
        w.proj_t[j] = cal ? t_c : t_r;
        w.proj_w[j] = pw;
        w.proj_fl[j] = fl;
        w.proj_bw[j] = (cal ? tb >= tf : b_r) ? 1 : 0;
      }
      if (pass == 0) sm.evaluate_and_replay();
    }
    for (std::size_t j = 0; j < rows.size(); ++j) {
      const std::int64_t i = rows[j];
      const Lane& l = L[i];
      const double t = w.proj_t[j];
      const double dv[3] = {d.r[0][j] + t, d.r[1][j] + t, d.r[2][j] + t};  // one draft pass
      if (l.draft > 0) {
        const double a = accepted_tokens(l.draft, l.accept);
        acc[i] = a;
        time[i] = (time[i] + l.draft * dv[0]) / a;
        p50[i] = (p50[i] + l.draft * dv[1]) / a;
        p99[i] = (p99[i] + l.draft * dv[2]) / a;
      }
      if (!want_detail) continue;
      const std::int64_t at = static_cast<std::int64_t>(2 * kNumPieces) * stride + i;
      detail.time[at] = t;
      detail.bytes[at] = w.proj_w[j];
      detail.flops[at] = w.proj_fl[j];
      detail.count[at] = 1.0;
      detail.present[at] = 1;
      detail.bandwidth_bound[at] = w.proj_bw[j];
    }
  }
  if (want_detail) {  // per accepted token: the verify pieces / acc, the draft pieces x d / acc
    for (std::int64_t i = 0; i < n; ++i) {
      const double a = acc[i], dr = L[i].draft;
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
    out.time[i] = time[i];
    out.p50[i] = p50[i];
    out.p99[i] = p99[i];
    out.tokens[i] = L[i].moe_layers > 0 ? v.tokens[static_cast<std::size_t>(i)] : 0.0;
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

void step_lanes(Lanes lanes, std::int64_t n, const double* batch, const double* context,
                const Straggler& straggler, const StepOutput& out, const PassDetail& detail,
                std::int64_t detail_stride) {
  Scratch& w = scratch();
  for (std::int64_t lo = 0; lo < n; lo += kBlockLanes) {
    const std::int64_t hi = std::min(n, lo + kBlockLanes);
    Straggler s = straggler;
    if (s.mean != nullptr) s = Straggler{s.routing, s.mean + lo, s.p50 + lo, s.p99 + lo};
    step_block(lanes.from(lo), hi - lo, batch + lo, context + lo, s,
               StepOutput{out.time + lo, out.p50 + lo, out.p99 + lo, out.tokens + lo}, offset(detail, lo),
               detail_stride, w);
  }
}

void step_time(const StepInput& in, const StepOutput& out, const PassDetail& detail) {
  if (in.lanes < 0) throw InvalidArgument("step_time: lanes = " + std::to_string(in.lanes) + ": must be >= 0");
  if (in.lanes == 0) return;
  check_columns(in.fields, "step_time");
  if (!in.batch || !in.context || !out.time || !out.p50 || !out.p99 || !out.tokens) {
    throw InvalidArgument("step_time: a per-lane input or output array is missing");
  }
  const Straggler& s = in.straggler;
  if ((s.mean == nullptr) != (s.p50 == nullptr) || (s.mean == nullptr) != (s.p99 == nullptr)) {
    throw InvalidArgument("step_time: a given straggler needs its mean, p50 and p99");
  }
  std::vector<Lane> block(static_cast<std::size_t>(std::min(in.lanes, kBlockLanes)));
  std::vector<const Lane*> refs(block.size());
  for (std::size_t j = 0; j < block.size(); ++j) refs[j] = &block[j];
  Scratch& w = scratch();
  for (std::int64_t lo = 0; lo < in.lanes; lo += kBlockLanes) {
    const std::int64_t hi = std::min(in.lanes, lo + kBlockLanes);
    gather_lanes(in.fields, lo, hi, block.data());
    Straggler sb = s;
    if (s.mean != nullptr) sb = Straggler{s.routing, s.mean + lo, s.p50 + lo, s.p99 + lo};
    step_block(Lanes{refs.data()}, hi - lo, in.batch + lo, in.context + lo, sb,
               StepOutput{out.time + lo, out.p50 + lo, out.p99 + lo, out.tokens + lo}, offset(detail, lo), in.lanes,
               w);
  }
}

}  // namespace step
}  // namespace qs
