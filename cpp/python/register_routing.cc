// Binding layer: the routing engine. Converts Python values to a plain
// qs::routing::RouteRequest while holding the GIL, then runs the core with the
// GIL released (run_interruptible). Results come back as a bound object whose
// fields are numpy arrays and numbers (no dicts with magic keys).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "core/routing.h"
#include "python/interrupt.h"
#include "python/register.h"

namespace qs_py {

namespace py = pybind11;
using namespace qs::routing;

namespace {

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

std::vector<double> to_vector(const std::optional<py::array_t<double, py::array::c_style | py::array::forcecast>>& a,
                              const char* name) {
  std::vector<double> v;
  if (!a) return v;
  if (a->ndim() != 1) throw qs::InvalidArgument(std::string(name) + ": must be a 1-D array");
  v.assign(a->data(), a->data() + a->size());
  return v;
}

}  // namespace

void register_routing(py::module_& m) {
  py::class_<Moments>(m, "Moments", "Streamed count, mean and M2 (sum of squared deviations).")
      .def_readonly("n", &Moments::n)
      .def_readonly("mean", &Moments::mean)
      .def_readonly("m2", &Moments::m2);

  py::class_<RouteResult>(m, "RouteResult", "Raw result of one routing run (see qsengine.RoutingStats).")
      .def_readonly("experts", &RouteResult::experts)
      .def_readonly("top_k", &RouteResult::top_k)
      .def_readonly("batch", &RouteResult::batch)
      .def_readonly("microbatches", &RouteResult::microbatches)
      .def_readonly("layers", &RouteResult::layers)
      .def_readonly("gpus", &RouteResult::gpus)
      .def_readonly("block_size", &RouteResult::block_size)
      .def_readonly("blocks", &RouteResult::blocks)
      .def_readonly("samples", &RouteResult::samples)
      .def_property_readonly("unique_hist", [](const RouteResult& r) { return to_numpy(r.unique_hist); })
      .def_property_readonly("gpu_unique_max_hist", [](const RouteResult& r) { return to_numpy(r.gpu_unique_max_hist); })
      .def_property_readonly("gpu_assign_max_hist", [](const RouteResult& r) { return to_numpy(r.gpu_assign_max_hist); })
      .def_property_readonly("tokens_per_expert_hist",
                             [](const RouteResult& r) { return to_numpy(r.tokens_per_expert_hist); })
      .def_property_readonly("gpu_unique_sum", [](const RouteResult& r) { return to_numpy(r.gpu_unique_sum); })
      .def_property_readonly("gpu_assign_sum", [](const RouteResult& r) { return to_numpy(r.gpu_assign_sum); })
      .def_property_readonly("layer_weights",
                             [](const RouteResult& r) {
                               py::array_t<double> a = to_numpy(r.layer_weights);
                               return a.reshape({static_cast<py::ssize_t>(r.weight_tables),
                                                 static_cast<py::ssize_t>(r.experts)});
                             })
      .def_readonly("has_cost", &RouteResult::has_cost)
      .def_readonly("layer_time", &RouteResult::layer_time)
      .def_readonly("step_time", &RouteResult::step_time)
      .def_property_readonly("layer_time_lo", [](const RouteResult& r) { return r.layer_time_hist.lo; })
      .def_property_readonly("step_time_lo", [](const RouteResult& r) { return r.step_time_hist.lo; })
      .def_property_readonly("layer_time_hist", [](const RouteResult& r) { return to_numpy(r.layer_time_hist.counts); })
      .def_property_readonly("step_time_hist", [](const RouteResult& r) { return to_numpy(r.step_time_hist.counts); })
      .def_property_readonly("selections", [](const RouteResult& r) {
        py::array_t<std::int32_t> a = to_numpy(r.selections);
        return a.reshape({static_cast<py::ssize_t>(r.microbatches), static_cast<py::ssize_t>(r.layers),
                          static_cast<py::ssize_t>(r.batch), static_cast<py::ssize_t>(r.top_k)});
      });
  m.attr("LOG_BIN_RATIO") = kLogBinRatio;
  m.attr("REJECT_BUDGET") = kRejectBudget;

  m.def(
      "route",
      [](std::int64_t experts, std::int64_t top_k, std::int64_t batch, std::int64_t microbatches, std::int64_t layers,
         int model_kind, int weight_kind, double alpha, int ranks,
         std::optional<py::array_t<double, py::array::c_style | py::array::forcecast>> weights,
         std::optional<py::array_t<double, py::array::c_style | py::array::forcecast>> concentration,
         std::int64_t groups, std::int64_t top_groups, double rho,
         std::optional<py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>> trace, std::int64_t gpus,
         std::vector<std::vector<std::int32_t>> expert_gpus,
         std::optional<py::array_t<double, py::array::c_style | py::array::forcecast>> cost_a,
         std::optional<py::array_t<double, py::array::c_style | py::array::forcecast>> cost_b, std::uint64_t key0,
         std::uint64_t key1, int threads, std::uint64_t memory_limit, bool record) {
        // Everything converted here, with the GIL held.
        RouteRequest req;
        req.experts = experts;
        req.top_k = top_k;
        req.batch = batch;
        req.microbatches = microbatches;
        req.layers = layers;
        if (model_kind < 0 || model_kind > 3) throw qs::InvalidArgument("routing: unknown model kind");
        if (weight_kind < 0 || weight_kind > 3) throw qs::InvalidArgument("routing: unknown weight kind");
        req.model.kind = static_cast<ModelKind>(model_kind);
        req.model.base.kind = static_cast<WeightKind>(weight_kind);
        req.model.base.alpha = alpha;
        req.model.base.ranks = ranks == 1 ? RankOrder::PerLayer : RankOrder::Fixed;
        req.model.base.weights = to_vector(weights, "routing.weights");
        req.model.base.concentration = to_vector(concentration, "routing.concentration");
        req.model.groups = groups;
        req.model.top_groups = top_groups;
        req.model.rho = rho;
        if (trace) {
          if (trace->ndim() != 3)
            throw qs::InvalidArgument("routing.expert_ids: must be a 3-D array [steps, tokens, k], got " +
                                      std::to_string(trace->ndim()) + " dimensions");
          req.model.trace_steps = trace->shape(0);
          req.model.trace_tokens = trace->shape(1);
          req.model.trace_k = trace->shape(2);
          const std::int64_t* d = trace->data();
          req.model.trace.resize(static_cast<std::size_t>(trace->size()));
          for (py::ssize_t i = 0; i < trace->size(); ++i) {
            const std::int64_t v = d[i];
            // Out-of-int32 ids are out of range anyway; keep them visibly invalid.
            req.model.trace[i] = (v < 0 || v > 0x7FFFFFFF) ? -1 : static_cast<std::int32_t>(v);
          }
        }
        req.placement.gpus = gpus;
        req.placement.expert_gpus = std::move(expert_gpus);
        if (cost_a || cost_b) {
          req.cost.enabled = true;
          req.cost.a = to_vector(cost_a, "cost.a");
          req.cost.b = to_vector(cost_b, "cost.b");
        }
        req.key = {key0, key1};
        req.threads = threads;
        req.memory_limit = memory_limit;
        req.record = record;
        return run_interruptible([&req](qs::CancelToken& token) { return route(req, &token); });
      },
      py::arg("experts"), py::arg("top_k"), py::arg("batch"), py::arg("microbatches"), py::arg("layers"),
      py::arg("model_kind"), py::arg("weight_kind"), py::arg("alpha"), py::arg("ranks"), py::arg("weights"),
      py::arg("concentration"), py::arg("groups"), py::arg("top_groups"), py::arg("rho"), py::arg("trace"),
      py::arg("gpus"), py::arg("expert_gpus"), py::arg("cost_a"), py::arg("cost_b"), py::arg("key0"),
      py::arg("key1"), py::arg("threads"), py::arg("memory_limit"), py::arg("record"),
      "Run the routing engine (private; use qsengine.route). Releases the GIL; Ctrl-C raises KeyboardInterrupt.");

  m.def(
      "philox_raw",
      [](std::uint64_t key0, std::uint64_t key1, std::uint64_t index, std::uint64_t purpose, std::int64_t n) {
        if (n < 0 || n > (1 << 24)) throw qs::InvalidArgument("n=" + std::to_string(n) + ": must be in [0, 2^24]");
        qs::PhiloxStream s({key0, key1}, index, purpose);
        py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(n));
        for (std::int64_t i = 0; i < n; ++i) out.mutable_data()[i] = s.next64();
        return out;
      },
      py::arg("key0"), py::arg("key1"), py::arg("index"), py::arg("purpose"), py::arg("n"),
      "First n words of the core's Philox stream (key, index, purpose); equals numpy.random.Philox("
      "key=[key0, key1], counter=[0, 0, index, purpose]).random_raw(n).");
}

}  // namespace qs_py
