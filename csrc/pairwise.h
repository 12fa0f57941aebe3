#pragma once

#include <cstdint>

namespace ncfast {

// Inputs of one tile of class pairs: rows I x columns J of G = Mt Mt^T (row-major, t1 x t2), the
// classes row0 + i and col0 + j (reduce_pair_tile's offsets). Only the pairs with col0 + j >
// row0 + i count, and G_ii enters nc2 once where the tile holds it: a tile on the diagonal of G may
// be any row strip of it, its entries below the diagonal never read.
struct PairTile {
  const double* gram;
  int64_t t1, t2;
  const double *sq_r, *sq_c;       // ||Mt_i||^2
  const double *norm_r, *norm_c;   // ||Mt_i||
  const double *var_r, *var_c;     // v_i
  const int64_t *sup_r, *sup_c;    // super-class of each class, or null
  double g;                        // ||G||_F
  double etf_diag, etf_offdiag;    // entries of E = (I - 11^T/C) / sqrt(C-1)
  double mean_cos, etf_cos;        // mean cosine over i != j; 1/(C-1)
  double cdnv_exponent;            // p of the CDNV ratio (v_i + v_j) / (2 ||mu_i - mu_j||^(2p))
  double unif_floor;               // 2 - 2 cos_ij at or below this: u_i = u_j to rounding, a +inf term
};

// Sums over the tile's unordered pairs, with ordered-pair weights (x2) where the metric averages
// over i != j, and (n, mean, M2) of the CDNV ratios and of the uniformity terms
// log(1 / ||u_i - u_j||) = -log(2 - 2 cos_ij) / 2 for a Chan merge across tiles.
struct PairSums {
  double resid = 0, cos_dev = 0, coh = 0, dist = 0, msdr_sum = 0;
  int64_t msdr_n = 0;
  int64_t cdnv_n = 0;
  double cdnv_mean = 0, cdnv_m2 = 0;
  int64_t unif_n = 0;
  double unif_mean = 0, unif_m2 = 0;
};

// Reduces one tile and updates the running nearest other class (by ||mu_i - mu_j||^2, as a global
// index) of its rows (best_r/idx_r, from the pairs' columns) and of its columns (best_c/idx_c, from
// the pairs' rows); on a diagonal tile the two may be the same arrays. A smaller distance wins,
// and among equal ones the lower index, whatever order the tiles come in. Each pair's CDNV ratio is
// also added to the running per-class sums of both its classes: ratio_r of the row, ratio_c of the
// column (the same array, or overlapping, on a diagonal tile).
PairSums reduce_pair_tile(const PairTile& t, int64_t row0, int64_t col0, double* best_r, int64_t* idx_r,
                          double* best_c, int64_t* idx_c, double* ratio_r, double* ratio_c, int num_threads);

}  // namespace ncfast
