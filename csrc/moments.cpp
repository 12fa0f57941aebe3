// Segmented class moments over a block of rows, in one read of the features.
//
// Each row is visited twice while it sits in cache: pass A takes its norm, pass B folds it into
// its class's running state centred on the running mean (deviations s, squared deviations q and
// unit vectors x / ||x||), and the group of rows is closed with Chan's batch update. Up to 64
// classes a thread walks its rows in memory order chunk by chunk (grouping each chunk by class);
// above, rows are bucketed by label and each thread walks a contiguous range of class-sorted
// positions. Either way pass B prefetches rows a few chunks ahead (kStreamAheadChunks,
// kSortedAheadChunks), so the arithmetic overlaps the memory reads. Per-thread states are merged after the parallel region in thread order, so
// thread counts change the result only by float64 rounding. The results are written straight
// into the caller's arrays (no C x D temporaries).
#include "moments.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
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
  aligned_vector<double> mean, unit_sum;
  explicit Running(int64_t d) : mean(d, 0.0), unit_sum(d, 0.0) {}
  void reset() {
    n = 0;
    m2 = norm_sum = 0.0;
    std::fill(mean.begin(), mean.end(), 0.0);
    std::fill(unit_sum.begin(), unit_sum.end(), 0.0);
  }
};

inline double inverse_norm(double norm) { return norm > 0.0 ? 1.0 / norm : 0.0; }

// Close a group of r rows that were centred on run.mean (s = sum of deviations, q = sum of their
// squared norms): the batch form of Chan's update,
//   n' = n + r,  mean' = mean + s / n',  M2' = M2 + q - ||s||^2 / n'.
// It equals Chan's merge of the group's own (r, mean_g, M2_g) (q = M2_g + r ||mean_g - mean||^2,
// s = r (mean_g - mean)); because the deviations are taken from the running mean, q and s are
// small where the data are tightly clustered and nothing large cancels.
void close_group(Running& run, const double* s, double q, int64_t r, int64_t d) {
  const int64_t n1 = run.n + r;
  const double inv = 1.0 / static_cast<double>(n1);
  double* mu = run.mean.data();
  double ss = 0.0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < d; ++j) {
    ss += s[j] * s[j];
    mu[j] += s[j] * inv;
  }
  // >= 0 exactly (Cauchy-Schwarz), rounding may not be; NaN and Inf must pass through (the caller's
  // bad-input check reads M2), which std::max(0.0, NaN) would not do.
  const double added = q - ss * inv;
  run.m2 += added < 0.0 ? 0.0 : added;
  run.n = n1;
}

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

// Fold r rows of one class (their norms known) centred on mu: s += sum (x - mu),
// usum += sum x / ||x||; returns sum ||x - mu||^2. The caller closes the group (close_group).
// `next` (rn rows) are the rows the caller reads after these; the AVX-512 kernel prefetches them
// meanwhile, row t's slice with row t's, so memory works while this runs from cache.
template <typename T>
double fold_group(const T* const* rows, const double* norms, int64_t r, int64_t d, const double* mu, double* s,
                  double* usum, const T* const* /*next*/, int64_t /*rn*/) {
  double q = 0.0;
  int64_t t = 0;
  for (; t + 4 <= r; t += 4) {
    const T *a = rows[t], *b = rows[t + 1], *c = rows[t + 2], *e = rows[t + 3];
    const double ia = inverse_norm(norms[t]), ib = inverse_norm(norms[t + 1]), ic = inverse_norm(norms[t + 2]),
                 ie = inverse_norm(norms[t + 3]);
#pragma omp simd reduction(+ : q)
    for (int64_t j = 0; j < d; ++j) {
      const double va = a[j], vb = b[j], vc = c[j], ve = e[j], m = mu[j];
      const double da = va - m, db = vb - m, dc = vc - m, de = ve - m;
      s[j] += (da + db) + (dc + de);
      q += (da * da + db * db) + (dc * dc + de * de);
      usum[j] += (va * ia + vb * ib) + (vc * ic + ve * ie);
    }
  }
  for (; t < r; ++t) {
    const T* a = rows[t];
    const double ia = inverse_norm(norms[t]);
#pragma omp simd reduction(+ : q)
    for (int64_t j = 0; j < d; ++j) {
      const double va = a[j], da = va - mu[j];
      s[j] += da;
      q += da * da;
      usum[j] += va * ia;
    }
  }
  return q;
}

#if defined(__AVX512F__) && !defined(NCFAST_GENERIC_MOMENTS)
// float32 rows with explicit AVX-512: each 8-element slice is widened to float64 once per pass,
// K rows per step share the loads and stores of the accumulator rows; masked loads and stores
// only on the d % 8 tail (AMD's masked stores are slow).
inline __m512d widen8(const float* p, int64_t j, bool masked, __mmask8 m) {
  return _mm512_cvtps_pd(masked ? _mm256_maskz_loadu_ps(m, p + j) : _mm256_loadu_ps(p + j));
}

// Front to back with four accumulators (independent FMAs): rows taken in memory order are then
// read as one sequential stream, which the hardware prefetcher follows from cold memory. All r
// rows in one call, square roots at the end: per row, a call's return (vzeroupper) and a scalar
// square root cost as much as the 512 elements' FMAs.
template <>
void row_norms<float>(const float* const* rows, int64_t r, int64_t d, double* norms) {
  const int64_t full = d & ~int64_t{7}, full4 = d & ~int64_t{31};
  const __mmask8 tail = static_cast<__mmask8>((1u << (d - full)) - 1u);
  for (int64_t t = 0; t < r; ++t) {
    const float* p = rows[t];
    __m512d q0 = _mm512_setzero_pd(), q1 = q0, q2 = q0, q3 = q0;
    int64_t j = 0;
    for (; j < full4; j += 32) {
      const __m512d a = widen8(p, j, false, 0xff), b = widen8(p, j + 8, false, 0xff),
                    c = widen8(p, j + 16, false, 0xff), e = widen8(p, j + 24, false, 0xff);
      q0 = _mm512_fmadd_pd(a, a, q0);
      q1 = _mm512_fmadd_pd(b, b, q1);
      q2 = _mm512_fmadd_pd(c, c, q2);
      q3 = _mm512_fmadd_pd(e, e, q3);
    }
    for (; j < full; j += 8) {
      const __m512d a = widen8(p, j, false, 0xff);
      q0 = _mm512_fmadd_pd(a, a, q0);
    }
    if (full < d) {
      const __m512d a = widen8(p, full, true, tail);
      q1 = _mm512_fmadd_pd(a, a, q1);
    }
    norms[t] = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(q0, q1), _mm512_add_pd(q2, q3)));
  }
  int64_t t = 0;
  for (; t + 8 <= r; t += 8) _mm512_storeu_pd(norms + t, _mm512_sqrt_pd(_mm512_loadu_pd(norms + t)));
  for (; t < r; ++t) norms[t] = std::sqrt(norms[t]);
}

// K (1 or 4) rows centred on mu: s += sum of deviations, usum += sum of x * inv; returns the
// squared deviations as a vector (a local accumulator: one passed by reference could alias the
// stores to s and usum and be reloaded every step). The four rows' terms are summed as a tree,
// which keeps the dependency chains short. Every 16 elements, the same slice of the npf rows pf[]
// is prefetched to L2.
template <int K>
__m512d fold_k(const float* const* p, const double* inv, int64_t d, int64_t full, __mmask8 tail,
               const double* __restrict mu, double* __restrict s, double* __restrict usum, const float* const* pf,
               int npf) {
  static_assert(K == 1 || K == 4, "fold_k: 1 or 4 rows");
  __m512d w[K];
  for (int i = 0; i < K; ++i) w[i] = _mm512_set1_pd(inv[i]);
  __m512d qacc = _mm512_setzero_pd();
  const __m512d one = _mm512_set1_pd(1.0);
  auto step = [&](int64_t j, auto masked_t, __mmask8 m) {
    constexpr bool masked = decltype(masked_t)::value;
    __m512d mean = masked ? _mm512_maskz_loadu_pd(m, mu + j) : _mm512_loadu_pd(mu + j);
    // one load of the mean per step: left alone, GCC folds it into each row's subtraction, four
    // loads where one will do, and the load ports are this loop's bottleneck
#if defined(__GNUC__)
    asm("" : "+v"(mean));
#endif
    __m512d ds, sq, u;
    // x - mean as x * 1 - mean (exact product, one rounding: the same value) on the FMA pipes:
    // the widening conversions and the additions already fill the two FP add pipes (Zen 4/5).
    if constexpr (K == 1) {
      const __m512d x = widen8(p[0], j, masked, m), dev = _mm512_fmsub_pd(x, one, mean);
      ds = dev;
      sq = _mm512_mul_pd(dev, dev);
      u = _mm512_mul_pd(x, w[0]);
    } else {
      const __m512d a = widen8(p[0], j, masked, m), b = widen8(p[1], j, masked, m), c = widen8(p[2], j, masked, m),
                    e = widen8(p[3], j, masked, m);
      const __m512d da = _mm512_fmsub_pd(a, one, mean), db = _mm512_fmsub_pd(b, one, mean),
                    dc = _mm512_fmsub_pd(c, one, mean), de = _mm512_fmsub_pd(e, one, mean);
      ds = _mm512_add_pd(_mm512_add_pd(da, db), _mm512_add_pd(dc, de));
      sq = _mm512_add_pd(_mm512_fmadd_pd(da, da, _mm512_mul_pd(db, db)), _mm512_fmadd_pd(dc, dc, _mm512_mul_pd(de, de)));
      u = _mm512_add_pd(_mm512_fmadd_pd(a, w[0], _mm512_mul_pd(b, w[1])), _mm512_fmadd_pd(c, w[2], _mm512_mul_pd(e, w[3])));
    }
    qacc = _mm512_add_pd(qacc, sq);
    if constexpr (masked) {
      _mm512_mask_storeu_pd(s + j, m, _mm512_add_pd(_mm512_maskz_loadu_pd(m, s + j), ds));
      _mm512_mask_storeu_pd(usum + j, m, _mm512_add_pd(_mm512_maskz_loadu_pd(m, usum + j), u));
    } else {
      _mm512_storeu_pd(s + j, _mm512_add_pd(_mm512_loadu_pd(s + j), ds));
      _mm512_storeu_pd(usum + j, _mm512_add_pd(_mm512_loadu_pd(usum + j), u));
    }
  };
  for (int64_t j = 0; j < full; j += 8) {
    if ((j & 15) == 0)
      for (int i = 0; i < npf; ++i) _mm_prefetch(reinterpret_cast<const char*>(pf[i] + j), _MM_HINT_T1);
    step(j, std::false_type{}, 0xff);
  }
  if (full < d) step(full, std::true_type{}, tail);
  return qacc;
}

template <>
double fold_group<float>(const float* const* rows, const double* norms, int64_t r, int64_t d, const double* mu,
                         double* s, double* usum, const float* const* next, int64_t rn) {
  const int64_t full = d & ~int64_t{7};
  const __mmask8 tail = static_cast<__mmask8>((1u << (d - full)) - 1u);
  __m512d qacc = _mm512_setzero_pd();
  auto prefetched = [&](int64_t t, int k) {  // how many of next[t .. t + k) go with rows t .. t + k
    return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(k, rn - t)));
  };
  double inv[4];
  int64_t t = 0;
  for (; t + 4 <= r; t += 4) {
    for (int i = 0; i < 4; ++i) inv[i] = inverse_norm(norms[t + i]);
    const int npf = prefetched(t, 4);
    qacc = _mm512_add_pd(qacc, fold_k<4>(rows + t, inv, d, full, tail, mu, s, usum, npf ? next + t : nullptr, npf));
  }
  for (; t < r; ++t) {
    inv[0] = inverse_norm(norms[t]);
    const int npf = prefetched(t, 1);
    qacc = _mm512_add_pd(qacc, fold_k<1>(rows + t, inv, d, full, tail, mu, s, usum, npf ? next + t : nullptr, npf));
  }
  for (; t < rn; ++t)  // more next rows than rows here
    for (int64_t j = 0; j < d; j += 16) _mm_prefetch(reinterpret_cast<const char*>(next[t] + j), _MM_HINT_T1);
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
  explicit ClassAccumulator(int64_t d) : run(d), s(d, 0.0) {}

  template <typename T>
  void fold(const T* const* rows, const double* norms, int64_t r, int64_t d, const T* const* next, int64_t rn) {
    if (r == 0) return;
    if (run.n == 0 && since == 0)  // a new class is centred on its first row
      for (int64_t j = 0; j < d; ++j) run.mean[j] = rows[0][j];
    q += fold_group(rows, norms, r, d, run.mean.data(), s.data(), run.unit_sum.data(), next, rn);
    for (int64_t t = 0; t < r; ++t) run.norm_sum += norms[t];
    since += r;
    if (since >= kCloseRows) close(d);
  }
  void close(int64_t d) {
    if (since == 0) return;
    close_group(run, s.data(), q, since, d);
    std::fill(s.begin(), s.end(), 0.0);
    q = 0.0;
    since = 0;
  }
  void reset() {
    run.reset();
    std::fill(s.begin(), s.end(), 0.0);
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

// How far ahead the folds prefetch, in chunks: the rows [c0 + ahead, c0 + ahead + rows) while
// working on [c0, c0 + rows) (the windows of consecutive chunks tile the range, whatever the chunk
// sizes). One chunk ahead was too close in memory order: a chunk's fold is shorter than its
// memory time, so the next chunk's first pass still waited and no new requests went out while it
// did (Zen 5, 2 threads, C = 10: 64-73% -> 79-84% of x.sum()). Class-sorted rows are gathered from
// all over the array; there two chunks ahead did best (C = 1,000: 1 chunk 32-58%, 2 chunks 60-61%,
// 3 chunks 56-63%, 6 chunks 52-55%).
constexpr int64_t kStreamAheadChunks = 3, kSortedAheadChunks = 2;

// Up to this many classes, rows are taken in memory order (see stream_thread); above, one state
// per class per thread would outgrow the caches, and rows are visited class by class instead.
constexpr int64_t kStreamClasses = 64;

// Few classes: one thread's contiguous rows [lo, hi) in memory order, chunk by chunk. Pass A
// takes the chunk's row norms front to back (sequential reads, friendly to the prefetcher and
// the TLB even when the data are cold); the rows are then grouped by class (stable counting sort)
// and pass B folds each group into its class from cache while the next chunk is prefetched.
template <typename T>
void stream_thread(const Matrix& x, const int64_t* labels, int64_t c, int64_t lo, int64_t hi, int64_t rows_per_chunk,
                   std::vector<ClassAccumulator>& acc) {
  const int64_t d = x.cols;
  const bool in_place = rows_in_place<T>(x);
  const int64_t ahead = kStreamAheadChunks * rows_per_chunk;
  aligned_vector<T> buf(in_place ? 0 : rows_per_chunk * d);
  std::vector<double> norms_mem(rows_per_chunk), norms(rows_per_chunk + 3);
  std::vector<const T*> mem(rows_per_chunk), grouped(rows_per_chunk + 3), next(rows_per_chunk);
  std::vector<int64_t> count(c + 1), slot(rows_per_chunk);
  struct Waiting {
    int count = 0;
    const T* rows[3];
    double norms[3];
  };
  std::vector<Waiting> waiting(c);
  for (int64_t c0 = lo; c0 < hi; c0 += rows_per_chunk) {
    const int64_t rows = std::min(rows_per_chunk, hi - c0);
    const int64_t nrows = in_place ? std::max<int64_t>(0, std::min(rows, hi - c0 - ahead)) : 0;
    for (int64_t i = 0; i < rows; ++i) mem[i] = row_as(x, c0 + i, buf.data() + (in_place ? 0 : i * d));
    row_norms(mem.data(), rows, d, norms_mem.data());
    for (int64_t i = 0; i < nrows; ++i) next[i] = static_cast<const T*>(x.data) + (c0 + ahead + i) * x.row_stride;
    // counting sort of the chunk's rows by class (stable: memory order within a class)
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < rows; ++i) ++count[labels[c0 + i] + 1];
    for (int64_t k = 0; k < c; ++k) count[k + 1] += count[k];
    for (int64_t i = 0; i < rows; ++i) slot[count[labels[c0 + i]]++] = i;
    for (int64_t k = c; k > 0; --k) count[k] = count[k - 1];
    count[0] = 0;
    // A class's rows beyond a multiple of four wait (in cache, with their norms) for the next
    // chunk, so that nearly every fold takes four rows at a time; converted rows live in the
    // chunk's buffer, so those are all folded before it is reused.
    int64_t pf0 = 0;  // the next chunk's rows are prefetched by the folds, in turn
    for (int64_t k = 0; k < c; ++k) {
      const int64_t g0 = count[k], g = count[k + 1] - g0;
      if (g == 0) continue;
      auto& wait = waiting[k];
      int64_t r = 0;
      for (int w = 0; w < wait.count; ++w, ++r) {
        grouped[r] = wait.rows[w];
        norms[r] = wait.norms[w];
      }
      for (int64_t p = 0; p < g; ++p, ++r) {
        grouped[r] = mem[slot[g0 + p]];
        norms[r] = norms_mem[slot[g0 + p]];
      }
      const int64_t fold = in_place ? r & ~int64_t{3} : r;
      const int64_t pf = std::max<int64_t>(0, std::min(fold, nrows - pf0));
      acc[k].fold(grouped.data(), norms.data(), fold, d, pf ? next.data() + pf0 : nullptr, pf);
      pf0 += pf;
      wait.count = static_cast<int>(r - fold);
      for (int w = 0; w < wait.count; ++w) {
        wait.rows[w] = grouped[fold + w];
        wait.norms[w] = norms[fold + w];
      }
    }
    for (int64_t i = pf0; i < nrows; ++i)  // rows no fold took along
      for (int64_t j = 0; j < d * static_cast<int64_t>(sizeof(T)); j += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(next[i]) + j, 0, 2);
  }
  for (int64_t k = 0; k < c; ++k) {
    auto& wait = waiting[k];
    acc[k].fold(wait.rows, wait.norms, wait.count, d, static_cast<const T* const*>(nullptr), 0);
  }
  for (auto& a : acc) a.close(d);
}

// Many classes: one thread's range [lo, hi) of class-sorted positions, class segment by class
// segment, in chunks that stay in L2: pass A (norms), then pass B (fold) while the rows after
// the chunk, the next class's included, are prefetched. Whole classes are written to `out`;
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
  const int64_t ahead = kSortedAheadChunks * rows_per_chunk;
  aligned_vector<T> buf(in_place ? 0 : rows_per_chunk * d);
  std::vector<double> norms(rows_per_chunk);
  std::vector<const T*> ptrs(rows_per_chunk), next(rows_per_chunk);
  ClassAccumulator acc(d);
  const Running& run = acc.run;
  int64_t pos = lo;
  while (pos < hi) {
    // The class owning sorted position pos, and the end of its segment inside [lo, hi).
    const int64_t k = std::upper_bound(start.begin(), start.end(), pos) - start.begin() - 1;
    const int64_t end = std::min(hi, start[k + 1]);
    acc.reset();
    for (int64_t c0 = pos; c0 < end; c0 += rows_per_chunk) {
      const int64_t r = std::min(rows_per_chunk, end - c0);
      const int64_t rn = in_place ? std::max<int64_t>(0, std::min(r, hi - c0 - ahead)) : 0;
      for (int64_t t = 0; t < r; ++t) ptrs[t] = row_as(x, order[c0 + t], buf.data() + (in_place ? 0 : t * d));
      for (int64_t t = 0; t < rn; ++t) next[t] = static_cast<const T*>(x.data) + order[c0 + ahead + t] * x.row_stride;
      row_norms(ptrs.data(), r, d, norms.data());
      acc.fold(ptrs.data(), norms.data(), r, d, rn ? next.data() : nullptr, rn);
    }
    acc.close(d);
    if (pos == start[k] && end == start[k + 1]) {  // the whole class: no other thread touches it
      std::copy(run.mean.begin(), run.mean.end(), out.means + k * d);
      std::copy(run.unit_sum.begin(), run.unit_sum.end(), out.unit_sums + k * d);
      out.m2[k] = run.m2;
      out.norm_sums[k] = run.norm_sum;
    } else {
      partials.push_back(Partial{k, run});
    }
    pos = end;
  }
}

// Fold one thread's state of class k into out, in thread order (the first copies).
void merge_into(const MomentsOut& out, int64_t k, int64_t d, int64_t& seen, const Running& s) {
  if (s.n == 0) return;
  const bool first = seen == 0;
  chan_merge(seen, out.means + k * d, out.m2[k], s.n, s.mean.data(), s.m2, d);
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

void block_moments(const Matrix& x, const int64_t* labels, int64_t num_classes, int num_threads,
                   const MomentsOut& out) {
  const int64_t n = x.rows, d = x.cols, c = num_classes;
  std::fill(out.counts, out.counts + c, int64_t{0});
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y = labels[i];
    if (y < 0 || y >= c) throw std::invalid_argument("labels: value out of range [0, num_classes)");
    ++out.counts[y];
  }
  // Classes without rows are zero; every other entry is written (not accumulated) below.
  for (int64_t k = 0; k < c; ++k) {
    if (out.counts[k] > 0) continue;
    std::fill(out.means + k * d, out.means + (k + 1) * d, 0.0);
    std::fill(out.unit_sums + k * d, out.unit_sums + (k + 1) * d, 0.0);
    out.m2[k] = out.norm_sums[k] = 0.0;
  }
  const bool wide = x.dtype == DType::F64;  // float64 input keeps its precision
  const int threads = region_threads(num_threads, (n + 1023) / 1024);

  if (c <= kStreamClasses) {
    const int64_t rows_per_chunk = std::max<int64_t>(4, std::min<int64_t>(256, (256 << 10) / (4 * d)));
    std::vector<std::vector<ClassAccumulator>> acc(threads);
    for_thread_ranges(threads, n, [&](int t, int64_t lo, int64_t hi) {
      acc[t].assign(c, ClassAccumulator(d));
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
