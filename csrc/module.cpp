// ncfast._C: the compiled CPU core. Each kernel family binds its own functions (bindings.h).
// NCFAST_MODULE names the module: _C, or _C_<level> in a build with one module per x86-64 level
// (CMake's NCFAST_ISA_BUILDS), of which ncfast/_extension.py imports the best the CPU runs.
#include "bindings.h"

#ifndef NCFAST_MODULE
#define NCFAST_MODULE _C
#endif

PYBIND11_MODULE(NCFAST_MODULE, m) {
  m.doc() = "ncfast compiled CPU core (no libtorch dependency)";
  ncfast::bind_buffer_pool(m);
  ncfast::bind_build_info(m);
  ncfast::bind_ncc(m);
  ncfast::bind_pairwise(m);
  ncfast::bind_gram(m);
  ncfast::bind_moments(m);
}
