// Bindings for csrc/dispatch (empty until that part lands).
#include "bindings/bindings.h"

namespace gpufleet::bindings {

void bind_dispatch(py::module_& m) {}

}  // namespace gpufleet::bindings
