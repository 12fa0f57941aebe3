#pragma once

#include <cstdint>

#include "common.h"

namespace ncfast {

// Float32 sweep of argmin_c  offsets[c] + scale * (x_i - shift) . centres[c]  over K classes,
// row blocks against class tiles, keeping a running best and second-best score per row.
// best[i] gets the argmin (lowest index on ties) and unsure[i] = 1 when the gap between the two
// best scores is within twice the float32 error bound
//     rel * (|scale| * ||x_i - shift|| * cmax + omax),
// so the caller can recompute exactly those rows in float64. centres: K x D row-major float32.
void ncc_sweep(const Matrix& x, const float* shift, const float* centres, const float* offsets, int64_t k,
               float scale, double rel, double cmax, double omax, int64_t* best, uint8_t* unsure,
               int num_threads);

}  // namespace ncfast
