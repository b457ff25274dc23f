// Tests of the packing core on its own (no Python). Run with ctest.
#include "core/packing.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

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
        const double want = model_bytes(d, c) * (c == kRoutedExperts ? copies_e : copies_ne);
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
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{3, 1, 1, 1, 0, false}, 3); }, "num_heads=8"));
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{2, 1, 1, 1, 0, false}, 4); }, "num_gpus = 4"));
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{1, 1, 3, 3, 0, false}, 3); }, "routed_experts=16"));
  CHECK(throws_invalid([&] { validate_plan(d, PlanDesc{1, 9, 1, 1, 0, false}, 9); }, "num_layers=8"));
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

int main() {
  test_conservation_and_capacity();
  test_validation();
  test_floor_fit();
  test_replicas_reduce_imbalance();
  test_threads_and_sampling();
  test_paged();
  test_min_gpus();
  return qs::test::report("packing");
}
