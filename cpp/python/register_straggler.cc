// Binding layer: qsengine._core closed-form straggler API (cpp/core/straggler.h).
// Thin: numpy arrays in, arrays out, the core runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "core/errors.h"
#include "core/straggler.h"
#include "python/interrupt.h"
#include "python/lanes.h"
#include "python/register.h"

namespace py = pybind11;
namespace sg = qs::straggler;

namespace qs_py {

namespace {

using Doubles = py::array_t<double, py::array::c_style | py::array::forcecast>;
using Ints = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

// A per-lane argument as a column (lanes.h's rule).
template <class T, class A>
sg::Column<T> column(const A& a, py::ssize_t lanes, const std::string& what, const char* who) {
  return sg::Column<T>{a.data(), lane_stride(a, lanes, what, who)};
}

}  // namespace

void register_straggler(py::module_& m) {
  m.attr("STRAGGLER_Z99") = sg::kZ99;
  m.def(
      "max_iid_normal", [](std::int64_t g) { const sg::MaxIid c = sg::max_iid_normal(g); return py::make_tuple(c.mean, c.sd); },
      py::arg("g"),
      "(c_G, s_G): mean and sd of the maximum of G independent standard normals (trapezoid on [-12, 12], 24 001 "
      "points; cached per G; (0, 1) for G <= 1).");

  m.def(
      "straggler_ceiling",
      [](Doubles experts_per_gpu, Doubles top_k, Doubles tokens, Doubles a, Doubles b) {
        py::ssize_t n = 1;
        for (const Doubles* x : {&experts_per_gpu, &top_k, &tokens, &a, &b}) {
          if (x->ndim() == 1 && x->shape(0) != 1) n = x->shape(0);
        }
        const char* who = "straggler_ceiling";
        const auto e = column<double>(experts_per_gpu, n, "experts_per_gpu", who);
        const auto k = column<double>(top_k, n, "top_k", who);
        const auto t = column<double>(tokens, n, "tokens", who);
        const auto ca = column<double>(a, n, "a", who), cb = column<double>(b, n, "b", who);
        py::array_t<double> out(n);
        double* o = out.mutable_data();
        without_gil([&] {
          for (py::ssize_t i = 0; i < n; ++i) o[i] = sg::ceiling(e[i], k[i], t[i], ca[i], cb[i]);
        });
        return out;
      },
      py::arg("experts_per_gpu"), py::arg("top_k"), py::arg("tokens"), py::arg("a"), py::arg("b"),
      "The physical ceiling max(a*E_g, b*B*min(k, E_g)) of one MoE layer's straggler, per lane (1-d arrays, one "
      "entry per lane or one for every lane).");

  m.def(
      "straggler_closed_form",
      [](std::int64_t experts, std::int64_t top_k, Doubles tokens, Ints gpus, Doubles a, Doubles b,
         std::optional<Doubles> pi, std::optional<Ints> redundant, const std::vector<SlotLayout>& layouts) {
        const char* who = "straggler_closed_form";
        if (tokens.ndim() != 1) throw qs::InvalidArgument("straggler_closed_form: tokens must be a 1-d array over the lanes");
        const py::ssize_t n = tokens.shape(0);
        const sg::Routing r = routing_law(experts, top_k, pi, layouts, who);
        sg::ClosedFormInput in;
        in.lanes = n;
        in.tokens = column<double>(tokens, n, "tokens", who);
        in.gpus = column<std::int64_t>(gpus, n, "gpus", who);
        in.a = column<double>(a, n, "a", who);
        in.b = column<double>(b, n, "b", who);
        if (redundant) in.redundant = column<std::int64_t>(*redundant, n, "redundant", who);
        py::array_t<double> mean(n), sd(n);
        double* pm = mean.mutable_data();
        double* ps = sd.mutable_data();
        without_gil([&] { sg::closed_form(r, in, pm, ps); });
        return py::make_tuple(mean, sd);
      },
      py::arg("experts"), py::arg("top_k"), py::arg("tokens"), py::arg("gpus"), py::arg("a"), py::arg("b"),
      py::arg("pi") = py::none(), py::arg("redundant") = py::none(), py::arg("layouts") = std::vector<SlotLayout>{},
      "Mean and sd of one MoE layer's straggler max_g max(a*u_g, b*n_g) per lane (0 where tokens <= 0): tokens, "
      "gpus, a, b, redundant 1-d (one entry per lane or one for every lane); pi the per-expert inclusion "
      "probabilities (None: uniform k/E); layouts one (gpus, redundant, class_expert, class_share, class_count) "
      "per (gpus, redundant > 0) pair of the live lanes (qsengine.decode.slots.slot_layout).");

  m.def(
      "straggler_quantiles",
      [](std::int64_t experts, std::int64_t top_k, Doubles tokens, const py::dict& fields, std::optional<Doubles> pi,
         const std::vector<SlotLayout>& layouts) {
        const char* who = "straggler_quantiles";
        if (tokens.ndim() != 1) throw qs::InvalidArgument("straggler_quantiles: tokens must be a 1-d array over the lanes");
        const py::ssize_t n = tokens.shape(0);
        const char* names[] = {"moe_layers", "experts", "top_k", "ep", "redundant", "moe_a", "moe_b"};
        std::vector<Doubles> keep;
        for (const char* name : names) {
          if (!fields.contains(name)) {
            throw qs::InvalidArgument(std::string(who) + ": field '" + name + "' is missing from the fields");
          }
          keep.push_back(Doubles::ensure(fields[py::str(name)]));
          if (!keep.back()) throw qs::InvalidArgument(std::string(who) + ": field '" + name + "' is not a float array");
        }
        sg::QuantilesInput in;
        in.lanes = n;
        in.tokens = column<double>(tokens, n, "tokens", who);
        sg::Column<double>* cols[] = {&in.moe_layers, &in.experts, &in.top_k, &in.ep, &in.redundant, &in.a, &in.b};
        for (std::size_t f = 0; f < keep.size(); ++f) {
          *cols[f] = column<double>(keep[f], n, std::string("field '") + names[f] + "'", who);
        }
        const sg::Routing r = routing_law(experts, top_k, pi, layouts, who);
        py::array_t<double> mean(n), p50(n), p99(n);
        double* pm = mean.mutable_data();
        double* p5 = p50.mutable_data();
        double* p9 = p99.mutable_data();
        without_gil([&] { sg::quantiles(r, in, pm, p5, p9); });
        return py::make_tuple(mean, p50, p99);
      },
      py::arg("experts"), py::arg("top_k"), py::arg("tokens"), py::arg("fields"), py::arg("pi") = py::none(),
      py::arg("layouts") = std::vector<SlotLayout>{},
      "(mean, p50, p99) of the routed experts' straggler summed over each lane's MoE layers (0 on dense lanes): "
      "fields a mapping of the StepParams columns moe_layers, experts, top_k, ep, redundant, moe_a, moe_b (one "
      "entry per lane or one for every lane); experts/top_k the MoE lanes' routing law (ValueError when a MoE lane "
      "disagrees); pi and layouts as straggler_closed_form's.");
}

}  // namespace qs_py
