// C++-only tests of the step model's pass: the soft maximum's closed forms and
// its independence of where a value sits in a block, the link model's closed
// forms, a roofline lane worked by hand, and bad input.
#include "core/step.h"

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

void test_roofline_lane_by_hand() {
  const Lane l = roofline_lane();
  std::vector<Column> cols(kNumFields);
  const double* base = &l.d;  // Lane is kNumFields doubles in Field order
  PassInput in;
  in.lanes = 1;
  for (int f = 0; f < kNumFields; ++f) in.fields[f] = Column{base + f, 0};
  const double batch = 16, ctx = 8192, zero = 0.0;
  in.batch = &batch;
  in.context = &ctx;
  in.tokens = &zero;
  in.moe_mean = in.moe_p50 = in.moe_p99 = &zero;
  double t, p50, p99, c, c50, c99, comm;
  step_pass(in, PassOutput{&t, &p50, &p99, &c, &c50, &c99, &comm}, PassDetail{});
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

void test_bad_input() {
  PassInput in;
  in.lanes = -1;
  CHECK(qs::test::throws_invalid([&] { step_pass(in, PassOutput{}, PassDetail{}); }, "lanes = -1"));
  in.lanes = 1;
  CHECK(qs::test::throws_invalid([&] { step_pass(in, PassOutput{}, PassDetail{}); }, "field 'd' is missing"));
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
  test_bad_input();
  return qs::test::report("step_test");
}
