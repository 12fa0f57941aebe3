#pragma once

#include <cstdint>
#include <string>

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
               int64_t* best, uint8_t* unsure, int num_threads, const std::string& precision = "fp32");

// A bound on the number of roundings on any path of the summation tree of one float32 score of
// this build's ncc_sweep (at most d): the n of the gamma_n = n u / (1 - n u) that bounds its error
// relative to sum_j |x_j c_j|. The generic sweep adds chunks of features, so for wide rows this is
// about the chunk size, not d.
int64_t ncc_sum_terms(int64_t d);

// Whether ncc_sweep offers a precision here: "fp32" always; "bf16" (VDPBF16PS products of the
// row and centre rounded to bfloat16, accumulated in float32; the caller's rel must cover the two
// extra roundings) only in an AVX512-BF16 build.
bool ncc_has_precision(const std::string& precision);

// Whether ncc_sweep runs its register-tiled AVX-512 form, which beats BLAS GEMM blocks at any number
// of classes (without AVX-512 the sweep pays off only for few classes).
bool ncc_register_tiled();

}  // namespace ncfast
