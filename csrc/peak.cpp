// The machine's compute ceilings, measured: what one core's FMA units and AMX tiles deliver
// with every operand in registers (no loads), on 1..n threads at once. Kernels' figures are
// read against these (`python -m kiln.bench.machine`), and the two-thread column says
// whether this machine's threads add compute at all (two vCPUs sharing one physical core's
// units do not).
#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <vector>

#include "amx_tiles.h"
#include "kiln.h"
#include "thread_pool.h"

namespace kiln {
namespace {

#ifdef __AVX512F__
// 12 independent FMA chains (latency 4 x 2 ports = 8 in flight needed), each started from
// its own value so that no two chains are the same computation to the compiler.
double fma_flops(int64_t iters) {
  __m512 a0 = _mm512_set1_ps(1.00f), a1 = _mm512_set1_ps(1.01f), a2 = _mm512_set1_ps(1.02f),
         a3 = _mm512_set1_ps(1.03f), a4 = _mm512_set1_ps(1.04f), a5 = _mm512_set1_ps(1.05f),
         a6 = _mm512_set1_ps(1.06f), a7 = _mm512_set1_ps(1.07f), a8 = _mm512_set1_ps(1.08f),
         a9 = _mm512_set1_ps(1.09f), a10 = _mm512_set1_ps(1.10f), a11 = _mm512_set1_ps(1.11f);
  const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
    a0 = _mm512_fmadd_ps(a0, m, c); a1 = _mm512_fmadd_ps(a1, m, c); a2 = _mm512_fmadd_ps(a2, m, c);
    a3 = _mm512_fmadd_ps(a3, m, c); a4 = _mm512_fmadd_ps(a4, m, c); a5 = _mm512_fmadd_ps(a5, m, c);
    a6 = _mm512_fmadd_ps(a6, m, c); a7 = _mm512_fmadd_ps(a7, m, c); a8 = _mm512_fmadd_ps(a8, m, c);
    a9 = _mm512_fmadd_ps(a9, m, c); a10 = _mm512_fmadd_ps(a10, m, c); a11 = _mm512_fmadd_ps(a11, m, c);
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                 _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)),
                                               _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11))));
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  return 12.0 * 32.0 * static_cast<double>(iters);
}
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
// Four accumulators (tiles 0-3) fed by two A and two B tiles, as a 2 x 2 GEMM block: each
// tdpbf16ps is 16 x 16 x 32 multiply-adds.
double amx_flops(int64_t iters) {
  alignas(64) static const uint16_t ones[16 * 32] = {};
  load_full_tiles();
  for (int t = 4; t < 8; ++t) {
    switch (t) {  // tile numbers must be immediates
      case 4: _tile_loadd(4, ones, 64); break;
      case 5: _tile_loadd(5, ones, 64); break;
      case 6: _tile_loadd(6, ones, 64); break;
      default: _tile_loadd(7, ones, 64); break;
    }
  }
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float sink[256];
  _tile_stored(0, sink, 64);
  _tile_release();
  __asm__ __volatile__("" : : "r"(sink) : "memory");
  return 4.0 * 16 * 16 * 32 * 2 * static_cast<double>(iters);
}
#endif

}  // namespace

double compute_peak_gflops(PeakUnit unit, int threads, int64_t iters) {
  if (threads < 1 || iters < 1) throw std::invalid_argument("compute_peak_gflops: threads and iters must be >= 1");
  if (unit == PeakUnit::kAmxBf16 && !amx_bf16_supported())
    throw std::runtime_error("compute_peak_gflops: this CPU has no AMX-BF16 tiles");
#ifndef __AVX512F__
  throw std::runtime_error("compute_peak_gflops: built without AVX-512");
#endif
  std::vector<double> flops(threads, 0.0), secs(threads, 0.0);
  std::atomic<int> ready{0};
  parallel_run(threads, [&](int id) {
    // start together (the figure is for threads running at once); a runtime that granted
    // fewer threads runs the ids in turn, so the wait is bounded
    ready.fetch_add(1);
    const auto wait0 = std::chrono::steady_clock::now();
    while (ready.load() < threads && std::chrono::steady_clock::now() - wait0 < std::chrono::milliseconds(20)) {}
    const auto t0 = std::chrono::steady_clock::now();
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
    if (unit == PeakUnit::kAmxBf16) flops[id] = amx_flops(iters);
#endif
#ifdef __AVX512F__
    if (unit == PeakUnit::kFma) flops[id] = fma_flops(iters);
#endif
    secs[id] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
  double total = 0.0;
  for (int i = 0; i < threads; ++i) total += secs[i] > 0 ? flops[i] / secs[i] : 0.0;
  return total / 1e9;
}

}  // namespace kiln
