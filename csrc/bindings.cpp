// pybind11 bindings for ncfast._C. Arrays cross as buffers (numpy); half and
// bfloat16 arrive as uint16 with a dtype name, so no libtorch is linked.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "common.h"
#include "gram.h"
#include "moments.h"
#include "ncc.h"
#include "pairwise.h"

#ifdef NCFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace ncfast;

namespace {

Matrix as_matrix(const py::buffer_info& info, const std::string& dtype_name) {
  if (info.ndim != 2) throw std::invalid_argument("features: expected a 2-D array");
  Matrix m;
  m.data = info.ptr;
  m.rows = info.shape[0];
  m.cols = info.shape[1];
  m.dtype = parse_dtype(dtype_name);
  const int64_t item = info.itemsize;
  if (info.strides[0] % item || info.strides[1] % item)
    throw std::invalid_argument("features: strides are not a multiple of the item size");
  m.row_stride = info.strides[0] / item;
  m.col_stride = info.strides[1] / item;
  return m;
}

// Output arrays of the per-call kernels come from a small pool of recycled buffers. A training
// loop calls class_moments every batch or epoch with the same shapes; fresh C x D arrays would
// page-fault every call (on some virtual machines ~1 us per 4 KiB page, more than the kernel
// itself at C = 1,000, D = 512). A buffer returns to the pool when numpy frees its array; the pool
// keeps at most kPoolBytes and reuses a buffer only for a request of exactly its size.
class BufferPool {
 public:
  static constexpr size_t kPoolBytes = size_t{256} << 20;

  void* get(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return p;
  }

  void put(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= kPoolBytes) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  size_t release() {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t n = cached_;
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    cached_ = 0;
    return n;
  }

  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

// Never destroyed: numpy may free arrays after static destructors have run.
BufferPool& pool() {
  static BufferPool* p = new BufferPool();
  return *p;
}

struct PooledBlock {
  void* ptr;
  size_t bytes;
};

// An uninitialised C-contiguous array whose memory comes from (and returns to) the pool.
template <typename T>
py::array_t<T> pooled_array(std::vector<py::ssize_t> shape) {
  size_t count = 1;
  for (auto s : shape) count *= static_cast<size_t>(s);
  const size_t bytes = std::max<size_t>(count, 1) * sizeof(T);
  auto* block = new PooledBlock{pool().get(bytes), bytes};
  py::capsule owner(block, [](void* b) {
    auto* blk = static_cast<PooledBlock*>(b);
    pool().put(blk->ptr, blk->bytes);
    delete blk;
  });
  return py::array_t<T>(shape, static_cast<T*>(block->ptr), owner);
}

std::string compile_options() {
  std::string s;
#ifdef NCFAST_WITH_OPENMP
  s += "OpenMP=ON(max_threads=" + std::to_string(omp_get_max_threads()) + ")";
#else
  s += "OpenMP=OFF";
#endif
  s += " SIMD=";
#if defined(__AVX512F__)
  s += "AVX512";
#elif defined(__AVX2__)
  s += "AVX2";
#elif defined(__SSE4_2__)
  s += "SSE4.2";
#elif defined(__ARM_NEON)
  s += "NEON";
#else
  s += "generic";
#endif
#if defined(__AVX512BF16__)
  s += " BF16=ON";
#else
  s += " BF16=OFF";
#endif
#ifdef NCFAST_WITH_CUDA
  s += " CUDA=ON";
#else
  s += " CUDA=OFF";
#endif
  return s;
}

}  // namespace

// Labels (N,) in [0, C) for the rows of x, and class means (C, D): shared by the centring kernels.
static void check_labels_means(const Matrix& x, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& labels,
                        const py::array_t<double, py::array::c_style>& means) {
  if (labels.ndim() != 1 || labels.shape(0) != x.rows)
    throw std::invalid_argument("labels: expected shape (N,) matching features");
  if (means.ndim() != 2 || means.shape(1) != x.cols) throw std::invalid_argument("means: expected shape (C, D)");
  const int64_t* y = labels.data();
  for (int64_t i = 0; i < x.rows; ++i)
    if (y[i] < 0 || y[i] >= means.shape(0)) throw std::invalid_argument("labels: out of range [0, C)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "ncfast compiled CPU core (no libtorch dependency)";
  m.def(
      "release_cached_buffers", []() { return pool().release(); },
      "Free the recycled output buffers (kept up to 256 MiB so repeated calls with the same shapes do not "
      "page-fault); returns the bytes freed.");
  m.def(
      "cached_buffer_bytes", []() { return pool().cached(); },
      "Bytes held by the pool of recycled output buffers.");
  m.def("compile_options", &compile_options,
        "What this build was compiled with: OpenMP, SIMD level, CUDA on or off.");
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
  m.def("ncc_register_tiled", &ncc_register_tiled,
        "Whether ncc_sweep is register-tiled (AVX-512): faster than GEMM blocks at any number of classes.");
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
