// _C functions of the fused class-pair tile reduction (pairwise.h).
#include <cmath>
#include <utility>

#include "bindings.h"
#include "pairwise.h"

namespace ncfast {

namespace {

// The scalars of the packed params buffer, in its order (ncfast.backends.base.PAIR_PARAMS).
constexpr std::pair<const char*, double PairParams::*> kPairParams[] = {
    {"g", &PairParams::g},
    {"etf_diag", &PairParams::etf_diag},
    {"etf_offdiag", &PairParams::etf_offdiag},
    {"mean_cos", &PairParams::mean_cos},
    {"etf_cos", &PairParams::etf_cos},
    {"cdnv_exponent", &PairParams::cdnv_exponent},
    {"unif_floor", &PairParams::unif_floor},
};
constexpr size_t kNumPairParams = sizeof(kPairParams) / sizeof(kPairParams[0]);

using F64In = py::array_t<double, py::array::c_style | py::array::forcecast>;
using I64In = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using F64Out = py::array_t<double, py::array::c_style>;
using I64Out = py::array_t<int64_t, py::array::c_style>;

// One side of a tile read off a ncfast.backends.base.PairVectors (attributes by name), with the
// arrays it holds for the call (inputs converted to float64 / int64 if need be; the updated
// arrays must already be C-contiguous float64 / int64, as a copy would lose the updates).
struct SideArrays {
  F64In sq, norms, var;
  I64In sup;
  F64Out best, ratio_sum;
  I64Out best_idx;
  PairSide side{};
};

void need_length(const py::array& a, int64_t n, const std::string& name) {
  if (a.ndim() != 1 || a.shape(0) != n)
    throw std::invalid_argument(name + ": expected a vector of length " + std::to_string(n));
}

template <typename Out>
Out output(const py::object& v, int64_t n, const std::string& name, const char* dtype) {
  if (!py::isinstance<Out>(v))
    throw std::invalid_argument(name + ": expected a C-contiguous " + dtype + " array (updated in place)");
  Out a = py::reinterpret_borrow<Out>(v);
  need_length(a, n, name);
  return a;
}

template <typename In>
In input(const py::object& v, int64_t n, const std::string& name) {
  if (v.is_none()) throw std::invalid_argument(name + ": expected a vector, got None");
  In a = In::ensure(v);
  if (!a) {
    PyErr_Clear();
    throw std::invalid_argument(name + ": expected a numeric vector");
  }
  need_length(a, n, name);
  return a;
}

SideArrays side_of(const py::object& v, int64_t n, const std::string& which) {
  SideArrays s;
  s.side.start = v.attr("start").cast<int64_t>();
  s.sq = input<F64In>(v.attr("sq"), n, which + ".sq");
  s.norms = input<F64In>(v.attr("norms"), n, which + ".norms");
  s.var = input<F64In>(v.attr("var"), n, which + ".var");
  const py::object sup = v.attr("sup");
  if (!sup.is_none()) {
    s.sup = input<I64In>(sup, n, which + ".sup");
    s.side.sup = s.sup.data();
  }
  s.best = output<F64Out>(v.attr("best"), n, which + ".best", "float64");
  s.best_idx = output<I64Out>(v.attr("best_idx"), n, which + ".best_idx", "int64");
  s.ratio_sum = output<F64Out>(v.attr("ratio_sum"), n, which + ".ratio_sum", "float64");
  s.side.sq = s.sq.data();
  s.side.norms = s.norms.data();
  s.side.var = s.var.data();
  s.side.best = s.best.mutable_data();
  s.side.best_idx = s.best_idx.mutable_data();
  s.side.ratio_sum = s.ratio_sum.mutable_data();
  return s;
}

PairParams params_of(const F64In& params) {
  if (params.ndim() != 1 || static_cast<size_t>(params.shape(0)) != kNumPairParams)
    throw std::invalid_argument("params: expected " + std::to_string(kNumPairParams) +
                                " float64 values in the order of _C.PAIR_PARAMS");
  PairParams p{};
  for (size_t k = 0; k < kNumPairParams; ++k) p.*(kPairParams[k].second) = params.data()[k];
  if (!(std::isfinite(p.cdnv_exponent) && p.cdnv_exponent > 0))
    throw std::invalid_argument("params: cdnv_exponent must be a finite number > 0");
  return p;
}

py::tuple moments_tuple(const ScalarMoments& m) { return py::make_tuple(m.n, m.mean, m.m2); }

}  // namespace

void bind_pairwise(py::module_& m) {
  py::tuple names(kNumPairParams);
  for (size_t k = 0; k < kNumPairParams; ++k) names[k] = py::str(kPairParams[k].first);
  m.attr("PAIR_PARAMS") = names;

  // The attributes are the fields of ncfast.backends.base.PairSums, which reads them by name.
  py::class_<PairSums>(m, "PairSums",
                       "One tile's sums over its pairs (csrc/pairwise.h); cdnv and unif as (n, mean, M2).")
      .def_readonly("resid", &PairSums::resid)
      .def_readonly("cos_dev", &PairSums::cos_dev)
      .def_readonly("coh", &PairSums::coh)
      .def_readonly("dist", &PairSums::dist)
      .def_readonly("msdr_sum", &PairSums::msdr_sum)
      .def_readonly("msdr_n", &PairSums::msdr_n)
      .def_property_readonly("cdnv", [](const PairSums& s) { return moments_tuple(s.cdnv); })
      .def_property_readonly("unif", [](const PairSums& s) { return moments_tuple(s.unif); });

  m.def(
      "reduce_pair_tile",
      [](const F64In& gram, const py::object& rows, const py::object& cols, const F64In& params, int num_threads) {
        if (gram.ndim() != 2) throw std::invalid_argument("gram: expected a 2-D tile");
        const int64_t t1 = gram.shape(0), t2 = gram.shape(1);
        const SideArrays r = side_of(rows, t1, "rows"), c = side_of(cols, t2, "cols");
        if ((r.side.sup == nullptr) != (c.side.sup == nullptr))
          throw std::invalid_argument("sup: given for one side of the tile only");
        const PairTile t{gram.data(), t1, t2, r.side, c.side, params_of(params)};
        py::gil_scoped_release release;
        return reduce_pair_tile(t, num_threads);
      },
      py::arg("gram"), py::arg("rows"), py::arg("cols"), py::arg("params"), py::arg("num_threads"),
      "One tile of class pairs reduced in one sweep (see csrc/pairwise.h): gram the (t1, t2) float64 block "
      "G[rows, cols]; rows and cols their classes' vectors (ncfast.backends.base.PairVectors: start, sq, norms, "
      "var, sup, best, best_idx, ratio_sum), best, best_idx and ratio_sum updated in place; params the float64 "
      "scalars in the order of PAIR_PARAMS. Returns the tile's PairSums.");
}

}  // namespace ncfast
