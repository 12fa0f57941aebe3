// Segmented class moments over a block of rows.
//
// Rows are bucketed by label with a counting sort, then every class segment is
// reduced by exactly one thread: a first pass for the float64 mean, a second
// pass (rows still in cache) for the centred sum of squares. Because a class is
// never split across threads, the result is bit-identical for any thread count.
// Merging blocks (Chan's formula) happens in Python on the float64 state.
#include "moments.h"

#include <cmath>

#ifdef NCFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace ncfast {

void Matrix::load_row(int64_t i, double* out) const {
  const int64_t base = i * row_stride;
  if (dtype == DType::F32 && col_stride == 1) {
    const float* p = static_cast<const float*>(data) + base;
    for (int64_t j = 0; j < cols; ++j) out[j] = p[j];
    return;
  }
  for (int64_t j = 0; j < cols; ++j) out[j] = at(i, j);
}

BlockMoments block_moments(const Matrix& x, const int64_t* labels,
                           int64_t num_classes, int num_threads) {
  const int64_t n = x.rows, d = x.cols, c = num_classes;
  BlockMoments r;
  r.counts.assign(c, 0);
  r.means.assign(c * d, 0.0);
  r.m2.assign(c, 0.0);
  r.unit_sums.assign(c * d, 0.0);
  r.norm_sums.assign(c, 0.0);

  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = labels[i];
    if (y < 0 || y >= c) throw std::invalid_argument("labels: value out of range [0, num_classes)");
    ++r.counts[y];
  }
  // Counting sort of row indices by class: start[c] .. start[c+1].
  std::vector<int64_t> start(c + 1, 0), order(n);
  for (int64_t k = 0; k < c; ++k) start[k + 1] = start[k] + r.counts[k];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[fill[labels[i]]++] = i;
  }

#ifdef NCFAST_WITH_OPENMP
  if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
#endif
  {
    std::vector<double> row(d);
#ifdef NCFAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t k = 0; k < c; ++k) {
      const int64_t lo = start[k], hi = start[k + 1];
      if (lo == hi) continue;
      double* mean = r.means.data() + k * d;
      double* usum = r.unit_sums.data() + k * d;
      double nsum = 0.0;
      for (int64_t p = lo; p < hi; ++p) {
        x.load_row(order[p], row.data());
        double sq = 0.0;
        for (int64_t j = 0; j < d; ++j) {
          mean[j] += row[j];
          sq += row[j] * row[j];
        }
        const double norm = std::sqrt(sq);
        nsum += norm;
        if (norm > 0.0) {
          const double inv = 1.0 / norm;
          for (int64_t j = 0; j < d; ++j) usum[j] += row[j] * inv;
        }
      }
      const double inv_n = 1.0 / static_cast<double>(hi - lo);
      for (int64_t j = 0; j < d; ++j) mean[j] *= inv_n;
      double m2 = 0.0;
      for (int64_t p = lo; p < hi; ++p) {
        x.load_row(order[p], row.data());
        for (int64_t j = 0; j < d; ++j) {
          const double t = row[j] - mean[j];
          m2 += t * t;
        }
      }
      r.m2[k] = m2;
      r.norm_sums[k] = nsum;
    }
  }
  return r;
}

}  // namespace ncfast
