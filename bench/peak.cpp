// ncfast._peak: the machine's arithmetic floor, measured, for bench/run.py (a benchmark tool, built
// as its own module beside ncfast._C). Fused multiply-adds on independent register accumulators,
// every thread busy, no memory traffic; bench/run.py divides an op's FLOP count by this rate to get
// its compute floor (BLAS throughput is not the floor: a kernel can beat it).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "common.h"

namespace ncfast {

namespace {

// One native vector per accumulator, and as many accumulators as fit the register file beside the
// two operands while covering FMA latency x pipes (8 on current x86 and ARM cores): 16 of the 32
// zmm registers with AVX-512, 12 of the 16 ymm registers otherwise. A wider vector type than the
// machine's would be split over two registers each and spill (an AVX2 core then measured a third
// of its rate).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kAccumulators = 16;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
constexpr int kAccumulators = 12;
#else
constexpr int kVectorBytes = 16;
constexpr int kAccumulators = 12;
#endif

template <typename T>
double fma_loop(int64_t iterations) {
  typedef T vec __attribute__((vector_size(kVectorBytes)));
  constexpr int lanes = kVectorBytes / sizeof(T);
  vec acc[kAccumulators];
  vec a, b;
  for (int l = 0; l < lanes; ++l) {
    a[l] = static_cast<T>(0.999999);
    b[l] = static_cast<T>(1e-6);
  }
  for (int q = 0; q < kAccumulators; ++q)
    for (int l = 0; l < lanes; ++l) acc[q][l] = static_cast<T>(q + l);
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
    for (int q = 0; q < kAccumulators; ++q) acc[q] = acc[q] * a + b;  // a float recurrence: not foldable
  }
  double sink = 0.0;
  for (int q = 0; q < kAccumulators; ++q)
    for (int l = 0; l < lanes; ++l) sink += acc[q][l];
  return sink;
}

}  // namespace

// Best FLOP/s (a fused multiply-add counts 2) of float32 or float64 vector FMAs on num_threads
// threads over repeated runs for about `seconds`: the compute floor's denominator.
double fma_peak(bool float64, double seconds, int num_threads) {
  const int threads = region_threads(num_threads, num_threads);
  const int lanes = kVectorBytes / (float64 ? 8 : 4);
  const int64_t iterations = 1 << 22;
  double best = 0.0;
  volatile double sink = 0.0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  do {
    const auto t0 = std::chrono::steady_clock::now();
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
      const double s = float64 ? fma_loop<double>(iterations) : fma_loop<float>(iterations);
#ifdef NCFAST_WITH_OPENMP
#pragma omp atomic
#endif
      sink += s;
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double flops = 2.0 * lanes * kAccumulators * static_cast<double>(iterations) * threads;
    best = std::max(best, flops / dt);
  } while (std::chrono::steady_clock::now() < deadline);
  (void)sink;
  return best;
}

}  // namespace ncfast

PYBIND11_MODULE(_peak, m) {
  namespace py = pybind11;
  m.doc() = "ncfast benchmark tool: the measured peak FMA rate (bench/run.py's compute floor)";
  m.def("fma_peak", &ncfast::fma_peak, py::arg("float64"), py::arg("seconds"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>(),
        "Measured peak FLOP/s of vector fused multiply-adds on num_threads threads (see bench/peak.cpp).");
}
