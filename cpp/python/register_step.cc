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
#include "core/side_search.h"
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

// The step fields of `fields` (a mapping), kept alive in `keep`, as columns.
void field_columns(const py::dict& fields, py::ssize_t lanes, std::vector<Doubles>& keep,
                   st::Column (&cols)[st::kNumFields], const char* who) {
  const auto& names = st::field_names();
  keep.reserve(names.size());
  for (std::size_t f = 0; f < names.size(); ++f) {
    if (!fields.contains(names[f])) {
      throw qs::InvalidArgument(std::string(who) + ": field '" + names[f] + "' is missing from the step fields");
    }
    keep.push_back(Doubles::ensure(fields[py::str(names[f])]));
    if (!keep.back()) throw qs::InvalidArgument(std::string(who) + ": field '" + names[f] + "' is not a float array");
    cols[f] = column(keep.back(), lanes, "field '" + names[f] + "'", who);
  }
}

// A per-lane array that must have one entry per lane.
const double* lanes_of(const Doubles& a, py::ssize_t lanes, const char* what, const char* who) {
  if (a.ndim() != 1 || a.shape(0) != lanes) {
    throw qs::InvalidArgument(std::string(who) + ": " + what + " must be 1-d with one entry per lane (" +
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
    for (int p = 0; p < st::kNumStepPieces; ++p) names.emplace_back(st::step_piece_name(p));
    m.attr("STEP_PIECES") = py::tuple(py::cast(names));
    std::vector<bool> link;
    for (int p = 0; p < st::kNumStepPieces; ++p) link.push_back(st::step_piece_is_link(p));
    m.attr("STEP_LINK_PIECES") = py::tuple(py::cast(link));
  }
  m.def(
      "step_time",
      [](const py::dict& fields, Doubles batch, Doubles context, std::int64_t experts, std::int64_t top_k,
         std::optional<LawDoubles> pi, const std::vector<SlotLayout>& layouts, std::optional<Doubles> moe_mean,
         std::optional<Doubles> moe_p50, std::optional<Doubles> moe_p99, bool detail) {
        const char* who = "step_time";
        if (batch.ndim() != 1) throw qs::InvalidArgument("step_time: batch must be a 1-d array over the lanes");
        const py::ssize_t n = batch.shape(0);
        st::StepInput in;
        in.lanes = n;
        std::vector<Doubles> keep;
        field_columns(fields, n, keep, in.fields, who);
        in.batch = batch.data();
        in.context = lanes_of(context, n, "context", who);
        const qs::straggler::Routing law = routing_law(experts, top_k, pi, layouts, who);
        in.straggler.routing = &law;
        if (moe_mean || moe_p50 || moe_p99) {
          if (!(moe_mean && moe_p50 && moe_p99)) {
            throw qs::InvalidArgument("step_time: a given straggler needs moe_mean, moe_p50 and moe_p99");
          }
          in.straggler.mean = lanes_of(*moe_mean, n, "moe_mean", who);
          in.straggler.p50 = lanes_of(*moe_p50, n, "moe_p50", who);
          in.straggler.p99 = lanes_of(*moe_p99, n, "moe_p99", who);
        }
        py::array_t<double> time(n), p50(n), p99(n), tokens(n);
        const st::StepOutput out{time.mutable_data(), p50.mutable_data(), p99.mutable_data(), tokens.mutable_data()};
        const std::vector<py::ssize_t> shape = {st::kNumStepPieces, n};
        py::array_t<double> pt(shape), pb(shape), pf(shape), pc(shape);
        py::array_t<bool> pp(shape), pw(shape);
        st::PassDetail det;
        if (detail) {
          det = st::PassDetail{pt.mutable_data(), pb.mutable_data(), pf.mutable_data(), pc.mutable_data(),
                               reinterpret_cast<std::uint8_t*>(pp.mutable_data()),
                               reinterpret_cast<std::uint8_t*>(pw.mutable_data())};
        }
        without_gil([&] { st::step_time(in, out, det); });
        py::dict r;
        r["time"] = time;
        r["p50"] = p50;
        r["p99"] = p99;
        r["tokens"] = tokens;
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
      py::arg("fields"), py::arg("batch"), py::arg("context"), py::arg("experts") = 0, py::arg("top_k") = 0,
      py::arg("pi") = py::none(), py::arg("layouts") = std::vector<SlotLayout>{}, py::arg("moe_mean") = py::none(),
      py::arg("moe_p50") = py::none(), py::arg("moe_p99") = py::none(), py::arg("detail") = false,
      "The decode step over lanes (qsengine.decode.step.step_time; docs/model.md): the routed tokens, the routed "
      "experts' straggler, one forward pass, two-batch overlap and the speculative draft passes. fields: a mapping "
      "name -> float64 array (one entry per lane, or one for every lane) holding every name of STEP_PASS_FIELDS; "
      "batch, context: one entry per lane. The straggler: the closed form of the routing law (experts, top_k, pi: None uniform, layouts: one "
      "(gpus, redundant, class_expert, class_share, class_count) per (ep, R > 0) pair), or moe_mean/p50/p99 per "
      "lane (the Monte Carlo's, for the verify pass; the draft passes take the closed form). Returns a dict of "
      "per-lane arrays time, p50, p99, tokens and with detail the pieces (STEP_PIECES order) as (pieces, lanes) "
      "arrays piece_time, piece_bytes, piece_flops, piece_count, piece_present, piece_bandwidth_bound.");

  m.def(
      "side_search",
      [](const py::dict& plans, Index unit, Index plan, Index lane, std::int64_t lanes, Doubles context,
         Doubles slo, Index units, std::optional<Index> fixed, std::optional<Doubles> stall,
         std::optional<Doubles> ffn, std::int64_t experts, std::int64_t top_k, std::optional<LawDoubles> pi,
         const std::vector<SlotLayout>& layouts) {
        const char* who = "side_search";
        if (unit.ndim() != 1) throw qs::InvalidArgument("side_search: unit must be a 1-d array over the plans");
        if (plan.ndim() != 1) throw qs::InvalidArgument("side_search: plan must be a 1-d array over the rows");
        const py::ssize_t P = unit.shape(0), K = plan.shape(0);
        std::vector<Doubles> keep;
        st::Column cols[st::kNumFields];
        field_columns(plans, P, keep, cols, who);
        std::vector<st::Lane> table(static_cast<std::size_t>(P));
        if (P > 0) st::gather_lanes(cols, 0, P, table.data());
        auto ints_of = [&](const Index& a, const char* what) {
          if (a.ndim() != 1 || a.shape(0) != K) {
            throw qs::InvalidArgument(std::string(who) + ": " + what + " must be 1-d with one entry per row (" +
                                      std::to_string(K) + ")");
          }
          return a.data();
        };
        auto doubles_of = [&](const Doubles& a, const char* what) {
          if (a.ndim() != 1 || a.shape(0) != K) {
            throw qs::InvalidArgument(std::string(who) + ": " + what + " must be 1-d with one entry per row (" +
                                      std::to_string(K) + ")");
          }
          return a.data();
        };
        qs::side::SearchInput in;
        in.plans = table.data();
        in.num_plans = P;
        in.unit = unit.data();
        in.rows = K;
        in.lanes = lanes;
        in.plan = plan.data();
        in.lane = ints_of(lane, "lane");
        in.context = doubles_of(context, "context");
        in.slo = doubles_of(slo, "slo");
        in.units = ints_of(units, "units");
        if (fixed) in.fixed = ints_of(*fixed, "fixed");
        if (stall) in.stall = doubles_of(*stall, "stall");
        if (ffn) in.ffn = doubles_of(*ffn, "ffn");
        const qs::straggler::Routing law = routing_law(experts, top_k, pi, layouts, who);
        in.straggler.routing = &law;
        py::array_t<double> top_time(K), top_p99(K), top_step(K), time(K), p99(K), step(K);
        py::array_t<bool> top_valid(K), binds(K), valid(K);
        py::array_t<std::int64_t> units_out(K), top_batch(K), batch(K);
        py::array_t<double> top_tps(K), tps(K);
        const qs::side::SearchOutput out{top_time.mutable_data(),
                                         top_p99.mutable_data(),
                                         top_step.mutable_data(),
                                         reinterpret_cast<std::uint8_t*>(top_valid.mutable_data()),
                                         reinterpret_cast<std::uint8_t*>(binds.mutable_data()),
                                         units_out.mutable_data(),
                                         time.mutable_data(),
                                         p99.mutable_data(),
                                         step.mutable_data(),
                                         reinterpret_cast<std::uint8_t*>(valid.mutable_data()),
                                         top_batch.mutable_data(),
                                         top_tps.mutable_data(),
                                         batch.mutable_data(),
                                         tps.mutable_data()};
        without_gil([&] { qs::side::search(in, out); });
        py::dict r;
        r["top_time"] = top_time;
        r["top_p99"] = top_p99;
        r["top_step"] = top_step;
        r["top_valid"] = top_valid;
        r["binds"] = binds;
        r["units"] = units_out;
        r["time"] = time;
        r["p99"] = p99;
        r["step"] = step;
        r["valid"] = valid;
        r["top_batch"] = top_batch;
        r["top_tps"] = top_tps;
        r["batch"] = batch;
        r["tps"] = tps;
        return r;
      },
      py::arg("plans"), py::arg("unit"), py::arg("plan"), py::arg("lane"), py::arg("lanes"), py::arg("context"),
      py::arg("slo"), py::arg("units"), py::arg("fixed") = py::none(), py::arg("stall") = py::none(),
      py::arg("ffn") = py::none(), py::arg("experts") = 0, py::arg("top_k") = 0, py::arg("pi") = py::none(),
      py::arg("layouts") = std::vector<SlotLayout>{},
      "One side's operating points (cpp/core/side_search.h; qsengine.decode.sides): plans, the stacked plans' "
      "step fields (one entry per plan, or one for every plan) and unit (sequences per admission unit, per "
      "plan); per row (a lane x plan that packs): plan, lane (< lanes), context (tokens read), slo (p99 TPOT "
      "target, nan: none), units (admission units held), fixed (a fixed cluster batch, 0: none), stall (colocated "
      "prefill stall per sequence and step), ffn (dense-FFN parameters replacing the plan's); the routing law "
      "as step_time's. Returns a dict of per-row arrays: top_time, top_p99, top_step, top_valid (at the HBM-max "
      "or fixed batch), binds (the target binds there), units, time, p99, step, valid (the answer; valid False: "
      "never chosen), and the sequences per replica and decode tokens/s of the cluster at both (top_batch, "
      "top_tps, batch, tps).");

  m.def(
      "in_order_best",
      [](Index lane, Doubles score, py::array_t<bool, py::array::c_style | py::array::forcecast> valid,
         std::int64_t lanes) {
        const py::ssize_t K = lane.ndim() == 1 ? lane.shape(0) : -1;
        if (K < 0 || score.ndim() != 1 || score.shape(0) != K || valid.ndim() != 1 || valid.shape(0) != K) {
          throw qs::InvalidArgument("in_order_best: lane, score and valid must be 1-d with one entry per row");
        }
        if (lanes < 0) throw qs::InvalidArgument("in_order_best: lanes must be >= 0");
        py::array_t<double> best(lanes);
        py::array_t<std::int64_t> row(lanes);
        const std::int64_t* pl = lane.data();
        const double* ps = score.data();
        const auto* pv = reinterpret_cast<const std::uint8_t*>(valid.data());
        double* pb = best.mutable_data();
        std::int64_t* pr = row.mutable_data();
        without_gil([&] { qs::side::in_order_best(K, pl, ps, pv, lanes, pb, pr); });
        return py::make_tuple(best, row);
      },
      py::arg("lane"), py::arg("score"), py::arg("valid"), py::arg("lanes"),
      "Each lane's choice among its rows (cpp/core/side_search.h): an in-order scan in which a row with a "
      "score (valid, not nan) replaces the lane's best only if better by a relative 1e-12. Returns (best per "
      "lane, nan: none; row per lane, -1: none).");

  m.def("accepted_tokens", py::vectorize(st::accepted_tokens), py::arg("draft"), py::arg("accept"),
        "Expected tokens a sequence gains per speculative step with `draft` drafts, each accepted with probability "
        "`accept` given the ones before it were: (1 - a^(d+1)) / (1 - a), d + 1 at a >= 1 (arrays broadcast).");

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
      "step_time's): 'roof' (x bytes, y FLOPs), 'gemm' (x = m, y = n, z = k; 0 where n <= 0), 'attention_core' "
      "(x = sequences, y = context), 'link_bandwidth' (x = group), 'allreduce' / 'ep_alltoall' (x bytes, y group; "
      "link model), 'allreduce_fit' / 'alltoall_fit' / 'expert_allreduce_fit' (x bytes; the fitted TP all-reduce, "
      "EP all-to-all, expert-TP all-reduce). Returns (value, bandwidth term, compute term), the terms nan for "
      "the collectives.");
}

}  // namespace qs_py
