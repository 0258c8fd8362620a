// The parallel loops of TVM-generated kernels, run on torch's OpenMP workers.
//
// TVM's host code calls its runtime's thread pool through a function pointer that each
// exported module holds (`__TVMBackendParallelLaunch`, filled in when the module loads).
// That pool is a second set of threads beside torch's OpenMP workers, which spin for a
// while after every parallel torch op: a generated kernel that follows a torch/oneDNN op
// had its pool thread share a core with a spinning OpenMP worker, and ran well below the
// copy bandwidth that it reached once OMP_WAIT_POLICY=PASSIVE stopped the spinning
// (`kiln bench elementwise --threads 2` reports the fraction). kernels/generated.py points
// loaded modules at the launcher below, so generated kernels and torch's ops take turns on
// the same threads.
#include <omp.h>

#include <atomic>
#include <cstdint>

#include "kiln.h"
#include "thread_pool.h"

namespace {

std::atomic<int64_t> launches{0};  // parallel launches taken, for tests and diagnostics
std::atomic<int64_t> serial_launches{0};  // of which run on the calling thread alone
// Set by the caller around one kernel call whose work is too small to share: a symbolic-size
// kernel has its parallel loops built in, and only the call knows how many rows it brings.
thread_local bool serial = false;

// TVM's C ABI for parallel loops (tvm/runtime/c_backend_api.h)
struct ParallelGroupEnv {
  void* sync_handle;  // for TVMBackendParallelBarrier; modules that call it keep TVM's pool
  int32_t num_task;
};
using ParallelLambda = int (*)(int task_id, ParallelGroupEnv* penv, void* cdata);

int openmp_parallel_launch(ParallelLambda flambda, void* cdata, int num_task) {
  // num_task 0: as many tasks as threads; the plan calls kernels with torch's thread count
  // set for this thread (omp_get_max_threads is torch.get_num_threads under OpenMP). Already
  // on a worker, parallel_run's nested region has one thread and runs the tasks in order.
  const int n = num_task > 0 ? num_task : ((serial || omp_in_parallel()) ? 1 : omp_get_max_threads());
  ParallelGroupEnv env{nullptr, n};
  launches.fetch_add(1, std::memory_order_relaxed);
  if (serial) {  // every task in order here: no parallel region, no worker to wake
    serial_launches.fetch_add(1, std::memory_order_relaxed);
    for (int t = 0; t < n; ++t)
      if (flambda(t, &env, cdata) != 0) return -1;
    return 0;
  }
  std::atomic<int> failed{0};
  kiln::parallel_run(n, [&](int t) {
    if (flambda(t, &env, cdata) != 0) failed.store(1, std::memory_order_relaxed);
  });
  return failed.load() ? -1 : 0;
}

}  // namespace

namespace kiln {

uintptr_t tvm_parallel_launch_address() { return reinterpret_cast<uintptr_t>(&openmp_parallel_launch); }

int64_t tvm_parallel_launches() { return launches.load(); }

int64_t tvm_serial_launches() { return serial_launches.load(); }

void tvm_parallel_serial(bool on) { serial = on; }

}  // namespace kiln
