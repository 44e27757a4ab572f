// Bindings for csrc/kernels (empty until that part lands).
#include "bindings/bindings.h"

namespace gpufleet::bindings {

void bind_kernels(py::module_& m) {}

}  // namespace gpufleet::bindings
