#include "thread_pool.h"

#include <omp.h>

namespace kiln {

// The quantized GEMMs run on OpenMP's workers. kiln._C links libgomp.so.1, the runtime torch
// has already loaded, so these are torch's own intra-op threads: a second pool of our own
// would compete for the cores with torch's workers, which spin for a while after each
// parallel torch op (the neighbouring layers of the same model).
void parallel_run(int threads, const std::function<void(int)>& fn) {
  if (threads <= 1) {
    fn(0);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    // every t in [0, threads) must run even if the runtime grants fewer threads
    const int n = omp_get_num_threads(), id = omp_get_thread_num();
    for (int t = id; t < threads; t += n) fn(t);
  }
}

}  // namespace kiln
