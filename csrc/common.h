// Shared helpers for the ncfast CPU kernels: element loads for the supported
// input dtypes and a strided 2-D view. No libtorch: inputs arrive as buffers.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef NCFAST_WITH_OPENMP
#include <omp.h>
#endif

namespace ncfast {

// Threads for a parallel region: the caller's count (torch.get_num_threads() on the Python side),
// at most one per work item, and 1 in a build without OpenMP.
inline int region_threads(int requested, int64_t items) {
#ifdef NCFAST_WITH_OPENMP
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, items)));
#else
  (void)requested;
  (void)items;
  return 1;
#endif
}

// This thread's index inside a parallel region (0 outside one, or without OpenMP).
inline int thread_id() {
#ifdef NCFAST_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// A std::allocator on 64-byte boundaries: vectors whose rows are read and written with 512-bit
// loads and stores (a store that straddles two cache lines costs about twice as much).
template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, ((std::max<size_t>(n, 1) * sizeof(T) + 63) / 64) * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};

template <typename T>
using aligned_vector = std::vector<T, CacheAligned<T>>;

// count zeroed elements on a 64-byte boundary (whole cache lines; AVX-512 aligned loads).
template <typename T>
std::unique_ptr<T[], FreeDeleter> aligned_zeros(int64_t count) {
  const size_t bytes = ((static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T) + 63) / 64) * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return std::unique_ptr<T[], FreeDeleter>(static_cast<T*>(p));
}

enum class DType { F32, F16, BF16, F64 };

inline DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::F32;
  if (name == "float16") return DType::F16;
  if (name == "bfloat16") return DType::BF16;
  if (name == "float64") return DType::F64;
  throw std::invalid_argument("features: unsupported dtype '" + name + "'");
}

inline int64_t dtype_bytes(DType t) { return t == DType::F64 ? 8 : t == DType::F32 ? 4 : 2; }

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// IEEE half -> float without relying on F16C, so the build is portable;
// subnormals, infinities and NaN are handled exactly.
inline float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise the mantissa
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      u = sign | ((127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// A read-only 2-D view with element strides; 64-bit offsets throughout so
// that N * D beyond 2^31 elements is addressed correctly.
struct Matrix {
  const void* data;
  int64_t rows, cols;
  int64_t row_stride, col_stride;  // in elements
  DType dtype;

  inline int64_t offset(int64_t i, int64_t j) const {
    return i * row_stride + j * col_stride;
  }

  inline double at(int64_t i, int64_t j) const {
    const int64_t o = offset(i, j);
    switch (dtype) {
      case DType::F32: return static_cast<const float*>(data)[o];
      case DType::F64: return static_cast<const double*>(data)[o];
      case DType::F16: return f16_to_float(static_cast<const uint16_t*>(data)[o]);
      case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(data)[o]);
    }
    return 0.0;
  }

  // Columns [j0, j0 + n) of every row, as a Matrix of their own (no copy).
  inline Matrix columns(int64_t j0, int64_t n) const {
    Matrix m = *this;
    m.data = static_cast<const char*>(data) + j0 * col_stride * dtype_bytes(dtype);
    m.cols = n;
    return m;
  }

  // Row i converted to double into out[0..cols).
  void load_row(int64_t i, double* out) const;
  // Row i as float32 into out[0..cols): exact for float32, float16 and bfloat16 (not for float64).
  void load_row_f32(int64_t i, float* out) const;
};

}  // namespace ncfast
