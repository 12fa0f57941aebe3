// What the binding files of ncfast._C share (module.cpp calls one bind_* function per kernel
// family). Arrays cross as buffers (numpy); half and bfloat16 arrive as uint16 with a dtype name,
// so no libtorch is linked.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "common.h"

namespace ncfast {

namespace py = pybind11;

// A 2-D buffer as a strided Matrix of the named dtype.
inline Matrix as_matrix(const py::buffer_info& info, const std::string& dtype_name) {
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

// Labels (N,) in [0, C) for the rows of x, and class means (C, D): shared by the centring kernels.
inline void check_labels_means(const Matrix& x,
                               const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& labels,
                               const py::array_t<double, py::array::c_style>& means) {
  if (labels.ndim() != 1 || labels.shape(0) != x.rows)
    throw std::invalid_argument("labels: expected shape (N,) matching features");
  if (means.ndim() != 2 || means.shape(1) != x.cols) throw std::invalid_argument("means: expected shape (C, D)");
  const int64_t* y = labels.data();
  for (int64_t i = 0; i < x.rows; ++i)
    if (y[i] < 0 || y[i] >= means.shape(0)) throw std::invalid_argument("labels: out of range [0, C)");
}

// One per family: the _C functions of buffer_pool.cpp, build_info.cpp and the *_bindings.cpp files.
void bind_buffer_pool(py::module_& m);
void bind_build_info(py::module_& m);
void bind_moments(py::module_& m);
void bind_ncc(py::module_& m);
void bind_pairwise(py::module_& m);
void bind_gram(py::module_& m);

}  // namespace ncfast
