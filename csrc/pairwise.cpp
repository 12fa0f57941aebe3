// Fused reduction of one tile of class pairs: every pair statistic of ncfast.pairwise in one
// sweep over the tile of G = Mt Mt^T (computed by the caller's BLAS or Gram engine), instead of a
// dozen elementwise passes. Only the pairs above the diagonal of G count (global column > global
// row), so a tile may be a row strip of a diagonal block whose lower part was never computed.
// Rows are split across threads; each thread keeps its own sums and column minima, combined
// afterwards.
#include "pairwise.h"

#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif


namespace ncfast {

#if defined(__AVX512F__)
namespace {

// Running sums of one row's sweep, eight lanes each; the row minimum keeps its first column per
// lane (INT64_MAX in a lane that never took a value).
struct RowAcc {
  __m512d resid, cos_dev, coh, dist, rsum, low;
  __m512i low_j;
};

// Columns [jb, je) of row i in one pass (AVX-512): the squared distance of each pair is formed in a
// register and feeds the row minimum, the column minima, the pair sums and the CDNV ratios written
// to rr. The generic path's separate loops read and wrote an 8 KiB row buffer five times, and GCC
// turned some of them into emulated gathers (1.16 against 0.53 ms per 1008 x 1008 tile, two Xeon
// threads). A Markstein reciprocal in place of the division measured slower (0.60 ms): the sweep
// is bound by its issue ports, not by the divider.
inline void sweep_row(const PairTile& t, const double* grow, const double* inv_nc, double inv_g, double sqi,
                      double inv_ni, double vi, int64_t gi, int64_t jb, int64_t je, double* rr, double* cbest,
                      int64_t* cidx, RowAcc& a) {
  const __m512d vsqi = _mm512_set1_pd(sqi), vinv_ni = _mm512_set1_pd(inv_ni), vvi = _mm512_set1_pd(vi);
  const __m512d vinv_g = _mm512_set1_pd(inv_g), voff = _mm512_set1_pd(t.etf_offdiag);
  const __m512d vmean = _mm512_set1_pd(t.mean_cos), vetf = _mm512_set1_pd(t.etf_cos);
  const __m512d zero = _mm512_setzero_pd(), two = _mm512_set1_pd(2.0);
  const __m512i vgi = _mm512_set1_epi64(gi), eight = _mm512_set1_epi64(8);
  __m512i jv = _mm512_add_epi64(_mm512_set1_epi64(jb), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  for (int64_t j = jb; j < je; j += 8) {
    const __mmask8 m = je - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (je - j)) - 1);
    const __m512d g = _mm512_maskz_loadu_pd(m, grow + j);
    // max(0, x) keeps a NaN x, as std::max(x, 0.0) does
    const __m512d dd =
        _mm512_max_pd(zero, _mm512_fnmadd_pd(two, g, _mm512_add_pd(vsqi, _mm512_maskz_loadu_pd(m, t.sq_c + j))));
    const __mmask8 lt = _mm512_mask_cmp_pd_mask(m, dd, a.low, _CMP_LT_OQ);
    a.low = _mm512_mask_mov_pd(a.low, lt, dd);
    a.low_j = _mm512_mask_mov_epi64(a.low_j, lt, jv);
    jv = _mm512_add_epi64(jv, eight);
    const __mmask8 better = _mm512_mask_cmp_pd_mask(m, dd, _mm512_maskz_loadu_pd(m, cbest + j), _CMP_LT_OQ);
    _mm512_mask_storeu_pd(cbest + j, better, dd);
    _mm512_mask_storeu_epi64(cidx + j, better, vgi);
    const __m512d r = _mm512_fmsub_pd(g, vinv_g, voff);
    a.resid = _mm512_mask3_fmadd_pd(r, r, a.resid, m);
    const __m512d cs = _mm512_mul_pd(_mm512_mul_pd(g, vinv_ni), _mm512_maskz_loadu_pd(m, inv_nc + j));
    const __m512d cd = _mm512_sub_pd(cs, vmean);
    a.cos_dev = _mm512_mask3_fmadd_pd(cd, cd, a.cos_dev, m);
    a.coh = _mm512_mask_add_pd(a.coh, m, a.coh, _mm512_abs_pd(_mm512_add_pd(cs, vetf)));
    const __m512d vs = _mm512_add_pd(vvi, _mm512_maskz_loadu_pd(m, t.var_c + j));
    a.dist = _mm512_mask_add_pd(a.dist, m, a.dist, _mm512_add_pd(dd, vs));
    const __m512d ratio = _mm512_div_pd(vs, _mm512_add_pd(dd, dd));
    _mm512_mask_storeu_pd(rr + j, m, ratio);
    a.rsum = _mm512_mask_add_pd(a.rsum, m, a.rsum, ratio);
  }
}

}  // namespace
#endif

namespace {

// sum_j (x_j - m)^2 in eight independent partial sums: `omp simd reduction` left this a scalar
// chain of dependent FMAs (4 cycles per element, two thirds of the whole tile's time).
inline double sum_sq_dev(const double* x, int64_t n, double m) {
#if defined(__AVX512F__)
  const __m512d vm = _mm512_set1_pd(m);
  __m512d acc = _mm512_setzero_pd(), acc2 = _mm512_setzero_pd();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512d a = _mm512_sub_pd(_mm512_loadu_pd(x + j), vm);
    const __m512d b = _mm512_sub_pd(_mm512_loadu_pd(x + j + 8), vm);
    acc = _mm512_fmadd_pd(a, a, acc);
    acc2 = _mm512_fmadd_pd(b, b, acc2);
  }
  for (; j < n; j += 8) {
    const __mmask8 k = n - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (n - j)) - 1);
    const __m512d a = _mm512_maskz_sub_pd(k, _mm512_maskz_loadu_pd(k, x + j), vm);
    acc = _mm512_fmadd_pd(a, a, acc);
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(acc, acc2));
#else
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += (x[j + l] - m) * (x[j + l] - m);
  for (; j < n; ++j) acc[0] += (x[j] - m) * (x[j] - m);
  double total = 0;
  for (int l = 0; l < 8; ++l) total += acc[l];
  return total;
#endif
}

// Chan's combination for the CDNV ratios, which are +inf where two classes share a mean: the mean
// of a set holding inf is inf (its delta, inf - inf, would have made it NaN), its M2 NaN.
inline void chan_merge_ratio(int64_t& n, double& mean, double& m2, int64_t nb, double mean_b, double m2_b) {
  if (nb == 0) return;
  if (n == 0 || (std::isfinite(mean) && std::isfinite(mean_b))) {
    chan_merge(n, &mean, m2, nb, &mean_b, m2_b, 1);
    return;
  }
  const double nn = static_cast<double>(n + nb);
  mean = mean * (static_cast<double>(n) / nn) + mean_b * (static_cast<double>(nb) / nn);
  m2 = std::numeric_limits<double>::quiet_NaN();
  n += nb;
}

// (value, index) replaces (best, best_idx) if smaller, or equal with a lower index: the nearest
// class is the lowest index among equal distances whatever order the candidates arrive in.
inline bool lex_less(double v, int64_t idx, double best, int64_t best_idx) {
  return v < best || (v == best && idx >= 0 && (best_idx < 0 || idx < best_idx));
}

}  // namespace


PairSums reduce_pair_tile(const PairTile& t, int64_t row0, int64_t col0, double* best_r, int64_t* idx_r,
                          double* best_c, int64_t* idx_c, int num_threads) {
  const double inf = std::numeric_limits<double>::infinity();
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  const int threads = region_threads(num_threads, t.t1);
  std::vector<PairSums> part(threads);
  // Column minima per thread, merged afterwards.
  std::vector<double> cbest(static_cast<size_t>(threads) * t.t2, inf);
  std::vector<int64_t> cidx(static_cast<size_t>(threads) * t.t2, -1);
  // Divisions by the norms become products with their inverses (one division per column, not per
  // pair); the CDNV ratio keeps its division.
  std::vector<double> inv_nc(t.t2);
  for (int64_t j = 0; j < t.t2; ++j) inv_nc[j] = 1.0 / t.norm_c[j];
  const double inv_g = 1.0 / t.g;

#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const int tid = thread_id();
    PairSums& s = part[tid];
    double* my_cbest = cbest.data() + static_cast<size_t>(tid) * t.t2;
    int64_t* my_cidx = cidx.data() + static_cast<size_t>(tid) * t.t2;
    // Row i's CDNV ratios, for their second (deviation) pass. The generic path also keeps the row's
    // squared distances, computed once and read by its later sweeps (each a loop the compiler
    // vectorises: 4.3 -> 1.2 ms per 1008 x 1008 tile on two Xeon threads).
    std::vector<double> ratio(t.t2);
#if !defined(__AVX512F__)
    std::vector<double> d2(t.t2);
#endif
    // Rows in interleaved blocks of 8: a tile that crosses the diagonal has rows of unequal length.
#ifdef NCFAST_WITH_OPENMP
#pragma omp for schedule(static, 8)
#endif
    for (int64_t i = 0; i < t.t1; ++i) {
      const int64_t gi = row0 + i;
      const double* grow = t.gram + i * t.t2;
      const double sqi = t.sq_r[i], inv_ni = 1.0 / t.norm_r[i], vi = t.var_r[i];
      // the pairs of row i: global column above gi
      const int64_t j0 = std::min(t.t2, std::max<int64_t>(0, gi + 1 - col0));
      double* rr = ratio.data();
      double resid, cos_dev, coh, dist, rsum, low;
      int64_t low_j;
#if defined(__AVX512F__)
      RowAcc a{_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(),
               _mm512_setzero_pd(), _mm512_set1_pd(inf), _mm512_set1_epi64(kNone)};
      sweep_row(t, grow, inv_nc.data(), inv_g, sqi, inv_ni, vi, gi, j0, t.t2, rr, my_cbest, my_cidx, a);
      resid = _mm512_reduce_add_pd(a.resid);
      cos_dev = _mm512_reduce_add_pd(a.cos_dev);
      coh = _mm512_reduce_add_pd(a.coh);
      dist = _mm512_reduce_add_pd(a.dist);
      rsum = _mm512_reduce_add_pd(a.rsum);
      low = _mm512_reduce_min_pd(a.low);
      // the first column among the lanes that hold the minimum (each lane keeps its own first)
      low_j = _mm512_mask_reduce_min_epi64(_mm512_cmp_pd_mask(a.low, _mm512_set1_pd(low), _CMP_EQ_OQ), a.low_j);
#else
      double* dd = d2.data();
#pragma omp simd
      for (int64_t j = j0; j < t.t2; ++j) dd[j] = std::max(sqi + t.sq_c[j] - 2.0 * grow[j], 0.0);
      resid = cos_dev = coh = dist = rsum = 0;
#pragma omp simd reduction(+ : resid, cos_dev, coh, dist, rsum)
      for (int64_t j = j0; j < t.t2; ++j) {
        const double gij = grow[j];
        const double r = gij * inv_g - t.etf_offdiag;
        resid += r * r;
        const double cs = gij * inv_ni * inv_nc[j];
        cos_dev += (cs - t.mean_cos) * (cs - t.mean_cos);
        coh += std::fabs(cs + t.etf_cos);
        const double vs = vi + t.var_c[j];
        dist += dd[j] + vs;
        rr[j] = vs / (2.0 * dd[j]);
        rsum += rr[j];
      }
#pragma omp simd
      for (int64_t j = j0; j < t.t2; ++j) {
        const bool better = dd[j] < my_cbest[j];
        my_cbest[j] = better ? dd[j] : my_cbest[j];
        my_cidx[j] = better ? gi : my_cidx[j];
      }
      // Eight running minima, folded at the end: GCC keeps `low = std::min(low, dd[j])` a scalar
      // chain (4 cycles per pair), even under omp simd.
      double lows[8] = {inf, inf, inf, inf, inf, inf, inf, inf};
      int64_t j8 = j0;
      for (; j8 + 8 <= t.t2; j8 += 8)
#pragma omp simd
        for (int l = 0; l < 8; ++l) lows[l] = dd[j8 + l] < lows[l] ? dd[j8 + l] : lows[l];
      for (; j8 < t.t2; ++j8) lows[0] = dd[j8] < lows[0] ? dd[j8] : lows[0];
      low = lows[0];
      for (int l = 1; l < 8; ++l) low = lows[l] < low ? lows[l] : low;
      low_j = kNone;  // as in the AVX-512 sweep, only finite distances are candidates; the scan
      if (low < inf && low <= best_r[i])  // for its column only where it can win
        for (low_j = j0; dd[low_j] != low;) ++low_j;
#endif
      if (t.sup_r) {
        double msdr = 0;
        int64_t msdr_n = 0;
        for (int64_t j = j0; j < t.t2; ++j)
          if (t.sup_r[i] == t.sup_c[j]) {
            msdr += std::max(sqi + t.sq_c[j] - 2.0 * grow[j], 0.0) + vi + t.var_c[j];
            ++msdr_n;
          }
        s.msdr_sum += 2.0 * msdr;
        s.msdr_n += 2 * msdr_n;
      }
      const int64_t cnt = t.t2 - j0;
      if (cnt > 0) {
        const double rmean = rsum / static_cast<double>(cnt);
        const double rm2 = sum_sq_dev(rr + j0, cnt, rmean);
        chan_merge_ratio(s.cdnv_n, s.cdnv_mean, s.cdnv_m2, cnt, rmean, rm2);
      }
      if (gi >= col0 && gi < col0 + t.t2) {  // G_ii, the diagonal of G, enters nc2 once
        const double r = grow[gi - col0] * inv_g - t.etf_diag;
        s.resid += r * r;
      }
      s.resid += 2.0 * resid;
      s.cos_dev += 2.0 * cos_dev;
      s.coh += 2.0 * coh;
      s.dist += dist;
      // Nearest other class of row i among the columns above it; those below reach it as column
      // minima of this or earlier tiles.
      if (low_j != kNone && lex_less(low, col0 + low_j, best_r[i], idx_r[i])) {
        best_r[i] = low;
        idx_r[i] = col0 + low_j;
      }
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
    chan_merge_ratio(out.cdnv_n, out.cdnv_mean, out.cdnv_m2, s.cdnv_n, s.cdnv_mean, s.cdnv_m2);
  }
  // Column minima, after the rows' own updates: best_c may be best_r (a tile on the diagonal).
  for (int tid = 0; tid < threads; ++tid) {
    for (int64_t j = 0; j < t.t2; ++j) {
      const size_t at = static_cast<size_t>(tid) * t.t2 + j;
      if (lex_less(cbest[at], cidx[at], best_c[j], idx_c[j])) {
        best_c[j] = cbest[at];
        idx_c[j] = cidx[at];
      }
    }
  }
  return out;
}

}  // namespace ncfast
