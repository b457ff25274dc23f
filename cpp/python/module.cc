// Binding layer entry point: qsengine._core. One register_*.cc per concept.
#include <pybind11/pybind11.h>

#include "core/parallel.h"
#include "core/version.h"
#include "python/register.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "qsengine's compiled core (private; use the qsengine package)";
  m.attr("__version__") = QSENGINE_VERSION;
  m.attr("FORMAT_VERSION") = qs::kFormatVersion;
  m.def("hardware_threads", []() { return qs::resolve_threads(0); },
        "Number of threads used when threads=None.");
  qs_py::register_errors(m);
  qs_py::register_packing(m);
  qs_py::register_routing(m);
  qs_py::register_step(m);
  qs_py::register_straggler(m);
}
