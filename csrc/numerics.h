// Chan's merge of (count, mean, M2) states: the one place csrc/ writes its formula. Two forms of
// the same update, for the two ways a part arrives:
//   chan_merge        the part as its own (nb, mean_b, M2_b): pairwise tiles, per-thread moments;
//   chan_merge_sums   the part as its sums about the running mean (s = sum of deviations, q = sum
//                     of their squared norms): the moments kernel's groups of rows, folded centred
//                     on the running mean and never given a mean of their own.
// They are equal in exact arithmetic (q = M2_b + nb ||mean_b - mean||^2, s = nb (mean_b - mean))
// but round differently, so neither is written through the other.
#pragma once

#include <algorithm>
#include <cstdint>

namespace ncfast {

// Chan's combination of a part (nb, mean_b, m2_b) into (n, mean, m2), for d-dimensional means and a
// scalar sum of squared deviations: mean += delta nb/n', m2 += m2_b + ||delta||^2 n nb / n'.
inline void chan_merge(int64_t& n, double* mean, double& m2, int64_t nb, const double* mean_b, double m2_b,
                       int64_t d) {
  if (nb == 0) return;
  if (n == 0) {
    n = nb;
    std::copy(mean_b, mean_b + d, mean);
    m2 = m2_b;
    return;
  }
  const double nn = static_cast<double>(n + nb);
  const double wb = static_cast<double>(nb) / nn;
  double dd = 0.0;
#pragma omp simd reduction(+ : dd)
  for (int64_t j = 0; j < d; ++j) {
    const double delta = mean_b[j] - mean[j];
    dd += delta * delta;
    mean[j] += delta * wb;
  }
  m2 += m2_b + dd * (static_cast<double>(n) * static_cast<double>(nb) / nn);
  n += nb;
}

// Chan's combination of nb rows given by their deviations from the running mean (s, d entries, and
// q, the sum of their squared norms) into (n, mean, m2): the batch form
//   n' = n + nb,  mean' = mean + s / n',  M2' = M2 + q - ||s||^2 / n'.
// Because the deviations are taken from the running mean, q and s are small where the data are
// tightly clustered and nothing large cancels. s is zeroed on the way, ready for the next group
// (no separate memset per group and per class start, which counts where classes have few rows).
inline void chan_merge_sums(int64_t& n, double* mean, double& m2, int64_t nb, double* s, double q, int64_t d) {
  const int64_t n1 = n + nb;
  const double inv = 1.0 / static_cast<double>(n1);
  double ss = 0.0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < d; ++j) {
    ss += s[j] * s[j];
    mean[j] += s[j] * inv;
    s[j] = 0.0;
  }
  // >= 0 exactly (Cauchy-Schwarz), rounding may not be; NaN and Inf must pass through (the caller's
  // bad-input check reads M2), which std::max(0.0, NaN) would not do.
  const double added = q - ss * inv;
  m2 += added < 0.0 ? 0.0 : added;
  n = n1;
}

}  // namespace ncfast
