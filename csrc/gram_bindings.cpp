// _C functions of the float64 Gram engine (gram.h).
#include "bindings.h"
#include "gram.h"

namespace ncfast {

void bind_gram(py::module_& m) {
  m.def("gram_available", &gram_available,
        "Whether this build has the register-tiled float64 Gram engine (centred_scatter, gram_nt).");
  m.def(
      "centred_scatter",
      [](py::buffer features, const std::string& dtype,
         py::array_t<int64_t, py::array::c_style | py::array::forcecast> labels,
         py::array_t<double, py::array::c_style> means, py::object scale, py::array_t<double, py::array::c_style> out,
         int num_threads) {
        py::buffer_info info = features.request();
        Matrix x = as_matrix(info, dtype);
        check_labels_means(x, labels, means);
        if (out.ndim() != 2 || out.shape(0) != x.cols || out.shape(1) != x.cols || !out.writeable())
          throw std::invalid_argument("out: expected a writeable (D, D) float64 array");
        const int64_t c = means.shape(0);
        const int64_t* y = labels.data();
        py::array_t<double, py::array::c_style | py::array::forcecast> s;
        if (!scale.is_none()) {
          s = scale.cast<py::array_t<double, py::array::c_style | py::array::forcecast>>();
          if (s.ndim() != 1 || s.shape(0) != c) throw std::invalid_argument("scale: expected shape (C,)");
        }
        const double* sp = scale.is_none() ? nullptr : s.data();
        const double* mp = means.data();
        double* op = out.mutable_data();
        py::gil_scoped_release release;
        centred_scatter(x, y, mp, sp, op, num_threads);
      },
      "out += sum_i s^2 (x_i - mu_{y_i})(x_i - mu_{y_i})^T (see csrc/gram.h).");
  m.def(
      "gram_nt",
      [](py::array_t<double, py::array::c_style> a, py::array_t<double, py::array::c_style> b,
         py::array_t<double, py::array::c_style> out, int num_threads) {
        if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) != b.shape(1))
          throw std::invalid_argument("a, b: expected (M, K) and (N, K)");
        if (out.ndim() != 2 || out.shape(0) != a.shape(0) || out.shape(1) != b.shape(0) || !out.writeable())
          throw std::invalid_argument("out: expected a writeable (M, N) float64 array");
        const double *ap = a.data(), *bp = b.data();
        double* op = out.mutable_data();
        const int64_t m = a.shape(0), n = b.shape(0), k = a.shape(1);
        py::gil_scoped_release release;
        gram_nt(ap, m, bp, n, k, op, num_threads);
      },
      "out = a @ b.T in float64 (see csrc/gram.h).");
}

}  // namespace ncfast
