// Bindings for csrc/tensor (empty until that part lands).
#include "bindings/bindings.h"

namespace gpufleet::bindings {

void bind_tensor(py::module_& m) {}

}  // namespace gpufleet::bindings
