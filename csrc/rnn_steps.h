// Shared by Kiln's recurrent kernels (rnn_recurrence.cpp: fp32 FMA tiles; rnn_amx.cpp:
// bf16 AMX tiles): hidden units in blocks of 16, the gate nonlinearities, and the step loop.
#pragma once
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "simd_math.h"

namespace kiln::rnn {

constexpr int kBlock = 16;
inline int64_t blocks_of(int64_t H) { return (H + kBlock - 1) / kBlock; }

#ifdef __AVX512F__
// The accumulators must live in registers: force inlining and full unrolling of the
// R x G tile (without it GCC keeps acc[][] on the stack).
#define KILN_INLINE inline __attribute__((always_inline))

// The gates' sigmoid and tanh, leaner than simd_math.h's (about a fifth of the layer's time
// went to them): 2^t as 2^round(t) (vscalefps, saturating) times a degree-5 polynomial for
// 2^f, f in [-0.5, 0.5] (relative error 2e-7). Reducing t = x log2(e) in one step loses
// relative accuracy for large |x|, where sigmoid and tanh are flat: the absolute error
// stays under 3e-7 over the whole range, as with simd_math.h's. NaN propagates; +-inf and
// +-1e30 saturate.
KILN_INLINE __m512 gate_exp2(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.32765e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.67554e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402212e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314697e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000007f));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + e^-x); the clamp to |x| <= 87 keeps e^-x finite (the Newton step in recip16
// would turn 0 * inf into NaN) and every step's result normal (a denormal or underflowing
// result takes a microcode assist without flush-to-zero; see simd_math.h). min/max_ps
// return their second operand when that is NaN.
KILN_INLINE __m512 gate_sigmoid(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(87.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  const __m512 e = gate_exp2(_mm512_mul_ps(x, _mm512_set1_ps(-1.44269504088896341f)));
  return recip16(_mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// 2 / (1 + e^-2x) - 1, |x| clamped to 43.5 (as gate_sigmoid's 87; tanh(43.5) rounds to 1)
KILN_INLINE __m512 gate_tanh(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(43.5f), _mm512_max_ps(_mm512_set1_ps(-43.5f), x));
  const __m512 e = gate_exp2(_mm512_mul_ps(x, _mm512_set1_ps(-2.88539008177792682f)));
  return _mm512_fmsub_ps(recip16(_mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_set1_ps(2.0f), _mm512_set1_ps(1.0f));
}

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

#endif  // __AVX512F__

}  // namespace kiln::rnn
