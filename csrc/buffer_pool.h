// Output arrays of the per-call kernels come from a small pool of recycled buffers. A training
// loop calls class_moments every batch or epoch with the same shapes; fresh C x D arrays would
// page-fault every call, which on some virtual machines costs more than the kernel itself. A
// buffer returns to the pool when numpy frees its array; the pool keeps at most kPoolBytes and
// reuses a buffer only for a request of exactly its size.
#pragma once

#include <cstddef>
#include <map>
#include <mutex>

namespace ncfast {

class BufferPool {
 public:
  static constexpr size_t kPoolBytes = size_t{256} << 20;

  // A buffer of `bytes` (64-byte aligned): a cached one of exactly that size, else a new one.
  void* get(size_t bytes);
  // p back into the pool, or freed where keeping it would pass kPoolBytes.
  void put(void* p, size_t bytes);
  // Frees every cached buffer; returns the bytes freed.
  size_t release();
  // Bytes held in cached buffers.
  size_t cached();

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

// The process's pool. Never destroyed: numpy may free arrays after static destructors have run.
BufferPool& pool();

}  // namespace ncfast
