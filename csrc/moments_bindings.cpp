// _C functions of the class moments kernels (moments.h).
#include <cmath>

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
