// Float64 Gram products on MR x 16 register tiles (AVX-512: 2 MR accumulators, two vector loads
// and MR broadcasts per step of the inner dimension), fed from packed panels:
//   B panel q: [k][16] = the 16 output columns' values at step k;  A panel p: [k][MR] likewise.
// The within-class scatter packs B panels straight from the feature rows, centring them on the
// way (no centred N x D copy), and reads its 8-row A operands from the same panels; gram_nt (the
// pairwise tiles) packs 12-row A panels of class means.
#include "gram.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ncfast {

#if defined(__AVX512F__)
namespace {

constexpr int kMR = 12;        // rows of the register tile (broadcast side)
constexpr int kNR = 16;        // columns (two 8-double vectors)
// Inner-dimension steps per packed panel: an A panel (12 x 128 doubles, 12 KiB) stays in L1 while
// the B panels of its row stream from L2 (at d = 512, 512 KiB of them; with 256 steps, 1 MiB, the
// product runs slower).
constexpr int64_t kChunk = 128;

// c (MR x 16, leading dimension ldc) += sum_{t < kc} a_t (x) bp[t][:], where a_t[r] = ap[t * lda + r]
// (a packed A panel: lda = MR; or, for the scatter, a half of a B panel: lda = 16).
template <int MR>
inline void micro(const double* ap, int64_t lda, const double* bp, int64_t kc, double* c, int64_t ldc) {
  __m512d acc[2 * MR];
#pragma GCC unroll 24
  for (int q = 0; q < 2 * MR; ++q) acc[q] = _mm512_setzero_pd();
  for (int64_t t = 0; t < kc; ++t) {
    const __m512d w0 = _mm512_load_pd(bp + t * kNR);
    const __m512d w1 = _mm512_load_pd(bp + t * kNR + 8);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512d v = _mm512_set1_pd(ap[t * lda + r]);
      acc[2 * r] = _mm512_fmadd_pd(v, w0, acc[2 * r]);
      acc[2 * r + 1] = _mm512_fmadd_pd(v, w1, acc[2 * r + 1]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    double* row = c + r * ldc;
    _mm512_storeu_pd(row, _mm512_add_pd(_mm512_loadu_pd(row), acc[2 * r]));
    _mm512_storeu_pd(row + 8, _mm512_add_pd(_mm512_loadu_pd(row + 8), acc[2 * r + 1]));
  }
}

// The scatter's register tile is 8 x 16: its eight rows are half of a 16-wide B panel, so the
// rows are packed once (B panels only) and A is broadcast straight from them, with no A panels to
// pack as 12 x 16 tiles would need.
constexpr int kSR = 8;

// Packing one 16-column B panel of a chunk (widening, centring, scaling 128 x 16 values from
// memory) costs about as long as this many 8 x 16 register tiles of the chunk. The bands count it:
// balanced by tiles alone, the thread that packs the most panels would finish last.
constexpr double kPackTiles = 2.0;

// The first register-tile column q of tile row p (tiles of mr rows) that touches the upper
// triangle of a square output ((q + 1) * kNR - 1 >= p * mr).
inline int64_t first_upper(int64_t p, int64_t mr) { return p * mr / kNR; }

// Contiguous bands of pa tile rows, one a thread, that make the costliest band as cheap as can be
// when a band starting at row lo costs start(lo) on top of its rows' cost(p): bisection on that
// largest cost, each candidate checked by filling bands greedily from row 0 (optimal here, as
// start falls with lo). Thread t's band is [lo, hi).
template <typename Cost, typename Start>
std::pair<int64_t, int64_t> balanced_rows(int t, int threads, int64_t pa, Cost cost, Start start) {
  std::vector<int64_t> cuts;
  auto fill = [&](double cap) {  // the bands of cost <= cap (each holds a row at least)
    cuts.assign(1, 0);
    for (int64_t p = 0; p < pa;) {
      double c = start(p) + cost(p);
      int64_t q = p + 1;
      for (; q < pa && c + cost(q) <= cap; ++q) c += cost(q);
      cuts.push_back(p = q);
    }
    return static_cast<int64_t>(cuts.size()) - 1;
  };
  double lo = 0.0, hi = start(0);
  for (int64_t p = 0; p < pa; ++p) hi += cost(p);
  for (int it = 0; it < 60; ++it) {
    const double mid = 0.5 * (lo + hi);
    (fill(mid) <= threads ? hi : lo) = mid;
  }
  fill(hi);
  cuts.resize(threads + 1, pa);
  return {cuts[t], cuts[t + 1]};
}

// Pack values v[0 .. W * panels) of step t into panels of width W ([panel][step][W]); entries past
// `count` are zero. Whole panels are plain copies of W contiguous values.
template <int W>
inline void pack_step(const double* v, int64_t count, int64_t panels, int64_t t, double* dst) {
  const int64_t whole = std::min(panels, count / W);
  for (int64_t p = 0; p < whole; ++p) std::memcpy(dst + (p * kChunk + t) * W, v + p * W, W * sizeof(double));
  for (int64_t p = whole; p < panels; ++p) {
    double* out = dst + (p * kChunk + t) * W;
    for (int r = 0; r < W; ++r) out[r] = p * W + r < count ? v[p * W + r] : 0.0;
  }
}

// Prefetches the rows [lo, hi) of x into L2 a few cache lines per call of step(), so that the next
// chunk's rows arrive while the register tiles of this one run (packing them straight from memory
// would stall the scatter).
struct RowPrefetcher {
  const char* base;
  int64_t row_bytes, stride_bytes;
  int64_t row = 0, end = 0, offset = 0;
  explicit RowPrefetcher(const Matrix& x)
      : base(static_cast<const char*>(x.data)),
        row_bytes(x.col_stride == 1 ? x.cols * dtype_bytes(x.dtype) : 0),
        stride_bytes(x.row_stride * dtype_bytes(x.dtype)) {}
  void start(int64_t lo, int64_t hi) {
    row = lo;
    end = row_bytes > 0 ? hi : lo;  // strided rows are not prefetched
    offset = 0;
  }
  void step(int64_t lines) {
    for (; lines > 0 && row < end; --lines) {
      _mm_prefetch(base + row * stride_bytes + offset, _MM_HINT_T1);
      offset += 64;
      if (offset >= row_bytes) {
        offset = 0;
        ++row;
      }
    }
  }
};

}  // namespace

bool gram_available() { return true; }

// Threads share nothing: each takes a band of tile rows (balanced by the number of tiles of the
// upper triangle in it), packs the B panels its tiles read from the centred rows, and walks all
// N rows chunk by chunk. Shared panels with a barrier per chunk would make each core pull the
// other's half of the panels through L3 every chunk; the private packing costs each thread
// d / (d / 2) of its work at most.
void centred_scatter(const Matrix& x, const int64_t* labels, const double* means, const double* scale,
                     double* out, int num_threads) {
  const int64_t n = x.rows, d = x.cols;
  const int64_t pb = (d + kNR - 1) / kNR, pa = 2 * pb;  // tile rows of 8: two per B panel
  const int64_t ldc = pb * kNR;
  auto acc = aligned_zeros<double>(pa * kSR * ldc);
  const int threads = region_threads(num_threads, pa);
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    // A band's cost: its tiles, and the B panels it packs every chunk (from its first tile's
    // column on), each about kPackTiles tiles' time.
    const auto [p0, p1] = balanced_rows(
        thread_id(), threads, pa, [&](int64_t p) { return double(pb - first_upper(p, kSR)); },
        [&](int64_t lo) { return kPackTiles * double(pb - first_upper(lo, kSR)); });
    if (p0 < p1) {
      const int64_t q0 = first_upper(p0, kSR), j0 = q0 * kNR;  // B panels from column j0 (A rows lie inside)
      const int64_t nb = pb - q0;
      auto bpack = aligned_zeros<double>(nb * kChunk * kNR);
      std::vector<double> row(d);
      RowPrefetcher ahead(x);
      const bool f32_rows = x.dtype == DType::F32 && x.col_stride == 1;
      int64_t tiles = 0;  // of this thread, per chunk
      for (int64_t p = p0; p < p1; ++p) tiles += pb - first_upper(p, kSR);
      for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
        const int64_t kc = std::min(kChunk, n - i0);
        ahead.start(i0 + kc, std::min(n, i0 + kc + kChunk));
        const int64_t per_tile = (kChunk * ahead.row_bytes / 64 + tiles - 1) / tiles;
        for (int64_t t = 0; t < kc; ++t) {
          const int64_t c = labels[i0 + t];
          const double* mu = means + c * d;
          const double s = scale ? scale[c] : 1.0;
          if (f32_rows) {  // widen and centre this thread's columns only, in one pass
            const float* xr = static_cast<const float*>(x.data) + (i0 + t) * x.row_stride;
#pragma omp simd
            for (int64_t j = j0; j < d; ++j) row[j] = (static_cast<double>(xr[j]) - mu[j]) * s;
          } else {
            x.load_row(i0 + t, row.data());
            for (int64_t j = j0; j < d; ++j) row[j] = (row[j] - mu[j]) * s;
          }
          pack_step<kNR>(row.data() + j0, d - j0, nb, t, bpack.get());
        }
        for (int64_t p = p0; p < p1; ++p) {
          // rows 8p .. 8p + 8 are lanes (p % 2) * 8 .. of B panel p / 2
          const double* ap = bpack.get() + (p / 2 - q0) * kChunk * kNR + (p % 2) * kSR;
          for (int64_t q = first_upper(p, kSR); q < pb; ++q) {
            ahead.step(per_tile);
            micro<kSR>(ap, kNR, bpack.get() + (q - q0) * kChunk * kNR, kc, acc.get() + p * kSR * ldc + q * kNR, ldc);
          }
        }
      }
    }
  }
  // Rows of the padded accumulator at or left of the diagonal come from the upper triangle.
  for (int64_t a = 0; a < d; ++a)
    for (int64_t b = a; b < d; ++b) {
      const double v = acc[a * ldc + b];
      out[a * d + b] += v;
      if (b != a) out[b * d + a] += v;
    }
  (void)threads;
}

// As centred_scatter: each thread a band of tile rows of out, its own A panels and a private copy
// of the B panels (n x chunk values per chunk: 1 / (m / threads) of its multiply-adds).
void gram_nt(const double* a, int64_t m, const double* b, int64_t n, int64_t k, double* out, int num_threads) {
  const int64_t pa = (m + kMR - 1) / kMR, pb = (n + kNR - 1) / kNR;
  const int64_t ldc = pb * kNR;
  // Whole tiles accumulate straight into out; otherwise into a padded buffer copied out after.
  const bool direct = m % kMR == 0 && n % kNR == 0;
  auto padded = aligned_zeros<double>(direct ? 1 : pa * kMR * ldc);
  if (direct) std::fill(out, out + m * n, 0.0);
  double* acc = direct ? out : padded.get();
  const int threads = region_threads(num_threads, pa);
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const auto [p0, p1] =
        balanced_rows(thread_id(), threads, pa, [](int64_t) { return 1.0; }, [](int64_t) { return 0.0; });
    if (p0 < p1) {
      const int64_t na = p1 - p0;
      auto apack = aligned_zeros<double>(na * kChunk * kMR);
      auto bpack = aligned_zeros<double>(pb * kChunk * kNR);
      for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
        const int64_t kc = std::min(kChunk, k - k0);
        auto pack = [&](const double* src, int64_t rows, int64_t r0, int64_t r1, int w, double* dst) {
          for (int64_t r = r0; r < r1; ++r) {  // row r of src into lane r % w of panel (r - r0) / w
            double* o = dst + ((r - r0) / w) * kChunk * w + (r - r0) % w;
            if (r < rows)
              for (int64_t t = 0; t < kc; ++t) o[t * w] = src[r * k + k0 + t];
            else
              for (int64_t t = 0; t < kc; ++t) o[t * w] = 0.0;
          }
        };
        pack(a, m, p0 * kMR, p1 * kMR, kMR, apack.get());
        pack(b, n, 0, pb * kNR, kNR, bpack.get());
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t q = 0; q < pb; ++q)
            micro<kMR>(apack.get() + (p - p0) * kChunk * kMR, kMR, bpack.get() + q * kChunk * kNR, kc,
                       acc + p * kMR * ldc + q * kNR, ldc);
      }
    }
  }
  if (!direct)
    for (int64_t i = 0; i < m; ++i) std::copy(acc + i * ldc, acc + i * ldc + n, out + i * n);
  (void)threads;
}

#else

bool gram_available() { return false; }

void centred_scatter(const Matrix&, const int64_t*, const double*, const double*, double*, int) {
  throw std::runtime_error("centred_scatter: this build has no AVX-512 Gram engine (see gram_available())");
}

void gram_nt(const double*, int64_t, const double*, int64_t, int64_t, double*, int) {
  throw std::runtime_error("gram_nt: this build has no AVX-512 Gram engine (see gram_available())");
}

#endif

}  // namespace ncfast
