// Fused nearest-class sweep: no N x C score matrix, one read of the features.
//
// A block of rows is converted once (minus the shift) into a float32 buffer that stays in L1/L2;
// the class centres are swept in tiles of four against pairs of rows, so every loaded vector of
// a row or a centre feeds several fused multiply-adds (8 accumulators: FMA-bound on AVX2).
// Scores are reduced at once into (best, second best, index) per row and class group.
#include "ncc.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>


namespace ncfast {

namespace {

constexpr int64_t kRowBlock = 32;
constexpr int kMaxGroups = 4;

inline void consider(float s, int64_t c, float& b1, float& b2, int64_t& i1) {
  if (s < b1) {  // strict: among equal scores the lower class index (seen first) stays
    b2 = b1;
    b1 = s;
    i1 = c;
  } else if (s < b2) {
    b2 = s;
  }
}

}  // namespace

void ncc_sweep(const Matrix& x, const float* shift, const float* centres, const float* offsets, int64_t k,
               const int64_t* starts, int groups, double rel, const double* cmax, const double* omax,
               int64_t* best, uint8_t* unsure, int num_threads) {
  if (groups < 1 || groups > kMaxGroups) throw std::invalid_argument("groups: between 1 and 4");
  // group_of[c]: which argmin problem class c belongs to
  std::vector<int> group_of(k);
  for (int g = 0; g < groups; ++g)
    for (int64_t c = starts[g]; c < starts[g + 1]; ++c) group_of[c] = g;
  const int64_t n = x.rows, d = x.cols;
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const float inf = std::numeric_limits<float>::infinity();
  const int threads = region_threads(num_threads, blocks);
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<float> buf(kRowBlock * d);
    std::vector<double> row64(d);
    float b1[kRowBlock][kMaxGroups], b2[kRowBlock][kMaxGroups];
    int64_t i1[kRowBlock][kMaxGroups];
    double norm[kRowBlock];
#ifdef NCFAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * kRowBlock;
      const int64_t rows = std::min(kRowBlock, n - r0);
      for (int64_t t = 0; t < rows; ++t) {
        float* dst = buf.data() + t * d;
        double sq = 0.0;
        // x - shift with one rounding of the exact difference, as the bound assumes: float32
        // arithmetic on exactly converted float32/16/bf16 values, float64 first for float64 input.
        if (x.dtype == DType::F64) {
          x.load_row(r0 + t, row64.data());
          for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(row64[j] - static_cast<double>(shift[j]));
        } else {
          x.load_row_f32(r0 + t, dst);
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) dst[j] -= shift[j];
        }
#pragma omp simd reduction(+ : sq)
        for (int64_t j = 0; j < d; ++j) sq += static_cast<double>(dst[j]) * dst[j];
        norm[t] = std::sqrt(sq);
        for (int g = 0; g < groups; ++g) {
          b1[t][g] = b2[t][g] = inf;
          i1[t][g] = 0;
        }
      }
      int64_t t = 0;
      for (; t + 2 <= rows; t += 2) {
        const float* xa = buf.data() + t * d;
        const float* xb = xa + d;
        int64_t c = 0;
        for (; c + 4 <= k; c += 4) {
          const float *w0 = centres + c * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
          float a0 = 0, a1 = 0, a2 = 0, a3 = 0, e0 = 0, e1 = 0, e2 = 0, e3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, e0, e1, e2, e3)
          for (int64_t j = 0; j < d; ++j) {
            const float va = xa[j], vb = xb[j];
            a0 += va * w0[j];
            a1 += va * w1[j];
            a2 += va * w2[j];
            a3 += va * w3[j];
            e0 += vb * w0[j];
            e1 += vb * w1[j];
            e2 += vb * w2[j];
            e3 += vb * w3[j];
          }
          const float as[4] = {a0, a1, a2, a3}, es[4] = {e0, e1, e2, e3};
          for (int q = 0; q < 4; ++q) {
            const int g = group_of[c + q];
            consider(offsets[c + q] + as[q], c + q, b1[t][g], b2[t][g], i1[t][g]);
            consider(offsets[c + q] + es[q], c + q, b1[t + 1][g], b2[t + 1][g], i1[t + 1][g]);
          }
        }
        for (; c < k; ++c) {
          const float* w = centres + c * d;
          float a = 0, e = 0;
#pragma omp simd reduction(+ : a, e)
          for (int64_t j = 0; j < d; ++j) {
            a += xa[j] * w[j];
            e += xb[j] * w[j];
          }
          const int g = group_of[c];
          consider(offsets[c] + a, c, b1[t][g], b2[t][g], i1[t][g]);
          consider(offsets[c] + e, c, b1[t + 1][g], b2[t + 1][g], i1[t + 1][g]);
        }
      }
      for (; t < rows; ++t) {
        const float* xa = buf.data() + t * d;
        for (int64_t c = 0; c < k; ++c) {
          const float* w = centres + c * d;
          float a = 0;
#pragma omp simd reduction(+ : a)
          for (int64_t j = 0; j < d; ++j) a += xa[j] * w[j];
          const int g = group_of[c];
          consider(offsets[c] + a, c, b1[t][g], b2[t][g], i1[t][g]);
        }
      }
      for (t = 0; t < rows; ++t) {
        for (int g = 0; g < groups; ++g) {
          const double bound = rel * (norm[t] * cmax[g] + omax[g]);
          const int64_t o = (r0 + t) * groups + g;
          best[o] = i1[t][g] - starts[g];
          unsure[o] = (starts[g + 1] - starts[g] > 1 &&
                       static_cast<double>(b2[t][g]) - static_cast<double>(b1[t][g]) <= 2.0 * bound) ? 1 : 0;
        }
      }
    }
  }
  (void)threads;  // unused without OpenMP
}

}  // namespace ncfast
