// ncfast._C: the compiled CPU core. Each kernel family binds its own functions (bindings.h).
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "ncfast compiled CPU core (no libtorch dependency)";
  ncfast::bind_buffer_pool(m);
  ncfast::bind_build_info(m);
  ncfast::bind_ncc(m);
  ncfast::bind_pairwise(m);
  ncfast::bind_gram(m);
  ncfast::bind_moments(m);
}
