// A small persistent thread pool for Kiln's quantized GEMMs. A linear layer of BERT-base
// takes 0.1-1 ms, so spawning threads per call (tens of microseconds each) would cost a
// visible share; the workers here spin briefly after each job, then sleep on a condition
// variable so they do not compete with torch's own threads between Kiln calls.
#pragma once
#include <functional>

namespace kiln {

// Runs fn(t) for t = 0 .. threads-1, t = 0 on the calling thread, and returns when all are
// done. Calls from several threads are serialized; fn must not call parallel_run itself.
void parallel_run(int threads, const std::function<void(int)>& fn);

}  // namespace kiln
