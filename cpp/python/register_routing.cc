// Binding layer: the routing engine. The request is the core's own
// qs::routing::RouteRequest, bound field by field (enums as py::enum_, arrays
// converted by their setters with the GIL held), so nothing on the Python side
// mirrors C++ codes by hand. route(request, threads) copies it and runs the
// core with the GIL released (run_interruptible). Results come back as a bound
// object whose fields are numpy arrays and numbers (no dicts with magic keys).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
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

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

std::vector<double> to_vector(const DoubleArray& a, const char* name) {
  if (a.ndim() != 1) throw qs::InvalidArgument(std::string(name) + ": must be a 1-D array");
  return std::vector<double>(a.data(), a.data() + a.size());
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
      .def_readonly("rtol", &RouteResult::rtol)
      .def_readonly("target_reached", &RouteResult::target_reached)
      .def_readonly("rse_mean", &RouteResult::rse_mean)
      .def_readonly("rse_p99", &RouteResult::rse_p99)
      .def_readonly("precision_sections", &RouteResult::precision_sections)
      .def_readonly("checkpoints", &RouteResult::checkpoints)
      .def_property_readonly("selections", [](const RouteResult& r) {
        py::array_t<std::int32_t> a = to_numpy(r.selections);
        return a.reshape({static_cast<py::ssize_t>(r.microbatches), static_cast<py::ssize_t>(r.layers),
                          static_cast<py::ssize_t>(r.batch), static_cast<py::ssize_t>(r.top_k)});
      });
  m.attr("LOG_BIN_RATIO") = kLogBinRatio;
  m.attr("REJECT_BUDGET") = kRejectBudget;

  py::enum_<WeightKind>(m, "WeightKind", "Per-expert weights of the routing base (cpp/core/routing.h).")
      .value("Uniform", WeightKind::Uniform)
      .value("PowerLaw", WeightKind::PowerLaw)
      .value("Popularity", WeightKind::Popularity)
      .value("Dirichlet", WeightKind::Dirichlet);
  py::enum_<RankOrder>(m, "RankOrder", "PowerLaw: which expert holds which popularity rank.")
      .value("Fixed", RankOrder::Fixed)
      .value("PerLayer", RankOrder::PerLayer);
  py::enum_<ModelKind>(m, "ModelKind", "The routing model (cpp/core/routing.h).")
      .value("Independent", ModelKind::Independent)
      .value("GroupLimited", ModelKind::GroupLimited)
      .value("Sticky", ModelKind::Sticky)
      .value("Trace", ModelKind::Trace);

  py::class_<WeightSpec>(m, "WeightSpec", "Per-expert weights of one layer (the base of every stochastic model).")
      .def(py::init<>())
      .def_readwrite("kind", &WeightSpec::kind)
      .def_readwrite("alpha", &WeightSpec::alpha)
      .def_readwrite("ranks", &WeightSpec::ranks)
      .def_property(
          "weights", [](const WeightSpec& w) { return to_numpy(w.weights); },
          [](WeightSpec& w, const DoubleArray& a) { w.weights = to_vector(a, "routing.weights"); })
      .def_property(
          "concentration", [](const WeightSpec& w) { return to_numpy(w.concentration); },
          [](WeightSpec& w, const DoubleArray& a) { w.concentration = to_vector(a, "routing.concentration"); });

  py::class_<ModelSpec>(m, "ModelSpec", "The routing model: kind, base weights and the kind's parameters.")
      .def(py::init<>())
      .def_readwrite("kind", &ModelSpec::kind)
      .def_readwrite("base", &ModelSpec::base)
      .def_readwrite("groups", &ModelSpec::groups)
      .def_readwrite("top_groups", &ModelSpec::top_groups)
      .def_readwrite("rho", &ModelSpec::rho)
      .def_property(
          "trace",
          [](const ModelSpec& s) {
            py::array_t<std::int32_t> a = to_numpy(s.trace);
            return a.reshape({static_cast<py::ssize_t>(s.trace_steps), static_cast<py::ssize_t>(s.trace_tokens),
                              static_cast<py::ssize_t>(s.trace_k)});
          },
          [](ModelSpec& s, const py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>& trace) {
            if (trace.ndim() != 3)
              throw qs::InvalidArgument("routing.expert_ids: must be a 3-D array [steps, tokens, k], got " +
                                        std::to_string(trace.ndim()) + " dimensions");
            s.trace_steps = trace.shape(0);
            s.trace_tokens = trace.shape(1);
            s.trace_k = trace.shape(2);
            const std::int64_t* d = trace.data();
            s.trace.resize(static_cast<std::size_t>(trace.size()));
            for (py::ssize_t i = 0; i < trace.size(); ++i) {
              const std::int64_t v = d[i];
              // Out-of-int32 ids are out of range anyway; keep them visibly invalid.
              s.trace[i] = (v < 0 || v > 0x7FFFFFFF) ? -1 : static_cast<std::int32_t>(v);
            }
          },
          "Recorded expert ids [steps, tokens, k] (Trace); set from any integer array.");

  py::class_<PlacementSpec>(m, "PlacementSpec", "Where experts live: expert_gpus[e] = GPUs of e's replicas.")
      .def(py::init<>())
      .def_readwrite("gpus", &PlacementSpec::gpus)
      .def_readwrite("expert_gpus", &PlacementSpec::expert_gpus);

  py::class_<CostSpec>(m, "CostSpec", "Straggler cost: GPU g spends max(a[g]*u_g, b[g]*n_g) seconds on a layer.")
      .def(py::init<>())
      .def_readwrite("enabled", &CostSpec::enabled)
      .def_property(
          "a", [](const CostSpec& c) { return to_numpy(c.a); },
          [](CostSpec& c, const DoubleArray& a) { c.a = to_vector(a, "cost.a"); })
      .def_property(
          "b", [](const CostSpec& c) { return to_numpy(c.b); },
          [](CostSpec& c, const DoubleArray& a) { c.b = to_vector(a, "cost.b"); });

  py::class_<RouteRequest>(m, "RouteRequest",
                           "One routing run (private; built by qsengine.route). Field rules: cpp/core/routing.h.")
      .def(py::init<>())
      .def_readwrite("experts", &RouteRequest::experts)
      .def_readwrite("top_k", &RouteRequest::top_k)
      .def_readwrite("batch", &RouteRequest::batch)
      .def_readwrite("microbatches", &RouteRequest::microbatches)
      .def_readwrite("layers", &RouteRequest::layers)
      .def_readwrite("model", &RouteRequest::model)
      .def_readwrite("placement", &RouteRequest::placement)
      .def_readwrite("cost", &RouteRequest::cost)
      .def_property(
          "key", [](const RouteRequest& r) { return py::make_tuple(r.key.k0, r.key.k1); },
          [](RouteRequest& r, const std::pair<std::uint64_t, std::uint64_t>& k) { r.key = {k.first, k.second}; },
          "The 128-bit Philox key (k0, k1).")
      .def_readwrite("memory_limit", &RouteRequest::memory_limit)
      .def_readwrite("record", &RouteRequest::record)
      .def_readwrite("rtol", &RouteRequest::rtol);

  m.def(
      "route",
      [](const RouteRequest& request, int threads) {
        // Copied and validated with the GIL held (the Python object may change
        // afterwards); the copy holds only plain C++ values, so the run needs no GIL.
        RouteRequest req = request;
        req.threads = threads;
        validate(req);  // bad input raises here, before any thread starts (route checks again, cheaply)
        return run_interruptible([&req](qs::CancelToken& token) { return route(req, &token); });
      },
      py::arg("request"), py::arg("threads"),
      "Run the routing engine (private; use qsengine.route). threads <= 0: all hardware threads. Releases the "
      "GIL; Ctrl-C raises KeyboardInterrupt.");

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
