// Segmented class moments over a block of rows, in one read of the features.
//
// Rows of one class are taken four at a time. Pass A widens them to float64 into an L1 stage and
// sums their squares (the norms their unit vectors need first); pass B folds the staged rows into
// the class's running state centred on the running mean (deviations s, squared deviations q and
// unit vectors x / ||x||), and every 64 rows the group is closed with Chan's batch update. Without
// unit sums no norm is needed and each row is widened and folded in one pass. Up to 32 classes a
// thread walks its rows in memory order chunk by chunk (grouping each chunk by class); above, rows
// are bucketed by label and each thread walks a contiguous range of class-sorted positions. Either
// way each fold prefetches the rows kPrefetchBytes later in its visiting order into L1 (class by
// class also those kFarPrefetchBytes later into L2), so the arithmetic overlaps the memory reads.
// Per-thread states are merged after the parallel region in thread order, so thread counts change
// the result only by float64 rounding. The results are written
// straight into the caller's arrays (no C x D temporaries).
#include "moments.h"
#include "numerics.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ncfast {

void Matrix::load_row(int64_t i, double* out) const {
  const int64_t base = i * row_stride;
  if (col_stride == 1) {
    switch (dtype) {
      case DType::F32: {
        const float* p = static_cast<const float*>(data) + base;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) out[j] = p[j];
        return;
      }
      case DType::F64: {
        const double* p = static_cast<const double*>(data) + base;
        std::copy(p, p + cols, out);
        return;
      }
      case DType::BF16: {
        const uint16_t* p = static_cast<const uint16_t*>(data) + base;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
          const uint32_t u = static_cast<uint32_t>(p[j]) << 16;
          float f;
          std::memcpy(&f, &u, sizeof f);
          out[j] = f;
        }
        return;
      }
      case DType::F16: {
        const uint16_t* p = static_cast<const uint16_t*>(data) + base;
        int64_t j = 0;
#if defined(__F16C__)
        for (; j + 8 <= cols; j += 8) {
          const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)));
          _mm256_storeu_pd(out + j, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
          _mm256_storeu_pd(out + j + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
        }
#endif
        for (; j < cols; ++j) out[j] = f16_to_float(p[j]);
        return;
      }
    }
  }
  for (int64_t j = 0; j < cols; ++j) out[j] = at(i, j);
}

// float16 / bfloat16 convert exactly to float32; float32 is copied; float64 would round.
void Matrix::load_row_f32(int64_t i, float* out) const {
  const Matrix& x = *this;
  const int64_t base = i * x.row_stride;
  const int64_t d = x.cols;
  if (x.col_stride == 1 && x.dtype == DType::F32) {
    const float* p = static_cast<const float*>(x.data) + base;
    std::copy(p, p + d, out);
    return;
  }
  if (x.col_stride == 1 && x.dtype == DType::BF16) {
    const uint16_t* p = static_cast<const uint16_t*>(x.data) + base;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      const uint32_t u = static_cast<uint32_t>(p[j]) << 16;
      std::memcpy(out + j, &u, sizeof(float));
    }
    return;
  }
  if (x.col_stride == 1 && x.dtype == DType::F16) {
    const uint16_t* p = static_cast<const uint16_t*>(x.data) + base;
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= d; j += 8)
      _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))));
#endif
    for (; j < d; ++j) out[j] = f16_to_float(p[j]);
    return;
  }
  for (int64_t j = 0; j < d; ++j) out[j] = static_cast<float>(x.at(i, j));
}

namespace {

// The statistics of one class over the rows seen so far.
struct Running {
  int64_t n = 0;
  double m2 = 0.0, norm_sum = 0.0;
  aligned_vector<double> mean, unit_sum;  // unit_sum is empty when the unit vectors are not summed
  Running(int64_t d, bool unit_sums) : mean(d, 0.0), unit_sum(unit_sums ? d : 0, 0.0) {}
  // Empty again. mean is left as it is: a class's first fold overwrites it with its first row
  // (the shift), and nothing reads the mean of an empty state.
  void reset() {
    n = 0;
    m2 = norm_sum = 0.0;
    std::fill(unit_sum.begin(), unit_sum.end(), 0.0);
  }
};

inline double inverse_norm(double norm) { return norm > 0.0 ? 1.0 / norm : 0.0; }

// The rows a fold requests while it folds its row t, slice by slice, so that memory works while
// the arithmetic runs from cache: near[t] into L1 and far[t], some rows further on, into L2
// (either array may be null, and so may its entries).
template <typename T>
struct Ahead {
  const T* const* near = nullptr;
  const T* const* far = nullptr;
  Ahead at(int64_t t) const { return {near ? near + t : nullptr, far ? far + t : nullptr}; }
  const T* near_row(int i) const { return near ? near[i] : nullptr; }
  const T* far_row(int i) const { return far ? far[i] : nullptr; }
};

// ||row|| of r rows, front to back (float64 sums of the widened elements).
template <typename T>
void row_norms(const T* const* rows, int64_t r, int64_t d, double* norms) {
  for (int64_t t = 0; t < r; ++t) {
    const T* a = rows[t];
    double q = 0.0;
#pragma omp simd reduction(+ : q)
    for (int64_t j = 0; j < d; ++j) {
      const double v = a[j];
      q += v * v;
    }
    norms[t] = std::sqrt(q);
  }
}

// Four rows a..e centred on mu in one loop: s += their deviations and, with Units, usum += the rows
// times their inverse norms w[0..4); returns their squared deviations (one loop for all the sums,
// not a second pass over the rows for the unit vectors).
template <bool Units, typename T>
double fold_four(const T* a, const T* b, const T* c, const T* e, const double* w, int64_t d, const double* mu,
                 double* s, double* usum) {
  double q = 0.0;
#pragma omp simd reduction(+ : q)
  for (int64_t j = 0; j < d; ++j) {
    const double va = a[j], vb = b[j], vc = c[j], ve = e[j], m = mu[j];
    const double da = va - m, db = vb - m, dc = vc - m, de = ve - m;
    s[j] += (da + db) + (dc + de);
    q += (da * da + db * db) + (dc * dc + de * de);
    if constexpr (Units) usum[j] += (va * w[0] + vb * w[1]) + (vc * w[2] + ve * w[3]);
  }
  return q;
}

// Fold r rows of one class centred on mu: s += sum (x - mu), and unless usum is null
// usum += sum x / ||x||, norm_sum += sum ||x||; returns sum ||x - mu||^2. The caller closes the
// group (ClassAccumulator::close). `next` names the rows the AVX-512 kernel prefetches as it goes (Ahead).
// `stage` (4 rows of stage_stride(d) doubles, 64-byte aligned) is scratch for the AVX-512 kernel.
template <typename T>
double fold_group(const T* const* rows, int64_t r, int64_t d, const double* mu, double* s, double* usum,
                  double& norm_sum, Ahead<T> /*next*/, double* /*stage*/) {
  double q = 0.0, norms[4] = {0.0, 0.0, 0.0, 0.0}, w[4];
  int64_t t = 0;
  for (; t + 4 <= r; t += 4) {
    if (usum) row_norms(rows + t, 4, d, norms);
    for (int i = 0; i < 4; ++i) w[i] = inverse_norm(norms[i]);
    norm_sum += (norms[0] + norms[1]) + (norms[2] + norms[3]);
    const T *a = rows[t], *b = rows[t + 1], *c = rows[t + 2], *e = rows[t + 3];
    q += usum ? fold_four<true>(a, b, c, e, w, d, mu, s, usum) : fold_four<false>(a, b, c, e, w, d, mu, s, usum);
  }
  for (; t < r; ++t) {
    const T* a = rows[t];
    if (usum) row_norms(rows + t, 1, d, norms);
    const double ia = inverse_norm(norms[0]);
    norm_sum += norms[0];
#pragma omp simd reduction(+ : q)
    for (int64_t j = 0; j < d; ++j) {
      const double da = a[j] - mu[j];
      s[j] += da;
      q += da * da;
    }
    if (usum)
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) usum[j] += a[j] * ia;
  }
  return q;
}

// NCFAST_GENERIC_MOMENTS: the CMake option of that name (-DNCFAST_GENERIC_MOMENTS=ON) builds the
// portable kernel below on AVX-512 machines too, so that the two can be timed against each other.
#if defined(__AVX512F__) && !defined(NCFAST_GENERIC_MOMENTS)
// float32 rows with explicit AVX-512. Each element is widened to float64 once: pass A widens K
// (1, 2 or 4) rows into the L1-resident stage while it sums their squares (the norms the unit
// vectors need first), pass B folds the staged rows. Widening costs two FP uops per 8 elements
// on Intel (one per cycle on Zen), so pass B reloads the widened values from L1 rather than
// widening them again.
// Masked loads and stores only on the d % 8 tail (AMD's masked stores are slow).
inline __m512d widen8(const float* p, int64_t j, bool masked, __mmask8 m) {
  return _mm512_cvtps_pd(masked ? _mm256_maskz_loadu_ps(m, p + j) : _mm256_loadu_ps(p + j));
}
#endif

// Doubles from one staged row to the next: d rounded up to 8, plus 8 so that the rows (and the
// rows of the source) do not sit a multiple of 4 KiB apart: a load from one staged row right
// after a store to another with the same low 12 address bits waits for the store (4K aliasing).
inline int64_t stage_stride(int64_t d) { return ((d + 7) & ~int64_t{7}) + 8; }

#if defined(__AVX512F__) && !defined(NCFAST_GENERIC_MOMENTS)

// v[0] + ... + v[K - 1] as a tree, K = 1, 2 or 4 (spelt out: GCC keeps a loop over h and i in
// memory, the vectors spilled to the stack).
template <int K>
inline __m512d tree_sum(const __m512d* v) {
  static_assert(K == 1 || K == 2 || K == 4, "tree_sum: 1, 2 or 4 vectors");
  if constexpr (K == 1) return v[0];
  else if constexpr (K == 2) return _mm512_add_pd(v[0], v[1]);
  else return _mm512_add_pd(_mm512_add_pd(v[0], v[1]), _mm512_add_pd(v[2], v[3]));
}

// Pass A for K rows at once (one loop, the K rows' loads and FMAs interleaved): widen row i into
// st + i * dpad (zero past d, up to a multiple of 8) and sum its squares into sq[i].
template <int K>
void stage_rows(const float* const* p, int64_t d, int64_t full, __mmask8 tail, double* __restrict st, int64_t dpad,
                double* sq) {
  __m512d q[K];
  for (int i = 0; i < K; ++i) q[i] = _mm512_setzero_pd();
  auto step = [&](int64_t j, bool masked, __mmask8 m) {
    for (int i = 0; i < K; ++i) {
      const __m512d a = widen8(p[i], j, masked, m);
      _mm512_store_pd(st + i * dpad + j, a);
      q[i] = _mm512_fmadd_pd(a, a, q[i]);
    }
  };
  for (int64_t j = 0; j < full; j += 8) step(j, false, 0xff);
  if (full < d) step(full, true, tail);
  for (int i = 0; i < K; ++i) sq[i] = _mm512_reduce_add_pd(q[i]);
}

// A fold's K rows ahead, taken out of an Ahead once per fold into locals (not read through the
// Ahead at every slice); prefetch(j) requests the slice at element j, the near rows into L1, the
// far ones into L2. The far requests reach L2 before the near ones are made, so a near one waits
// on L2, not on memory, and the L1 fill buffers (16 a core, each held for a request's whole
// latency) turn over faster.
template <int K>
struct Slices {
  const float* near[K];
  const float* far[K];
  explicit Slices(const Ahead<float>& a) {
    for (int i = 0; i < K; ++i) {
      near[i] = a.near_row(i);
      far[i] = a.far_row(i);
    }
  }
  void prefetch(int64_t j) const {
    for (int i = 0; i < K; ++i) {
      if (near[i]) _mm_prefetch(reinterpret_cast<const char*>(near[i] + j), _MM_HINT_T0);
      if (far[i]) _mm_prefetch(reinterpret_cast<const char*>(far[i] + j), _MM_HINT_T1);
    }
  }
};

// K staged rows (row i at stage + i * dpad, dpad = stage_stride(d)) centred on mu: s += sum of
// deviations, usum += sum of x * inv; returns the squared deviations as a vector (a local
// accumulator: one passed by reference could alias the stores to s and usum and be reloaded every
// step). Each row's squared deviations go to their own accumulator and the unit vectors are added
// in a chain through usum: fewer operations than a tree, and the chains of different steps
// overlap. Every 16 elements the same slice of the rows ahead is prefetched (Slices), so
// that the requests are spread over the arithmetic (a burst of them, as in a pass of their own,
// stalls once the fill buffers are full).
template <int K>
__m512d fold_staged(const double* __restrict stage, int64_t dpad, const double* inv, int64_t d, int64_t full,
                    __mmask8 tail, const double* __restrict mu, double* __restrict s, double* __restrict usum,
                    Ahead<float> ahead) {
  static_assert(K == 1 || K == 2 || K == 4, "fold_staged: 1, 2 or 4 rows");
  const Slices<K> pf(ahead);
  constexpr int kAcc = K < 4 ? K : 4;  // accumulators of squared deviations
  __m512d qa[kAcc];
  for (int i = 0; i < kAcc; ++i) qa[i] = _mm512_setzero_pd();
  auto step = [&](int64_t j, auto masked_t, __mmask8 m) {
    constexpr bool masked = decltype(masked_t)::value;
    if ((j & 15) == 0) pf.prefetch(j);
    const __m512d mean = masked ? _mm512_maskz_loadu_pd(m, mu + j) : _mm512_loadu_pd(mu + j);
    __m512d sv = masked ? _mm512_maskz_loadu_pd(m, s + j) : _mm512_loadu_pd(s + j);
    __m512d u = masked ? _mm512_maskz_loadu_pd(m, usum + j) : _mm512_loadu_pd(usum + j);
    // Few live registers: the staged values are loaded again for the unit vectors, the weights
    // are broadcast from memory, and s and usum take their terms in a chain.
    for (int i = 0; i < K; ++i) {
      const __m512d x = _mm512_load_pd(stage + i * dpad + j), dev = _mm512_sub_pd(x, mean);
      qa[i % kAcc] = _mm512_fmadd_pd(dev, dev, qa[i % kAcc]);
      sv = _mm512_add_pd(sv, dev);
      u = _mm512_fmadd_pd(x, _mm512_set1_pd(inv[i]), u);
    }
    if constexpr (masked) {
      _mm512_mask_storeu_pd(s + j, m, sv);
      _mm512_mask_storeu_pd(usum + j, m, u);
    } else {
      _mm512_storeu_pd(s + j, sv);
      _mm512_storeu_pd(usum + j, u);
    }
  };
  for (int64_t j = 0; j < full; j += 8) step(j, std::false_type{}, 0xff);
  if (full < d) step(full, std::true_type{}, tail);
  return tree_sum<kAcc>(qa);
}

// Without unit vectors no row needs its norm first: K rows (1, 2 or 4) widened and folded in one
// pass, s += sum of deviations, the squared deviations returned as a vector.
template <int K>
__m512d fold_plain(const float* const* p, int64_t d, int64_t full, __mmask8 tail, const double* __restrict mu,
                   double* __restrict s, Ahead<float> ahead) {
  constexpr int kAcc = K < 4 ? K : 4;
  const Slices<K> pf(ahead);
  __m512d qa[kAcc];
  for (int i = 0; i < kAcc; ++i) qa[i] = _mm512_setzero_pd();
  auto step = [&](int64_t j, auto masked_t, __mmask8 m) {
    constexpr bool masked = decltype(masked_t)::value;
    if ((j & 15) == 0) pf.prefetch(j);
    const __m512d mean = masked ? _mm512_maskz_loadu_pd(m, mu + j) : _mm512_loadu_pd(mu + j);
    __m512d dev[K];
    for (int i = 0; i < K; ++i) {
      dev[i] = _mm512_sub_pd(widen8(p[i], j, masked, m), mean);
      qa[i % kAcc] = _mm512_fmadd_pd(dev[i], dev[i], qa[i % kAcc]);
    }
    const __m512d ds = tree_sum<K>(dev);
    if constexpr (masked)
      _mm512_mask_storeu_pd(s + j, m, _mm512_add_pd(_mm512_maskz_loadu_pd(m, s + j), ds));
    else
      _mm512_storeu_pd(s + j, _mm512_add_pd(_mm512_loadu_pd(s + j), ds));
  };
  for (int64_t j = 0; j < full; j += 8) step(j, std::false_type{}, 0xff);
  if (full < d) step(full, std::true_type{}, tail);
  return tree_sum<kAcc>(qa);
}

// K rows (1, 2 or 4) staged, their norms taken, then folded.
template <int K>
__m512d stage_and_fold(const float* const* rows, int64_t d, int64_t full, __mmask8 tail, const double* mu, double* s,
                       double* usum, double& norm_sum, Ahead<float> next, double* stage) {
  if (!usum) return fold_plain<K>(rows, d, full, tail, mu, s, next);
  const int64_t dpad = stage_stride(d);
  double sq[4] = {0.0, 0.0, 0.0, 0.0}, nrm[4], inv[4];
  stage_rows<K>(rows, d, full, tail, stage, dpad, sq);
  const __m256d n = _mm256_sqrt_pd(_mm256_loadu_pd(sq));
  // 1 / ||x||, and 0 for a zero row (whose unit vector counts as zero)
  const __m256d w = _mm256_and_pd(_mm256_div_pd(_mm256_set1_pd(1.0), n), _mm256_cmp_pd(n, _mm256_setzero_pd(), _CMP_GT_OQ));
  _mm256_storeu_pd(nrm, n);
  _mm256_storeu_pd(inv, w);
  norm_sum += K == 1 ? nrm[0] : K == 2 ? nrm[0] + nrm[1] : (nrm[0] + nrm[1]) + (nrm[2] + nrm[3]);
  return fold_staged<K>(stage, dpad, inv, d, full, tail, mu, s, usum, next);
}

// Rows in fours, the last r % 4 as a two and a one. Four rows is the widest fold that fits: with
// eight, the stage (32 KiB) and the rows would overflow a 48 KiB L1.
template <>
double fold_group<float>(const float* const* rows, int64_t r, int64_t d, const double* mu, double* s,
                         double* usum, double& norm_sum, Ahead<float> next, double* stage) {
  const int64_t full = d & ~int64_t{7};
  const __mmask8 tail = static_cast<__mmask8>((1u << (d - full)) - 1u);
  __m512d qacc = _mm512_setzero_pd();
  int64_t t = 0;
  for (; t + 4 <= r; t += 4)
    qacc = _mm512_add_pd(qacc, stage_and_fold<4>(rows + t, d, full, tail, mu, s, usum, norm_sum, next.at(t), stage));
  if (t + 2 <= r) {
    qacc = _mm512_add_pd(qacc, stage_and_fold<2>(rows + t, d, full, tail, mu, s, usum, norm_sum, next.at(t), stage));
    t += 2;
  }
  if (t < r) qacc = _mm512_add_pd(qacc, stage_and_fold<1>(rows + t, d, full, tail, mu, s, usum, norm_sum, next.at(t), stage));
  return _mm512_reduce_add_pd(qacc);
}
#endif

// A class's state in one thread: its Running state and the deviation sums (s, q) of the rows
// folded since the last close, all centred on run.mean. The shift (run.mean) is the mean of the
// rows before (or the class's first row), so deviations stay small; closing costs O(D), so it
// happens once kCloseRows rows have gathered, not after every small group.
struct ClassAccumulator {
  static constexpr int64_t kCloseRows = 64;
  Running run;
  aligned_vector<double> s;
  double q = 0.0;
  int64_t since = 0;
  ClassAccumulator(int64_t d, bool unit_sums) : run(d, unit_sums), s(d, 0.0) {}

  template <typename T>
  void fold(const T* const* rows, int64_t r, int64_t d, Ahead<T> next, double* stage) {
    if (r == 0) return;
    if (run.n == 0 && since == 0)  // a new class is centred on its first row
      for (int64_t j = 0; j < d; ++j) run.mean[j] = rows[0][j];
    double* usum = run.unit_sum.empty() ? nullptr : run.unit_sum.data();  // empty: no unit sums kept
    q += fold_group(rows, r, d, run.mean.data(), s.data(), usum, run.norm_sum, next, stage);
    since += r;
    if (since >= kCloseRows) close(d);
  }
  // s is zero whenever since == 0 (from the constructor, then chan_merge_sums).
  void close(int64_t d) {
    if (since == 0) return;
    chan_merge_sums(run.n, run.mean.data(), run.m2, since, s.data(), q, d);
    q = 0.0;
    since = 0;
  }
  void reset() {
    run.reset();
    if (since != 0) std::fill(s.begin(), s.end(), 0.0);
    q = 0.0;
    since = 0;
  }
};

// Whether rows of x can be read in place as T (contiguous elements of that type).
template <typename T>
bool rows_in_place(const Matrix& x) {
  return x.col_stride == 1 && ((std::is_same<T, float>::value && x.dtype == DType::F32) ||
                               (std::is_same<T, double>::value && x.dtype == DType::F64));
}

// Row i as a T pointer: in place, or converted into dst (float16/bfloat16 widen exactly to float32).
template <typename T>
const T* row_as(const Matrix& x, int64_t i, T* dst) {
  if (rows_in_place<T>(x)) return static_cast<const T*>(x.data) + i * x.row_stride;
  if constexpr (std::is_same<T, double>::value)
    x.load_row(i, dst);
  else
    x.load_row_f32(i, dst);
  return dst;
}

// How far ahead of its reads a fold prefetches, in bytes of rows of its own visiting order (at
// least one row): while row t is folded, the row visited kPrefetchBytes later is requested into
// L1. The hardware prefetchers cannot follow rows taken class by class, and a stream of software
// prefetches a few rows ahead keeps the memory busy while the arithmetic runs (a whole chunk ahead
// is too far, and into L1 beats into L2).
constexpr int64_t kPrefetchBytes = 8 << 10;

inline int64_t prefetch_rows(int64_t row_bytes) { return std::max<int64_t>(1, kPrefetchBytes / std::max<int64_t>(1, row_bytes)); }

// Rows visited class by class also request, into L2, the row kFarPrefetchBytes later (see
// Slices); always beyond the near one.
constexpr int64_t kFarPrefetchBytes = 48 << 10;

inline int64_t far_rows(int64_t row_bytes, int64_t near) {
  return std::max<int64_t>(near + 1, kFarPrefetchBytes / std::max<int64_t>(1, row_bytes));
}

// Up to this many classes, rows are taken in memory order (see stream_thread); above, rows are
// visited class by class instead: each chunk's groups get small and the per-class states outgrow
// L1. With the far prefetch of the class-sorted path the two orders meet near 40 classes without
// unit sums (with them, class by class is already ahead at 32).
constexpr int64_t kStreamClasses = 32;

// Few classes: one thread's contiguous rows [lo, hi) in memory order, chunk by chunk. The
// chunk's rows are grouped by class (stable counting sort) and folded group by group; each fold
// prefetches the rows `ahead` places later in this visiting order (the next chunk's rows in
// memory order once this chunk's run out).
template <typename T>
void stream_thread(const Matrix& x, const int64_t* labels, int64_t c, int64_t lo, int64_t hi, int64_t rows_per_chunk,
                   std::vector<ClassAccumulator>& acc) {
  const int64_t d = x.cols;
  const bool in_place = rows_in_place<T>(x);
  const int64_t ahead = in_place ? prefetch_rows(d * static_cast<int64_t>(sizeof(T))) : 0;
  aligned_vector<T> buf(in_place ? 0 : rows_per_chunk * d);
  aligned_vector<double> stage(4 * stage_stride(d));
  // seq: the rows in the order they are folded (at most the chunk's and the waiting ones);
  // next[p]: the row prefetched while seq[p] is folded
  std::vector<const T*> mem(rows_per_chunk), seq(rows_per_chunk + 3 * c), next(rows_per_chunk + 3 * c);
  std::vector<int64_t> count(c + 1), slot(rows_per_chunk), group(c + 1);
  struct Waiting {
    int count = 0;
    const T* rows[3];
  };
  std::vector<Waiting> waiting(c);
  for (int64_t c0 = lo; c0 < hi; c0 += rows_per_chunk) {
    const int64_t rows = std::min(rows_per_chunk, hi - c0);
    for (int64_t i = 0; i < rows; ++i) mem[i] = row_as(x, c0 + i, buf.data() + (in_place ? 0 : i * d));
    // counting sort of the chunk's rows by class (stable: memory order within a class)
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < rows; ++i) ++count[labels[c0 + i] + 1];
    for (int64_t k = 0; k < c; ++k) count[k + 1] += count[k];
    for (int64_t i = 0; i < rows; ++i) slot[count[labels[c0 + i]]++] = i;
    for (int64_t k = c; k > 0; --k) count[k] = count[k - 1];
    count[0] = 0;
    // Class k folds seq[group[k] .. group[k + 1]): its waiting rows, then the chunk's. A class's
    // rows beyond a multiple of four wait (in cache) for the next chunk, so that nearly every fold
    // takes four rows at a time; converted rows live in the chunk's buffer, so those are all
    // folded before it is reused.
    int64_t len = 0;
    for (int64_t k = 0; k < c; ++k) {
      group[k] = len;
      auto& wait = waiting[k];
      const int64_t g0 = count[k], g = count[k + 1] - g0, r = wait.count + g;
      if (g == 0) continue;
      const int64_t fold = in_place ? r & ~int64_t{3} : r;
      for (int w = 0; w < wait.count; ++w) seq[len + w] = wait.rows[w];
      for (int64_t p = 0; p < g; ++p) seq[len + wait.count + p] = mem[slot[g0 + p]];
      wait.count = static_cast<int>(r - fold);
      for (int w = 0; w < wait.count; ++w) wait.rows[w] = seq[len + fold + w];
      len += fold;
    }
    group[c] = len;
    for (int64_t p = 0; p < len; ++p) {
      const int64_t q = p + ahead, beyond = c0 + rows + (q - len);  // beyond: a row of the next chunk
      next[p] = ahead == 0 ? nullptr
                : q < len ? seq[q]
                : beyond < hi ? static_cast<const T*>(x.data) + beyond * x.row_stride : nullptr;
    }
    for (int64_t k = 0; k < c; ++k) {
      const int64_t r = group[k + 1] - group[k];
      if (r > 0) acc[k].fold(seq.data() + group[k], r, d, Ahead<T>{next.data() + group[k]}, stage.data());
    }
  }
  for (int64_t k = 0; k < c; ++k) {
    auto& wait = waiting[k];
    acc[k].fold(wait.rows, wait.count, d, Ahead<T>{}, stage.data());
  }
  for (auto& a : acc) a.close(d);
}

// dst[0, d) = src[0, d) with non-temporal stores where the AVX-512 build can: with many classes
// the C x D results are written once and not read again here, and an ordinary store first reads
// each line from memory.
// The caller fences (_mm_sfence) before the results are read elsewhere.
inline void stream_copy(const double* src, double* dst, int64_t d) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j < d && (reinterpret_cast<uintptr_t>(dst + j) & 63) != 0; ++j) dst[j] = src[j];
  for (; j + 8 <= d; j += 8) _mm512_stream_pd(dst + j, _mm512_loadu_pd(src + j));
#endif
  for (; j < d; ++j) dst[j] = src[j];
}

inline void prefetch_l1(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

inline void store_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// Many classes: one thread's range [lo, hi) of class-sorted positions, class segment by class
// segment, in chunks; each fold prefetches the rows `ahead` sorted positions later into L1 and
// those `far` later into L2, the next classes' included. Whole classes are written to `out`;
// classes cut by the range's ends are left in `partials`.
struct Partial {
  int64_t cls;
  Running state;
};

template <typename T>
void sorted_thread(const Matrix& x, const int64_t* order, const std::vector<int64_t>& start, int64_t lo, int64_t hi,
                   int64_t rows_per_chunk, const MomentsOut& out, std::vector<Partial>& partials) {
  const int64_t d = x.cols;
  const bool in_place = rows_in_place<T>(x);
  const int64_t ahead = in_place ? prefetch_rows(d * static_cast<int64_t>(sizeof(T))) : 0;
  const int64_t far = in_place ? far_rows(d * static_cast<int64_t>(sizeof(T)), ahead) : 0;
  aligned_vector<T> buf(in_place ? 0 : rows_per_chunk * d);
  aligned_vector<double> stage(4 * stage_stride(d));
  std::vector<const T*> ptrs(rows_per_chunk), next(rows_per_chunk), further(rows_per_chunk);
  ClassAccumulator acc(d, out.unit_sums != nullptr);
  const Running& run = acc.run;
  int64_t pos = lo;
  while (pos < hi) {
    // The class owning sorted position pos, and the end of its segment inside [lo, hi).
    const int64_t k = std::upper_bound(start.begin(), start.end(), pos) - start.begin() - 1;
    const int64_t end = std::min(hi, start[k + 1]);
    acc.reset();
    for (int64_t c0 = pos; c0 < end; c0 += rows_per_chunk) {
      const int64_t r = std::min(rows_per_chunk, end - c0);
      // The sorted positions the next chunk will read (the other thread wrote them, so a plain
      // read of each new line would wait on it).
      for (int64_t q = c0 + r + far; q < std::min(hi, c0 + r + far + rows_per_chunk); q += 8)
        prefetch_l1(order + q);
      for (int64_t t = 0; t < r; ++t) {
        ptrs[t] = row_as(x, order[c0 + t], buf.data() + (in_place ? 0 : t * d));
        const int64_t q = c0 + t + ahead;
        next[t] = ahead > 0 && q < hi ? static_cast<const T*>(x.data) + order[q] * x.row_stride : nullptr;
        const int64_t qf = c0 + t + far;
        further[t] = far > 0 && qf < hi ? static_cast<const T*>(x.data) + order[qf] * x.row_stride : nullptr;
      }
      acc.fold(ptrs.data(), r, d, Ahead<T>{next.data(), further.data()}, stage.data());
    }
    acc.close(d);
    if (pos == start[k] && end == start[k + 1]) {  // the whole class: no other thread touches it
      stream_copy(run.mean.data(), out.means + k * d, d);
      out.m2[k] = run.m2;
      if (out.unit_sums) {
        stream_copy(run.unit_sum.data(), out.unit_sums + k * d, d);
        out.norm_sums[k] = run.norm_sum;
      }
    } else {
      partials.push_back(Partial{k, run});
    }
    pos = end;
  }
  store_fence();
}

// Fold one thread's state of class k into out, in thread order (the first copies).
void merge_into(const MomentsOut& out, int64_t k, int64_t d, int64_t& seen, const Running& s) {
  if (s.n == 0) return;
  const bool first = seen == 0;
  chan_merge(seen, out.means + k * d, out.m2[k], s.n, s.mean.data(), s.m2, d);
  if (!out.unit_sums) return;
  double* usum = out.unit_sums + k * d;
  if (first) {
    std::copy(s.unit_sum.begin(), s.unit_sum.end(), usum);
    out.norm_sums[k] = s.norm_sum;
  } else {
    for (int64_t j = 0; j < d; ++j) usum[j] += s.unit_sum[j];
    out.norm_sums[k] += s.norm_sum;
  }
}

// body(t, lo, hi) on every thread of a parallel region, [lo, hi) being thread t's share of n rows.
template <typename Body>
void for_thread_ranges(int threads, int64_t n, Body&& body) {
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const int t = thread_id();
    body(t, n * t / threads, n * (t + 1) / threads);
  }
}

}  // namespace

void centre_rows(const Matrix& x, const int64_t* labels, const double* means, double* out, int num_threads) {
  const int64_t n = x.rows, d = x.cols;
  const int threads = region_threads(num_threads, (n + 255) / 256);
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t i = 0; i < n; ++i) {
    double* row = out + i * d;
    x.load_row(i, row);
    const double* m = means + labels[i] * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) row[j] -= m[j];
  }
  (void)threads;  // unused without OpenMP
}

namespace {

// Count the labels into counts[0, c), checking each: a label outside [0, c) raises
// std::invalid_argument naming it (the first in memory order) before anything else is written.
// The Python layer leaves this check to the kernel on its path, saving a torch pass over the
// labels. One thread: counting in parallel (per-thread counts, then a parallel fill of the sort
// below) is no faster.
void count_labels(const int64_t* labels, int64_t n, int64_t c, int64_t* counts) {
  std::fill(counts, counts + c, int64_t{0});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = labels[i];
    if (y < 0) throw std::invalid_argument("labels: negative label " + std::to_string(y));
    if (y >= c)
      throw std::invalid_argument("labels: label " + std::to_string(y) + " out of range [0, " + std::to_string(c) + ")");
    ++counts[y];
  }
}

}  // namespace

namespace {

// Few classes and few, wide rows (a batch of a convolutional layer's flattened output): the rows are
// taken kColumnChunk features at a time, each chunk by every row in memory order (stream_thread on
// the chunk, no unit sums), so the chunk's class states stay in L2 and the chunks are shared out
// among the threads (a split by rows would give each thread C x D states for few rows). Every
// chunk's M2 is its columns' share of each class's sum of squared deviations; they are added in
// chunk order, so the result does not depend on the number of threads. With unit sums, the row
// norms come first (threads over rows), then each chunk adds its columns of h_i / ||h_i||.
constexpr int64_t kColumnChunk = 2048;
constexpr int64_t kColumnRowsMax = 2048;  // from here on, blocks of rows are split among threads

void column_moments(const Matrix& x, const int64_t* labels, int64_t c, int num_threads, const MomentsOut& out) {
  const int64_t n = x.rows, d = x.cols;
  const int64_t chunks = (d + kColumnChunk - 1) / kColumnChunk;
  const bool units = out.unit_sums != nullptr, wide = x.dtype == DType::F64;
  std::vector<double> inv(units ? n : 0), norms(units ? n : 0), m2(chunks * c, 0.0);
  if (units) {
    const int threads = region_threads(num_threads, (n * d + (1 << 18) - 1) >> 18);
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
      aligned_vector<double> row(d);
#ifdef NCFAST_WITH_OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t i = 0; i < n; ++i) {
        double q = 0.0;
        if (x.dtype == DType::F32 && x.col_stride == 1) {
          const float* p = static_cast<const float*>(x.data) + i * x.row_stride;
#pragma omp simd reduction(+ : q)
          for (int64_t j = 0; j < d; ++j) q += static_cast<double>(p[j]) * p[j];
        } else {
          x.load_row(i, row.data());
#pragma omp simd reduction(+ : q)
          for (int64_t j = 0; j < d; ++j) q += row[j] * row[j];
        }
        norms[i] = std::sqrt(q);
        inv[i] = inverse_norm(norms[i]);
      }
    }
    (void)threads;
  }
  const int threads = region_threads(num_threads, chunks);
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    aligned_vector<double> row(kColumnChunk);
#ifdef NCFAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t q = 0; q < chunks; ++q) {
      const int64_t j0 = q * kColumnChunk, dj = std::min(kColumnChunk, d - j0);
      const Matrix part = x.columns(j0, dj);
      std::vector<ClassAccumulator> acc(c, ClassAccumulator(dj, false));
      const int64_t rows_per_chunk = std::max<int64_t>(4, std::min<int64_t>(256, (256 << 10) / (4 * dj)));
      if (wide)
        stream_thread<double>(part, labels, c, 0, n, rows_per_chunk, acc);
      else
        stream_thread<float>(part, labels, c, 0, n, rows_per_chunk, acc);
      for (int64_t k = 0; k < c; ++k) {
        if (out.counts[k] == 0) continue;
        std::copy(acc[k].run.mean.begin(), acc[k].run.mean.end(), out.means + k * d + j0);
        m2[q * c + k] = acc[k].run.m2;
        if (units) std::fill(out.unit_sums + k * d + j0, out.unit_sums + k * d + j0 + dj, 0.0);
      }
      if (units) {
        const bool direct = x.dtype == DType::F32 && x.col_stride == 1;
        for (int64_t i = 0; i < n; ++i) {
          double* u = out.unit_sums + labels[i] * d + j0;
          const double w = inv[i];
          if (direct) {
            const float* p = static_cast<const float*>(part.data) + i * x.row_stride;
#pragma omp simd
            for (int64_t j = 0; j < dj; ++j) u[j] += static_cast<double>(p[j]) * w;
          } else {
            part.load_row(i, row.data());
#pragma omp simd
            for (int64_t j = 0; j < dj; ++j) u[j] += row[j] * w;
          }
        }
      }
    }
  }
  (void)threads;
  for (int64_t k = 0; k < c; ++k) {
    if (out.counts[k] == 0) continue;
    double total = 0.0;
    for (int64_t q = 0; q < chunks; ++q) total += m2[q * c + k];
    out.m2[k] = total;
    if (units) out.norm_sums[k] = 0.0;
  }
  if (units)
    for (int64_t i = 0; i < n; ++i) out.norm_sums[labels[i]] += norms[i];
}

}  // namespace

void block_moments(const Matrix& x, const int64_t* labels, int64_t num_classes, int num_threads,
                   const MomentsOut& out) {
  const int64_t n = x.rows, d = x.cols, c = num_classes;
  count_labels(labels, n, c, out.counts);
  // Classes without rows are zero; every other entry is written (not accumulated) below.
  for (int64_t k = 0; k < c; ++k) {
    if (out.counts[k] > 0) continue;
    std::fill(out.means + k * d, out.means + (k + 1) * d, 0.0);
    out.m2[k] = 0.0;
    if (out.unit_sums) {
      std::fill(out.unit_sums + k * d, out.unit_sums + (k + 1) * d, 0.0);
      out.norm_sums[k] = 0.0;
    }
  }
  const bool wide = x.dtype == DType::F64;  // float64 input keeps its precision
  const int threads = region_threads(num_threads, (n + 1023) / 1024);

  if (c <= kStreamClasses && n < kColumnRowsMax && d >= 2 * kColumnChunk) {
    column_moments(x, labels, c, num_threads, out);
    return;
  }
  if (c <= kStreamClasses) {
    const int64_t rows_per_chunk = std::max<int64_t>(4, std::min<int64_t>(256, (256 << 10) / (4 * d)));
    std::vector<std::vector<ClassAccumulator>> acc(threads);
    for_thread_ranges(threads, n, [&](int t, int64_t lo, int64_t hi) {
      acc[t].assign(c, ClassAccumulator(d, out.unit_sums != nullptr));
      if (wide)
        stream_thread<double>(x, labels, c, lo, hi, rows_per_chunk, acc[t]);
      else
        stream_thread<float>(x, labels, c, lo, hi, rows_per_chunk, acc[t]);
    });
    std::vector<int64_t> seen(c, 0);
    for (int t = 0; t < threads; ++t)
      for (int64_t k = 0; k < c; ++k)
        merge_into(out, k, d, seen[k], acc[t][k].run);
    return;
  }

  // Counting sort of row indices by class: class k owns sorted positions start[k] .. start[k+1].
  std::vector<int64_t> start(c + 1, 0), order(n);
  for (int64_t k = 0; k < c; ++k) start[k + 1] = start[k] + out.counts[k];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[fill[labels[i]]++] = i;
  }
  // About 128 KiB of rows per chunk: pass B reads them from L2.
  const int64_t rows_per_chunk = std::max<int64_t>(4, std::min<int64_t>(256, (128 << 10) / (4 * d)));
  std::vector<std::vector<Partial>> partials(threads);
  for_thread_ranges(threads, n, [&](int t, int64_t lo, int64_t hi) {
    if (wide)
      sorted_thread<double>(x, order.data(), start, lo, hi, rows_per_chunk, out, partials[t]);
    else
      sorted_thread<float>(x, order.data(), start, lo, hi, rows_per_chunk, out, partials[t]);
  });
  // Classes cut by thread boundaries: merge their pieces in thread order.
  std::vector<int64_t> seen(c, 0);
  for (auto& list : partials)
    for (auto& p : list) merge_into(out, p.cls, d, seen[p.cls], p.state);
}

}  // namespace ncfast
