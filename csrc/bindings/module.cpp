// The private extension module gpufleet._core. Public names are re-exported by python/gpufleet.
#include "bindings/bindings.h"

#ifndef GPUFLEET_VERSION
#define GPUFLEET_VERSION "0.0.0"
#endif

PYBIND11_MODULE(_core, m) {
  using namespace gpufleet::bindings;
  m.doc() = "gpufleet's C++/CUDA core (private: use the gpufleet package)";
  m.attr("__version__") = GPUFLEET_VERSION;
  bind_errors(m);
  bind_device(m);
  bind_tensor(m);
  bind_dispatch(m);
  bind_journal(m);  // after bind_dispatch: it takes TaskSpec
  bind_kernels(m);
  bind_pipeline(m);
}
