// Parallel regions for Kiln's quantized GEMMs, on the OpenMP workers torch already runs
// (a BERT-base linear layer takes 0.1-1 ms: spawning threads per call would cost a visible
// share, and a pool of our own would compete with torch's spinning workers).
#pragma once
#include <functional>

namespace kiln {

// Runs fn(t) for t = 0 .. threads-1, t = 0 on the calling thread, and returns when all are
// done; fn must not call parallel_run itself.
void parallel_run(int threads, const std::function<void(int)>& fn);

}  // namespace kiln
