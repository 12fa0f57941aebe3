#pragma once

#include <cstdint>

#include "common.h"

namespace ncfast {

// Whether this build has the register-tiled float64 Gram engine (AVX-512); without it the Python
// side uses BLAS (dsyrk / torch.mm) for the same products.
bool gram_available();

// out (d x d, row-major, float64) += sum_i s_i^2 (x_i - means[labels[i]]) (x_i - means[labels[i]])^T,
// with s_i = scale[labels[i]] (or 1 when scale is null): the pooled within-class scatter, the
// rows centred as they are packed (no N x D centred copy). Both triangles of out are written.
// Every element is summed in the same order for any thread count.
void centred_scatter(const Matrix& x, const int64_t* labels, const double* means, const double* scale,
                     double* out, int num_threads);

// out (m x n, row-major) = A B^T for row-major A (m x k) and B (n x k), float64: a tile of the
// class-mean Gram matrix.
void gram_nt(const double* a, int64_t m, const double* b, int64_t n, int64_t k, double* out, int num_threads);

}  // namespace ncfast
