// Parallel regions for Kiln's C++ kernels, on the OpenMP workers torch already runs
// (a BERT-base linear layer is short enough that spawning threads per call would cost a
// visible share of it, and a pool of our own would compete with torch's spinning workers).
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>

namespace kiln {

// Runs fn(t) for t = 0 .. threads-1, t = 0 on the calling thread, and returns when all are
// done; fn must not call parallel_run itself.
void parallel_run(int threads, const std::function<void(int)>& fn);

// Splits [0, n) into min(threads, n) contiguous ranges and runs body(begin, end) for each,
// through parallel_run (one range on the calling thread when threads <= 1).
template <typename Body>
void parallel_ranges(int64_t n, int threads, Body&& body) {
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  parallel_run(t, [&](int id) { body(n * id / t, n * (id + 1) / t); });
}

}  // namespace kiln
