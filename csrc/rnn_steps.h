// Shared by Kiln's recurrent kernels (rnn_recurrence.cpp: fp32 FMA tiles, AVX-512 or AVX2;
// rnn_amx.cpp: bf16 AMX tiles, hidden units in blocks of kBlock = 16): the gate
// nonlinearities and the step loop.
#pragma once
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "simd_math.h"
#include "simd_vec.h"

namespace kiln::rnn {

constexpr int kBlock = 16;
inline int64_t blocks_of(int64_t H) { return (H + kBlock - 1) / kBlock; }

// The accumulators must live in registers: force inlining and full unrolling of the
// R x G tile (without it GCC keeps acc[][] on the stack).
#define KILN_INLINE inline __attribute__((always_inline))

#ifdef KILN_HAS_VEC
using simd::Vec;

// The gates' sigmoid and tanh, leaner than simd_math.h's (about a fifth of the layer's time
// went to them): 2^t by simd_vec.h's exp2_reduced (relative error 2e-7). Reducing
// t = x log2(e) in one step loses relative accuracy for large |x|, where sigmoid and tanh
// are flat: the absolute error stays under 3e-7 over the whole range, as with simd_math.h's.
// NaN propagates; +-inf and +-1e30 saturate. The clamps below keep round(t) within
// [-126, 126].
KILN_INLINE Vec::T gate_exp2(Vec::T t) { return simd::exp2_reduced<Vec>(t); }

// 1 / (1 + e^-x); the clamp to |x| <= 87 keeps e^-x finite (the Newton step in Vec::recip
// would turn 0 * inf into NaN) and every step's result normal (a denormal or underflowing
// result takes a microcode assist without flush-to-zero; see simd_math.h). min/max return
// their second operand when that is NaN.
KILN_INLINE Vec::T gate_sigmoid(Vec::T x) {
  x = Vec::min(Vec::set1(87.0f), Vec::max(Vec::set1(-87.0f), x));
  const Vec::T e = gate_exp2(Vec::mul(x, Vec::set1(-1.44269504088896341f)));
  return Vec::recip(Vec::add(Vec::set1(1.0f), e));
}

// 2 / (1 + e^-2x) - 1, |x| clamped to 43.5 (as gate_sigmoid's 87; tanh(43.5) rounds to 1)
KILN_INLINE Vec::T gate_tanh(Vec::T x) {
  x = Vec::min(Vec::set1(43.5f), Vec::max(Vec::set1(-43.5f), x));
  const Vec::T e = gate_exp2(Vec::mul(x, Vec::set1(-2.88539008177792682f)));
  return Vec::fmsub(Vec::recip(Vec::add(Vec::set1(1.0f), e)), Vec::set1(2.0f), Vec::set1(1.0f));
}
#endif  // KILN_HAS_VEC

// Runs step(t, block_begin, block_end) for t = 0..T-1 over `blocks` hidden blocks.
// With several threads each step is cut into one chunk of blocks per thread, and the
// chunks are claimed in order from a shared counter: a chunk of step t starts once every
// chunk of step t-1 is done (it reads all of h_{t-1}). Claiming rather than a fixed split
// matters on a shared machine: a thread that loses its core between chunks holds nobody
// up, the others take its chunks (with a fixed split every step would wait for it).
// The threads are OpenMP's: kiln._C links libgomp.so.1, which is the very runtime torch has
// already loaded, so these are torch's intra-op workers. Threads of our own would compete
// for the cores with torch's workers, which spin for a while after every parallel torch op
// (such as the input projection that runs just before a hoisted recurrence).
template <typename Step>
void run_steps(int64_t T, int64_t blocks, int threads, Step&& step) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  if (chunks == 1) {
    for (int64_t t = 0; t < T; ++t) step(t, 0, blocks);
    return;
  }
  std::atomic<int64_t> next{0}, done{0};
#pragma omp parallel num_threads(static_cast<int>(chunks))
  for (int64_t item = next.fetch_add(1, std::memory_order_relaxed); item < T * chunks;
       item = next.fetch_add(1, std::memory_order_relaxed)) {
    const int64_t t = item / chunks, c = item % chunks;
    // spin (a chunk takes microseconds), but yield now and then so an oversubscribed machine
    // still makes progress
    for (int spins = 1; done.load(std::memory_order_acquire) < t * chunks; ++spins) {
      _mm_pause();
      if ((spins & 1023) == 0) sched_yield();
    }
    step(t, blocks * c / chunks, blocks * (c + 1) / chunks);
    done.fetch_add(1, std::memory_order_release);
  }
}


}  // namespace kiln::rnn
