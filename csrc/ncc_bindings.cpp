// _C functions of the nearest-class sweep (ncc.h).
#include "bindings.h"
#include "ncc.h"

namespace ncfast {

void bind_ncc(py::module_& m) {
  m.def(
      "ncc_sweep",
      [](py::buffer features, const std::string& dtype, py::array_t<float, py::array::c_style> shift,
         py::array_t<float, py::array::c_style> centres, py::array_t<float, py::array::c_style> offsets,
         py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts, double rel,
         py::array_t<double, py::array::c_style | py::array::forcecast> cmax,
         py::array_t<double, py::array::c_style | py::array::forcecast> omax, int num_threads,
         const std::string& precision) {
        py::buffer_info info = features.request();
        Matrix x = as_matrix(info, dtype);
        if (centres.ndim() != 2 || centres.shape(1) != x.cols)
          throw std::invalid_argument("centres: expected shape (K, D)");
        const int64_t k = centres.shape(0);
        if (offsets.ndim() != 1 || offsets.shape(0) != k) throw std::invalid_argument("offsets: expected shape (K,)");
        if (shift.ndim() != 1 || shift.shape(0) != x.cols) throw std::invalid_argument("shift: expected shape (D,)");
        const int groups = static_cast<int>(starts.shape(0)) - 1;
        if (groups < 1 || cmax.shape(0) != groups || omax.shape(0) != groups)
          throw std::invalid_argument("starts / cmax / omax: one group boundary more than groups");
        const int64_t* st = starts.data();
        if (st[0] != 0 || st[groups] != k) throw std::invalid_argument("starts: must run from 0 to K");
        for (int g = 0; g < groups; ++g)
          if (st[g + 1] <= st[g]) throw std::invalid_argument("starts: every group needs a class");
        py::array_t<int64_t> best({x.rows, static_cast<int64_t>(groups)});
        py::array_t<uint8_t> unsure({x.rows, static_cast<int64_t>(groups)});
        const float *sh = shift.data(), *ce = centres.data(), *of = offsets.data();
        const double *cm = cmax.data(), *om = omax.data();
        int64_t* b = best.mutable_data();
        uint8_t* u = unsure.mutable_data();
        {
          py::gil_scoped_release release;
          ncc_sweep(x, sh, ce, of, k, st, groups, rel, cm, om, b, u, num_threads, precision);
        }
        return py::make_tuple(best, unsure);
      },
      "Certified argmin sweep over groups of classes (see csrc/ncc.h): returns "
      "(argmin within each group int64 (N, G), unsure uint8 (N, G)).",
      py::arg("features"), py::arg("dtype"), py::arg("shift"), py::arg("centres"), py::arg("offsets"),
      py::arg("starts"), py::arg("rel"), py::arg("cmax"), py::arg("omax"), py::arg("num_threads"),
      py::arg("precision") = "fp32");
  m.def("ncc_has_precision", &ncc_has_precision,
        "Whether ncc_sweep offers this precision ('fp32' always, 'bf16' with AVX512-BF16).");
  m.def("ncc_sum_terms", &ncc_sum_terms, py::arg("d"),
        "At most how many roundings lie on any path of the summation tree of one float32 score of "
        "ncc_sweep over d features (the n of its gamma_n error bound; at most d).");
  m.def("ncc_register_tiled", &ncc_register_tiled,
        "Whether ncc_sweep is register-tiled (AVX-512): faster than GEMM blocks at any number of classes.");
}

}  // namespace ncfast
