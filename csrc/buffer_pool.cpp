// The recycled-buffer pool (buffer_pool.h) and its two _C functions, release_cached_buffers and
// cached_buffer_bytes.
#include "buffer_pool.h"

#include <cstdlib>
#include <new>

#include "bindings.h"

namespace ncfast {

void* BufferPool::get(size_t bytes) {
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

void BufferPool::put(void* p, size_t bytes) {
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

size_t BufferPool::release() {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = cached_;
  for (auto& kv : free_) std::free(kv.second);
  free_.clear();
  cached_ = 0;
  return n;
}

size_t BufferPool::cached() {
  std::lock_guard<std::mutex> lock(mu_);
  return cached_;
}

BufferPool& pool() {
  static BufferPool* p = new BufferPool();
  return *p;
}

void bind_buffer_pool(py::module_& m) {
  m.def(
      "release_cached_buffers", []() { return pool().release(); },
      "Free the recycled output buffers (kept up to 256 MiB so repeated calls with the same shapes do not "
      "page-fault); returns the bytes freed.");
  m.def(
      "cached_buffer_bytes", []() { return pool().cached(); },
      "Bytes held by the pool of recycled output buffers.");
}

}  // namespace ncfast
