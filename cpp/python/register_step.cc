// Binding layer: qsengine._core step-model API. Thin: takes the step fields as a
// mapping of name -> float64 array (one value per lane, or one for every lane),
// runs the core pass with the GIL released, returns numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/step.h"
#include "python/interrupt.h"
#include "python/lanes.h"
#include "python/register.h"

namespace py = pybind11;
namespace st = qs::step;

namespace qs_py {

namespace {

using Doubles = py::array_t<double, py::array::c_style | py::array::forcecast>;
using Index = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

// A per-lane argument as a column (lanes.h's rule).
st::Column column(const Doubles& a, py::ssize_t lanes, const std::string& what, const char* who) {
  return st::Column{a.data(), lane_stride(a, lanes, what, who)};
}

// The step fields of `fields` (a mapping), kept alive in `keep`, as columns. Fields named in `indexed` hold one
// value per row of a table, read at index[i] for lane i (every index entry must be a row of each).
void field_columns(const py::dict& fields, py::ssize_t lanes, std::vector<Doubles>& keep,
                   st::Column (&cols)[st::kNumFields], const char* who, const std::vector<std::string>& indexed = {},
                   std::int64_t index_max = -1) {
  const auto& names = st::field_names();
  for (const auto& name : indexed) {
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      throw qs::InvalidArgument(std::string(who) + ": indexed field '" + name + "' is not a step field");
    }
  }
  keep.reserve(names.size());
  for (std::size_t f = 0; f < names.size(); ++f) {
    if (!fields.contains(names[f])) {
      throw qs::InvalidArgument(std::string(who) + ": field '" + names[f] + "' is missing from the step fields");
    }
    keep.push_back(Doubles::ensure(fields[py::str(names[f])]));
    if (!keep.back()) throw qs::InvalidArgument(std::string(who) + ": field '" + names[f] + "' is not a float array");
    const Doubles& a = keep.back();
    if (std::find(indexed.begin(), indexed.end(), names[f]) != indexed.end()) {
      if (a.ndim() != 1 || a.shape(0) <= index_max) {
        throw qs::InvalidArgument(std::string(who) + ": indexed field '" + names[f] + "' has " +
                                  std::to_string(a.ndim() == 1 ? a.shape(0) : 0) + " rows: the index reaches row " +
                                  std::to_string(index_max));
      }
      cols[f] = st::Column{a.data(), 0, true};
    } else {
      cols[f] = column(a, lanes, "field '" + names[f] + "'", who);
    }
  }
}

// A per-lane array that must have one entry per lane.
const double* lanes_of(const Doubles& a, py::ssize_t lanes, const char* what) {
  if (a.ndim() != 1 || a.shape(0) != lanes) {
    throw qs::InvalidArgument(std::string("step_pass: ") + what + " must be 1-d with one entry per lane (" +
                              std::to_string(lanes) + ")");
  }
  return a.data();
}

}  // namespace

void register_step(py::module_& m) {
  m.attr("STEP_PASS_FIELDS") = py::tuple(py::cast(st::field_names()));
  m.attr("SOFT_MAX_VECTORISED") = st::soft_max_is_vectorised();
  {
    std::vector<std::string> names;
    for (int p = 0; p < st::kNumPieces; ++p) names.emplace_back(st::piece_name(static_cast<st::Piece>(p)));
    m.attr("STEP_PIECES") = py::tuple(py::cast(names));
    std::vector<bool> link;
    for (int p = 0; p < st::kNumPieces; ++p) link.push_back(st::piece_is_link(static_cast<st::Piece>(p)));
    m.attr("STEP_LINK_PIECES") = py::tuple(py::cast(link));
  }
  m.def(
      "step_pass",
      [](const py::dict& fields, Doubles batch, Doubles context, Doubles tokens, Doubles moe_mean,
         Doubles moe_p50, Doubles moe_p99, bool detail, std::optional<Index> index,
         const std::vector<std::string>& indexed) {
        if (batch.ndim() != 1) throw qs::InvalidArgument("step_pass: batch must be a 1-d array over the lanes");
        const py::ssize_t n = batch.shape(0);
        st::PassInput in;
        in.lanes = n;
        std::int64_t index_max = -1;
        if (!indexed.empty()) {
          if (!index || index->ndim() != 1 || index->shape(0) != n) {
            throw qs::InvalidArgument("step_pass: indexed fields need an index with one entry per lane (" +
                                      std::to_string(n) + ")");
          }
          const std::int64_t* ix = index->data();
          for (py::ssize_t i = 0; i < n; ++i) {
            if (ix[i] < 0) throw qs::InvalidArgument("step_pass: index[" + std::to_string(i) + "] = " +
                                                     std::to_string(ix[i]) + ": must be >= 0");
            index_max = std::max(index_max, ix[i]);
          }
          in.index = ix;
        }
        std::vector<Doubles> keep;
        field_columns(fields, n, keep, in.fields, "step_pass", indexed, index_max);
        in.batch = batch.data();
        in.context = lanes_of(context, n, "context");
        in.tokens = lanes_of(tokens, n, "tokens");
        in.moe_mean = lanes_of(moe_mean, n, "moe_mean");
        in.moe_p50 = lanes_of(moe_p50, n, "moe_p50");
        in.moe_p99 = lanes_of(moe_p99, n, "moe_p99");
        const char* names[] = {"time", "p50", "p99", "compute", "compute_p50", "compute_p99", "comm"};
        std::vector<py::array_t<double>> outs;
        for (int k = 0; k < 7; ++k) outs.emplace_back(n);
        st::PassOutput out{outs[0].mutable_data(), outs[1].mutable_data(), outs[2].mutable_data(),
                           outs[3].mutable_data(), outs[4].mutable_data(), outs[5].mutable_data(),
                           outs[6].mutable_data()};
        const std::vector<py::ssize_t> shape = {st::kNumPieces, n};
        py::array_t<double> pt(shape), pb(shape), pf(shape), pc(shape);
        py::array_t<bool> pp(shape), pw(shape);
        st::PassDetail det;
        if (detail) {
          det = st::PassDetail{pt.mutable_data(), pb.mutable_data(), pf.mutable_data(), pc.mutable_data(),
                               reinterpret_cast<std::uint8_t*>(pp.mutable_data()),
                               reinterpret_cast<std::uint8_t*>(pw.mutable_data())};
        }
        without_gil([&] { st::step_pass(in, out, det); });
        py::dict r;
        for (int k = 0; k < 7; ++k) r[names[k]] = outs[static_cast<std::size_t>(k)];
        if (detail) {
          r["piece_time"] = pt;
          r["piece_bytes"] = pb;
          r["piece_flops"] = pf;
          r["piece_count"] = pc;
          r["piece_present"] = pp;
          r["piece_bandwidth_bound"] = pw;
        }
        return r;
      },
      py::arg("fields"), py::arg("batch"), py::arg("context"), py::arg("tokens"), py::arg("moe_mean"),
      py::arg("moe_p50"), py::arg("moe_p99"), py::arg("detail") = false, py::arg("index") = py::none(),
      py::arg("indexed") = std::vector<std::string>{},
      "One forward pass of the decode step model over lanes (qsengine.decode.step; docs/model.md). fields: a "
      "mapping name -> float64 array (one entry per lane, or one for every lane) holding every name of "
      "STEP_PASS_FIELDS; batch, context, tokens (routed tokens per EP group) and the routed experts' straggler "
      "summed over the MoE layers (moe_mean/p50/p99, 0 on dense lanes; without the grouped GEMM's fixed term): "
      "one entry per lane. Fields named in indexed hold a table's rows, lane i reading row index[i] (the plans "
      "of a stacked family list, gathered lane by lane). Returns a dict of per-lane arrays time, p50, p99, compute, compute_p50, compute_p99, "
      "comm, and with detail the pieces (STEP_PIECES order) as (pieces, lanes) arrays piece_time, piece_bytes, "
      "piece_flops, piece_count, piece_present, piece_bandwidth_bound.");

  m.def(
      "step_kernel",
      [](const std::string& kind, const py::dict& fields, Doubles x, Doubles y, Doubles z) {
        py::ssize_t n = 1;
        for (const Doubles* a : {&x, &y, &z}) {
          if (a->ndim() != 1) throw qs::InvalidArgument("step_kernel: arguments must be 1-d arrays");
          if (a->shape(0) != 1) n = a->shape(0);
        }
        std::vector<Doubles> keep;
        st::Column cols[st::kNumFields];
        // fields may broadcast against the arguments: a lane count from either
        for (const auto& name : st::field_names()) {
          if (!fields.contains(name)) continue;  // field_columns names it
          const Doubles a = Doubles::ensure(fields[py::str(name)]);
          if (a && a.ndim() == 1 && a.shape(0) != 1) n = a.shape(0);
        }
        field_columns(fields, n, keep, cols, "step_kernel");
        const st::Column cx = column(x, n, "x", "step_kernel"), cy = column(y, n, "y", "step_kernel"),
                        cz = column(z, n, "z", "step_kernel");
        const auto& kinds = st::kernel_names();
        const auto it = std::find(kinds.begin(), kinds.end(), kind);
        if (it == kinds.end()) {
          std::string all;
          for (const auto& x : kinds) all += (all.empty() ? "" : ", ") + x;
          throw qs::InvalidArgument("step_kernel: kind = '" + kind + "': must be one of " + all);
        }
        const auto k = static_cast<st::Kernel>(it - kinds.begin());
        py::array_t<double> out(n), out_b(n), out_f(n);
        double* o = out.mutable_data();
        double* ob = out_b.mutable_data();
        double* of = out_f.mutable_data();
        without_gil([&] { st::kernel_over_lanes(k, cols, cx, cy, cz, n, o, ob, of); });
        return py::make_tuple(out, out_b, out_f);
      },
      py::arg("kind"), py::arg("fields"), py::arg("x"), py::arg("y"), py::arg("z"),
      "One step-model kernel over lanes (arrays broadcast: one entry per lane or one for every lane; fields as "
      "step_pass's): 'roof' (x bytes, y FLOPs), 'gemm' (x = m, y = n, z = k; 0 where n <= 0), 'attention_core' "
      "(x = sequences, y = context), 'link_bandwidth' (x = group), 'allreduce' / 'ep_alltoall' (x bytes, y group; "
      "link model), 'allreduce_fit' / 'alltoall_fit' / 'expert_allreduce_fit' (x bytes; the fitted TP all-reduce, "
      "EP all-to-all, expert-TP all-reduce). Returns (value, bandwidth term, compute term), the terms nan for "
      "the collectives.");
}

}  // namespace qs_py
