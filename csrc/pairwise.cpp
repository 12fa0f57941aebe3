// Fused reduction of one tile of class pairs: every pair statistic of ncfast.pairwise in one
// sweep over the tile of G = Mt Mt^T (computed by the caller's BLAS or Gram engine), instead of a
// dozen elementwise passes. Only the pairs above the diagonal of G count (global column > global
// row), so a tile may be a row strip of a diagonal block whose lower part was never computed.
// Rows are split across threads; each thread keeps its own sums and column minima, combined
// afterwards.
#include "pairwise.h"

#include "common.h"
#include "numerics.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// glibc's vector math library (libmvec) has SIMD variants of log and pow (_ZGVdN4v_log and kin),
// but its headers declare them only under -ffast-math. Declared here, `omp simd` loops call them:
// the generic path's uniformity logs (at most 1.6 ulp, 2.4e-16 relative, from the exact log over
// 2e7 inputs in (0, 4] and near 1; log(0) = -inf as the scalar one) and the CDNV powers for an
// exponent other than 1. Without glibc the loops call the scalar functions. The AVX-512 sweep has
// its own log (neg_half_log), inline, which costs a fraction of a libmvec call per eight values.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    !defined(__FAST_MATH__)
#if __GLIBC_PREREQ(2, 22)
extern "C" double log(double) noexcept __attribute__((__simd__("notinbranch")));
extern "C" double pow(double, double) noexcept __attribute__((__simd__("notinbranch")));
#endif
#endif

namespace ncfast {

namespace {

// What a row sweep reads of row i besides the tile: its row of G, ||Mt_i||^2, 1 / ||Mt_i||, v_i, its
// global class, its first paired column (global column above the row's class) and the distance
// of its nearest class so far.
struct PairRow {
  const double* g;
  double sq, inv_norm, var;
  int64_t index, begin;
  double best;
};

// What every row of a tile shares: 1 / ||Mt_j|| per column (divisions by the norms become products
// with their inverses: one division per column, not per pair), 1 / ||G||_F and the CDNV exponent.
struct TileScale {
  const double* inv_nc;
  double inv_g, p;
  bool unit_p;  // p == 1
};

// Where a row sweep writes (one set per thread): the row's CDNV ratios and uniformity terms in
// [begin, t2), for their deviation pass, and the thread's column sums of the ratios and column
// minima (with their rows' global indices).
struct RowOut {
  double *ratio, *lg, *csum, *cbest;
  int64_t* cidx;
};

// One row's sums over its pairs; low is its smallest squared distance and low_j that column
// (kNoColumn where no distance was a candidate).
struct RowSums {
  double resid, cos_dev, coh, dist, rsum, usum, low;
  int64_t low_j;
};

constexpr int64_t kNoColumn = std::numeric_limits<int64_t>::max();

// The CDNV ratios of row i for p != 1, from the squared distances in rr[j0, n): rr[j] becomes
// (vi + var_c[j]) / (2 rr[j]^p), added to csum[j]; returns their sum. p = 2 and p = 1/2 take a
// product and a square root (faster than pow, and exactly rounded); other p pow.
template <typename Power>
inline double ratios_with(double* rr, const double* var_c, double vi, int64_t j0, int64_t n, double* csum,
                          Power power) {
  double rsum = 0;
#pragma omp simd simdlen(8) reduction(+ : rsum)
  for (int64_t j = j0; j < n; ++j) {
    const double r = (vi + var_c[j]) / (2.0 * power(rr[j]));
    rr[j] = r;
    csum[j] += r;
    rsum += r;
  }
  return rsum;
}

inline double ratios_pow(double* rr, const double* var_c, double vi, double p, int64_t j0, int64_t n, double* csum) {
  if (p == 2.0) return ratios_with(rr, var_c, vi, j0, n, csum, [](double d) { return d * d; });
  if (p == 0.5) return ratios_with(rr, var_c, vi, j0, n, csum, [](double d) { return std::sqrt(d); });
  return ratios_with(rr, var_c, vi, j0, n, csum, [p](double d) { return std::pow(d, p); });
}

// lg[j] = log(1 / sqrt(lg[j])) = -log(lg[j]) / 2 over [j0, n) (+inf where lg[j] = 0); returns their sum.
inline double log_terms(double* lg, int64_t j0, int64_t n) {
  double sum = 0;
#pragma omp simd simdlen(8) reduction(+ : sum)
  for (int64_t j = j0; j < n; ++j) {
    const double l = -0.5 * std::log(lg[j]);
    lg[j] = l;
    sum += l;
  }
  return sum;
}

// The generic row sweep: a loop per statistic, each one the compiler vectorises. The squared
// distances are formed once into out.ratio and read by the later loops; the last turns them into
// the CDNV ratios in place.
inline RowSums sweep_row_generic(const PairTile& t, const TileScale& k, const PairRow& row, const RowOut& out) {
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t j0 = row.begin, n = t.t2;
  const double sqi = row.sq, inv_ni = row.inv_norm, vi = row.var;
  const double* grow = row.g;
  const double* inv_nc = k.inv_nc;
  double* dd = out.ratio;
  double* lg = out.lg;
  RowSums s;
#pragma omp simd
  for (int64_t j = j0; j < n; ++j) dd[j] = std::max(sqi + t.c.sq[j] - 2.0 * grow[j], 0.0);
  double resid = 0, cos_dev = 0, coh = 0, dist = 0;
#pragma omp simd reduction(+ : resid, cos_dev, coh, dist)
  for (int64_t j = j0; j < n; ++j) {
    const double gij = grow[j];
    const double r = gij * k.inv_g - t.p.etf_offdiag;
    resid += r * r;
    const double cs = gij * inv_ni * inv_nc[j];
    const double u2 = 2.0 - 2.0 * cs;
    lg[j] = u2 <= t.p.unif_floor ? 0.0 : u2;
    cos_dev += (cs - t.p.mean_cos) * (cs - t.p.mean_cos);
    coh += std::fabs(cs + t.p.etf_cos);
    dist += dd[j] + vi + t.c.var[j];
  }
  s.resid = resid;
  s.cos_dev = cos_dev;
  s.coh = coh;
  s.dist = dist;
  s.usum = log_terms(lg, j0, n);
#pragma omp simd
  for (int64_t j = j0; j < n; ++j) {
    const bool better = dd[j] < out.cbest[j];
    out.cbest[j] = better ? dd[j] : out.cbest[j];
    out.cidx[j] = better ? row.index : out.cidx[j];
  }
  // Eight running minima, folded at the end: GCC keeps `low = std::min(low, dd[j])` a scalar
  // chain (one compare latency per pair), even under omp simd.
  double lows[8] = {inf, inf, inf, inf, inf, inf, inf, inf};
  int64_t j8 = j0;
  for (; j8 + 8 <= n; j8 += 8)
#pragma omp simd
    for (int l = 0; l < 8; ++l) lows[l] = dd[j8 + l] < lows[l] ? dd[j8 + l] : lows[l];
  for (; j8 < n; ++j8) lows[0] = dd[j8] < lows[0] ? dd[j8] : lows[0];
  s.low = lows[0];
  for (int l = 1; l < 8; ++l) s.low = lows[l] < s.low ? lows[l] : s.low;
  s.low_j = kNoColumn;  // as in the AVX-512 sweep, only finite distances are candidates; the scan
  if (s.low < inf && s.low <= row.best)  // for its column only where it can win
    for (s.low_j = j0; dd[s.low_j] != s.low;) ++s.low_j;
  // the squared distances become the CDNV ratios (the last loop to read them)
  if (k.unit_p) {
    double rsum = 0;
#pragma omp simd reduction(+ : rsum)
    for (int64_t j = j0; j < n; ++j) {
      const double r = (vi + t.c.var[j]) / (2.0 * dd[j]);
      dd[j] = r;
      out.csum[j] += r;
      rsum += r;
    }
    s.rsum = rsum;
  } else {
    s.rsum = ratios_pow(dd, t.c.var, vi, k.p, j0, n, out.csum);
  }
  return s;
}

// sum_j (x_j - m)^2 in eight independent partial sums: `omp simd reduction` leaves this a scalar
// chain of dependent FMAs (one FMA latency per element).
inline double sum_sq_dev_generic(const double* x, int64_t n, double m) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += (x[j + l] - m) * (x[j + l] - m);
  for (; j < n; ++j) acc[0] += (x[j] - m) * (x[j] - m);
  double total = 0;
  for (int l = 0; l < 8; ++l) total += acc[l];
  return total;
}

#if defined(__AVX512F__)
// -log(x) / 2 for x in [0, 4] (+inf at 0, NaN for NaN), eight lanes, without a division or a call:
// x = m 2^e with m in [0.75, 1.5) (getmant / getexp), m in one of 16 bins of width 3/64 with a
// point c_k (c_k = 1 for the bin holding 1), log m = log c_k + log1p(r), r = m / c_k - 1 formed by
// one FMA with 1/c_k (|r| <= 1/32), log c_k tabulated as a double-double for the double 1/c_k as
// stored (so the reduction is exact up to r's one rounding), log1p(r) as its Taylor polynomial to
// r^11 (truncation below 3e-18 relative). Error against the exact value: a few roundings, so a
// bound of about 4e-16 relative; measured on 2e7 inputs over [0, 4] (uniform, near 1, and down to
// 2^-60) against long double logl, at most 3.0e-16 (near x = 0.984, where log c_k and log1p(r)
// partly cancel). For e = 0 in the bin of 1 (x near 1, the value near 0) the sum is log1p(r)
// alone, with r = m - 1 exact, so the error stays relative there too.
inline __m512d neg_half_log(__m512d x) {
  alignas(64) static const double inv_c[16] = {
      1.292929292929293,  1.2190476190476192, 1.1531531531531531, 1.0940170940170941,
      1.0406504065040652, 1.0,                0.9481481481481482, 0.9078014184397163,
      0.8707482993197279, 0.8366013071895425, 0.8050314465408805, 0.7757575757575758,
      0.7485380116959064, 0.7231638418079096, 0.6994535519125683, 0.6772486772486772};
  // log c_k = -log(inv_c[k]) = hi + lo
  alignas(64) static const double log_hi[16] = {
      -0.2569104137850273, -0.19806991376209387, -0.142500062607283, -0.08985632912186114,
      -0.03984590854719978, 0.0,                 0.05324451451881224, 0.09672962645855114,
      0.1384023228591192,  0.17840765747281825,  0.2168739383006143,  0.25391520998096345,
      0.2896332925830427,  0.324119468654212,    0.3574558889218038,  0.38971675114002524};
  alignas(64) static const double log_lo[16] = {
      9.92419178127068e-19,   -1.0681737386368664e-17, -9.155570001519129e-18, -2.84207093558465e-18,
      1.3948242043384064e-18, 0.0,                     1.803871134979952e-18,  -4.0291867005826106e-18,
      -1.3766819196398948e-17, 1.2720936612962572e-17, 6.285749669211092e-18,  -7.180735656435798e-18,
      2.0535953219858177e-17, -4.488767429940198e-18,  -2.4269548334425144e-17, 2.734172667856699e-17};
  const double ln2_hi = 0.6931471805599453, ln2_lo = 2.3190468138462996e-17;
  const __m512d m = _mm512_getmant_pd(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  // getexp gives floor(log2 x) for a mantissa in [1, 2); one more where m fell in [0.75, 1)
  __m512d e = _mm512_getexp_pd(x);
  e = _mm512_mask_add_pd(e, _mm512_cmp_pd_mask(m, _mm512_set1_pd(1.0), _CMP_LT_OQ), e, _mm512_set1_pd(1.0));
  const __m512d pos = _mm512_mul_pd(_mm512_sub_pd(m, _mm512_set1_pd(0.75)), _mm512_set1_pd(64.0 / 3.0));
  // bin 0..15 for every finite x > 0; at x = 0 (m = 1, e = -inf) and NaN, any bin: e decides
  const __m512i k = _mm512_cvtepi32_epi64(_mm512_cvttpd_epi32(pos));
  auto table = [&](const double* t) {
    return _mm512_permutex2var_pd(_mm512_load_pd(t), k, _mm512_load_pd(t + 8));
  };
  const __m512d r = _mm512_fmsub_pd(m, table(inv_c), _mm512_set1_pd(1.0));
  // log1p(r) = r + r^2 q(r), q(r) = sum_{n=2..11} (-1)^(n+1) r^(n-2) / n
  __m512d q = _mm512_set1_pd(1.0 / 11.0);
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(-1.0 / 10.0));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(1.0 / 9.0));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(-1.0 / 8.0));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(1.0 / 7.0));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(-1.0 / 6.0));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(1.0 / 5.0));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(-1.0 / 4.0));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(1.0 / 3.0));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(-0.5));
  const __m512d log1p_r = _mm512_fmadd_pd(_mm512_mul_pd(r, r), q, r);
  const __m512d small = _mm512_add_pd(log1p_r, _mm512_fmadd_pd(e, _mm512_set1_pd(ln2_lo), table(log_lo)));
  const __m512d big = _mm512_fmadd_pd(e, _mm512_set1_pd(ln2_hi), table(log_hi));
  // x = 0: getexp gives e = -inf, so big and small are -inf and the value +inf
  return _mm512_mul_pd(_mm512_add_pd(big, small), _mm512_set1_pd(-0.5));
}

// Running sums of one row's sweep, eight lanes each; the row minimum keeps its first column per
// lane (INT64_MAX in a lane that never took a value). rsum is used only with kRatio.
struct RowAcc {
  __m512d resid, cos_dev, coh, dist, rsum, usum, low;
  __m512i low_j;
};

// Columns [jb, je) of row i in one pass (AVX-512): the squared distance of each pair is formed in a
// register and feeds the row minimum, the column minima and the pair sums; with kRatio (p = 1) the
// CDNV ratios are written to rr and added to the row's sum and to the column sums csum, without it
// the squared distances are written to rr for ratios_pow. The uniformity terms -log(2 - 2 cos_ij) / 2
// (+inf where 2 - 2 cos_ij <= t.p.unif_floor) go to lg and their sum to usum. One pass, where the
// generic sweep's separate loops read and write a row buffer several times (and GCC turns some of
// them into emulated gathers). The ratio keeps its division: the sweep is bound by its issue
// ports, not by the divider, so a Markstein reciprocal would not pay.
template <bool kRatio>
inline void sweep_columns(const PairTile& t, const double* grow, const double* inv_nc, double inv_g, double sqi,
                          double inv_ni, double vi, int64_t gi, int64_t jb, int64_t je, double* rr, double* lg,
                          double* csum, double* cbest, int64_t* cidx, RowAcc& a) {
  const __m512d vsqi = _mm512_set1_pd(sqi), vinv_ni = _mm512_set1_pd(inv_ni), vvi = _mm512_set1_pd(vi);
  const __m512d vinv_g = _mm512_set1_pd(inv_g), voff = _mm512_set1_pd(t.p.etf_offdiag);
  const __m512d vmean = _mm512_set1_pd(t.p.mean_cos), vetf = _mm512_set1_pd(t.p.etf_cos);
  const __m512d vfloor = _mm512_set1_pd(t.p.unif_floor);
  const __m512d zero = _mm512_setzero_pd(), two = _mm512_set1_pd(2.0);
  const __m512i vgi = _mm512_set1_epi64(gi), eight = _mm512_set1_epi64(8);
  __m512i jv = _mm512_add_epi64(_mm512_set1_epi64(jb), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  for (int64_t j = jb; j < je; j += 8) {
    const __mmask8 m = je - j >= 8 ? __mmask8(0xFF) : __mmask8((1u << (je - j)) - 1);
    const __m512d g = _mm512_maskz_loadu_pd(m, grow + j);
    // max(0, x) keeps a NaN x, as std::max(x, 0.0) does
    const __m512d dd =
        _mm512_max_pd(zero, _mm512_fnmadd_pd(two, g, _mm512_add_pd(vsqi, _mm512_maskz_loadu_pd(m, t.c.sq + j))));
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
    const __m512d u2 = _mm512_fnmadd_pd(two, cs, two);  // ||u_i - u_j||^2; NaN stays NaN
    const __m512d ul = neg_half_log(_mm512_mask_mov_pd(u2, _mm512_cmp_pd_mask(u2, vfloor, _CMP_LE_OQ), zero));
    _mm512_mask_storeu_pd(lg + j, m, ul);
    a.usum = _mm512_mask_add_pd(a.usum, m, a.usum, ul);
    const __m512d cd = _mm512_sub_pd(cs, vmean);
    a.cos_dev = _mm512_mask3_fmadd_pd(cd, cd, a.cos_dev, m);
    a.coh = _mm512_mask_add_pd(a.coh, m, a.coh, _mm512_abs_pd(_mm512_add_pd(cs, vetf)));
    const __m512d vs = _mm512_add_pd(vvi, _mm512_maskz_loadu_pd(m, t.c.var + j));
    a.dist = _mm512_mask_add_pd(a.dist, m, a.dist, _mm512_add_pd(dd, vs));
    if constexpr (kRatio) {
      const __m512d ratio = _mm512_div_pd(vs, _mm512_add_pd(dd, dd));
      _mm512_mask_storeu_pd(rr + j, m, ratio);
      a.rsum = _mm512_mask_add_pd(a.rsum, m, a.rsum, ratio);
      _mm512_mask_storeu_pd(csum + j, m, _mm512_add_pd(_mm512_maskz_loadu_pd(m, csum + j), ratio));
    } else {
      _mm512_mask_storeu_pd(rr + j, m, dd);
    }
  }
}

// The AVX-512 row sweep: one pass over the columns (sweep_columns), then, for p != 1, the ratios
// from the squared distances it left in out.ratio.
inline RowSums sweep_row_avx512(const PairTile& t, const TileScale& k, const PairRow& row, const RowOut& out) {
  const double inf = std::numeric_limits<double>::infinity();
  RowAcc a{_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(),
           _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_set1_pd(inf), _mm512_set1_epi64(kNoColumn)};
  if (k.unit_p)
    sweep_columns<true>(t, row.g, k.inv_nc, k.inv_g, row.sq, row.inv_norm, row.var, row.index, row.begin, t.t2,
                        out.ratio, out.lg, out.csum, out.cbest, out.cidx, a);
  else
    sweep_columns<false>(t, row.g, k.inv_nc, k.inv_g, row.sq, row.inv_norm, row.var, row.index, row.begin, t.t2,
                         out.ratio, out.lg, out.csum, out.cbest, out.cidx, a);
  RowSums s;
  s.resid = _mm512_reduce_add_pd(a.resid);
  s.cos_dev = _mm512_reduce_add_pd(a.cos_dev);
  s.coh = _mm512_reduce_add_pd(a.coh);
  s.dist = _mm512_reduce_add_pd(a.dist);
  s.rsum = k.unit_p ? _mm512_reduce_add_pd(a.rsum) : ratios_pow(out.ratio, t.c.var, row.var, k.p, row.begin, t.t2, out.csum);
  s.usum = _mm512_reduce_add_pd(a.usum);
  s.low = _mm512_reduce_min_pd(a.low);
  // the first column among the lanes that hold the minimum (each lane keeps its own first)
  s.low_j = _mm512_mask_reduce_min_epi64(_mm512_cmp_pd_mask(a.low, _mm512_set1_pd(s.low), _CMP_EQ_OQ), a.low_j);
  return s;
}

// sum_j (x_j - m)^2 in two vectors of eight partial sums.
inline double sum_sq_dev_avx512(const double* x, int64_t n, double m) {
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
}
#endif

// The row sweep and the deviation sums of this build: AVX-512 or generic.
#if defined(__AVX512F__)
inline RowSums sweep_row(const PairTile& t, const TileScale& k, const PairRow& row, const RowOut& out) {
  return sweep_row_avx512(t, k, row, out);
}
inline double sum_sq_dev(const double* x, int64_t n, double m) { return sum_sq_dev_avx512(x, n, m); }
#else
inline RowSums sweep_row(const PairTile& t, const TileScale& k, const PairRow& row, const RowOut& out) {
  return sweep_row_generic(t, k, row, out);
}
inline double sum_sq_dev(const double* x, int64_t n, double m) { return sum_sq_dev_generic(x, n, m); }
#endif

// Chan's combination for the CDNV ratios and the uniformity terms, which are +inf where two classes
// share a mean (a direction): the mean of a set holding inf is inf (its delta, inf - inf, would
// have made it NaN), its M2 NaN.
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

PairSums reduce_pair_tile(const PairTile& t, int num_threads) {
  const int64_t row0 = t.r.start, col0 = t.c.start;
  double* const best_r = t.r.best;
  int64_t* const idx_r = t.r.best_idx;
  double* const ratio_r = t.r.ratio_sum;
  double* const best_c = t.c.best;
  int64_t* const idx_c = t.c.best_idx;
  double* const ratio_c = t.c.ratio_sum;
  const double inf = std::numeric_limits<double>::infinity();
  const int threads = region_threads(num_threads, t.t1);
  std::vector<PairSums> part(threads);
  // Column minima per thread, merged afterwards.
  std::vector<double> cbest(static_cast<size_t>(threads) * t.t2, inf);
  std::vector<int64_t> cidx(static_cast<size_t>(threads) * t.t2, -1);
  // Column sums of the CDNV ratios per thread, likewise.
  std::vector<double> csums(static_cast<size_t>(threads) * t.t2, 0.0);
  std::vector<double> inv_nc(t.t2);
  for (int64_t j = 0; j < t.t2; ++j) inv_nc[j] = 1.0 / t.c.norms[j];
  const TileScale scale{inv_nc.data(), 1.0 / t.p.g, t.p.cdnv_exponent, t.p.cdnv_exponent == 1.0};

#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const int tid = thread_id();
    PairSums& s = part[tid];
    // Row i's CDNV ratios and uniformity terms, for their deviation pass.
    std::vector<double> ratio(t.t2), lgs(t.t2);
    const RowOut out{ratio.data(), lgs.data(), csums.data() + static_cast<size_t>(tid) * t.t2,
                     cbest.data() + static_cast<size_t>(tid) * t.t2, cidx.data() + static_cast<size_t>(tid) * t.t2};
    // Rows in interleaved blocks of 8: a tile that crosses the diagonal has rows of unequal length.
#ifdef NCFAST_WITH_OPENMP
#pragma omp for schedule(static, 8)
#endif
    for (int64_t i = 0; i < t.t1; ++i) {
      const int64_t gi = row0 + i;
      const double* grow = t.gram + i * t.t2;
      const double sqi = t.r.sq[i], vi = t.r.var[i];
      // the pairs of row i: global column above gi
      const int64_t j0 = std::min(t.t2, std::max<int64_t>(0, gi + 1 - col0));
      const RowSums r = sweep_row(t, scale, PairRow{grow, sqi, 1.0 / t.r.norms[i], vi, gi, j0, best_r[i]}, out);
      if (t.r.sup) {
        double msdr = 0;
        int64_t msdr_n = 0;
        for (int64_t j = j0; j < t.t2; ++j)
          if (t.r.sup[i] == t.c.sup[j]) {
            msdr += std::max(sqi + t.c.sq[j] - 2.0 * grow[j], 0.0) + vi + t.c.var[j];
            ++msdr_n;
          }
        s.msdr_sum += 2.0 * msdr;
        s.msdr_n += 2 * msdr_n;
      }
      const int64_t cnt = t.t2 - j0;
      if (cnt > 0) {
        const double rmean = r.rsum / static_cast<double>(cnt);
        const double rm2 = sum_sq_dev(out.ratio + j0, cnt, rmean);
        chan_merge_ratio(s.cdnv.n, s.cdnv.mean, s.cdnv.m2, cnt, rmean, rm2);
        ratio_r[i] += r.rsum;
        const double umean = r.usum / static_cast<double>(cnt);
        const double um2 = sum_sq_dev(out.lg + j0, cnt, umean);
        chan_merge_ratio(s.unif.n, s.unif.mean, s.unif.m2, cnt, umean, um2);
      }
      if (gi >= col0 && gi < col0 + t.t2) {  // G_ii, the diagonal of G, enters nc2 once
        const double d = grow[gi - col0] * scale.inv_g - t.p.etf_diag;
        s.resid += d * d;
      }
      s.resid += 2.0 * r.resid;
      s.cos_dev += 2.0 * r.cos_dev;
      s.coh += 2.0 * r.coh;
      s.dist += r.dist;
      // Nearest other class of row i among the columns above it; those below reach it as column
      // minima of this or earlier tiles.
      if (r.low_j != kNoColumn && lex_less(r.low, col0 + r.low_j, best_r[i], idx_r[i])) {
        best_r[i] = r.low;
        idx_r[i] = col0 + r.low_j;
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
    chan_merge_ratio(out.cdnv.n, out.cdnv.mean, out.cdnv.m2, s.cdnv.n, s.cdnv.mean, s.cdnv.m2);
    chan_merge_ratio(out.unif.n, out.unif.mean, out.unif.m2, s.unif.n, s.unif.mean, s.unif.m2);
  }
  // Column sums of the ratios, after the rows' own: ratio_c may be ratio_r (a tile on the diagonal).
  for (int tid = 0; tid < threads; ++tid) {
    const double* cs = csums.data() + static_cast<size_t>(tid) * t.t2;
    for (int64_t j = 0; j < t.t2; ++j) ratio_c[j] += cs[j];
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
