// Segmented class moments over a block of rows, in one read of the features.
//
// Rows are bucketed by label (counting sort of row indices). The sorted positions are split
// into one contiguous range per thread; each thread walks its range class segment by class
// segment, in chunks of rows small enough to stay in L2. A chunk is converted once to float64
// (sums and squared norms fused into that conversion), its own mean is taken, and a second
// pass over the in-cache chunk gives the centred sum of squares and the unit-vector sums. The
// chunk is folded into the class's running state with Chan's formula. A class cut by a thread
// boundary leaves one partial state per side; these are merged after the parallel region in
// thread order. Thread counts therefore change the result only by float64 rounding.
#include "moments.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

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
  std::vector<double> mean, unit_sum;
  explicit Running(int64_t d) : mean(d, 0.0), unit_sum(d, 0.0) {}
  void reset() {
    n = 0;
    m2 = norm_sum = 0.0;
    std::fill(mean.begin(), mean.end(), 0.0);
    std::fill(unit_sum.begin(), unit_sum.end(), 0.0);
  }
};


// One chunk of rows of one class: pointers to its rows (float or double elements, contiguous),
// reduced in two passes over data that stays in L2. Rows are taken four at a time so that each
// load and store of an accumulator row (chunk sum, unit sum) serves four elements.
template <typename T>
void reduce_chunk(const T* const* rows, int64_t r, int64_t d, double* cmean, double* norms, Running& run,
                  const T* const* /*next*/, int64_t /*rn*/) {
  std::fill(cmean, cmean + d, 0.0);
  int64_t t = 0;
  for (; t + 4 <= r; t += 4) {
    const T *a = rows[t], *b = rows[t + 1], *c = rows[t + 2], *e = rows[t + 3];
    double qa = 0.0, qb = 0.0, qc = 0.0, qe = 0.0;
#pragma omp simd reduction(+ : qa, qb, qc, qe)
    for (int64_t j = 0; j < d; ++j) {
      const double va = a[j], vb = b[j], vc = c[j], ve = e[j];
      cmean[j] += (va + vb) + (vc + ve);
      qa += va * va;
      qb += vb * vb;
      qc += vc * vc;
      qe += ve * ve;
    }
    norms[t] = std::sqrt(qa);
    norms[t + 1] = std::sqrt(qb);
    norms[t + 2] = std::sqrt(qc);
    norms[t + 3] = std::sqrt(qe);
  }
  for (; t < r; ++t) {
    const T* a = rows[t];
    double qa = 0.0;
#pragma omp simd reduction(+ : qa)
    for (int64_t j = 0; j < d; ++j) {
      const double va = a[j];
      cmean[j] += va;
      qa += va * va;
    }
    norms[t] = std::sqrt(qa);
  }
  const double inv_r = 1.0 / static_cast<double>(r);
  for (int64_t j = 0; j < d; ++j) cmean[j] *= inv_r;
  for (t = 0; t < r; ++t) run.norm_sum += norms[t];

  auto inv = [&](int64_t k) { return norms[k] > 0.0 ? 1.0 / norms[k] : 0.0; };
  double m2 = 0.0;
  double* usum = run.unit_sum.data();
  for (t = 0; t + 4 <= r; t += 4) {
    const T *a = rows[t], *b = rows[t + 1], *c = rows[t + 2], *e = rows[t + 3];
    const double ia = inv(t), ib = inv(t + 1), ic = inv(t + 2), ie = inv(t + 3);
#pragma omp simd reduction(+ : m2)
    for (int64_t j = 0; j < d; ++j) {
      const double va = a[j], vb = b[j], vc = c[j], ve = e[j], m = cmean[j];
      const double da = va - m, db = vb - m, dc = vc - m, de = ve - m;
      m2 += (da * da + db * db) + (dc * dc + de * de);
      usum[j] += (va * ia + vb * ib) + (vc * ic + ve * ie);
    }
  }
  for (; t < r; ++t) {
    const T* a = rows[t];
    const double ia = inv(t);
#pragma omp simd reduction(+ : m2)
    for (int64_t j = 0; j < d; ++j) {
      const double va = a[j], da = va - cmean[j];
      m2 += da * da;
      usum[j] += va * ia;
    }
  }
  chan_merge(run.n, run.mean.data(), run.m2, r, cmean, m2, d);
}

#if defined(__AVX512F__) && !defined(NCFAST_GENERIC_MOMENTS)
// The float32 chunk with explicit AVX-512: four rows per step, each 8-element slice widened to
// float64 once per pass, the squared norms and M2 kept in vector accumulators and reduced once
// per row. The same arithmetic as the generic template, in fewer instructions.
template <>
void reduce_chunk<float>(const float* const* rows, int64_t r, int64_t d, double* cmean, double* norms, Running& run,
                         const float* const* next, int64_t rn) {
  std::fill(cmean, cmean + d, 0.0);
  const int64_t full = d & ~int64_t{7};
  const __mmask8 tail = static_cast<__mmask8>((1u << (d - full)) - 1u);
  auto widen = [](const float* p, int64_t j, __mmask8 m) {
    return _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, p + j));
  };
  int64_t t = 0;
  for (; t < r; t += 4) {
    const int k = static_cast<int>(std::min<int64_t>(4, r - t));
    const float* p[4];
    for (int q = 0; q < 4; ++q) p[q] = rows[t + std::min(q, k - 1)];
    __m512d q0 = _mm512_setzero_pd(), q1 = q0, q2 = q0, q3 = q0;
    // rows beyond r repeat the last row with weight 0, so one code path serves 1..4 rows;
    // masked loads and stores only on the tail (AMD's masked stores are slow)
    auto step = [&](int64_t j, auto masked, __mmask8 m) {
      constexpr bool mk = decltype(masked)::value;
      auto ld = [&](const float* q) { return mk ? widen(q, j, m) : _mm512_cvtps_pd(_mm256_loadu_ps(q + j)); };
      const __m512d a = ld(p[0]);
      const __m512d b = k > 1 ? ld(p[1]) : _mm512_setzero_pd();
      const __m512d c = k > 2 ? ld(p[2]) : _mm512_setzero_pd();
      const __m512d e = k > 3 ? ld(p[3]) : _mm512_setzero_pd();
      const __m512d s = _mm512_add_pd(_mm512_add_pd(a, b), _mm512_add_pd(c, e));
      if constexpr (mk)
        _mm512_mask_storeu_pd(cmean + j, m, _mm512_add_pd(_mm512_maskz_loadu_pd(m, cmean + j), s));
      else
        _mm512_storeu_pd(cmean + j, _mm512_add_pd(_mm512_loadu_pd(cmean + j), s));
      q0 = _mm512_fmadd_pd(a, a, q0);
      q1 = _mm512_fmadd_pd(b, b, q1);
      q2 = _mm512_fmadd_pd(c, c, q2);
      q3 = _mm512_fmadd_pd(e, e, q3);
    };
    for (int64_t j = 0; j < full; j += 8) step(j, std::false_type{}, 0xff);
    if (full < d) step(full, std::true_type{}, tail);
    const double qs[4] = {_mm512_reduce_add_pd(q0), _mm512_reduce_add_pd(q1), _mm512_reduce_add_pd(q2),
                          _mm512_reduce_add_pd(q3)};
    for (int q = 0; q < k; ++q) norms[t + q] = std::sqrt(qs[q]);
  }
  const double inv_r = 1.0 / static_cast<double>(r);
  for (int64_t j = 0; j < d; ++j) cmean[j] *= inv_r;
  for (t = 0; t < r; ++t) run.norm_sum += norms[t];

  double* usum = run.unit_sum.data();
  __m512d m2v = _mm512_setzero_pd();
  for (t = 0; t < r; t += 4) {
    const int k = static_cast<int>(std::min<int64_t>(4, r - t));
    const float* p[4];
    double inv[4];
    for (int q = 0; q < 4; ++q) {
      p[q] = rows[t + std::min(q, k - 1)];
      inv[q] = (q < k && norms[t + q] > 0.0) ? 1.0 / norms[t + q] : 0.0;
    }
    const __m512d live[4] = {_mm512_set1_pd(1.0), _mm512_set1_pd(k > 1), _mm512_set1_pd(k > 2), _mm512_set1_pd(k > 3)};
    const __m512d ia = _mm512_set1_pd(inv[0]), ib = _mm512_set1_pd(inv[1]), ic = _mm512_set1_pd(inv[2]),
                  ie = _mm512_set1_pd(inv[3]);
    auto step = [&](int64_t j, auto masked, __mmask8 m) {
      constexpr bool mk = decltype(masked)::value;
      auto ld = [&](const float* q) { return mk ? widen(q, j, m) : _mm512_cvtps_pd(_mm256_loadu_ps(q + j)); };
      const __m512d mu = mk ? _mm512_maskz_loadu_pd(m, cmean + j) : _mm512_loadu_pd(cmean + j);
      // a row beyond r is the last row again: its difference is zeroed and its 1/norm is 0
      const __m512d a = ld(p[0]), b = ld(p[1]), c = ld(p[2]), e = ld(p[3]);
      const __m512d da = _mm512_sub_pd(a, mu), db = _mm512_mul_pd(_mm512_sub_pd(b, mu), live[1]);
      const __m512d dc = _mm512_mul_pd(_mm512_sub_pd(c, mu), live[2]), de = _mm512_mul_pd(_mm512_sub_pd(e, mu), live[3]);
      const __m512d sq = _mm512_add_pd(_mm512_fmadd_pd(da, da, _mm512_mul_pd(db, db)),
                                       _mm512_fmadd_pd(dc, dc, _mm512_mul_pd(de, de)));
      m2v = _mm512_add_pd(m2v, sq);
      const __m512d u = _mm512_add_pd(_mm512_fmadd_pd(a, ia, _mm512_mul_pd(b, ib)),
                                      _mm512_fmadd_pd(c, ic, _mm512_mul_pd(e, ie)));
      if constexpr (mk)
        _mm512_mask_storeu_pd(usum + j, m, _mm512_add_pd(_mm512_maskz_loadu_pd(m, usum + j), u));
      else
        _mm512_storeu_pd(usum + j, _mm512_add_pd(_mm512_loadu_pd(usum + j), u));
    };
    // The second pass runs from cache: meanwhile, ask memory for the next chunk's rows (the
    // hardware prefetcher alone leaves the first pass waiting on every 2 KB row).
    const float* pf[4];
    int npf = 0;
    for (int q = 0; q < 4; ++q)
      if (t + q < rn) pf[npf++] = next[t + q];
    for (int64_t j = 0; j < full; j += 8) {
      if ((j & 15) == 0)
        for (int q = 0; q < npf; ++q) _mm_prefetch(reinterpret_cast<const char*>(pf[q] + j), _MM_HINT_T1);
      step(j, std::false_type{}, 0xff);
    }
    if (full < d) step(full, std::true_type{}, tail);
  }
  for (t = (r + 3) / 4 * 4; t < rn; ++t)  // a next chunk longer than this one
    for (int64_t j = 0; j < d; j += 16) _mm_prefetch(reinterpret_cast<const char*>(next[t] + j), _MM_HINT_T1);
  chan_merge(run.n, run.mean.data(), run.m2, r, cmean, _mm512_reduce_add_pd(m2v), d);
}
#endif

// Rows as float32 (or float64) pointers: in place when contiguous, else converted into buf.
// Fold rows order[p0..p1) (all of one class) into `run`, chunk by chunk; rows up to p_end (the
// end of the thread's range) are prefetched one chunk ahead.
template <typename T>
void accumulate_segment(const Matrix& x, const int64_t* order, int64_t p0, int64_t p1, int64_t p_end,
                        int64_t rows_per_chunk, T* buf, const T** ptrs, double* cmean, double* norms, Running& run) {
  const int64_t d = x.cols;
  const bool in_place = x.col_stride == 1 && ((std::is_same<T, float>::value && x.dtype == DType::F32) ||
                                              (std::is_same<T, double>::value && x.dtype == DType::F64));
  std::vector<const T*> next(in_place ? rows_per_chunk : 0);
  for (int64_t c0 = p0; c0 < p1; c0 += rows_per_chunk) {
    const int64_t r = std::min(rows_per_chunk, p1 - c0);
    // the rows after this chunk in the thread's range, the next class's included
    const int64_t rn = in_place ? std::max<int64_t>(0, std::min(rows_per_chunk, p_end - c0 - r)) : 0;
    for (int64_t t = 0; t < rn; ++t) next[t] = static_cast<const T*>(x.data) + order[c0 + r + t] * x.row_stride;
    for (int64_t t = 0; t < r; ++t) {
      const int64_t i = order[c0 + t];
      if (in_place) {
        ptrs[t] = static_cast<const T*>(x.data) + i * x.row_stride;
      } else {
        T* row = buf + t * d;
        if constexpr (std::is_same<T, double>::value) {
          x.load_row(i, row);
        } else {
          x.load_row_f32(i, row);
        }
        ptrs[t] = row;
      }
    }
    reduce_chunk(ptrs, r, d, cmean, norms, run, next.data(), rn);
  }
}

struct Partial {
  int64_t cls;
  Running state;
};

// Up to this many classes, rows are taken in memory order (see stream_moments); above, one state
// per class per thread would outgrow the caches, and rows are visited class by class instead.
constexpr int64_t kStreamClasses = 64;

// Few classes: each thread walks its contiguous range of rows in memory order, chunk by chunk
// (sequential reads, friendly to the prefetcher and the TLB even when the data is cold), groups
// the chunk's rows by class, and folds each group into its own per-class state (two passes in
// cache, Chan's merge). Per-thread states are merged in thread order after the region.
void stream_moments(const Matrix& x, const int64_t* labels, int64_t c, int num_threads, BlockMoments& r) {
  const int64_t n = x.rows, d = x.cols;
  const int64_t rows_per_chunk = std::max<int64_t>(4, std::min<int64_t>(256, (256 << 10) / (4 * d)));
  const int threads = region_threads(num_threads, (n + 1023) / 1024);
  std::vector<std::vector<Running>> states(threads);
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const int t = thread_id();
    const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
    std::vector<Running>& state = states[t];
    state.assign(c, Running(d));
    const bool wide = x.dtype == DType::F64;
    const bool in_place = x.col_stride == 1 && x.dtype == DType::F32;
    std::vector<float> buf32(wide || in_place ? 0 : rows_per_chunk * d);
    std::vector<double> buf64(wide ? rows_per_chunk * d : 0), cmean(d), norms(rows_per_chunk);
    std::vector<const float*> ptr32(rows_per_chunk), next32(rows_per_chunk);
    std::vector<const double*> ptr64(rows_per_chunk), next64(rows_per_chunk);
    std::vector<int64_t> count(c + 1), slot(rows_per_chunk);
    for (int64_t c0 = lo; c0 < hi; c0 += rows_per_chunk) {
      const int64_t rows = std::min(rows_per_chunk, hi - c0);
      const int64_t nrows = in_place ? std::max<int64_t>(0, std::min(rows_per_chunk, hi - c0 - rows)) : 0;
      // counting sort of the chunk's rows by class (stable: memory order within a class)
      std::fill(count.begin(), count.end(), 0);
      for (int64_t i = 0; i < rows; ++i) ++count[labels[c0 + i] + 1];
      for (int64_t k = 0; k < c; ++k) count[k + 1] += count[k];
      for (int64_t i = 0; i < rows; ++i) slot[count[labels[c0 + i]]++] = i;
      for (int64_t k = c; k > 0; --k) count[k] = count[k - 1];
      count[0] = 0;
      for (int64_t p = 0; p < rows; ++p) {
        const int64_t i = c0 + slot[p];
        if (wide) {
          x.load_row(i, buf64.data() + p * d);
          ptr64[p] = buf64.data() + p * d;
        } else if (in_place) {
          ptr32[p] = static_cast<const float*>(x.data) + i * x.row_stride;
        } else {
          x.load_row_f32(i, buf32.data() + p * d);
          ptr32[p] = buf32.data() + p * d;
        }
      }
      for (int64_t p = 0; p < nrows; ++p) next32[p] = static_cast<const float*>(x.data) + (c0 + rows + p) * x.row_stride;
      for (int64_t k = 0; k < c; ++k) {
        const int64_t g0 = count[k], g = count[k + 1] - g0;
        if (g == 0) continue;
        // each group prefetches its share of the next chunk, so the whole chunk is asked for
        const int64_t pf = std::max<int64_t>(0, std::min(g, nrows - g0));
        if (wide)
          reduce_chunk(ptr64.data() + g0, g, d, cmean.data(), norms.data(), state[k], next64.data(), 0);
        else
          reduce_chunk(ptr32.data() + g0, g, d, cmean.data(), norms.data(), state[k], next32.data() + g0, pf);
      }
    }
  }
  std::vector<int64_t> seen(c, 0);
  for (int t = 0; t < threads; ++t) {
    for (int64_t k = 0; k < c; ++k) {
      const Running& s = states[t][k];
      if (s.n == 0) continue;
      chan_merge(seen[k], r.means.data() + k * d, r.m2[k], s.n, s.mean.data(), s.m2, d);
      double* usum = r.unit_sums.data() + k * d;
      for (int64_t j = 0; j < d; ++j) usum[j] += s.unit_sum[j];
      r.norm_sums[k] += s.norm_sum;
    }
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

BlockMoments block_moments(const Matrix& x, const int64_t* labels, int64_t num_classes, int num_threads) {
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
  if (c <= kStreamClasses) {
    stream_moments(x, labels, c, num_threads, r);
    return r;
  }
  // Counting sort of row indices by class: class k owns sorted positions start[k] .. start[k+1].
  std::vector<int64_t> start(c + 1, 0), order(n);
  for (int64_t k = 0; k < c; ++k) start[k + 1] = start[k] + r.counts[k];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[fill[labels[i]]++] = i;
  }

  // About 128 KiB of rows per chunk: the second pass reads them from L2.
  const int64_t rows_per_chunk = std::max<int64_t>(4, std::min<int64_t>(256, (128 << 10) / (4 * d)));
  const int threads = region_threads(num_threads, (n + 1023) / 1024);
  std::vector<std::vector<Partial>> partials(threads);

#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const int t = thread_id();
    const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
    const bool wide = x.dtype == DType::F64;  // float64 input keeps its precision
    std::vector<float> buf32(wide ? 0 : rows_per_chunk * d);
    std::vector<double> buf64(wide ? rows_per_chunk * d : 0), cmean(d), norms(rows_per_chunk);
    std::vector<const float*> ptr32(rows_per_chunk);
    std::vector<const double*> ptr64(rows_per_chunk);
    Running run(d);
    int64_t pos = lo;
    while (pos < hi) {
      // The class owning sorted position pos, and the end of its segment inside [lo, hi).
      const int64_t k = std::upper_bound(start.begin(), start.end(), pos) - start.begin() - 1;
      const int64_t end = std::min(hi, start[k + 1]);
      run.reset();
      if (wide)
        accumulate_segment(x, order.data(), pos, end, hi, rows_per_chunk, buf64.data(), ptr64.data(), cmean.data(),
                           norms.data(), run);
      else
        accumulate_segment(x, order.data(), pos, end, hi, rows_per_chunk, buf32.data(), ptr32.data(), cmean.data(),
                           norms.data(), run);
      if (pos == start[k] && end == start[k + 1]) {  // the whole class: no other thread touches it
        std::copy(run.mean.begin(), run.mean.end(), r.means.begin() + k * d);
        std::copy(run.unit_sum.begin(), run.unit_sum.end(), r.unit_sums.begin() + k * d);
        r.m2[k] = run.m2;
        r.norm_sums[k] = run.norm_sum;
      } else {
        partials[t].push_back(Partial{k, run});
      }
      pos = end;
    }
  }

  // Classes cut by thread boundaries: merge their pieces in thread order.
  std::vector<int64_t> seen(c, 0);
  for (auto& list : partials) {
    for (auto& p : list) {
      const int64_t k = p.cls;
      chan_merge(seen[k], r.means.data() + k * d, r.m2[k], p.state.n, p.state.mean.data(), p.state.m2, d);
      double* usum = r.unit_sums.data() + k * d;
      for (int64_t j = 0; j < d; ++j) usum[j] += p.state.unit_sum[j];
      r.norm_sums[k] += p.state.norm_sum;
    }
  }
  return r;
}

}  // namespace ncfast
