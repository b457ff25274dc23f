// C++-only tests of the step model: the soft maximum's closed forms and its
// independence of where a value sits in a block, the link model's closed forms,
// a roofline lane worked by hand, two-batch overlap and speculative decoding
// against their formulas, the side search against trying every batch, and bad
// input.
#include "core/step.h"

#include "core/side_search.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/test_util.h"

using namespace qs::step;

namespace {

bool close(double a, double b, double rel = 1e-15) { return std::abs(a - b) <= rel * std::max(std::abs(a), std::abs(b)); }

void test_soft_max_closed_forms() {
  CHECK(soft_max(3.0, 0.0, 2.0) == 3.0);                           // one term: the term
  CHECK(close(soft_max(3.0, 4.0, 2.0), 5.0, 4e-16));                // the Euclidean norm
  CHECK(close(soft_max(2.0, 2.0, 3.0), 2.0 * std::cbrt(2.0), 4e-16));  // x·2^(1/p)
  const double inf = std::numeric_limits<double>::infinity();
  CHECK(soft_max(2.0, 5.0, inf) == 5.0);  // p = inf: the maximum (the roofline's max)
  CHECK(soft_max(0.0, 0.0, 2.0) == 0.0);
  CHECK(std::isnan(soft_max(std::nan(""), 1.0, 2.0)));  // numpy's maximum: NaN in, NaN out
  // never below the larger term, never above their sum (p >= 1)
  for (double p : {1.0, 1.5, 2.0, 4.0, 17.0}) {
    for (double x : {1e-9, 0.3, 1.0, 7.0}) {
      const double s = soft_max(x, 1.0, p);
      CHECK(s >= std::max(x, 1.0) && s <= (x + 1.0) * (1 + 1e-15));
    }
  }
}

void test_soft_max_block_is_elementwise() {
  // a value's result is the same alone, at any position of any block, beside any other values
  std::vector<double> x, y, p;
  for (int i = 0; i < 37; ++i) {
    x.push_back(1e-7 * (i + 1) * (i % 5 + 1));
    y.push_back(3e-7 * ((i * 7) % 11 + 1));
    p.push_back(1.0 + 0.37 * (i % 9));
  }
  std::vector<double> all(x.size());
  soft_max_block(static_cast<std::int64_t>(x.size()), x.data(), y.data(), p.data(), all.data());
  for (std::size_t i = 0; i < x.size(); ++i) {
    CHECK(all[i] == soft_max(x[i], y[i], p[i]));
    double out[3];
    const double xs[3] = {y[i], x[i], 1.0}, ys[3] = {x[i], y[i], 2.0}, ps[3] = {2.0, p[i], 3.0};
    soft_max_block(3, xs, ys, ps, out);
    CHECK(out[1] == all[i]);
    // against the scalar formula: within a few ulps (libmvec's vector pow is within 1 ulp of pow)
    const double hi = std::max(x[i], y[i]), r = std::min(x[i], y[i]) / hi;
    CHECK(close(all[i], hi * std::pow(1.0 + std::pow(r, p[i]), 1.0 / p[i]), 1e-14));
  }
}

Lane roofline_lane() {
  Lane l{};
  l.d = 4096; l.wb = 2; l.eb = 2; l.ab = 2;
  l.bw = 2e12; l.flops = 5e14; l.scaleup = 4.5e11; l.internode = 5e10; l.link_eff = 0.8; l.domain = 8;
  l.tp = 2; l.pp = 1; l.dp = 1; l.ep = 1; l.etp = 1; l.attn_dp = 0; l.copies = 1;
  l.layers = 32; l.local = 0; l.window = 0;
  l.attn_params = 4.0 * 4096 * 4096; l.attn_proj_flops = 2.0 * 4.0 * 4096 * 4096; l.attn_ctx_flops = 4.0 * 4096;
  l.kv_layer = 2.0 * 1024 * 2; l.kv_split = 2;
  l.dense_layers = 32; l.ffn_params = 3.0 * 4096 * 14336; l.vd = 128256.0 * 4096;
  l.latency = 1e-5; l.overlap = 0; l.kern = 0;  // roofline
  l.ar_a1 = l.aa_a1 = l.er_a1 = std::nan("");
  return l;
}

// The pass of one lane: (time, p50, p99, compute, compute_p50, compute_p99, comm).
std::vector<double> pass_of(const Lane& l, double batch, double ctx) {
  const Lane* ref = &l;
  const double zero = 0.0;
  std::vector<double> r(7);
  pass_lanes(Lanes{&ref}, 1, &batch, &ctx, &zero, &zero, &zero, &zero,
             PassOutput{&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6]}, PassDetail{}, 0);
  return r;
}

// The step of lanes (time, p50, p99 per lane) with the closed-form straggler of `law`.
std::vector<double> step_of(const std::vector<Lane>& lanes, const std::vector<double>& batch, double ctx,
                            const qs::straggler::Routing* law = nullptr) {
  const auto n = static_cast<std::int64_t>(lanes.size());
  std::vector<const Lane*> refs;
  for (const Lane& l : lanes) refs.push_back(&l);
  std::vector<double> c(lanes.size(), ctx), t(lanes.size()), p50(lanes.size()), p99(lanes.size()), tok(lanes.size());
  Straggler s;
  s.routing = law;
  step_lanes(Lanes{refs.data()}, n, batch.data(), c.data(), s, StepOutput{t.data(), p50.data(), p99.data(), tok.data()},
             PassDetail{}, 0);
  std::vector<double> out;
  for (std::size_t i = 0; i < lanes.size(); ++i) {
    out.push_back(t[i]);
    out.push_back(p50[i]);
    out.push_back(p99[i]);
  }
  return out;
}

void test_roofline_lane_by_hand() {
  const Lane l = roofline_lane();
  const auto r = pass_of(l, 16, 8192);
  const double t = r[0], p50 = r[1], p99 = r[2], c = r[3], c50 = r[4], c99 = r[5], comm = r[6];
  // by hand (docs/model.md): per layer, attention weights/tp + norms + the KV of 16 sequences over 8192
  // tokens split 2 ways, every piece bandwidth-bound at this batch; FFN weights/tp; LM head/tp; two ring
  // all-reduces of 16 x 4096 x 2 B per layer over 2 GPUs
  const double att = (l.attn_params * 2 / 2 + 2 * 4096 * 2 + 16 * 8192 * l.kv_layer / 2) / l.bw;
  const double ffn = l.ffn_params * 2 / 2 / l.bw;
  const double lm = l.vd * 2 / 2 / l.bw;
  const double ar = l.latency + 2.0 * 1 / 2 * (16 * 4096 * 2) / (l.scaleup * l.link_eff);
  CHECK(close(c, 32 * att + 32 * ffn + lm, 1e-14));
  CHECK(close(comm, 2 * 32 * ar, 1e-14));
  CHECK(t == c + comm && p50 == t && p99 == t && c50 == c && c99 == c);
}

void test_link_model_closed_forms() {
  Lane l = roofline_lane();
  CHECK(allreduce_time(l, 1e6, 1) == 0.0);  // one GPU: nothing to reduce
  CHECK(close(allreduce_time(l, 1e6, 8), l.latency + 2.0 * 7 / 8 * 1e6 / (l.scaleup * l.link_eff)));
  CHECK(link_bandwidth(l, 16) == l.internode * l.link_eff);  // beyond the scale-up domain
  // EP all-to-all over 16 GPUs of 8-GPU domains: half the destinations over the network
  CHECK(close(ep_alltoall_time(l, 1e6, 16),
              l.latency + std::max(1e6 * 0.5 / (l.scaleup * l.link_eff), 1e6 * 0.5 / (l.internode * l.link_eff))));
  bool bw = false;
  CHECK(roof_time(1e9, 1e9, 1e12, 1e15, &bw) == 1e-3 && bw);
}

void test_step_without_options_is_the_pass() {
  const Lane l = roofline_lane();
  const auto s = step_of({l}, {16}, 8192);
  const auto r = pass_of(l, 16, 8192);
  CHECK(s[0] == r[0] && s[1] == r[1] && s[2] == r[2]);
}

void test_two_batch_overlap_is_its_formula() {
  // two half-batch microbatches alternate compute C and communication M: T = 2 max(C, M) + min(C, M) / L
  Lane l = roofline_lane();
  l.overlap = 2;
  Lane half = l;
  half.overlap = 0;
  for (const double batch : {2.0, 64.0, 1024.0}) {
    const auto h = pass_of(half, batch / 2, 8192);
    const double C = h[3], M = h[6];
    const auto s = step_of({l}, {batch}, 8192);
    CHECK(s[0] == 2.0 * std::max(C, M) + std::min(C, M) / l.layers);
    CHECK(s[0] < pass_of(half, batch, 8192)[0] * 2.0);  // never worse than two sequential half steps
  }
}

void test_speculative_steps_are_per_accepted_token() {
  CHECK(accepted_tokens(3, 0.0) == 1.0 && accepted_tokens(3, 1.0) == 4.0);
  CHECK(close(accepted_tokens(2, 0.5), 1.75));  // 1 + a + a^2
  CHECK(close(accepted_tokens(1, 0.8), 1.8));
  // the same step, divided by the expected tokens: acceptance 1 gives d + 1 times acceptance 0's throughput
  Lane l = roofline_lane();
  l.draft = 2;
  Lane sure = l, never = l;
  sure.accept = 1.0;
  never.accept = 0.0;
  const auto s = step_of({sure, never}, {32, 32}, 4096);
  CHECK(close(s[3], 3.0 * s[0], 1e-15));
  // and the step with drafts costs more than the plain pass (the verify pass reads as much, plus d draft passes)
  CHECK(s[3] > pass_of(roofline_lane(), 32, 4096)[0]);
}

void test_side_search_equals_every_batch() {
  // one dense roofline plan, three lanes with p99 targets: the answer is the largest batch that meets the
  // target, as trying every batch finds it; a target that one sequence misses leaves the row invalid
  Lane l = roofline_lane();
  const std::int64_t unit = 1, units_max = 700;
  const std::vector<double> slo = {8e-3, 20e-3, 1e-6};
  std::vector<std::int64_t> plan(3, 0), lane = {0, 1, 2}, units(3, units_max);
  std::vector<double> ctx(3, 8192.0);
  qs::side::SearchInput in;
  in.plans = &l;
  in.num_plans = 1;
  in.unit = &unit;
  in.rows = 3;
  in.lanes = 3;
  in.plan = plan.data();
  in.lane = lane.data();
  in.context = ctx.data();
  in.slo = slo.data();
  in.units = units.data();
  std::vector<double> tt(3), tp(3), ts(3), t(3), p(3), s(3);
  std::uint8_t tv[3], b[3], v[3];
  std::vector<std::int64_t> u(3), tb(3), bb(3);
  std::vector<double> ttps(3), tps(3);
  const qs::side::SearchOutput out{tt.data(), tp.data(), ts.data(), tv,          b,          u.data(), t.data(),
                                   p.data(),  s.data(),  v,         tb.data(), ttps.data(), bb.data(), tps.data()};
  qs::side::search(in, out);
  for (int r = 0; r < 3; ++r) {
    std::int64_t want = 0;
    for (std::int64_t batch = 1; batch <= units_max; ++batch) {
      if (pass_of(l, static_cast<double>(batch), 8192)[2] <= slo[static_cast<std::size_t>(r)]) want = batch;
    }
    CHECK(b[r] == 1);  // every target binds at 700 sequences
    if (want == 0) {
      CHECK(v[r] == 0);
      continue;
    }
    const auto j = static_cast<std::size_t>(r);
    CHECK(v[r] == 1 && u[j] == want && bb[j] == want && tb[j] == units_max);
    CHECK(t[j] == pass_of(l, static_cast<double>(want), 8192)[0]);
    CHECK(tps[j] == static_cast<double>(want) / t[j] * l.dp && ttps[j] == static_cast<double>(units_max) / tt[j] * l.dp);
  }
  CHECK(v[2] == 0);
  // bad input is named
  plan[1] = 5;
  CHECK(qs::test::throws_invalid([&] { qs::side::search(in, out); }, "plan[1] = 5: must be in [0, 1)"));
  plan[1] = 0;
  units[0] = 0;
  CHECK(qs::test::throws_invalid([&] { qs::side::search(in, out); }, "units[0] = 0: must be >= 1"));
}

void test_bad_input() {
  StepInput in;
  in.lanes = -1;
  CHECK(qs::test::throws_invalid([&] { step_time(in, StepOutput{}, PassDetail{}); }, "lanes = -1"));
  in.lanes = 1;
  CHECK(qs::test::throws_invalid([&] { step_time(in, StepOutput{}, PassDetail{}); }, "field 'd' is missing"));
  // a MoE lane needs a routing law for its closed-form straggler
  Lane moe = roofline_lane();
  moe.moe_layers = 4;
  moe.experts = 8;
  moe.top_k = 2;
  moe.ep = 2;
  CHECK(qs::test::throws_invalid([&] { step_of({moe}, {8}, 1024); }, "need a routing law"));
}

}  // namespace

int main() {
  static_assert(sizeof(Lane) == sizeof(double) * kNumFields, "Lane holds the fields in Field order");
  CHECK(field_names().size() == static_cast<std::size_t>(kNumFields) && field_names()[0] == "d");
  CHECK(std::string(piece_name(Piece::kPpSend)) == "pp send" && piece_is_link(Piece::kEpAllToAll) &&
        !piece_is_link(Piece::kLmHead));
  test_soft_max_closed_forms();
  test_soft_max_block_is_elementwise();
  test_roofline_lane_by_hand();
  test_link_model_closed_forms();
  test_step_without_options_is_the_pass();
  test_two_batch_overlap_is_its_formula();
  test_speculative_steps_are_per_accepted_token();
  test_side_search_equals_every_batch();
  test_bad_input();
  return qs::test::report("step_test");
}
