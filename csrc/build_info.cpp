// What this build has, as functions (simd, openmp_threads; the kernels' own: gram_available,
// ncc_register_tiled, ncc_has_precision), and compile_options(), the human-readable line made from
// them.
#include "bindings.h"
#include "ncc.h"

namespace ncfast {

namespace {

std::string simd() {
#if defined(__AVX512F__)
  return "AVX512";
#elif defined(__AVX2__)
  return "AVX2";
#elif defined(__SSE4_2__)
  return "SSE4.2";
#elif defined(__ARM_NEON)
  return "NEON";
#else
  return "generic";
#endif
}

int openmp_threads() {
#ifdef NCFAST_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

std::string compile_options() {
  const int threads = openmp_threads();
  std::string s = threads > 0 ? "OpenMP=ON(max_threads=" + std::to_string(threads) + ")" : "OpenMP=OFF";
  s += " SIMD=" + simd();
  s += ncc_has_precision("bf16") ? " BF16=ON" : " BF16=OFF";
  return s;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The CPU's (and the OS's: AVX state saved) x86-64 features, from the compiler's cpuid helper.
py::dict cpu_features() {
  __builtin_cpu_init();
  py::dict d;
  d["avx2"] = bool(__builtin_cpu_supports("avx2"));
  d["fma"] = bool(__builtin_cpu_supports("fma"));
  d["bmi2"] = bool(__builtin_cpu_supports("bmi2"));
  d["avx512f"] = bool(__builtin_cpu_supports("avx512f"));
  d["avx512bw"] = bool(__builtin_cpu_supports("avx512bw"));
  d["avx512dq"] = bool(__builtin_cpu_supports("avx512dq"));
  d["avx512vl"] = bool(__builtin_cpu_supports("avx512vl"));
  d["avx512cd"] = bool(__builtin_cpu_supports("avx512cd"));
  d["avx512bf16"] = bool(__builtin_cpu_supports("avx512bf16"));
  return d;
}
#else
py::dict cpu_features() { return py::dict(); }
#endif

}  // namespace

void bind_build_info(py::module_& m) {
  m.def("compile_options", &compile_options,
        "What this build was compiled with: OpenMP (and its threads), SIMD level, AVX512-BF16.");
  m.def("simd", &simd, "The SIMD level this build was compiled for: 'AVX512', 'AVX2', 'SSE4.2', 'NEON' or 'generic'.");
  m.def("cpu_features", &cpu_features,
        "The x86-64 features this CPU runs (avx2, fma, bmi2, avx512f/bw/dq/vl/cd, avx512bf16): {name: bool}; "
        "empty elsewhere.");
  m.def("openmp_threads", &openmp_threads,
        "OpenMP's maximum number of threads (omp_get_max_threads()), or 0 in a build without OpenMP.");
}

}  // namespace ncfast
