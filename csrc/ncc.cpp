// Fused nearest-class sweep: no N x C score matrix, one read of the features.
//
// A block of rows is converted once (minus the shift) into a float32 buffer that stays in cache,
// and scored against the class centres; scores are reduced at once into (best, second best,
// index) per row and class group. Two sweeps: the register-tiled AVX-512 engine (any number of
// classes), and a generic 2 x 4 blocked one; ncc_sweep runs the one this build has.
#include "ncc.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif


namespace ncfast {

namespace {

constexpr int kMaxGroups = 4;
constexpr double kScoreRange = 0x1p126;  // half of float32's range: no score or partial sum overflows below

inline void consider(float s, int64_t c, float& b1, float& b2, int64_t& i1) {
  if (s < b1) {  // strict: among equal scores the lower class index (seen first) stays
    b2 = b1;
    b1 = s;
    i1 = c;
  } else if (s < b2) {
    b2 = s;
  }
}

// Row r of x minus the shift into dst (float32) with one rounding of the exact difference, as the
// bound assumes: float32 arithmetic on exactly converted float32/16/bf16 values, float64 first for
// float64 input (row64: scratch of d doubles). Returns ||dst|| in float64.
inline double shifted_row(const Matrix& x, int64_t r, const float* shift, float* dst, double* row64) {
  const int64_t d = x.cols;
  if (x.dtype == DType::F32 && x.col_stride == 1) {  // one pass: difference, store, square
    const float* p = static_cast<const float*>(x.data) + r * x.row_stride;
    double sq = 0.0;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < d; ++j) {
      const float v = p[j] - shift[j];
      dst[j] = v;
      sq += static_cast<double>(v) * v;
    }
    return std::sqrt(sq);
  }
  if (x.dtype == DType::F64) {
    // a difference beyond float32's range becomes inf (so does the norm: the row is unsure); one
    // below its normal range is off by at most 2^-150, which the bound's underflow floor covers
    x.load_row(r, row64);
    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(row64[j] - static_cast<double>(shift[j]));
  } else {
    x.load_row_f32(r, dst);
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) dst[j] -= shift[j];
  }
  double sq = 0.0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < d; ++j) sq += static_cast<double>(dst[j]) * dst[j];
  return std::sqrt(sq);
}

// A block of rows' running (best, second best, index) per group and their norms.
template <int64_t R>
struct BlockBest {
  float b1[R][kMaxGroups], b2[R][kMaxGroups];
  int64_t i1[R][kMaxGroups];
  double norm[R];

  void reset(int64_t t, int groups) {
    for (int g = 0; g < groups; ++g) {
      b1[t][g] = b2[t][g] = std::numeric_limits<float>::infinity();
      i1[t][g] = 0;
    }
  }

  // Block row t: row r of x minus the shift into dst (shifted_row), its norm kept, its bests reset.
  void start_row(int64_t t, const Matrix& x, int64_t r, const float* shift, float* dst, double* row64, int groups) {
    norm[t] = shifted_row(x, r, shift, dst, row64);
    reset(t, groups);
  }

  // best / unsure of rows r0 .. r0 + rows (see ncc.h), the bound rel * (||x - t|| cmax + omax).
  // Every partial sum of a score is at most ||x - t|| cmax + omax in magnitude (Cauchy-Schwarz), so
  // below kScoreRange no float32 operation of the row overflows; a row above it, or with a NaN
  // norm (shifted_row), is unsure whatever its scores say, as is any gap that is not a finite
  // number above twice the bound.
  void write(int64_t r0, int64_t rows, int groups, const int64_t* starts, double rel, const double* cmax,
             const double* omax, int64_t* best, uint8_t* unsure) const {
    for (int64_t t = 0; t < rows; ++t) {
      for (int g = 0; g < groups; ++g) {
        const double magnitude = norm[t] * cmax[g] + omax[g];
        const double bound = rel * magnitude;
        const double gap = static_cast<double>(b2[t][g]) - static_cast<double>(b1[t][g]);
        const int64_t o = (r0 + t) * groups + g;
        best[o] = i1[t][g] - starts[g];
        const bool certain = magnitude < kScoreRange && std::isfinite(b1[t][g]) && std::isfinite(b2[t][g]) &&
                             gap > 2.0 * bound;
        unsure[o] = (starts[g + 1] - starts[g] > 1 && !certain) ? 1 : 0;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Generic sweep: blocks of kRowBlock rows, taken kChunk features at a time: the chunk of the block's
// rows (converted minus the shift) and of every centre stay in L2 while the centres are swept in
// tiles of four against pairs of rows, so every loaded vector of a row or a centre feeds several
// fused multiply-adds (8 accumulators: FMA-bound on AVX2); each chunk's dot products are added to
// the rows' running float32 scores. Compiled in every build, run in those without AVX-512.
constexpr int64_t kRowBlock = 32;
constexpr int64_t kChunk = 1024;

// The chunk [j0, j0 + dj) of rows r0 .. r0 + rows into buf (row t at t * dj), minus the shift, as
// shifted_row does for whole rows; each row's sum of squares is added to sq[t].
inline void shifted_chunk(const Matrix& x, int64_t r0, int64_t rows, int64_t j0, int64_t dj, const float* shift,
                          float* buf, double* row64, double* sq) {
  const Matrix part = x.columns(j0, dj);
  for (int64_t t = 0; t < rows; ++t) {
    const double norm = shifted_row(part, r0 + t, shift + j0, buf + t * dj, row64);
    sq[t] += norm * norm;
  }
}

[[maybe_unused]] void sweep_blocked(const Matrix& x, const float* shift, const float* centres, const float* offsets, int64_t k,
                   const int64_t* starts, int groups, double rel, const double* cmax, const double* omax,
                   int64_t* best, uint8_t* unsure, int num_threads) {
  // group_of[c]: which argmin problem class c belongs to
  std::vector<int> group_of(k);
  for (int g = 0; g < groups; ++g)
    for (int64_t c = starts[g]; c < starts[g + 1]; ++c) group_of[c] = g;
  const int64_t n = x.rows, d = x.cols;
  const int64_t chunk = std::min(kChunk, d);
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const int threads = region_threads(num_threads, blocks);
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    std::vector<float> buf(kRowBlock * chunk), score(kRowBlock * k);
    std::vector<double> row64(chunk), sq(kRowBlock);
    BlockBest<kRowBlock> st;
    auto& b1 = st.b1;
    auto& b2 = st.b2;
    auto& i1 = st.i1;
#ifdef NCFAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * kRowBlock;
      const int64_t rows = std::min(kRowBlock, n - r0);
      std::fill(score.begin(), score.end(), 0.0f);
      std::fill(sq.begin(), sq.end(), 0.0);
      for (int64_t j0 = 0; j0 < d; j0 += chunk) {
        const int64_t dj = std::min(chunk, d - j0);
        shifted_chunk(x, r0, rows, j0, dj, shift, buf.data(), row64.data(), sq.data());
        int64_t t = 0;
        for (; t + 2 <= rows; t += 2) {
          const float* xa = buf.data() + t * dj;
          const float* xb = xa + dj;
          float* sa = score.data() + t * k;
          float* sb = sa + k;
          int64_t c = 0;
          for (; c + 4 <= k; c += 4) {
            const float *w0 = centres + c * d + j0, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0, e0 = 0, e1 = 0, e2 = 0, e3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, e0, e1, e2, e3)
            for (int64_t j = 0; j < dj; ++j) {
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
            sa[c] += a0;
            sa[c + 1] += a1;
            sa[c + 2] += a2;
            sa[c + 3] += a3;
            sb[c] += e0;
            sb[c + 1] += e1;
            sb[c + 2] += e2;
            sb[c + 3] += e3;
          }
          // (the 2-centre tile repeats the 4-centre one with named accumulators: `omp simd` vectorises
          // scalar reductions, and an array-reduction template of both measured 4x slower)
          for (; c + 2 <= k; c += 2) {  // two centres left (C = 10 = 4 + 4 + 2)
            const float *w0 = centres + c * d + j0, *w1 = w0 + d;
            float a0 = 0, a1 = 0, e0 = 0, e1 = 0;
#pragma omp simd reduction(+ : a0, a1, e0, e1)
            for (int64_t j = 0; j < dj; ++j) {
              const float va = xa[j], vb = xb[j];
              a0 += va * w0[j];
              a1 += va * w1[j];
              e0 += vb * w0[j];
              e1 += vb * w1[j];
            }
            sa[c] += a0;
            sa[c + 1] += a1;
            sb[c] += e0;
            sb[c + 1] += e1;
          }
          for (; c < k; ++c) {
            const float* w = centres + c * d + j0;
            float a = 0, e = 0;
#pragma omp simd reduction(+ : a, e)
            for (int64_t j = 0; j < dj; ++j) {
              a += xa[j] * w[j];
              e += xb[j] * w[j];
            }
            sa[c] += a;
            sb[c] += e;
          }
        }
        for (; t < rows; ++t) {
          const float* xa = buf.data() + t * dj;
          float* sa = score.data() + t * k;
          for (int64_t c = 0; c < k; ++c) {
            const float* w = centres + c * d + j0;
            float a = 0;
#pragma omp simd reduction(+ : a)
            for (int64_t j = 0; j < dj; ++j) a += xa[j] * w[j];
            sa[c] += a;
          }
        }
      }
      for (int64_t t = 0; t < rows; ++t) {
        st.norm[t] = std::sqrt(sq[t]);
        st.reset(t, groups);
        const float* sa = score.data() + t * k;
        for (int64_t c = 0; c < k; ++c) {
          const int g = group_of[c];
          consider(offsets[c] + sa[c], c, b1[t][g], b2[t][g], i1[t][g]);
        }
      }
      st.write(r0, rows, groups, starts, rel, cmax, omax, best, unsure);
    }
  }
  (void)threads;  // unused without OpenMP
}

#if defined(__AVX512F__)
// ---------------------------------------------------------------------------------------------
// AVX-512 engine: centres packed into panels of 32 classes (two zmm registers per feature), a
// 12-row x 32-class register tile (24 accumulators) swept over the whole feature dimension, so
// every loaded centre vector feeds 12 fused multiply-adds and every broadcast row element two.
// Where no argmin has more than 16 classes the panels are 16 wide (one register per feature).
// Groups are padded to whole panels separately (padding lanes score +inf), so a panel belongs to
// one group and its scores are screened against the rows' second-best with one compare each.
// The bf16 variant keeps the same tiles over pairs of features with VDPBF16PS (products exact,
// accumulated in float32), twice the products per instruction.
constexpr int kLanes = 32;     // classes per panel
// Narrow panels (see above): at C = 10 a 32-lane panel computes 22 padding lanes, and the sweep is
// FMA-bound on them.
constexpr int kNarrowLanes = 16;
constexpr int kTileRows = 12;  // rows per register tile
// Rows converted per block: up to 384 (each centre panel streamed from L2/L3 serves 32 register
// tiles), fewer when the block would outgrow ~768 KB of L2.
constexpr int64_t kPackedBlock = 384;
// Up to this many panels the tiles prefetch the thread's next block, of at most kPrefetchBlock
// rows (see sweep_packed).
constexpr int64_t kPrefetchPanels = 4;
constexpr int64_t kPrefetchBlock = 192;
inline int64_t packed_block_rows(int64_t d) {
  const int64_t fit = (768 << 10) / (4 * std::max<int64_t>(d, 1));
  return std::max<int64_t>(kTileRows, std::min<int64_t>(kPackedBlock, fit / kTileRows * kTileRows));
}

struct Panels {
  int64_t count = 0;
  std::vector<int> group;      // group of panel p
  std::vector<int64_t> base;   // class index (in 0..K) of lane 0
  std::vector<float> offsets;  // count * 32, +inf on padding lanes
};

template <int L>
Panels make_panels(const int64_t* starts, int groups, const float* offsets) {
  Panels p;
  for (int g = 0; g < groups; ++g) {
    for (int64_t c = starts[g]; c < starts[g + 1]; c += L) {
      p.group.push_back(g);
      p.base.push_back(c);
      for (int l = 0; l < L; ++l)
        p.offsets.push_back(c + l < starts[g + 1] ? offsets[c + l] : std::numeric_limits<float>::infinity());
    }
  }
  p.count = static_cast<int64_t>(p.group.size());
  return p;
}

// update_rows' many-candidate case: the smallest candidate m1 at its lowest lane l, then the
// smallest of the others (the second order statistic m2); lanes outside mlo / mhi count as +inf.
// Every candidate is under b2, so: a new best takes the old best or m2 as its second; otherwise
// (m1 >= b1: the earlier, lower class keeps a tie) m1 may become the second. Out of line, so that
// the sweep's loop stays small.
__attribute__((noinline)) void fold_panel_top2(__m512 lo, __m512 hi, __mmask16 mlo, __mmask16 mhi, int64_t base,
                                               float& b1, float& b2, int64_t& i1) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __m512 vlo = _mm512_mask_mov_ps(inf, mlo, lo), vhi = _mm512_mask_mov_ps(inf, mhi, hi);
  const float m1 = _mm512_reduce_min_ps(_mm512_min_ps(vlo, vhi));
  const __m512 m1v = _mm512_set1_ps(m1);
  const uint32_t at = _mm512_cmp_ps_mask(vlo, m1v, _CMP_EQ_OQ) |
                      (static_cast<uint32_t>(_mm512_cmp_ps_mask(vhi, m1v, _CMP_EQ_OQ)) << 16);
  const uint32_t first = at & (0u - at);  // the lowest lane holding m1
  const __m512 wlo = _mm512_mask_mov_ps(vlo, static_cast<__mmask16>(first), inf);
  const __m512 whi = _mm512_mask_mov_ps(vhi, static_cast<__mmask16>(first >> 16), inf);
  const float m2 = _mm512_reduce_min_ps(_mm512_min_ps(wlo, whi));
  if (m1 < b1) {
    b2 = std::min(b1, m2);
    b1 = m1;
    i1 = base + __builtin_ctz(at);
  } else {
    b2 = std::min(b2, m1);
  }
}

// Fold a panel's L scores (lanes in increasing class order, padding +inf) into a row's running
// (best, second best, index), as consider() on each lane in turn would. Lanes not under the second
// best (NaN included) cannot change it and are skipped. With more than two candidates (every lane
// of a row's first panel) the panel's two smallest come from vector reductions instead of a lane
// loop, whose branches would be unpredictable there.
template <int L>
inline void update_rows(const float* scores, int64_t base, float& b1, float& b2, int64_t& i1) {
  const __m512 lim = _mm512_set1_ps(b2);
  const __m512 lo = _mm512_loadu_ps(scores);
  const __m512 hi = L == 32 ? _mm512_loadu_ps(scores + 16) : _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __mmask16 mlo = _mm512_cmp_ps_mask(lo, lim, _CMP_LT_OQ);
  const __mmask16 mhi = L == 32 ? _mm512_cmp_ps_mask(hi, lim, _CMP_LT_OQ) : 0;
  uint32_t mask = mlo | (static_cast<uint32_t>(mhi) << 16);
  if (__builtin_popcount(mask) > 2) {
    fold_panel_top2(lo, hi, mlo, mhi, base, b1, b2, i1);
    return;
  }
  while (mask) {  // ties keep the lowest index
    const int l = __builtin_ctz(mask);
    mask &= mask - 1;
    consider(scores[l], base + l, b1, b2, i1);
  }
}

// acc[H r + h] += x_r . panel lanes 16h..16h+15 (H = L / 16 vectors a row), over d features
// (float32); out holds MR rows of L scores.
// With PF, the tile requests pf_lines cache lines from pf into L2 while it runs (one or two a
// step; without, the loop keeps every general register for its row pointers).
template <int MR, int L, bool PF>
inline void tile_f32(const float* xs, int64_t ld, const float* panel, int64_t d, float* out, const char* pf,
                     int64_t pf_lines) {
  constexpr int H = L / 16;
  __m512 acc[H * MR];
#pragma GCC unroll 24
  for (int q = 0; q < H * MR; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; ++j) {
    if (PF) {
      if (j < pf_lines) _mm_prefetch(pf + 64 * j, _MM_HINT_T1);
      if (j + d < pf_lines) _mm_prefetch(pf + 64 * (j + d), _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_load_ps(panel + j * L);
    const __m512 w1 = H == 2 ? _mm512_load_ps(panel + j * L + 16) : w0;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 v = _mm512_set1_ps(xs[r * ld + j]);
      acc[H * r] = _mm512_fmadd_ps(v, w0, acc[H * r]);
      if (H == 2) acc[H * r + 1] = _mm512_fmadd_ps(v, w1, acc[H * r + 1]);
    }
  }
#pragma GCC unroll 24
  for (int q = 0; q < H * MR; ++q) _mm512_storeu_ps(out + q * 16, acc[q]);
}

#if defined(__AVX512BF16__)
// The same tile over pairs of bf16 features: xs rows hold d2 uint32 pairs, the panel d2 x 2L bf16.
template <int MR, int L, bool PF>
inline void tile_bf16(const uint32_t* xs, int64_t ld, const uint16_t* panel, int64_t d2, float* out,
                      const char* pf, int64_t pf_lines) {
  constexpr int H = L / 16;
  __m512 acc[H * MR];
#pragma GCC unroll 24
  for (int q = 0; q < H * MR; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t j = 0; j < d2; ++j) {
    if (PF) {
      if (j < pf_lines) _mm_prefetch(pf + 64 * j, _MM_HINT_T1);
      if (j + d2 < pf_lines) _mm_prefetch(pf + 64 * (j + d2), _MM_HINT_T1);
    }
    const __m512bh w0 = (__m512bh)_mm512_load_si512(panel + j * 2 * L);
    const __m512bh w1 = H == 2 ? (__m512bh)_mm512_load_si512(panel + j * 2 * L + 32) : w0;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512bh v = (__m512bh)_mm512_set1_epi32(static_cast<int>(xs[r * ld + j]));
      acc[H * r] = _mm512_dpbf16_ps(acc[H * r], v, w0);
      if (H == 2) acc[H * r + 1] = _mm512_dpbf16_ps(acc[H * r + 1], v, w1);
    }
  }
#pragma GCC unroll 24
  for (int q = 0; q < H * MR; ++q) _mm512_storeu_ps(out + q * 16, acc[q]);
}
#endif

// float -> bf16 bits, round to nearest even (finite inputs).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename Tile>
void dispatch_rows(int64_t rows, Tile&& tile) {
  int64_t t = 0;
  for (; t + kTileRows <= rows; t += kTileRows) tile(std::integral_constant<int, kTileRows>{}, t);
  switch (rows - t) {
    case 11: tile(std::integral_constant<int, 11>{}, t); break;
    case 10: tile(std::integral_constant<int, 10>{}, t); break;
    case 9: tile(std::integral_constant<int, 9>{}, t); break;
    case 8: tile(std::integral_constant<int, 8>{}, t); break;
    case 7: tile(std::integral_constant<int, 7>{}, t); break;
    case 6: tile(std::integral_constant<int, 6>{}, t); break;
    case 5: tile(std::integral_constant<int, 5>{}, t); break;
    case 4: tile(std::integral_constant<int, 4>{}, t); break;
    case 3: tile(std::integral_constant<int, 3>{}, t); break;
    case 2: tile(std::integral_constant<int, 2>{}, t); break;
    case 1: tile(std::integral_constant<int, 1>{}, t); break;
    default: break;
  }
}

// One register tile of scores, rows t .. t + MR of the block (buf: float32, d a row; buf16: bf16
// pairs, d2 a row) against panel p, in the sweep's precision, the rows' next block prefetched or
// not. bf16 exists only in an AVX512-BF16 build (ncc_sweep refuses it elsewhere).
template <int MR, int L>
inline void tile_scores(bool bf16, bool prefetch, int64_t t, int64_t p, const float* buf, const uint32_t* buf16,
                        const float* packed32, const uint16_t* packed16, int64_t d, int64_t d2, float* out,
                        const char* pf, int64_t pf_lines) {
#if defined(__AVX512BF16__)
  if (bf16) {
    if (prefetch)
      tile_bf16<MR, L, true>(buf16 + t * d2, d2, packed16 + p * d2 * L * 2, d2, out, pf, pf_lines);
    else
      tile_bf16<MR, L, false>(buf16 + t * d2, d2, packed16 + p * d2 * L * 2, d2, out, pf, 0);
    return;
  }
#endif
  if (prefetch)
    tile_f32<MR, L, true>(buf + t * d, d, packed32 + p * d * L, d, out, pf, pf_lines);
  else
    tile_f32<MR, L, false>(buf + t * d, d, packed32 + p * d * L, d, out, pf, 0);
}

template <int L>
void sweep_packed(const Matrix& x, const float* shift, const float* centres, const float* offsets,
                  const int64_t* starts, int groups, double rel, const double* cmax, const double* omax,
                  int64_t* best, uint8_t* unsure, int num_threads, bool bf16) {
  const int64_t n = x.rows, d = x.cols, d2 = (d + 1) / 2;
  const Panels pan = make_panels<L>(starts, groups, offsets);
  // Panel p, feature j, lane l at [(p * d + j) * L + l] (float32), or pairs of features
  // [((p * d2 + j2) * L + l) * 2 + {0,1}] (bf16); padding lanes and the odd feature stay zero.
  auto packed32 = aligned_zeros<float>(bf16 ? 1 : pan.count * d * L);
  auto packed16 = aligned_zeros<uint16_t>(bf16 ? pan.count * d2 * L * 2 : 1);
  for (int64_t p = 0; p < pan.count; ++p) {
    const int g = pan.group[p];
    for (int l = 0; l < L; ++l) {
      const int64_t c = pan.base[p] + l;
      if (c >= starts[g + 1]) break;
      const float* w = centres + c * d;
      for (int64_t j = 0; j < d; ++j) {
        if (bf16)
          packed16[((p * d2 + j / 2) * L + l) * 2 + (j & 1)] = to_bf16(w[j]);
        else
          packed32[(p * d + j) * L + l] = w[j];
      }
    }
  }
  // Blocks are dealt round-robin, so a thread knows its next block, and where the centres fill
  // at most kPrefetchPanels panels its tiles prefetch that block's rows into L2 while they compute:
  // the conversion pass then reads from L2, and the memory reads overlap the tiles' arithmetic
  // instead of following it. Those blocks are smaller, so that two of them and the panels stay
  // well inside L2. With more panels the sweep is compute-bound and the prefetch's registers cost
  // more than it saves.
  const bool prefetch = pan.count <= kPrefetchPanels;
  const int64_t block_rows = prefetch ? std::min(kPrefetchBlock, packed_block_rows(d)) : packed_block_rows(d);
  const int64_t blocks = (n + block_rows - 1) / block_rows;
  const int threads = region_threads(num_threads, blocks);
#ifdef NCFAST_WITH_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    auto buf = aligned_zeros<float>(block_rows * d);
    auto buf16 = aligned_zeros<uint32_t>(bf16 ? block_rows * d2 : 1);
    std::vector<double> row64(d);
    alignas(64) float sc[kTileRows * L];
    BlockBest<kPackedBlock> st;
    const int64_t esize = dtype_bytes(x.dtype);
    const bool contiguous_rows = x.col_stride == 1 && x.row_stride == d;
#ifdef NCFAST_WITH_OPENMP
#pragma omp for schedule(static, 1)
#endif
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t r0 = blk * block_rows;
      const int64_t rows = std::min(block_rows, n - r0);
      const int64_t nr0 = (blk + threads) * block_rows;  // this thread's next block
      const int64_t next_rows = contiguous_rows && nr0 < n ? std::min(block_rows, n - nr0) : 0;
      const char* pf_base = next_rows > 0 ? static_cast<const char*>(x.data) + nr0 * d * esize : nullptr;
      const int64_t pf_total = (next_rows * d * esize + 63) / 64;
      const int64_t tiles = pan.count * ((rows + kTileRows - 1) / kTileRows);
      const int64_t pf_each = tiles > 0 ? (pf_total + tiles - 1) / tiles : 0;
      int64_t tile_no = 0;
      for (int64_t t = 0; t < rows; ++t) {
        float* dst = buf.get() + t * d;
        st.start_row(t, x, r0 + t, shift, dst, row64.data(), groups);
        if (bf16) {
          uint32_t* pairs = buf16.get() + t * d2;
          for (int64_t j2 = 0; j2 < d2; ++j2) {
            const uint32_t lo = to_bf16(dst[2 * j2]);
            const uint32_t hi = 2 * j2 + 1 < d ? to_bf16(dst[2 * j2 + 1]) : 0u;
            pairs[j2] = lo | (hi << 16);
          }
        }
      }
      for (int64_t p = 0; p < pan.count; ++p) {
        const int g = pan.group[p];
        const int64_t base = pan.base[p];
        const __m512 o0 = _mm512_loadu_ps(pan.offsets.data() + p * L);
        const __m512 o1 = L == 32 ? _mm512_loadu_ps(pan.offsets.data() + p * L + 16) : o0;
        dispatch_rows(rows, [&](auto mr, int64_t t) {
          constexpr int MR = decltype(mr)::value;
          const int64_t first = std::min(pf_total, tile_no * pf_each);
          const char* pf = pf_base ? pf_base + 64 * first : nullptr;
          const int64_t pf_lines = std::min(pf_total, first + pf_each) - first;
          ++tile_no;
          tile_scores<MR, L>(bf16, prefetch, t, p, buf.get(), buf16.get(), packed32.get(), packed16.get(), d, d2, sc,
                             pf, pf_lines);
          for (int r = 0; r < MR; ++r) {
            float* s = sc + r * L;
            _mm512_store_ps(s, _mm512_add_ps(_mm512_load_ps(s), o0));
            if (L == 32) _mm512_store_ps(s + 16, _mm512_add_ps(_mm512_load_ps(s + 16), o1));
            update_rows<L>(s, base, st.b1[t + r][g], st.b2[t + r][g], st.i1[t + r][g]);
          }
        });
      }
      st.write(r0, rows, groups, starts, rel, cmax, omax, best, unsure);
    }
  }
  (void)threads;
}

// The AVX-512 engine: 16-wide panels where no argmin has more than 16 classes, else 32-wide.
void sweep_register_tiled(const Matrix& x, const float* shift, const float* centres, const float* offsets,
                          const int64_t* starts, int groups, double rel, const double* cmax, const double* omax,
                          int64_t* best, uint8_t* unsure, int num_threads, bool bf16) {
  int64_t widest = 0;
  for (int g = 0; g < groups; ++g) widest = std::max(widest, starts[g + 1] - starts[g]);
  if (widest <= kNarrowLanes)
    sweep_packed<kNarrowLanes>(x, shift, centres, offsets, starts, groups, rel, cmax, omax, best, unsure,
                               num_threads, bf16);
  else
    sweep_packed<kLanes>(x, shift, centres, offsets, starts, groups, rel, cmax, omax, best, unsure, num_threads,
                         bf16);
}
#endif

}  // namespace

bool ncc_register_tiled() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

int64_t ncc_sum_terms(int64_t d) {
#if defined(__AVX512F__)
  return d;  // every register tile sums its products over the whole feature dimension
#else
  // each chunk's dot product, in whatever order the compiler vectorised it, is a tree of at most
  // kChunk - 1 additions; the chunks' partial scores are then added one after another
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  return std::min(d, kChunk + chunks);
#endif
}

bool ncc_has_precision(const std::string& precision) {
  if (precision == "fp32") return true;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if (precision == "bf16") return true;
#endif
  return false;
}

void ncc_sweep(const Matrix& x, const float* shift, const float* centres, const float* offsets, int64_t k,
               const int64_t* starts, int groups, double rel, const double* cmax, const double* omax,
               int64_t* best, uint8_t* unsure, int num_threads, const std::string& precision) {
  if (groups < 1 || groups > kMaxGroups) throw std::invalid_argument("groups: between 1 and 4");
  if (!ncc_has_precision(precision))
    throw std::invalid_argument("precision: '" + precision + "' is not available in this build (see compile_options())");
#if defined(__AVX512F__)
  sweep_register_tiled(x, shift, centres, offsets, starts, groups, rel, cmax, omax, best, unsure, num_threads,
                       precision == "bf16");
#else
  sweep_blocked(x, shift, centres, offsets, k, starts, groups, rel, cmax, omax, best, unsure, num_threads);
#endif
}

}  // namespace ncfast
