// Tests of the packing core on its own (no Python). Run with ctest.
#include "core/packing.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/test_util.h"

using namespace qs::packing;
using qs::test::throws_invalid;


// A small GQA MoE: 8 layers (first 2 dense), 16 experts, 8 heads / 2 KV heads.
static MemoryDesc toy_moe() {
  MemoryDesc d;
  d.attention_bytes = 4e6;
  d.dense_ffn_bytes = 12e6;
  d.expert_bytes = 1e6;
  d.shared_expert_bytes = 2e6;
  d.router_bytes = 1e4;
  d.norm_bytes_per_layer = 1e3;
  d.final_norm_bytes = 5e2;
  d.embedding_bytes = 8e6;
  d.lm_head_bytes = 8e6;
  for (int i = 0; i < 8; ++i) {
    d.layer_is_moe.push_back(i >= 2);
    d.layer_has_kv.push_back(1);
    d.layer_is_local.push_back(i % 2);
  }
  d.local_window = 128;
  d.routed_experts = 16;
  d.moe_intermediate = 256;
  d.num_heads = 8;
  d.num_kv_heads = 2;
  d.kv_bytes_per_token_per_layer = 1024;
  d.hbm_bytes = 2e9;
  d.usable_fraction = 0.9;
  d.reserve_bytes = 1e8;
  return d;
}

static double model_bytes(const MemoryDesc& d, int c) {
  double moe = 0, dense = 0, L = static_cast<double>(d.num_layers());
  for (int v : d.layer_is_moe) (v ? moe : dense) += 1;
  switch (c) {
    case kAttention: return L * d.attention_bytes;
    case kDenseFfn: return dense * d.dense_ffn_bytes;
    case kRoutedExperts: return moe * d.routed_experts * d.expert_bytes;
    case kSharedExperts: return moe * d.shared_expert_bytes;
    case kRouter: return moe * d.router_bytes;
    case kNorms: return L * d.norm_bytes_per_layer + d.final_norm_bytes;
    case kEmbedding: return d.embedding_bytes;
    default: return d.lm_head_bytes;
  }
}

static void test_conservation_and_capacity() {
  MemoryDesc d = toy_moe();
  for (std::int64_t g : {1, 2, 4, 8, 12}) {
    for (const PlanDesc& p : enumerate_plans(d, g)) {
      CHECK(plan_violation(d, p, g).empty());
      PackResult r = pack(d, p, g, 4096, nullptr, nullptr);
      const double copies_ne = static_cast<double>(p.attn_dp ? p.dp * p.tp : p.dp);
      const double copies_e = static_cast<double>(p.dp * p.tp / (p.ep * p.expert_tp()));
      for (int c = 0; c < kNumComponents; ++c) {
        double placed = 0;
        for (double v : r.weights[c]) placed += v;
        const double slots = static_cast<double>(d.routed_experts + p.redundant) / static_cast<double>(d.routed_experts);
        const double want = model_bytes(d, c) * (c == kRoutedExperts ? copies_e * slots : copies_ne);
        CHECK(std::fabs(placed - want) <= 1e-9 * want + 1e-9);
      }
      for (std::int64_t i = 0; i < g; ++i) {
        double used = r.replica_bytes[i] + r.kv_bytes[i];
        for (int c = 0; c < kNumComponents; ++c) used += r.weights[c][i];
        if (r.overflow[i] == 0) CHECK(used <= r.usable);
        CHECK(std::fabs(used + r.free[i] - r.overflow[i] + r.reserve[i] + r.unusable[i] - r.capacity) <= 1e-3);
      }
      PlanEval e = evaluate_plan(d, p, g, 4096);
      CHECK(e.cluster_batch == r.cluster_batch);
      CHECK(e.feasible == r.feasible);
    }
  }
}

static void test_validation() {
  MemoryDesc d = toy_moe();
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{3, 1, 1, 1, 0, false}, 3); },
                       "plan.tp=3: must divide num_heads (8)"));
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{2, 1, 1, 1, 0, false}, 4); },
                       "plan.tp*pp*dp=2: must equal the cluster's GPUs (4)"));
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{1, 1, 3, 3, 0, false}, 3); },
                       "plan.ep=3: must divide routed_experts (16)"));
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{1, 9, 1, 1, 0, false}, 9); }, "model's layers (8)"));
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{1, 1, 2, 4, 0, false}, 2); },
                       "ep x etp (4 x 1) must divide dp x tp (2 x 1)"));
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{1, std::int64_t{1} << 40, std::int64_t{1} << 40, 1, 0, false}, 2); },
                       "tp*pp*dp=1*1099511627776*1099511627776: must be <= 2^53"));
  CHECK(plan_shape_rule(PlanDesc{4, 1, 1, 8, 0, false}) == PlanRule::kStageExperts);
  CHECK(plan_shape_rule(PlanDesc{0, 1, 1, 1, 0, false}) == PlanRule::kDegrees);
  CHECK(plan_shape_rule(PlanDesc{4, 1, 2, 8, 1, false}) == PlanRule::kOk);
  CHECK(throws_invalid([&] { pack(d, PlanDesc{}, 1, 0, nullptr, nullptr); }, "context=0"));
  MemoryDesc bad = d;
  bad.attention_bytes = std::nan("");
  CHECK(throws_invalid([&] { validate_desc(bad); }, "attention_bytes"));
  ReplicaRequest rr;
  rr.popularity.assign(16, 0.0);
  rr.replicas = 1;
  CHECK(throws_invalid([&] { pack(d, PlanDesc{1, 1, 4, 4, 1, false}, 4, 64, &rr, nullptr); }, "no mass"));
  rr.popularity.assign(16, 1.0);
  rr.replicas = 1000000;
  CHECK(throws_invalid([&] { pack(d, PlanDesc{1, 1, 4, 4, 1, false}, 4, 64, &rr, nullptr); }, "replicas=1000000"));
  // refused before any O(replicas) work (this used to run 2^62 heap steps)
  rr.replicas = std::int64_t{1} << 62;
  CHECK(throws_invalid([&] { pack(d, PlanDesc{1, 1, 4, 4, 1, false}, 4, 64, &rr, nullptr); }, "do not fit in free HBM"));
}

static void test_floor_fit() {
  CHECK(floor_fit(10.0, 3.0) == 3);
  CHECK(floor_fit(9.0, 3.0) == 3);
  CHECK(floor_fit(-1.0, 3.0) == 0);
  CHECK(floor_fit(0.3, 0.1) * 0.1 <= 0.3);
}

static void test_replicas_reduce_imbalance() {
  MemoryDesc d = toy_moe();
  ReplicaRequest rr;
  for (int e = 0; e < 16; ++e) rr.popularity.push_back(std::pow(e + 1.0, -1.2));
  rr.replicas = 4;
  PackResult r = pack(d, PlanDesc{1, 1, 4, 4, 1, false}, 4, 1024, &rr, nullptr);
  CHECK(r.has_replicas);
  CHECK(r.imbalance_after < r.imbalance_before);
  CHECK(r.replica_expert.size() == 4);
  CHECK(r.cluster_batch <= r.cluster_batch_without_replicas);
}

static void test_threads_and_sampling() {
  MemoryDesc d = toy_moe();
  auto a = search_plans(d, 1, 48, 2048, 1);
  auto b = search_plans(d, 1, 48, 2048, 3);
  CHECK(a.size() == b.size());
  bool same = a.size() == b.size();
  for (std::size_t i = 0; same && i < a.size(); ++i) {
    same = a[i].cluster_batch == b[i].cluster_batch && a[i].plan.label() == b[i].plan.label();
  }
  CHECK(same);
  std::vector<std::int64_t> vals{100, 1000, 10000};
  std::vector<double> w{1, 0, 3};
  auto s1 = sample_lengths(vals, w, 200000, 1, 2, 1);
  auto s2 = sample_lengths(vals, w, 200000, 1, 2, 4);
  CHECK(s1 == s2);
  double n10k = 0;
  for (auto v : s1) {
    CHECK(v != 1000);
    n10k += v == 10000;
  }
  CHECK(std::fabs(n10k / 200000 - 0.75) < 0.01);
  CHECK(throws_invalid([&] { sample_lengths(vals, {0, 0, 0}, 10, 1, 2, 1); }, "no mass"));
}

static void test_paged() {
  MemoryDesc d = toy_moe();
  PagedRequest pr;
  pr.block_size = 16;
  pr.lengths = sample_lengths({100, 1000, 3000}, {1, 1, 1}, 100000, 7, 8, 2);
  PackResult r = pack(d, PlanDesc{2, 1, 2, 4, 1, false}, 4, 1024, nullptr, &pr);
  CHECK(r.placed + r.rejected == 100000);
  CHECK(r.placed > 0);
  CHECK(r.fragmentation_bytes > 0 && r.fragmentation_bytes < r.kv_placed_bytes);
  for (std::int64_t g = 0; g < 4; ++g) CHECK(r.free[g] >= 0 && r.overflow[g] == 0);
}

static void test_min_gpus() {
  MemoryDesc d = toy_moe();
  d.hbm_bytes = 1.2e8;  // usable 8e6: nothing fits on one GPU
  PlanEval best;
  std::int64_t g = min_gpus(d, 512, 256, &best);
  CHECK(g > 1);
  CHECK(best.feasible && best.num_gpus == g);
  for (std::int64_t h = 1; h < g; ++h) {
    for (const PlanDesc& p : enumerate_plans(d, h)) CHECK(!evaluate_plan(d, p, h, 512).feasible);
  }
}

// A dense GQA model: 6 decoder layers, two of them local, tied embeddings.
static MemoryDesc toy_dense() {
  MemoryDesc d;
  d.attention_bytes = 3e6;
  d.dense_ffn_bytes = 9e6;
  d.norm_bytes_per_layer = 2e3;
  d.final_norm_bytes = 1e3;
  d.embedding_bytes = 6e6;
  d.tie_embeddings = true;
  for (int i = 0; i < 6; ++i) {
    d.layer_is_moe.push_back(0);
    d.layer_has_kv.push_back(1);
    d.layer_is_local.push_back(i == 1 || i == 4);
  }
  d.local_window = 300;
  d.num_heads = 12;
  d.num_kv_heads = 4;
  d.kv_bytes_per_token_per_layer = 3072;
  d.hbm_bytes = 1e9;
  d.usable_fraction = 0.95;
  d.reserve_bytes = 5e7;
  return d;
}

struct Lanes {
  std::vector<std::int64_t> plan, context, batch;
  std::vector<double> ffn;
  std::vector<std::uint8_t> fit;
  std::vector<double> wmax;
  void run(const AdmissionTable& t, bool with_ffn, unsigned threads) {
    batch.assign(plan.size(), -1);
    fit.assign(plan.size(), 2);
    wmax.assign(plan.size(), -2);
    admissible_batches(t, static_cast<std::int64_t>(plan.size()), plan.data(), context.data(),
                       with_ffn ? ffn.data() : nullptr, batch.data(), fit.data(), wmax.data(), threads);
  }
};

// admissible_batches == evaluate_plan lane by lane, with and without the dense-FFN override.
static void test_batched_admission_equals_evaluate_plan() {
  MemoryDesc mla = toy_moe();
  mla.mla = true;
  mla.layer_is_local.assign(8, 0);
  mla.local_window = 0;
  MemoryDesc tight = toy_moe();
  tight.hbm_bytes = 1.2e8;  // usable 8e6: the weights overflow on few GPUs
  MemoryDesc encoder = toy_dense();
  encoder.layer_has_kv[0] = 0;  // an encoder layer: no KV
  encoder.layer_is_local[1] = 0;
  const std::vector<std::int64_t> contexts{1, 2, 100, 299, 300, 301, 4096, 65536, std::int64_t{1} << 24,
                                           kMaxAdmissionContext};
  const std::vector<double> ffns{0.0, 1.0, 9e6, 12e6, 7.77e7, 3e9};
  std::int64_t lanes = 0, unfit = 0, zero = 0, positive = 0, override_changed = 0;
  for (const MemoryDesc& d : {toy_moe(), mla, tight, toy_dense(), encoder}) {
    for (std::int64_t g : {1, 2, 3, 4, 8, 12}) {
      const std::vector<PlanDesc> plans = enumerate_plans(d, g);
      const AdmissionTable t(d, plans, g);
      CHECK(t.num_plans() == static_cast<std::int64_t>(plans.size()));
      Lanes a;
      for (std::size_t i = 0; i < plans.size(); ++i) {
        for (std::int64_t c : contexts) {
          for (double f : ffns) {
            a.plan.push_back(static_cast<std::int64_t>(i));
            a.context.push_back(c);
            a.ffn.push_back(f);
          }
        }
      }
      Lanes b = a;
      a.run(t, false, 2);
      b.run(t, true, 2);
      for (std::size_t k = 0; k < a.plan.size(); ++k) {
        const PlanDesc& p = plans[a.plan[k]];
        const PlanEval e = evaluate_plan(d, p, g, a.context[k]);
        CHECK(a.batch[k] == e.unit_batch);
        CHECK(a.fit[k] == (e.weights_fit ? 1 : 0));
        CHECK(a.wmax[k] == e.weight_bytes_max);
        MemoryDesc twin = d;
        twin.dense_ffn_bytes = b.ffn[k];
        const PlanEval et = evaluate_plan(twin, p, g, b.context[k]);
        CHECK(b.batch[k] == et.unit_batch);
        CHECK(b.fit[k] == (et.weights_fit ? 1 : 0));
        CHECK(b.wmax[k] == et.weight_bytes_max);
        ++lanes;
        unfit += !et.weights_fit;
        zero += et.weights_fit && et.unit_batch == 0;
        positive += et.unit_batch > 0;
        override_changed += b.batch[k] != a.batch[k];
      }
    }
  }
  // The cases above cover every branch: weights that do not fit, KV that does not, and room.
  CHECK(lanes > 10000);
  CHECK(unfit > 0 && zero > 0 && positive > 0 && override_changed > 0);
}

// Lanes whose KV exactly fills the free memory (usable = weights + 5 sequences),
// and one ulp less: one ulp more weight, or another summation order, and the
// batch changes.
static void test_batched_admission_at_the_boundary() {
  MemoryDesc base = toy_dense();
  base.attention_bytes = 3.1e6 + 0.3;  // fractional bytes: the component sums round
  base.norm_bytes_per_layer = 2e3 / 3;
  base.embedding_bytes = 6e6 + 0.7;
  base.usable_fraction = 1.0;
  base.reserve_bytes = 0;
  std::int64_t lanes = 0, five = 0;
  // twin: the model with the lane's dense_ffn_bytes; the table is built from base's.
  auto check = [&](const MemoryDesc& twin, const PlanDesc& p, std::int64_t g, std::int64_t ctx) {
    MemoryDesc d = twin;
    d.dense_ffn_bytes = base.dense_ffn_bytes;
    const AdmissionTable t(d, {p}, g);
    const PlanEval e = evaluate_plan(twin, p, g, ctx);
    const std::int64_t zero = 0;
    std::int64_t b = -1;
    std::uint8_t f = 2;
    double w = -2;
    admissible_batches(t, 1, &zero, &ctx, &twin.dense_ffn_bytes, &b, &f, &w, 1);
    CHECK(b == e.unit_batch && f == 1 && e.weights_fit && w == e.weight_bytes_max);
    if (twin.dense_ffn_bytes == base.dense_ffn_bytes) {  // no override needed
      admissible_batches(t, 1, &zero, &ctx, nullptr, &b, &f, nullptr, 1);
      CHECK(b == e.unit_batch);
    }
    ++lanes;
    five += e.unit_batch == 5;
  };
  for (std::int64_t g : {1, 2, 4, 6}) {
    for (const PlanDesc& p : enumerate_plans(base, g)) {
      if (p.pp != 1) continue;  // one stage: it binds
      for (double ffn : {9e6, 9e6 / 7, 1.3e7 + 0.1, 1e7 / 3, 2.2e7 / 7, 5e6 + 1.0 / 3, 1.1e7 / 9}) {
        for (std::int64_t ctx : {1, 1000, 4097}) {
          MemoryDesc twin = base;
          twin.dense_ffn_bytes = ffn;
          const StageMemory sm = stage_memory(twin, p, 0);
          const double hbm = sm.weight_total + 5 * kv_per_sequence(sm, ctx, twin.local_window);
          for (double h : {hbm, std::nextafter(hbm, 0.0)}) {
            twin.hbm_bytes = h;
            check(twin, p, g, ctx);
          }
        }
      }
    }
  }
  CHECK(five > 50 && five < lanes);
}

static void test_batched_admission_threads_and_validation() {
  MemoryDesc d = toy_moe();
  const std::vector<PlanDesc> plans = enumerate_plans(d, 8);
  const AdmissionTable t(d, plans, 8);
  Lanes a;
  std::uint64_t x = 12345;
  for (int i = 0; i < 100000; ++i) {  // several parallel blocks
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    a.plan.push_back(static_cast<std::int64_t>((x >> 33) % plans.size()));
    a.context.push_back(1 + static_cast<std::int64_t>((x >> 13) % 300000));
    a.ffn.push_back(static_cast<double>((x >> 40) % 100000) * 1e3);
  }
  for (bool with_ffn : {false, true}) {
    Lanes one = a, three = a, hw = a;
    one.run(t, with_ffn, 1);
    three.run(t, with_ffn, 3);
    hw.run(t, with_ffn, qs::resolve_threads(0));
    CHECK(one.batch == three.batch && one.fit == three.fit && one.wmax == three.wmax);
    CHECK(one.batch == hw.batch && one.fit == hw.fit && one.wmax == hw.wmax);
    CHECK(*std::min_element(one.batch.begin(), one.batch.end()) >= 0);
  }
  CHECK(throws_invalid([&] { AdmissionTable(d, {PlanDesc{1, 1, 8, 1, 0, false}, PlanDesc{1, 1, 8, 3, 0, false}}, 8); },
                       "plans[1] (tp1-pp1-dp8-ep3): plan.ep=3: ep x etp (3 x 1) must divide dp x tp (8 x 1)"));
  // Bad lanes are reported by index and value; with several, the first one, for any thread count.
  auto bad = [&](auto edit, bool with_ffn, const char* needle) {
    for (unsigned threads : {1u, 3u}) {
      Lanes l = a;
      edit(l);
      CHECK(throws_invalid([&] { l.run(t, with_ffn, threads); }, needle));
    }
  };
  const auto P = static_cast<std::int64_t>(plans.size());
  bad([&](Lanes& l) { l.plan[70000] = P; l.plan[90000] = -1; }, false,
      ("lane 70000: plan_index=" + std::to_string(P) + " out of range").c_str());
  bad([&](Lanes& l) { l.plan[99999] = -1; }, false, "lane 99999: plan_index=-1 out of range");
  bad([&](Lanes& l) { l.context[5] = 0; l.context[50000] = -3; }, false, "lane 5: context=0: must be a positive");
  bad([&](Lanes& l) { l.context[17] = kMaxAdmissionContext + 1; }, false, "lane 17: context=9007199254740993");
  bad([&](Lanes& l) { l.ffn[40000] = -1.0; }, true, "lane 40000: dense_ffn_bytes=-1: must be a finite number >= 0");
  bad([&](Lanes& l) { l.ffn[3] = std::nan(""); }, true, "lane 3: dense_ffn_bytes=nan");
  bad([&](Lanes& l) { l.ffn[3] = INFINITY; }, true, "lane 3: dense_ffn_bytes=inf");
  {  // without the override the ffn values are not read
    Lanes l = a;
    l.ffn[3] = std::nan("");
    l.run(t, false, 2);
    CHECK(l.batch[3] >= 0);
  }
  Lanes empty;
  empty.run(t, true, 2);
  CHECK(empty.batch.empty());
}

// Labels: parse(label(p)) == p for plans written canonically (etp 0 or not the
// default); parts in any order; bad parts named.
static void test_plan_labels() {
  for (std::int64_t tp : {1, 2, 8}) {
    for (std::int64_t ep : {1, 4}) {
      for (std::int64_t etp : {0, 1, 2, 8}) {
        for (bool adp : {false, true}) {
          const PlanDesc p{tp, 3, 2, ep, etp, adp};
          const PlanDesc q = parse_plan_label(p.label());
          const std::int64_t want_etp = etp == (ep == 1 ? tp : 1) ? 0 : etp;
          CHECK(q.tp == tp && q.pp == 3 && q.dp == 2 && q.ep == ep && q.etp == want_etp && q.attn_dp == adp);
          CHECK(q.label() == p.label());
        }
      }
    }
  }
  const PlanDesc q = parse_plan_label("adp-ep8-tp4");
  CHECK(q.tp == 4 && q.pp == 1 && q.dp == 1 && q.ep == 8 && q.etp == 0 && q.attn_dp);
  CHECK(throws_invalid([] { parse_plan_label(""); }, "empty"));
  CHECK(throws_invalid([] { parse_plan_label("tp8-x"); }, "part 'x' is not"));
  CHECK(throws_invalid([] { parse_plan_label("tp8-tp4"); }, "part 'tp4' repeats tp"));
  CHECK(throws_invalid([] { parse_plan_label("tp-pp1"); }, "part 'tp' is not"));
  CHECK(throws_invalid([] { parse_plan_label("tp99999999999999999999999"); }, "must be <= 2^53"));
  CHECK(throws_invalid([] { parse_plan_label("tp8-"); }, "part '' is not"));
}

// enumerate_plans == every candidate of the brute-force box that plan_rule
// accepts and is_canonical keeps, in the documented order; and every plan it
// lists is valid (plan_violation empty).
static void test_enumeration_is_the_rules() {
  MemoryDesc moe = toy_moe(), dense = toy_moe(), mla = toy_moe();
  dense.routed_experts = 0;
  std::fill(dense.layer_is_moe.begin(), dense.layer_is_moe.end(), 0);
  mla.mla = true;
  for (const MemoryDesc* d : {&moe, &dense, &mla}) {
    for (std::int64_t g = 1; g <= 24; ++g) {
      std::vector<PlanDesc> want;
      for (std::int64_t tp = 1; tp <= g; ++tp)
        for (std::int64_t pp = 1; pp <= g; ++pp)
          for (std::int64_t dp = 1; dp <= g; ++dp) {
            if (tp * pp * dp != g) continue;
            for (std::int64_t ep = 1; ep <= g; ++ep)
              for (std::int64_t etp = 0; etp <= g; ++etp)
                for (std::int64_t red = 0; red <= 2 * g; ++red)
                  for (bool adp : {false, true}) {
                    const PlanDesc p{tp, pp, dp, ep, etp, adp, red};
                    if (is_canonical(*d, p) && plan_rule(*d, p, g) == PlanRule::kOk) want.push_back(p);
                  }
          }
      const std::vector<PlanDesc> got = enumerate_plans(*d, g);
      CHECK(got.size() == want.size());
      for (std::size_t i = 0; i < std::min(got.size(), want.size()); ++i) CHECK(got[i].label() == want[i].label());
      for (const PlanDesc& p : got) CHECK(plan_violation(*d, p, g).empty());
    }
  }
}

// Redundant expert slots (EPLB): the rule ep | E + R, R >= 0, R only for a MoE with
// ep > 1 and at most E*(ep-1); (E+R)/ep slots per GPU charged in routed_experts;
// the label round trip; the enumeration pairs each ep with the smallest R.
static void test_redundant_slots() {
  const MemoryDesc d = toy_moe();  // E = 16, 6 MoE layers of 8, expert 1 MB
  MemoryDesc dense = toy_moe();
  dense.routed_experts = 0;
  std::fill(dense.layer_is_moe.begin(), dense.layer_is_moe.end(), 0);
  // rules: ep=6 does not divide 16, but divides 16 + 2
  CHECK(plan_rule(d, PlanDesc{1, 1, 6, 6, 1, false, 0}, 6) == PlanRule::kExpertsEp);
  CHECK(plan_rule(d, PlanDesc{1, 1, 6, 6, 1, false, 2}, 6) == PlanRule::kOk);
  CHECK(plan_rule(d, PlanDesc{1, 1, 6, 6, 1, false, 8}, 6) == PlanRule::kOk);
  CHECK(plan_rule(d, PlanDesc{1, 1, 6, 6, 1, false, 3}, 6) == PlanRule::kExpertsEp);
  CHECK(plan_violation(d, PlanDesc{1, 1, 6, 6, 1, false, 3}, 6) ==
        "plan.ep=6: must divide routed_experts + redundant (16 + 3 expert slots per EP group)");
  CHECK(plan_shape_rule(PlanDesc{1, 1, 4, 4, 1, false, -1}) == PlanRule::kDegrees);
  CHECK(plan_violation(d, PlanDesc{1, 1, 4, 4, 1, false, -1}, 4) ==
        "plan.redundant=-1: must be >= 0 (redundant expert slots per EP group)");
  CHECK(plan_rule(dense, PlanDesc{1, 1, 4, 1, 0, false, 4}, 4) == PlanRule::kRedundant);
  CHECK(plan_violation(dense, PlanDesc{1, 1, 4, 1, 0, false, 4}, 4).find("must be 0 for a dense model") !=
        std::string::npos);
  CHECK(plan_rule(d, PlanDesc{4, 1, 1, 1, 1, false, 16}, 4) == PlanRule::kRedundant);  // ep = 1
  CHECK(plan_rule(d, PlanDesc{1, 1, 2, 2, 1, false, 16}, 2) == PlanRule::kOk);         // E*(ep-1) = 16
  CHECK(plan_rule(d, PlanDesc{1, 1, 2, 2, 1, false, 18}, 2) == PlanRule::kRedundant);  // every expert on both
  // memory: (E + R)/ep slots per GPU in routed_experts; replica_bytes is one more slot
  for (std::int64_t red : {2, 8}) {
    const PlanDesc p{1, 1, 6, 6, 1, false, red};
    const StageMemory sm = stage_memory(d, p, 0);
    CHECK(sm.weights[kRoutedExperts] == 6.0 * static_cast<double>((16 + red) / 6) * d.expert_bytes);
    const PackResult r = pack(d, p, 6, 1000, nullptr, nullptr);
    CHECK(r.weights[kRoutedExperts][5] == sm.weights[kRoutedExperts]);
    const PlanEval e = evaluate_plan(d, p, 6, 1000);
    CHECK(e.unit_batch == r.admissible_batch && e.cluster_batch == r.cluster_batch);
  }
  // more slots, less KV
  CHECK(evaluate_plan(d, PlanDesc{1, 1, 6, 6, 1, false, 8}, 6, 1000).cluster_batch <
        evaluate_plan(d, PlanDesc{1, 1, 6, 6, 1, false, 2}, 6, 1000).cluster_batch);
  // labels
  const PlanDesc p{2, 1, 3, 6, 1, false, 2};
  CHECK(p.label() == "tp2-pp1-dp3-ep6-red2");
  const PlanDesc q = parse_plan_label("red32-ep72-dp72");
  CHECK(q.redundant == 32 && q.ep == 72 && q.dp == 72 && q.tp == 1);
  CHECK(parse_plan_label(p.label()).label() == p.label());
  CHECK(parse_plan_label("tp1-ep8-red0").redundant == 0);
  CHECK(throws_invalid([] { parse_plan_label("ep8-red4-red4"); }, "repeats red"));
  // enumeration: ep=6 = the stage's GPUs appears with R=2, every other plan has R=0
  bool saw6 = false;
  for (const PlanDesc& e : enumerate_plans(d, 6)) {
    CHECK(e.redundant == (e.ep == e.dp * e.tp ? redundant_candidate(16, e.ep) : 0));
    saw6 = saw6 || (e.ep == 6 && e.redundant == 2);
  }
  CHECK(saw6);
  CHECK(searched_redundant(256, 72, 72) == 32 && searched_redundant(256, 36, 72) == 0);
  CHECK(redundant_candidate(256, 72) == 32 && redundant_candidate(256, 64) == 0 && redundant_candidate(256, 48) == 32);
  // pack: extra replicas on top of slots refused; popularity places the slots
  ReplicaRequest rr;
  rr.popularity.assign(16, 1.0);
  rr.replicas = 2;
  CHECK(throws_invalid([&] { pack(d, PlanDesc{1, 1, 6, 6, 1, false, 2}, 6, 1000, &rr, nullptr); },
                       "already holds redundant=2"));
  rr.replicas = 0;
  for (int e = 0; e < 16; ++e) rr.popularity[e] = 1.0 / std::pow(e + 1.0, 1.2);
  const PackResult rs = pack(d, PlanDesc{1, 1, 6, 6, 1, false, 8}, 6, 1000, &rr, nullptr);
  CHECK(rs.has_replicas && rs.replicas == 8 && rs.replica_expert.size() == 8);
  CHECK(rs.imbalance_after < rs.imbalance_before);
  CHECK(rs.cluster_batch == evaluate_plan(d, PlanDesc{1, 1, 6, 6, 1, false, 8}, 6, 1000).cluster_batch);
}

// place_slots: every rank gets (E+R)/ep slots, every expert at least one copy, no two
// copies of an expert on one rank, the loads add up, skew lowers the maximum load.
static void test_place_slots() {
  for (std::int64_t E : {16, 7, 256}) {
    for (std::int64_t ep : {2, 3, 6, 8, 72}) {
      for (std::int64_t red : {std::int64_t{0}, redundant_candidate(E, ep), redundant_candidate(E, ep) + ep,
                               redundant_candidate(E, ep) + 5 * ep}) {
        if ((E + red) % ep != 0 || red > E * (ep - 1)) continue;
        std::vector<double> pop(static_cast<std::size_t>(E));
        for (std::int64_t e = 0; e < E; ++e) pop[e] = 1.0 / std::pow(static_cast<double>(e + 1), 1.01);
        const SlotPlacement sp = place_slots(pop, ep, red);
        const std::int64_t m = (E + red) / ep;
        CHECK(static_cast<std::int64_t>(sp.slot_expert.size()) == E + red);
        std::vector<std::int64_t> count(static_cast<std::size_t>(E), 0);
        for (std::int64_t r = 0; r < ep; ++r) {
          std::vector<std::int64_t> on(sp.slot_expert.begin() + r * m, sp.slot_expert.begin() + (r + 1) * m);
          std::sort(on.begin(), on.end());
          CHECK(std::adjacent_find(on.begin(), on.end()) == on.end());
          double load = 0;
          for (std::int64_t e : on) {
            ++count[e];
            load += pop[e] / static_cast<double>(sp.copies[e]);
          }
          CHECK(std::fabs(load - sp.load[r]) <= 1e-9 * (1 + load));
        }
        for (std::int64_t e = 0; e < E; ++e) CHECK(count[e] == sp.copies[e] && count[e] >= 1 && count[e] <= ep);
      }
    }
  }
  std::vector<double> pop(16);
  for (int e = 0; e < 16; ++e) pop[e] = 1.0 / std::pow(e + 1.0, 1.2);
  const SlotPlacement without = place_slots(pop, 4, 0);  // one object: begin() and end() of the same vector
  const double before = *std::max_element(without.load.begin(), without.load.end());
  const SlotPlacement with = place_slots(pop, 4, 4);
  CHECK(*std::max_element(with.load.begin(), with.load.end()) < before);
  CHECK(with.copies[0] >= 2);  // the most popular expert is replicated first
  CHECK(throws_invalid([&] { place_slots(pop, 6, 1); }, "must divide routed_experts + redundant"));
  CHECK(throws_invalid([&] { place_slots(pop, 2, 18); }, "routed_experts*(ep-1)"));
  CHECK(throws_invalid([&] { place_slots(std::vector<double>(16, 0.0), 4, 0); }, "no mass"));
}

// kv_fraction f: the KV cache gets f of the memory left after weights (TensorRT-LLM's
// free_gpu_memory_fraction). pack, evaluate_plan and the batched admission agree, the
// batch is floor(f * free / per_sequence), and f = 1 is the default rule.
static void test_kv_fraction() {
  for (MemoryDesc d : {toy_dense(), toy_moe()}) {
    for (const PlanDesc& p : enumerate_plans(d, 4)) {
      const std::int64_t ctx = 2048;
      const PlanEval full = evaluate_plan(d, p, 4, ctx);
      if (!full.feasible) continue;
      MemoryDesc h = d;
      h.kv_fraction = 0.5;
      const PlanEval half = evaluate_plan(h, p, 4, ctx);
      const PackResult r = pack(h, p, 4, ctx, nullptr, nullptr);
      const AdmissionTable t(h, {p}, 4);
      const std::int64_t zero = 0;
      std::int64_t b = -1;
      std::uint8_t f = 2;
      admissible_batches(t, 1, &zero, &ctx, nullptr, &b, &f, nullptr, 1);
      CHECK(half.unit_batch == b && r.admissible_batch == b);
      CHECK(half.unit_batch <= full.unit_batch && 2 * half.unit_batch <= full.unit_batch + 1);
      const StageMemory sm = stage_memory(h, p, half.binding_stage);
      CHECK(half.unit_batch == floor_fit(0.5 * (h.usable_bytes() - sm.weight_total),
                                         kv_per_sequence(sm, ctx, h.local_window)));
      for (std::size_t g = 0; g < r.kv_bytes.size(); ++g) {  // at least the other half stays free
        CHECK(r.kv_bytes[g] <= 0.5 * (r.free[g] + r.kv_bytes[g]) * (1 + 1e-12));
      }
    }
  }
  MemoryDesc bad = toy_dense();
  for (double v : {0.0, -0.1, 1.5, std::nan("")}) {
    bad.kv_fraction = v;
    CHECK(throws_invalid([&] { validate_desc(bad); }, "kv_fraction"));
  }
}

// EP all-to-all buffers: a2a_bytes_per_token * rows / (pp * shard) per admitted sequence on the GPUs of
// stages with decode MoE layers under ep > 1, in every admission path (evaluate_plan, the batched
// admission, pack and its paged placement), and nowhere else.
static void test_a2a_buffers() {
  MemoryDesc d = toy_moe();
  d.a2a_bytes_per_token = 3e5;
  d.a2a_rows_per_sequence = 2;  // one draft token
  MemoryDesc none = toy_moe();
  for (std::int64_t g : {2, 4, 8}) {
    const std::vector<PlanDesc> ps = enumerate_plans(d, g);
    AdmissionTable table(d, ps, g);
    for (std::size_t i = 0; i < ps.size(); ++i) {
      const PlanDesc& p = ps[i];
      const double shard = p.attn_dp ? 1.0 : static_cast<double>(p.tp);
      for (std::int64_t s = 0; s < p.pp; ++s) {
        const StageMemory sm = stage_memory(d, p, s);
        const double want = (p.ep > 1 && sm.moe_layers > 0) ? 3e5 * 2 / (static_cast<double>(p.pp) * shard) : 0.0;
        CHECK(sm.a2a_per_sequence == want);
        const StageMemory sn = stage_memory(none, p, s);
        CHECK(kv_per_sequence(sm, 1000, d.local_window) == kv_per_sequence(sn, 1000, d.local_window) + want);
      }
      const PlanEval e = evaluate_plan(d, p, g, 1000);
      const PlanEval en = evaluate_plan(none, p, g, 1000);
      CHECK(e.unit_batch <= en.unit_batch);
      if (p.ep == 1) CHECK(e.unit_batch == en.unit_batch);
      const std::int64_t idx = static_cast<std::int64_t>(i), ctx = 1000;
      std::int64_t b = -1;
      std::uint8_t fit = 0;
      admissible_batches(table, 1, &idx, &ctx, nullptr, &b, &fit, nullptr, 1);
      CHECK(b == e.unit_batch);
      const PackResult r = pack(d, p, g, 1000, nullptr, nullptr);
      CHECK(r.admissible_batch == e.unit_batch);
      for (std::int64_t k = 0; k < g; ++k) {
        CHECK(r.a2a_bytes[k] == static_cast<double>(r.unit_batch[r.unit[k]]) * r.a2a_per_sequence[k]);
        CHECK(r.free[k] >= 0);
      }
      // paged placement of equal lengths places what the fixed-context admission admits
      PagedRequest req;
      req.block_size = 1;
      req.lengths.assign(static_cast<std::size_t>(r.cluster_batch + 3), 1000);
      const PackResult rp = pack(d, p, g, 1000, nullptr, &req);
      CHECK(rp.placed == r.cluster_batch);
    }
  }
  MemoryDesc bad = toy_moe();
  bad.a2a_bytes_per_token = -1;
  CHECK(throws_invalid([&] { validate_desc(bad); }, "a2a_bytes_per_token"));
  bad = toy_moe();
  bad.a2a_rows_per_sequence = 0.5;
  CHECK(throws_invalid([&] { validate_desc(bad); }, "a2a_rows_per_sequence"));
}

int main() {
  test_redundant_slots();
  test_place_slots();
  test_conservation_and_capacity();
  test_validation();
  test_plan_labels();
  test_enumeration_is_the_rules();
  test_floor_fit();
  test_kv_fraction();
  test_a2a_buffers();
  test_replicas_reduce_imbalance();
  test_threads_and_sampling();
  test_paged();
  test_min_gpus();
  test_batched_admission_equals_evaluate_plan();
  test_batched_admission_at_the_boundary();
  test_batched_admission_threads_and_validation();
  return qs::test::report("packing");
}
