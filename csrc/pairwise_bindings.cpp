// _C functions of the fused class-pair tile reduction (pairwise.h).
#include <cmath>

#include "bindings.h"
#include "pairwise.h"

namespace ncfast {

void bind_pairwise(py::module_& m) {
  m.def(
      "reduce_pair_tile",
      [](py::array_t<double, py::array::c_style> gram, py::array_t<double, py::array::c_style> sq_r,
         py::array_t<double, py::array::c_style> sq_c, py::array_t<double, py::array::c_style> norm_r,
         py::array_t<double, py::array::c_style> norm_c, py::array_t<double, py::array::c_style> var_r,
         py::array_t<double, py::array::c_style> var_c, py::object sup_r, py::object sup_c, double g,
         double etf_diag, double etf_offdiag, double mean_cos, double etf_cos, double cdnv_exponent, double unif_floor, int64_t row0,
         int64_t col0, py::array_t<double, py::array::c_style> best_r, py::array_t<int64_t, py::array::c_style> idx_r,
         py::array_t<double, py::array::c_style> best_c, py::array_t<int64_t, py::array::c_style> idx_c,
         py::array_t<double, py::array::c_style> ratio_r, py::array_t<double, py::array::c_style> ratio_c,
         int num_threads) {
        if (gram.ndim() != 2) throw std::invalid_argument("gram: expected a 2-D tile");
        const int64_t t1 = gram.shape(0), t2 = gram.shape(1);
        auto need = [](const py::array& a, int64_t n, const char* name) {
          if (a.ndim() != 1 || a.shape(0) != n) throw std::invalid_argument(std::string(name) + ": wrong length");
        };
        need(sq_r, t1, "sq_r"); need(norm_r, t1, "norm_r"); need(var_r, t1, "var_r");
        need(best_r, t1, "best_r"); need(idx_r, t1, "idx_r");
        need(sq_c, t2, "sq_c"); need(norm_c, t2, "norm_c"); need(var_c, t2, "var_c");
        need(best_c, t2, "best_c"); need(idx_c, t2, "idx_c");
        need(ratio_r, t1, "ratio_r"); need(ratio_c, t2, "ratio_c");
        if (!(std::isfinite(cdnv_exponent) && cdnv_exponent > 0))
          throw std::invalid_argument("cdnv_exponent: expected a finite number > 0");
        py::array_t<int64_t, py::array::c_style | py::array::forcecast> sr, sc;
        PairTile t{gram.data(), t1, t2, sq_r.data(), sq_c.data(), norm_r.data(), norm_c.data(),
                   var_r.data(), var_c.data(), nullptr, nullptr, g, etf_diag, etf_offdiag, mean_cos, etf_cos,
                   cdnv_exponent, unif_floor};
        if (!sup_r.is_none()) {
          sr = sup_r.cast<py::array_t<int64_t, py::array::c_style | py::array::forcecast>>();
          sc = sup_c.cast<py::array_t<int64_t, py::array::c_style | py::array::forcecast>>();
          need(sr, t1, "sup_r"); need(sc, t2, "sup_c");
          t.sup_r = sr.data();
          t.sup_c = sc.data();
        }
        double* br = best_r.mutable_data();
        int64_t* ir = idx_r.mutable_data();
        double* bc = best_c.mutable_data();
        int64_t* ic = idx_c.mutable_data();
        double* rsr = ratio_r.mutable_data();
        double* rsc = ratio_c.mutable_data();
        PairSums s;
        {
          py::gil_scoped_release release;
          s = reduce_pair_tile(t, row0, col0, br, ir, bc, ic, rsr, rsc, num_threads);
        }
        py::dict out;
        out["resid"] = s.resid;
        out["cos_dev"] = s.cos_dev;
        out["coh"] = s.coh;
        out["dist"] = s.dist;
        out["msdr_sum"] = s.msdr_sum;
        out["msdr_n"] = s.msdr_n;
        out["cdnv"] = py::make_tuple(s.cdnv_n, s.cdnv_mean, s.cdnv_m2);
        out["unif"] = py::make_tuple(s.unif_n, s.unif_mean, s.unif_m2);
        return out;
      },
      "One tile of class pairs reduced in one sweep (see csrc/pairwise.h); updates the nearest-class "
      "arrays and the per-class CDNV ratio sums in place and returns the tile's sums.");
}

}  // namespace ncfast
