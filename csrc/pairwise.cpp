// Fused reduction of one tile of class pairs: every pair statistic of ncfast.pairwise in one
// sweep over the tile of G = Mt Mt^T (computed by the caller's BLAS), instead of a dozen
// elementwise passes. Rows are split across threads; each thread keeps its own sums and column
// minima, combined afterwards in thread order.
#include "pairwise.h"

#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>


namespace ncfast {


PairSums reduce_pair_tile(const PairTile& t, int64_t row0, int64_t col0, double* best_r, int64_t* idx_r,
                          double* best_c, int64_t* idx_c, int num_threads) {
  const double inf = std::numeric_limits<double>::infinity();
  const int threads = region_threads(num_threads, t.t1);
  std::vector<PairSums> part(threads);
  // Column minima per thread (off-diagonal tiles only): merged in thread order = row order.
  std::vector<double> cbest(t.diagonal ? 0 : static_cast<size_t>(threads) * t.t2, inf);
  std::vector<int64_t> cidx(t.diagonal ? 0 : static_cast<size_t>(threads) * t.t2, -1);

#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const int tid = thread_id();
    PairSums& s = part[tid];
    double* my_cbest = t.diagonal ? nullptr : cbest.data() + static_cast<size_t>(tid) * t.t2;
    int64_t* my_cidx = t.diagonal ? nullptr : cidx.data() + static_cast<size_t>(tid) * t.t2;
#ifdef NCFAST_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < t.t1; ++i) {
      const double* grow = t.gram + i * t.t2;
      const double sqi = t.sq_r[i], ni = t.norm_r[i], vi = t.var_r[i];
      const int64_t j0 = t.diagonal ? i + 1 : 0;
      double resid = 0, cos_dev = 0, coh = 0, dist = 0, msdr = 0, rsum = 0;
      int64_t msdr_n = 0;
      for (int64_t j = j0; j < t.t2; ++j) {
        const double gij = grow[j];
        const double r = gij / t.g - t.etf_offdiag;
        resid += r * r;
        const double cs = gij / (ni * t.norm_c[j]);
        cos_dev += (cs - t.mean_cos) * (cs - t.mean_cos);
        coh += std::fabs(cs + t.etf_cos);
        const double d2 = std::max(sqi + t.sq_c[j] - 2.0 * gij, 0.0);
        const double vs = vi + t.var_c[j];
        dist += d2 + vs;
        rsum += vs / (2.0 * d2);
        if (t.sup_r && t.sup_r[i] == t.sup_c[j]) {
          msdr += d2 + vs;
          ++msdr_n;
        }
        if (!t.diagonal && d2 < my_cbest[j]) {
          my_cbest[j] = d2;
          my_cidx[j] = row0 + i;
        }
      }
      const int64_t cnt = t.t2 - j0;
      if (cnt > 0) {
        const double rmean = rsum / static_cast<double>(cnt);
        double rm2 = 0;
        for (int64_t j = j0; j < t.t2; ++j) {
          const double d2 = std::max(sqi + t.sq_c[j] - 2.0 * grow[j], 0.0);
          const double dev = (vi + t.var_c[j]) / (2.0 * d2) - rmean;
          rm2 += dev * dev;
        }
        chan_merge(s.cdnv_n, &s.cdnv_mean, s.cdnv_m2, cnt, &rmean, rm2, 1);
      }
      if (t.diagonal) {
        const double r = grow[i] / t.g - t.etf_diag;
        s.resid += r * r;
      }
      s.resid += 2.0 * resid;
      s.cos_dev += 2.0 * cos_dev;
      s.coh += 2.0 * coh;
      s.dist += dist;
      s.msdr_sum += 2.0 * msdr;
      s.msdr_n += 2 * msdr_n;
      // Nearest other class of row i: all columns of the tile (both sides of the diagonal).
      double best = best_r[i];
      int64_t arg = idx_r[i];
      for (int64_t j = 0; j < t.t2; ++j) {
        if (t.diagonal && j == i) continue;
        const double d2 = std::max(sqi + t.sq_c[j] - 2.0 * grow[j], 0.0);
        if (d2 < best) {
          best = d2;
          arg = col0 + j;
        }
      }
      best_r[i] = best;
      idx_r[i] = arg;
    }
  }

  PairSums out;
  for (const PairSums& s : part) {
    out.resid += s.resid;
    out.cos_dev += s.cos_dev;
    out.coh += s.coh;
    out.dist += s.dist;
    out.msdr_sum += s.msdr_sum;
    out.msdr_n += s.msdr_n;
    chan_merge(out.cdnv_n, &out.cdnv_mean, out.cdnv_m2, s.cdnv_n, &s.cdnv_mean, s.cdnv_m2, 1);
  }
  if (!t.diagonal) {
    for (int tid = 0; tid < threads; ++tid) {
      for (int64_t j = 0; j < t.t2; ++j) {
        const double v = cbest[static_cast<size_t>(tid) * t.t2 + j];
        if (v < best_c[j]) {
          best_c[j] = v;
          idx_c[j] = cidx[static_cast<size_t>(tid) * t.t2 + j];
        }
      }
    }
  }
  return out;
}

}  // namespace ncfast
