// Binding layer: core exceptions -> Python exceptions.
#include <pybind11/pybind11.h>

#include "core/errors.h"
#include "python/register.h"

namespace qs_py {

void register_errors(pybind11::module_& m) {
  // InvalidArgument derives from std::invalid_argument, which pybind11 already
  // translates to ValueError. ResourceLimitExceeded gets its own subclass.
  pybind11::register_exception<qs::ResourceLimitExceeded>(m, "ResourceLimitError", PyExc_ValueError);
}

}  // namespace qs_py
