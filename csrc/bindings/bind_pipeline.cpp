// Bindings for csrc/pipeline (empty until that part lands).
#include "bindings/bindings.h"

namespace gpufleet::bindings {

void bind_pipeline(py::module_& m) {}

}  // namespace gpufleet::bindings
