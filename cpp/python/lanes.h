// Binding layer: what the step and straggler bindings share: the per-lane array rule and the routing law.
#pragma once

#include <pybind11/numpy.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "core/errors.h"
#include "core/straggler.h"

namespace qs_py {

// The stride of a per-lane argument: 1 if it has one entry per lane, 0 if one for every lane (broadcast);
// InvalidArgument naming `who` and `what` otherwise.
inline pybind11::ssize_t lane_stride(const pybind11::array& a, pybind11::ssize_t lanes, const std::string& what,
                                     const char* who) {
  if (a.ndim() != 1 || (a.shape(0) != lanes && a.shape(0) != 1)) {
    throw qs::InvalidArgument(std::string(who) + ": " + what + " has shape (" +
                              (a.ndim() == 1 ? std::to_string(a.shape(0)) : std::to_string(a.ndim()) + " dimensions") +
                              "): must be 1-d with one entry per lane (" + std::to_string(lanes) +
                              ") or one for every lane");
  }
  return a.shape(0) == 1 ? 0 : 1;
}

using LawDoubles = pybind11::array_t<double, pybind11::array::c_style | pybind11::array::forcecast>;
using LawInts = pybind11::array_t<std::int64_t, pybind11::array::c_style | pybind11::array::forcecast>;
// One (gpus, redundant, class_expert, class_share, class_count) slot layout (qsengine.decode.slots.slot_layout).
using SlotLayout = std::tuple<std::int64_t, std::int64_t, LawInts, LawDoubles, LawInts>;

// The routing law of the closed-form straggler: experts, top-k, pi (None: uniform) and the slot layouts
// (arrays kept alive by the caller's arguments).
inline qs::straggler::Routing routing_law(std::int64_t experts, std::int64_t top_k, const std::optional<LawDoubles>& pi,
                    const std::vector<SlotLayout>& layouts, const char* who) {
  qs::straggler::Routing r;
  r.experts = experts;
  r.top_k = top_k;
  if (pi) {
    if (pi->ndim() != 1 || pi->shape(0) != experts) {
      throw qs::InvalidArgument(std::string(who) + ": pi has " +
                                (pi->ndim() == 1 ? std::to_string(pi->shape(0)) + " entries" : std::to_string(pi->ndim()) + " dimensions") +
                                ": must be 1-d with one entry per expert (" + std::to_string(experts) + ")");
    }
    r.pi = pi->data();
  }
  for (std::size_t k = 0; k < layouts.size(); ++k) {
    const auto& [gpus, red, expert, share, count] = layouts[k];
    const std::string tag = std::string(who) + ": layouts[" + std::to_string(k) + "]";
    if (expert.ndim() != 2 || share.ndim() != 2 || count.ndim() != 1 || expert.shape(0) != share.shape(0) ||
        expert.shape(1) != share.shape(1) || expert.shape(0) != count.shape(0)) {
      throw qs::InvalidArgument(tag + ": class_expert and class_share must be (classes, per_gpu) arrays and "
                                "class_count (classes,)");
    }
    r.slots.push_back(qs::straggler::SlotClasses{gpus, red, expert.shape(0), expert.shape(1), expert.data(), share.data(),
                                      count.data()});
  }
  return r;
}

}  // namespace qs_py
