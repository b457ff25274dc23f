// Binding layer: one registration function per concept, defined in register_*.cc.
#pragma once

#include <pybind11/pybind11.h>

namespace qs_py {

void register_errors(pybind11::module_& m);
void register_packing(pybind11::module_& m);
void register_routing(pybind11::module_& m);
void register_step(pybind11::module_& m);
void register_straggler(pybind11::module_& m);

}  // namespace qs_py
