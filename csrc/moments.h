#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace ncfast {

// Per-class statistics of one block of rows, all in float64:
//   counts[c]     n_c
//   means[c, :]   mu_c                          (0 for absent classes)
//   m2[c]         sum_{y_i=c} ||h_i - mu_c||^2   (two-pass: centred on mu_c)
//   unit_sums[c]  sum_{y_i=c} h_i / ||h_i||      (a zero row contributes 0)
//   norm_sums[c]  sum_{y_i=c} ||h_i||
// Where block_moments writes: counts, m2, norm_sums hold C entries, means and unit_sums C x D
// (row-major). Every entry is written; the caller need not zero them. unit_sums and norm_sums
// may both be null: then the unit vectors and norms are not taken (a third less work).
struct MomentsOut {
  int64_t* counts;
  double *means, *m2, *unit_sums, *norm_sums;
};

// out[i, :] = x[i, :] - means[labels[i], :] in float64 (out is n x d, row-major): the centred rows
// whose Gram matrix is the within-class scatter.
void centre_rows(const Matrix& x, const int64_t* labels, const double* means, double* out, int num_threads);

void block_moments(const Matrix& x, const int64_t* labels, int64_t num_classes, int num_threads,
                   const MomentsOut& out);

}  // namespace ncfast
