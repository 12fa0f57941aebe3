#pragma once

#include <cstdint>

namespace ncfast {

// The per-class vectors of one side of a tile (its rows or its columns), classes start, start + 1,
// ...: read (sq, norms, var, sup) and updated in place (best, best_idx, ratio_sum). The names are
// those of ncfast.backends.base.PairVectors, whose fields the binding reads.
struct PairSide {
  int64_t start;         // global index of the first class
  const double* sq;      // ||Mt_i||^2
  const double* norms;   // ||Mt_i||
  const double* var;     // v_i
  const int64_t* sup;    // super-class of each class, or null (on both sides)
  double* best;          // running min_{j != i} ||mu_i - mu_j||^2
  int64_t* best_idx;     // its argmin, a global index (-1: none yet)
  double* ratio_sum;     // running sum of the CDNV ratios of the pairs of i
};

// The scalars every tile reads, in the order of the packed params buffer (kPairParams in the
// binding; ncfast.backends.base.PAIR_PARAMS).
struct PairParams {
  double g;                        // ||G||_F
  double etf_diag, etf_offdiag;    // entries of E = (I - 11^T/C) / sqrt(C-1)
  double mean_cos, etf_cos;        // mean cosine over i != j; 1/(C-1)
  double cdnv_exponent;            // p of the CDNV ratio (v_i + v_j) / (2 ||mu_i - mu_j||^(2p))
  double unif_floor;               // 2 - 2 cos_ij at or below this: u_i = u_j to rounding, a +inf term
};

// One tile of class pairs: rows I x columns J of G = Mt Mt^T (row-major, t1 x t2), the classes
// r.start + i and c.start + j. Only the pairs with c.start + j > r.start + i count, and G_ii enters
// nc2 once where the tile holds it: a tile on the diagonal of G may be any row strip of it, its
// entries below the diagonal never read.
struct PairTile {
  const double* gram;
  int64_t t1, t2;
  PairSide r, c;
  PairParams p;
};

// (n, mean, M2) of a set of values, for a Chan merge across threads and tiles.
struct ScalarMoments {
  int64_t n = 0;
  double mean = 0, m2 = 0;
};

// Sums over the tile's unordered pairs, with ordered-pair weights (x2) where the metric averages
// over i != j, and the moments of the CDNV ratios and of the uniformity terms
// log(1 / ||u_i - u_j||) = -log(2 - 2 cos_ij) / 2. The names are those of ncfast.backends.base.PairSums,
// which reads the bound class's attributes.
struct PairSums {
  double resid = 0, cos_dev = 0, coh = 0, dist = 0, msdr_sum = 0;
  int64_t msdr_n = 0;
  ScalarMoments cdnv, unif;
};

// Reduces one tile and updates the running nearest other class (by ||mu_i - mu_j||^2, as a global
// index) of its rows (t.r.best / best_idx, from the pairs' columns) and of its columns (t.c's, from
// the pairs' rows); on a diagonal tile the two may be the same arrays. A smaller distance wins,
// and among equal ones the lower index, whatever order the tiles come in. Each pair's CDNV ratio is
// also added to the running per-class sums of both its classes: the row's t.r.ratio_sum and the
// column's t.c.ratio_sum (the same array, or overlapping, on a diagonal tile).
PairSums reduce_pair_tile(const PairTile& t, int num_threads);

}  // namespace ncfast
