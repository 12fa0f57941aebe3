// _C functions of the class moments kernels (moments.h).
#include <cmath>
#include <optional>

#include <pybind11/stl.h>

#include "bindings.h"
#include "moments.h"

namespace ncfast {

void bind_moments(py::module_& m) {
  m.def(
      "centre_rows",
      [](py::buffer features, const std::string& dtype,
         py::array_t<int64_t, py::array::c_style | py::array::forcecast> labels,
         py::array_t<double, py::array::c_style> means, py::array_t<double, py::array::c_style> out,
         int num_threads) {
        py::buffer_info info = features.request();
        Matrix x = as_matrix(info, dtype);
        check_labels_means(x, labels, means);
        if (out.ndim() != 2 || out.shape(0) != x.rows || out.shape(1) != x.cols || !out.writeable())
          throw std::invalid_argument("out: expected a writable float64 array of shape (N, D)");
        const int64_t* y = labels.data();
        double* dst = out.mutable_data();
        const double* mu = means.data();
        py::gil_scoped_release release;
        centre_rows(x, y, mu, dst, num_threads);
      },
      py::arg("features"), py::arg("dtype"), py::arg("labels"), py::arg("means"), py::arg("out"),
      py::arg("num_threads") = 1,
      "out[i] = features[i] - means[labels[i]] in float64: the centred rows of the within-class scatter.");
  m.def(
      "merge_moments",
      [](py::array_t<int64_t, py::array::c_style> count, py::array_t<double, py::array::c_style> mean,
         py::array_t<double, py::array::c_style> m2, std::optional<py::array_t<double, py::array::c_style>> unit_sum,
         std::optional<py::array_t<double, py::array::c_style>> norm_sum,
         py::array_t<int64_t, py::array::c_style> pcount, py::array_t<double, py::array::c_style> pmean,
         py::array_t<double, py::array::c_style> pm2, std::optional<py::array_t<double, py::array::c_style>> punit,
         std::optional<py::array_t<double, py::array::c_style>> pnorm,
         std::optional<py::array_t<double, py::array::c_style>> delta) -> py::object {
        const py::ssize_t c = count.size();
        if (mean.ndim() != 2 || mean.shape(0) != c) throw std::invalid_argument("mean: expected shape (C, D)");
        const py::ssize_t d = mean.shape(1);
        auto vec = [c](const auto& a, const char* name) {
          if (a.ndim() != 1 || a.size() != c) throw std::invalid_argument(std::string(name) + ": expected shape (C,)");
        };
        auto mat = [c, d](const auto& a, const char* name) {
          if (a.ndim() != 2 || a.shape(0) != c || a.shape(1) != d)
            throw std::invalid_argument(std::string(name) + ": expected shape (C, D)");
        };
        vec(count, "count");
        vec(m2, "m2");
        vec(pcount, "part count");
        vec(pm2, "part m2");
        mat(pmean, "part mean");
        const bool units = unit_sum.has_value();
        if (units != norm_sum.has_value() || units != punit.has_value() || units != pnorm.has_value())
          throw std::invalid_argument("unit_sum, norm_sum: give them for both the state and the part, or for neither");
        if (units) {
          mat(*unit_sum, "unit_sum");
          mat(*punit, "part unit_sum");
          vec(*norm_sum, "norm_sum");
          vec(*pnorm, "part norm_sum");
        }
        if (delta) mat(*delta, "delta");
        if (!count.writeable() || !mean.writeable() || !m2.writeable() ||
            (units && (!unit_sum->writeable() || !norm_sum->writeable())) || (delta && !delta->writeable()))
          throw std::invalid_argument("merge_moments: the state and delta must be writable");
        int64_t* n = count.mutable_data();
        double* mu = mean.mutable_data();
        double* s2 = m2.mutable_data();
        const int64_t* nb = pcount.data();
        const double* mub = pmean.data();
        const double* s2b = pm2.data();
        // A class present in both parts whose mean is not finite: nothing is written, the caller
        // merges out of place (the rule for infinite means lives there).
        for (py::ssize_t k = 0; k < c; ++k) {
          if (n[k] == 0 || nb[k] == 0) continue;
          for (py::ssize_t j = 0; j < d; ++j)
            if (!std::isfinite(mu[k * d + j]) || !std::isfinite(mub[k * d + j])) return py::none();
        }
        py::array_t<double> weight(c);
        double* w = weight.mutable_data();
        double* dl = delta ? delta->mutable_data() : nullptr;
        for (py::ssize_t k = 0; k < c; ++k) {
          double* a = mu + k * d;
          const double* b = mub + k * d;
          double* dk = dl ? dl + k * d : nullptr;
          w[k] = 0.0;
          if (nb[k] == 0) {
            if (dk) std::fill(dk, dk + d, 0.0);
            continue;
          }
          if (n[k] == 0) {  // the part's class as it is
            std::copy(b, b + d, a);
            if (dk) std::fill(dk, dk + d, 0.0);
            s2[k] = 0.0 + s2b[k];
            n[k] = nb[k];
            continue;
          }
          // the same operations as _numerics.chan_merge: wb = n_b / n, weight = n_a wb
          const int64_t total = n[k] + nb[k];
          const double wb = static_cast<double>(nb[k]) / static_cast<double>(total);
          const double weight_k = static_cast<double>(n[k]) * wb;
          double dd = 0.0;
#pragma omp simd reduction(+ : dd)
          for (py::ssize_t j = 0; j < d; ++j) {
            const double delta_j = b[j] - a[j];
            if (dk) dk[j] = delta_j;
            dd += delta_j * delta_j;
            a[j] += delta_j * wb;
          }
          s2[k] = s2[k] + s2b[k] + weight_k * dd;
          w[k] = weight_k;
          n[k] = total;
        }
        if (units) {
          double* u = unit_sum->mutable_data();
          const double* ub = punit->data();
#pragma omp simd
          for (py::ssize_t i = 0; i < c * d; ++i) u[i] += ub[i];
          double* ns = norm_sum->mutable_data();
          const double* nsb = pnorm->data();
          for (py::ssize_t k = 0; k < c; ++k) ns[k] += nsb[k];
        }
        return std::move(weight);
      },
      py::arg("count"), py::arg("mean"), py::arg("m2"), py::arg("unit_sum"), py::arg("norm_sum"), py::arg("part_count"),
      py::arg("part_mean"), py::arg("part_m2"), py::arg("part_unit_sum"), py::arg("part_norm_sum"),
      py::arg("delta") = py::none(),
      "Chan's merge of a part's per-class (count, mean, m2, unit_sum, norm_sum) into the state's arrays, "
      "in place: mean += delta n_b / n, m2 += m2_b + (n_a n_b / n) ||delta||^2, sums added. Returns the "
      "per-class weights n_a n_b / n (0 where a part is empty) and writes delta (zero there) into "
      "'delta' if given, from which a D x D scatter merges; returns None and writes nothing when a "
      "class present in both has a mean that is not finite.");
  m.def(
      "block_moments",
      [](py::buffer features, const std::string& dtype,
         py::array_t<int64_t, py::array::c_style | py::array::forcecast> labels,
         int64_t num_classes, int num_threads, bool unit_sums) {
        py::buffer_info info = features.request();
        Matrix x = as_matrix(info, dtype);
        if (labels.ndim() != 1 || labels.shape(0) != x.rows)
          throw std::invalid_argument("labels: expected shape (N,) matching features");
        if (num_classes < 1) throw std::invalid_argument("num_classes: must be >= 1");
        const int64_t* y = labels.data();
        const py::ssize_t c = num_classes, d = x.cols;
        py::array_t<int64_t> counts = pooled_array<int64_t>({c});
        py::array_t<double> means = pooled_array<double>({c, d}), m2 = pooled_array<double>({c});
        py::array_t<double> units, norms;
        if (unit_sums) {
          units = pooled_array<double>({c, d});
          norms = pooled_array<double>({c});
        }
        const MomentsOut dst{counts.mutable_data(), means.mutable_data(), m2.mutable_data(),
                             unit_sums ? units.mutable_data() : nullptr, unit_sums ? norms.mutable_data() : nullptr};
        {
          py::gil_scoped_release release;
          block_moments(x, y, num_classes, num_threads, dst);
        }
        // NaN or Inf in any row of a class makes its centred M2 NaN or Inf: the caller's bad-input
        // check, here where M2 is still in cache.
        bool finite = true;
        for (py::ssize_t k = 0; k < c; ++k) finite = finite && std::isfinite(m2.data()[k]);
        py::dict out;
        out["counts"] = counts;
        out["means"] = means;
        out["m2"] = m2;
        out["finite"] = finite;
        if (unit_sums) {
          out["unit_sums"] = units;
          out["norm_sums"] = norms;
        }
        return out;
      },
      py::arg("features"), py::arg("dtype"), py::arg("labels"), py::arg("num_classes"),
      py::arg("num_threads") = 1, py::arg("unit_sums") = true,
      "Per-class count, float64 mean, centred sum of squares and, with unit_sums, the unit-vector "
      "sum and norm sum of a block of rows (features: 2-D buffer of float32/float64, or uint16 "
      "holding float16/bfloat16 bits named by dtype), and 'finite': whether every M2 is finite "
      "(no NaN or Inf in the rows). Labels outside [0, num_classes) raise ValueError.");
}

}  // namespace ncfast
