// Binding layer: qsengine._core packing API. Thin: converts Python inputs to
// plain C++ values while holding the GIL, runs the core with the GIL released
// (run_interruptible), converts results to numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/packing.h"
#include "python/interrupt.h"
#include "python/register.h"

namespace py = pybind11;
namespace pk = qs::packing;

namespace qs_py {

namespace {

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}

py::array_t<bool> to_numpy_bool(const std::vector<std::uint8_t>& v) {
  py::array_t<bool> a(static_cast<py::ssize_t>(v.size()));
  auto m = a.mutable_unchecked<1>();
  for (std::size_t i = 0; i < v.size(); ++i) m(static_cast<py::ssize_t>(i)) = v[i] != 0;
  return a;
}

// Columns of an evaluated plan list (plan search / ranking), one entry per plan.
struct PlanTable {
  std::vector<std::int64_t> num_gpus, tp, pp, dp, ep, etp, redundant, units, unit_batch, cluster_batch, binding_stage;
  std::vector<std::uint8_t> attn_dp, feasible, weights_fit;
  std::vector<double> weight_bytes_max;
  std::vector<std::string> label;

  explicit PlanTable(const std::vector<pk::PlanEval>& evals) {
    for (const auto& e : evals) {
      num_gpus.push_back(e.num_gpus);
      tp.push_back(e.plan.tp);
      pp.push_back(e.plan.pp);
      dp.push_back(e.plan.dp);
      ep.push_back(e.plan.ep);
      etp.push_back(e.plan.etp);
      redundant.push_back(e.plan.redundant);
      attn_dp.push_back(e.plan.attn_dp);
      units.push_back(e.units);
      unit_batch.push_back(e.unit_batch);
      cluster_batch.push_back(e.cluster_batch);
      feasible.push_back(e.feasible);
      weights_fit.push_back(e.weights_fit);
      binding_stage.push_back(e.binding_stage);
      weight_bytes_max.push_back(e.weight_bytes_max);
      label.push_back(e.plan.label());
    }
  }
};

std::vector<double> as_doubles(const py::array_t<double, py::array::c_style | py::array::forcecast>& a) {
  if (a.ndim() != 1) throw qs::InvalidArgument("expected a 1-d array");
  return std::vector<double>(a.data(), a.data() + a.size());
}

std::vector<std::int64_t> as_int64(const py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>& a) {
  if (a.ndim() != 1) throw qs::InvalidArgument("expected a 1-d array");
  return std::vector<std::int64_t>(a.data(), a.data() + a.size());
}

// Per (plan, pipeline stage) of an admission table: what one GPU of the stage
// holds (the per-plan constants behind admissible_batches; docs/packing.md).
py::dict stage_columns(const pk::AdmissionTable& t) {
  std::vector<std::int64_t> plan_idx, stage, full, local, dense;
  std::vector<double> weights, total, kv;
  for (std::int64_t i = 0; i < t.num_plans(); ++i) {
    for (std::int64_t k = t.stage_begin[i]; k < t.stage_begin[i + 1]; ++k) {
      const pk::StageMemory& sm = t.stages[static_cast<std::size_t>(k)];
      plan_idx.push_back(i);
      stage.push_back(k - t.stage_begin[i]);
      for (int c = 0; c < pk::kNumComponents; ++c) weights.push_back(sm.weights[c]);
      total.push_back(sm.weight_total);
      kv.push_back(sm.kv_per_token_layer);
      full.push_back(sm.kv_full_layers);
      local.push_back(sm.kv_local_layers);
      dense.push_back(sm.dense_layers);
    }
  }
  py::dict out;
  out["plan"] = to_numpy(plan_idx);
  out["stage"] = to_numpy(stage);
  py::array_t<double> w({static_cast<py::ssize_t>(total.size()), static_cast<py::ssize_t>(pk::kNumComponents)});
  std::copy(weights.begin(), weights.end(), w.mutable_data());
  out["weights"] = w;
  out["weight_total"] = to_numpy(total);
  out["kv_per_token_layer"] = to_numpy(kv);
  out["kv_full_layers"] = to_numpy(full);
  out["kv_local_layers"] = to_numpy(local);
  out["dense_layers"] = to_numpy(dense);
  return out;
}

using LaneArray = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
using LaneDoubles = py::array_t<double, py::array::c_style | py::array::forcecast>;

// n lanes of a 1-d per-lane argument; names it when it is not.
py::ssize_t lane_count(const py::array& a, const char* name) {
  if (a.ndim() != 1) {
    throw qs::InvalidArgument(std::string("admissible_batches: ") + name + " must be a 1-d array with one entry per " +
                              "lane (got " + std::to_string(a.ndim()) + " dimensions)");
  }
  return a.shape(0);
}

}  // namespace

void register_packing(py::module_& m) {
  py::class_<pk::MemoryDesc>(m, "MemoryDesc", "Flat numeric memory description of model x precision x accelerator.")
      .def(py::init<>())
      .def_readwrite("attention_bytes", &pk::MemoryDesc::attention_bytes)
      .def_readwrite("dense_ffn_bytes", &pk::MemoryDesc::dense_ffn_bytes)
      .def_readwrite("expert_bytes", &pk::MemoryDesc::expert_bytes)
      .def_readwrite("shared_expert_bytes", &pk::MemoryDesc::shared_expert_bytes)
      .def_readwrite("router_bytes", &pk::MemoryDesc::router_bytes)
      .def_readwrite("norm_bytes_per_layer", &pk::MemoryDesc::norm_bytes_per_layer)
      .def_readwrite("final_norm_bytes", &pk::MemoryDesc::final_norm_bytes)
      .def_readwrite("embedding_bytes", &pk::MemoryDesc::embedding_bytes)
      .def_readwrite("lm_head_bytes", &pk::MemoryDesc::lm_head_bytes)
      .def_readwrite("tie_embeddings", &pk::MemoryDesc::tie_embeddings)
      .def_readwrite("layer_is_moe", &pk::MemoryDesc::layer_is_moe)
      .def_readwrite("layer_has_kv", &pk::MemoryDesc::layer_has_kv)
      .def_readwrite("layer_is_local", &pk::MemoryDesc::layer_is_local)
      .def_readwrite("routed_experts", &pk::MemoryDesc::routed_experts)
      .def_readwrite("moe_intermediate", &pk::MemoryDesc::moe_intermediate)
      .def_readwrite("num_heads", &pk::MemoryDesc::num_heads)
      .def_readwrite("num_kv_heads", &pk::MemoryDesc::num_kv_heads)
      .def_readwrite("mla", &pk::MemoryDesc::mla)
      .def_readwrite("kv_bytes_per_token_per_layer", &pk::MemoryDesc::kv_bytes_per_token_per_layer)
      .def_readwrite("a2a_bytes_per_token", &pk::MemoryDesc::a2a_bytes_per_token)
      .def_readwrite("a2a_rows_per_sequence", &pk::MemoryDesc::a2a_rows_per_sequence)
      .def_readwrite("local_window", &pk::MemoryDesc::local_window)
      .def_readwrite("hbm_bytes", &pk::MemoryDesc::hbm_bytes)
      .def_readwrite("usable_fraction", &pk::MemoryDesc::usable_fraction)
      .def_readwrite("reserve_bytes", &pk::MemoryDesc::reserve_bytes)
      .def_readwrite("kv_fraction", &pk::MemoryDesc::kv_fraction)
      .def_property_readonly("usable_bytes", &pk::MemoryDesc::usable_bytes)
      .def("validate", &pk::validate_desc);

  py::class_<pk::PlanDesc>(m, "PlanDesc",
                           "A parallel plan (etp=0 means the default expert TP; redundant: extra expert slots "
                           "per EP group).")
      .def(py::init([](std::int64_t tp, std::int64_t pp, std::int64_t dp, std::int64_t ep, std::int64_t etp,
                       bool attn_dp, std::int64_t redundant) {
             return pk::PlanDesc{tp, pp, dp, ep, etp, attn_dp, redundant};
           }),
           py::arg("tp") = 1, py::arg("pp") = 1, py::arg("dp") = 1, py::arg("ep") = 1, py::arg("etp") = 0,
           py::arg("attn_dp") = false, py::arg("redundant") = 0)
      .def_readonly("tp", &pk::PlanDesc::tp)
      .def_readonly("pp", &pk::PlanDesc::pp)
      .def_readonly("dp", &pk::PlanDesc::dp)
      .def_readonly("ep", &pk::PlanDesc::ep)
      .def_readonly("etp", &pk::PlanDesc::etp)
      .def_readonly("attn_dp", &pk::PlanDesc::attn_dp)
      .def_readonly("redundant", &pk::PlanDesc::redundant)
      .def_property_readonly("expert_tp", &pk::PlanDesc::expert_tp)
      .def_property_readonly("label", &pk::PlanDesc::label);

  py::class_<PlanTable>(m, "PlanTable", "Evaluated plans, one entry per plan, as numpy columns.")
      .def("__len__", [](const PlanTable& t) { return t.tp.size(); })
#define QS_COL(name) .def_property_readonly(#name, [](const PlanTable& t) { return to_numpy(t.name); })
      QS_COL(num_gpus) QS_COL(tp) QS_COL(pp) QS_COL(dp) QS_COL(ep) QS_COL(etp) QS_COL(redundant) QS_COL(units) QS_COL(unit_batch)
      QS_COL(cluster_batch) QS_COL(binding_stage) QS_COL(weight_bytes_max)
#undef QS_COL
      .def_readonly("label", &PlanTable::label)
      .def_property_readonly("attn_dp", [](const PlanTable& t) { return to_numpy_bool(t.attn_dp); })
      .def_property_readonly("feasible", [](const PlanTable& t) { return to_numpy_bool(t.feasible); })
      .def_property_readonly("weights_fit", [](const PlanTable& t) { return to_numpy_bool(t.weights_fit); });

  py::class_<pk::PackResult>(m, "PackResult", "Per-GPU memory map and admission results of one packing.")
      .def_readonly("plan", &pk::PackResult::plan)
#define QS_SCALAR(name) .def_readonly(#name, &pk::PackResult::name)
      QS_SCALAR(num_gpus) QS_SCALAR(num_units) QS_SCALAR(context) QS_SCALAR(capacity) QS_SCALAR(usable)
      QS_SCALAR(admissible_batch) QS_SCALAR(cluster_batch) QS_SCALAR(feasible) QS_SCALAR(reason) QS_SCALAR(binding)
      QS_SCALAR(binding_gpu) QS_SCALAR(has_replicas) QS_SCALAR(replicas) QS_SCALAR(imbalance_before)
      QS_SCALAR(imbalance_after) QS_SCALAR(cluster_batch_without_replicas) QS_SCALAR(has_paged) QS_SCALAR(block_size)
      QS_SCALAR(offered) QS_SCALAR(placed) QS_SCALAR(rejected) QS_SCALAR(first_rejected) QS_SCALAR(kv_placed_bytes)
      QS_SCALAR(fragmentation_bytes) QS_SCALAR(tokens_placed)
#undef QS_SCALAR
#define QS_ARR(name) .def_property_readonly(#name, [](const pk::PackResult& r) { return to_numpy(r.name); })
      QS_ARR(unit) QS_ARR(stage) QS_ARR(dp_rank) QS_ARR(tp_rank) QS_ARR(ep_rank) QS_ARR(replica_bytes)
      QS_ARR(kv_bytes) QS_ARR(kv_per_sequence) QS_ARR(a2a_per_sequence) QS_ARR(a2a_bytes) QS_ARR(reserve) QS_ARR(unusable) QS_ARR(free) QS_ARR(overflow)
      QS_ARR(replica_count) QS_ARR(unit_batch) QS_ARR(expert_copies) QS_ARR(replica_expert) QS_ARR(replica_rank)
      QS_ARR(load_before) QS_ARR(load_after) QS_ARR(unit_sequences)
#undef QS_ARR
      .def("weights", [](const pk::PackResult& r, int c) { return to_numpy(r.weights.at(static_cast<std::size_t>(c))); },
           py::arg("component"), "Bytes of weight component `c` (index into COMPONENTS) on each GPU.");

  m.attr("COMPONENTS") = [] {
    py::tuple t(static_cast<py::size_t>(pk::kNumComponents));
    for (int c = 0; c < pk::kNumComponents; ++c) t[static_cast<py::size_t>(c)] = pk::component_name(c);
    return t;
  }();

  m.def("plan_violation", &pk::plan_violation, py::arg("desc"), py::arg("plan"), py::arg("num_gpus"),
        "'' if the plan is valid for the model on num_gpus GPUs, else the rule it breaks.");
  // The plan rules (packing.h, PlanRule) as (field, value, rule) text, or None.
  auto violation_tuple = [](const pk::PlanViolation& v) -> py::object {
    if (v.rule == pk::PlanRule::kOk) return py::none();
    return py::make_tuple(v.field, v.value, v.text);
  };
  m.def(
      "check_plan",
      [violation_tuple](const pk::MemoryDesc& desc, const pk::PlanDesc& plan, std::int64_t num_gpus) {
        const pk::PlanRule rule = pk::plan_rule(desc, plan, num_gpus);
        return violation_tuple(pk::describe_plan_rule(desc, plan, num_gpus, rule));
      },
      py::arg("desc"), py::arg("plan"), py::arg("num_gpus"),
      "None if the plan is valid for the model on num_gpus GPUs, else (field, value, rule) of the first rule "
      "it breaks (the one implementation of the plan rules).");
  m.def(
      "check_plan_shape",
      [violation_tuple](const pk::PlanDesc& plan) {
        const pk::MemoryDesc none;
        return violation_tuple(pk::describe_plan_rule(none, plan, 0, pk::plan_shape_rule(plan)));
      },
      py::arg("plan"), "check_plan's model-independent rules only (degrees; ep*etp divides dp*tp).");
  m.def("parse_plan_label", &pk::parse_plan_label, py::arg("text"),
        "The PlanDesc of a label tp<n>-pp<n>-dp<n>-ep<n>[-etp<n>][-red<n>][-adp] (parts in any order, missing parts "
        "default); ValueError naming the bad part.");
  py::class_<pk::AdmissionTable>(
      m, "AdmissionTable",
      "The pipeline stages of a list of valid plans of one model x precision x cluster (stage_memory), "
      "from which admissible_batches evaluates many (plan, context) lanes.")
      .def(py::init<const pk::MemoryDesc&, const std::vector<pk::PlanDesc>&, std::int64_t>(), py::arg("desc"),
           py::arg("plans"), py::arg("num_gpus"),
           "Validates desc and every plan (ValueError naming plans[i] and the rule it breaks).")
      .def("__len__", &pk::AdmissionTable::num_plans)
      .def_readonly("num_gpus", &pk::AdmissionTable::num_gpus)
      .def_readonly("usable", &pk::AdmissionTable::usable)
      .def_readonly("local_window", &pk::AdmissionTable::local_window)
      .def_readonly("plans", &pk::AdmissionTable::plans)
      .def("stage_table", &stage_columns,
           "Per (plan, pipeline stage): weight bytes by component on one GPU, their total, KV bytes per token per "
           "layer, the full/local KV layers and the dense layers.");

  m.def(
      "stage_table",
      [](const pk::MemoryDesc& desc, const std::vector<pk::PlanDesc>& plans, std::int64_t num_gpus) {
        return stage_columns(pk::AdmissionTable(desc, plans, num_gpus));
      },
      py::arg("desc"), py::arg("plans"), py::arg("num_gpus"),
      "AdmissionTable(desc, plans, num_gpus).stage_table().");

  m.def(
      "admissible_batches",
      [](const pk::AdmissionTable& table, LaneArray plan_index, LaneArray context,
         std::optional<LaneDoubles> dense_ffn_bytes, std::optional<int> threads) {
        const py::ssize_t n = lane_count(plan_index, "plan_index");
        const py::ssize_t nc = lane_count(context, "context");
        if (nc != n) {
          throw qs::InvalidArgument("admissible_batches: plan_index has " + std::to_string(n) +
                                    " lanes but context has " + std::to_string(nc) + ": need one entry per lane in each");
        }
        if (dense_ffn_bytes) {
          const py::ssize_t nf = lane_count(*dense_ffn_bytes, "dense_ffn_bytes");
          if (nf != n) {
            throw qs::InvalidArgument("admissible_batches: plan_index has " + std::to_string(n) +
                                      " lanes but dense_ffn_bytes has " + std::to_string(nf) +
                                      ": need one entry per lane in each");
          }
        }
        if (threads && *threads < 1) {
          throw qs::InvalidArgument("admissible_batches: threads=" + std::to_string(*threads) +
                                    ": must be >= 1 (or None for every hardware thread)");
        }
        const unsigned nt = qs::resolve_threads(threads.value_or(0));
        py::array_t<std::int64_t> batch(n);
        py::array_t<bool> fit(n);
        py::array_t<double> weight_max(n);
        const std::int64_t* pi = plan_index.data();
        const std::int64_t* ctx = context.data();
        const double* ffn = dense_ffn_bytes ? dense_ffn_bytes->data() : nullptr;
        std::int64_t* b = batch.mutable_data();
        auto* f = reinterpret_cast<std::uint8_t*>(fit.mutable_data());  // numpy bool: one byte, 0 or 1
        // The inputs are kept alive by this frame; a short pure kernel, so no interrupt polling.
        double* wm = weight_max.mutable_data();
        without_gil([&] { pk::admissible_batches(table, static_cast<std::int64_t>(n), pi, ctx, ffn, b, f, wm, nt); });
        return py::make_tuple(batch, fit, weight_max);
      },
      py::arg("table"), py::arg("plan_index"), py::arg("context"), py::arg("dense_ffn_bytes") = py::none(),
      py::arg("threads") = py::none(),
      "(batch int64, fit bool, weight_max float64) per lane: evaluate_plan(desc, plans[plan_index[i]], num_gpus, "
      "context[i]).unit_batch, weights_fit and weight_bytes_max (weights on the fullest GPU), with dense_ffn_bytes[i] (if given) in place of desc.dense_ffn_bytes. Releases the GIL; "
      "threads=None uses every hardware thread (the result does not depend on it). ValueError names the first "
      "bad lane.");
  m.def("enumerate_plans", &pk::enumerate_plans, py::arg("desc"), py::arg("num_gpus"),
        "Every valid plan for num_gpus GPUs, in canonical order.");

  m.def(
      "search_plans",
      [](const pk::MemoryDesc& desc, std::int64_t g_lo, std::int64_t g_hi, std::int64_t context, int threads) {
        const pk::MemoryDesc d = desc;  // copied under the GIL
        const unsigned nt = qs::resolve_threads(threads);
        auto evals = run_interruptible(
            [&](qs::CancelToken& tok) { return pk::search_plans(d, g_lo, g_hi, context, nt, &tok); });
        return PlanTable(evals);
      },
      py::arg("desc"), py::arg("g_lo"), py::arg("g_hi"), py::arg("context"), py::arg("threads") = 0,
      "Evaluate every valid plan for each G in [g_lo, g_hi]; ranked within each G.");

  m.def(
      "min_gpus",
      [](const pk::MemoryDesc& desc, std::int64_t context, std::int64_t max_gpus) {
        const pk::MemoryDesc d = desc;
        pk::PlanEval best;
        std::int64_t g = run_interruptible(
            [&](qs::CancelToken& tok) { return pk::min_gpus(d, context, max_gpus, &best, &tok); });
        return py::make_tuple(g, g > 0 ? py::cast(best.plan) : py::none());
      },
      py::arg("desc"), py::arg("context"), py::arg("max_gpus"),
      "(smallest feasible G or 0, best plan at that G or None).");

  m.def(
      "sample_lengths",
      [](py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> values,
         py::array_t<double, py::array::c_style | py::array::forcecast> weights, std::int64_t n, std::uint64_t key0,
         std::uint64_t key1, int threads) {
        auto v = as_int64(values);
        auto w = as_doubles(weights);
        const unsigned nt = qs::resolve_threads(threads);
        auto out = run_interruptible(
            [&](qs::CancelToken& tok) { return pk::sample_lengths(v, w, n, key0, key1, nt, &tok); });
        return to_numpy(out);
      },
      py::arg("values"), py::arg("weights"), py::arg("n"), py::arg("key0"), py::arg("key1"), py::arg("threads") = 0,
      "n lengths from a discrete distribution; counter-based stream keyed by (key, block).");

  m.def(
      "place_slots",
      [](py::array_t<double, py::array::c_style | py::array::forcecast> popularity, std::int64_t ep,
         std::int64_t redundant) {
        const auto pop = as_doubles(popularity);
        const pk::SlotPlacement sp = pk::place_slots(pop, ep, redundant);
        return py::make_tuple(to_numpy(sp.slot_expert), to_numpy(sp.copies), to_numpy(sp.load));
      },
      py::arg("popularity"), py::arg("ep"), py::arg("redundant"),
      "EPLB-style placement of E + redundant expert slots on ep ranks (packing.h, place_slots): "
      "(slot_expert rank-major, copies per expert, expected load per rank).");

  m.def(
      "pack",
      [](const pk::MemoryDesc& desc, const pk::PlanDesc& plan, std::int64_t num_gpus, std::int64_t context,
         std::optional<py::array_t<double, py::array::c_style | py::array::forcecast>> popularity,
         std::int64_t replicas,
         std::optional<py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>> lengths,
         std::int64_t block_size) {
        const pk::MemoryDesc d = desc;
        const pk::PlanDesc p = plan;
        std::optional<pk::ReplicaRequest> rr;
        if (popularity || replicas != 0) {
          rr.emplace();
          if (popularity) rr->popularity = as_doubles(*popularity);
          rr->replicas = replicas;
        }
        std::optional<pk::PagedRequest> pr;
        if (lengths) {
          pr.emplace();
          pr->lengths = as_int64(*lengths);
          pr->block_size = block_size;
        }
        return run_interruptible([&](qs::CancelToken& tok) {
          return pk::pack(d, p, num_gpus, context, rr ? &*rr : nullptr, pr ? &*pr : nullptr, &tok);
        });
      },
      py::arg("desc"), py::arg("plan"), py::arg("num_gpus"), py::arg("context"), py::arg("popularity") = py::none(),
      py::arg("replicas") = 0, py::arg("lengths") = py::none(), py::arg("block_size") = 16,
      "Pack the model onto num_gpus GPUs under plan; see qsengine.pack.");
}

}  // namespace qs_py
