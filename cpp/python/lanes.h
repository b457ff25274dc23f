// Binding layer: the per-lane array rule shared by the step and straggler bindings.
#pragma once

#include <pybind11/numpy.h>

#include <string>

#include "core/errors.h"

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

}  // namespace qs_py
