// What this build was compiled with.
#include "bindings.h"

namespace ncfast {

namespace {

std::string compile_options() {
  std::string s;
#ifdef NCFAST_WITH_OPENMP
  s += "OpenMP=ON(max_threads=" + std::to_string(omp_get_max_threads()) + ")";
#else
  s += "OpenMP=OFF";
#endif
  s += " SIMD=";
#if defined(__AVX512F__)
  s += "AVX512";
#elif defined(__AVX2__)
  s += "AVX2";
#elif defined(__SSE4_2__)
  s += "SSE4.2";
#elif defined(__ARM_NEON)
  s += "NEON";
#else
  s += "generic";
#endif
#if defined(__AVX512BF16__)
  s += " BF16=ON";
#else
  s += " BF16=OFF";
#endif
  return s;
}

}  // namespace

void bind_build_info(py::module_& m) {
  m.def("compile_options", &compile_options,
        "What this build was compiled with: OpenMP (and its threads), SIMD level, AVX512-BF16.");
}

}  // namespace ncfast
