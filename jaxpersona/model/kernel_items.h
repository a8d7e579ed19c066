// How the package's CPU kernels (skinny_matmul.cc, cache_attention.cc) share out their work.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace jaxpersona {

// Calls take(i) for every item 0 <= i < n, then returns. The caller and any of XLA's intra-op pool workers that
// wakes in time take the next item from an atomic counter; make() gives each taker its `take` (with its own
// scratch, allocated on first use: a worker that wakes after the last item must touch no buffer). An item
// writes only its own outputs, so who computes which item never changes a number.
template <class Make>
void ForItems(xla::ffi::ThreadPool& pool, int64_t n, Make make) {
  struct Counter {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto job = std::make_shared<Counter>();
  auto run = [job, n, make]() {
    auto take = make();
    for (int64_t i; (i = job->next.fetch_add(1)) < n;) {
      take(i);
      job->done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  const int64_t helpers = pool.num_threads() < n - 1 ? pool.num_threads() : n - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run]() { run(); });  // a temporary: Schedule takes F&&
  run();
  while (job->done.load(std::memory_order_acquire) < n) _mm_pause();
}

}  // namespace jaxpersona
