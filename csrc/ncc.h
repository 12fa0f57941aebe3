#pragma once

#include <cstdint>

#include "common.h"

namespace ncfast {

// Float32 sweep of argmin_c  offsets[c] + (x_i - shift) . centres[c]  (scales folded into the
// centres), row blocks against class tiles, with a running best and second-best score per row.
// The K classes form `groups` consecutive groups (starts[g] .. starts[g+1]), each its own argmin
// problem over the same rows (e.g. nearest class mean and classifier decision in one read).
// best[i * groups + g] gets group g's argmin (a class index within the group; lowest on ties) and
// unsure[i * groups + g] = 1 when its top-2 gap is within twice the float32 error bound
//     rel * (||x_i - shift|| * cmax[g] + omax[g]),
// so the caller can recompute exactly those rows in float64. centres: K x D row-major float32.
void ncc_sweep(const Matrix& x, const float* shift, const float* centres, const float* offsets, int64_t k,
               const int64_t* starts, int groups, double rel, const double* cmax, const double* omax,
               int64_t* best, uint8_t* unsure, int num_threads);

}  // namespace ncfast
