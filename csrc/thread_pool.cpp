#include "thread_pool.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define KILN_PAUSE() _mm_pause()
#else
#define KILN_PAUSE() std::this_thread::yield()
#endif

namespace kiln {
namespace {

class Pool {
 public:
  void run(int threads, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> serial(call_mu_);
    if (owner_pid_ != getpid()) {  // after fork() the workers of the parent do not exist here
      workers_ = 0;
      owner_pid_ = getpid();
    }
    while (workers_ < threads - 1) {
      // Detached: the workers live for the whole process.
      std::thread([this, id = workers_ + 1, seen = generation_.load()] { work(id, seen); }).detach();
      ++workers_;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      job_threads_ = threads;
      pending_.store(threads - 1, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    fn(0);
    while (pending_.load(std::memory_order_acquire) != 0) KILN_PAUSE();
  }

 private:
  // `seen`: the generation before this worker's first job (read when it was created).
  void work(int id, uint64_t seen) {
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        KILN_PAUSE();
        if (++spins % 64 == 0 && std::chrono::steady_clock::now() - start > std::chrono::microseconds(50)) {
          std::unique_lock<std::mutex> lk(mu_);
          cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
      }
      const std::function<void(int)>* job;
      int job_threads;
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
        job_threads = job_threads_;
      }
      if (id < job_threads) {
        (*job)(id);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int)>* job_ = nullptr;
  int job_threads_ = 0;
  int workers_ = 0;
  pid_t owner_pid_ = getpid();
};

}  // namespace

void parallel_run(int threads, const std::function<void(int)>& fn) {
  if (threads <= 1) {
    fn(0);
    return;
  }
  static Pool* pool = new Pool();  // leaked on purpose: workers outlive static destruction
  pool->run(threads, fn);
}

}  // namespace kiln
