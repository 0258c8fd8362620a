// The machine's compute ceilings, measured: what one core's FMA units, AVX-512 dot products
// (bf16 vdpbf16ps, int8 vpdpbusd) and AMX tiles (bf16 and int8) deliver with every operand in registers (no loads), on 1..n threads at once, and the
// core clock the theoretical per-cycle figures are read at. Kernels' figures are
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
#include "quant_gemm.h"
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
#elif defined(__AVX2__) && defined(__FMA__)
// The same on 256-bit registers (a CPU with AVX2 and FMA but no AVX-512): 12 chains of 8 lanes.
double fma_flops(int64_t iters) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.0f + 0.01f * static_cast<float>(i));
  const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
    a[0] = _mm256_fmadd_ps(a[0], m, c); a[1] = _mm256_fmadd_ps(a[1], m, c); a[2] = _mm256_fmadd_ps(a[2], m, c);
    a[3] = _mm256_fmadd_ps(a[3], m, c); a[4] = _mm256_fmadd_ps(a[4], m, c); a[5] = _mm256_fmadd_ps(a[5], m, c);
    a[6] = _mm256_fmadd_ps(a[6], m, c); a[7] = _mm256_fmadd_ps(a[7], m, c); a[8] = _mm256_fmadd_ps(a[8], m, c);
    a[9] = _mm256_fmadd_ps(a[9], m, c); a[10] = _mm256_fmadd_ps(a[10], m, c); a[11] = _mm256_fmadd_ps(a[11], m, c);
  }
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  volatile float sink = lanes[0] + lanes[7];
  (void)sink;
  return 12.0 * 16.0 * static_cast<double>(iters);
}
#define KILN_HAS_FMA_PEAK 1
#endif
#ifdef __AVX512F__
#define KILN_HAS_FMA_PEAK 1
#endif

#if defined(__AVX512BF16__)
// 12 independent vdpbf16ps chains: each instruction is 16 fp32 sums of two bf16 products
// (64 FLOP), the rate bf16 GEMMs on a CPU without AMX tiles (Cooper Lake, Zen 4) run against.
double dot_bf16_flops(int64_t iters) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(0.01f * static_cast<float>(i));
  const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.999f), _mm512_set1_ps(1.001f));
  const __m512bh y = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(-1e-3f));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
  }
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  volatile float sink = _mm512_reduce_add_ps(s);
  (void)sink;
  return 12.0 * 64.0 * static_cast<double>(iters);
}
#define KILN_HAS_DOT_BF16_PEAK 1
#endif

#if defined(__AVX512VNNI__)
// 12 independent vpdpbusd chains: 16 int32 sums of four u8 x s8 products each (128 ops), the
// int8 GEMMs' ceiling without AMX.
double dot_int8_ops(int64_t iters) {
  __m512i a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_epi32(i);
  const __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(-1);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbusd_epi32(a[i], x, y);
  }
  __m512i s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_epi32(s, a[i]);
  volatile int sink = _mm512_reduce_add_epi32(s);
  (void)sink;
  return 12.0 * 128.0 * static_cast<double>(iters);
}
#define KILN_HAS_DOT_INT8_PEAK 1
#endif

#if defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AMX_TILE__)
// N independent accumulator tiles (0..N-1, N <= 6) fed by the same two source tiles (6, 7):
// each tile instruction is 16 x 16 x 32 multiply-adds (bf16) or 16 x 16 x 64 (int8), and one
// accumulator's chain waits on its own previous result, so too few in flight measure the
// instruction's latency rather than the unit's throughput. The sources hold nonzero values so
// that nothing about the data could take a short cut.
template <int N, bool Int8>
double amx_ops(int64_t iters) {
  static_assert(N >= 1 && N <= 6, "six accumulators and two sources fill the eight tiles");
  alignas(64) static const uint8_t src[16 * 64] = {
#define KILN_ROW 1, 60, 1, 60, 1, 60, 1, 60, 1, 60, 1, 60, 1, 60, 1, 60
#define KILN_ROW4 KILN_ROW, KILN_ROW, KILN_ROW, KILN_ROW
      KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4,
      KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4, KILN_ROW4};
#undef KILN_ROW4
#undef KILN_ROW
  load_full_tiles();
  _tile_loadd(6, src, 64);
  _tile_loadd(7, src, 64);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); _tile_zero(4); _tile_zero(5);
#define KILN_DP(t)                                   \
  if constexpr (N > t) {                             \
    if constexpr (Int8) _tile_dpbssd(t, 6, 7);       \
    else _tile_dpbf16ps(t, 6, 7);                    \
  }
  for (int64_t it = 0; it < iters; ++it) {
    KILN_DP(0) KILN_DP(1) KILN_DP(2) KILN_DP(3) KILN_DP(4) KILN_DP(5)
  }
#undef KILN_DP
  alignas(64) float sink[256];
  _tile_stored(0, sink, 64);
  _tile_release();
  __asm__ __volatile__("" : : "r"(sink) : "memory");
  return N * 16.0 * 16 * (Int8 ? 64 : 32) * 2 * static_cast<double>(iters);
}

// A GEMM's inner loop with its operands in L1: a 2 x 2 block of accumulators (0-3), two A
// tiles (4, 5) and two B tiles (6, 7) loaded for every step from 4 KiB that stay in cache.
// The gap to amx_ops is what feeding the tiles costs.
template <bool Int8>
double amx_loaded_ops(int64_t iters) {
  alignas(64) static uint8_t buf[4][16 * 64];
  for (int t = 0; t < 4; ++t)
    for (int i = 0; i < 16 * 64; ++i) buf[t][i] = static_cast<uint8_t>((i % 2) ? 60 : 1);
  load_full_tiles();
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_loadd(4, buf[0], 64);
    _tile_loadd(6, buf[2], 64);
    if constexpr (Int8) _tile_dpbssd(0, 4, 6); else _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, buf[3], 64);
    if constexpr (Int8) _tile_dpbssd(1, 4, 7); else _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, buf[1], 64);
    if constexpr (Int8) { _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7); }
    else { _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); }
  }
  alignas(64) float sink[256];
  _tile_stored(0, sink, 64);
  _tile_release();
  __asm__ __volatile__("" : : "r"(sink) : "memory");
  return 4 * 16.0 * 16 * (Int8 ? 64 : 32) * 2 * static_cast<double>(iters);
}

template <bool Int8>
double amx_ops_n(int accumulators, int64_t iters) {
  switch (accumulators) {
    case 1: return amx_ops<1, Int8>(iters);
    case 2: return amx_ops<2, Int8>(iters);
    case 3: return amx_ops<3, Int8>(iters);
    case 4: return amx_ops<4, Int8>(iters);
    case 5: return amx_ops<5, Int8>(iters);
    default: return amx_ops<6, Int8>(iters);
  }
}
#endif

// Core cycles per second: a chain of dependent 64-bit multiplies, three cycles each (in
// assembly, so the compiler cannot fold it; not adds of an immediate, which recent cores
// resolve at register renaming, several to a cycle).
double scalar_clock(int64_t iters) {
  uint64_t x = 1;
  const uint64_t m = 3;
  for (int64_t it = 0; it < iters; ++it) {
    __asm__ __volatile__(
        "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
        "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
        : "+r"(x) : "r"(m));
  }
  return 3.0 * 8.0 * static_cast<double>(iters);
}

}  // namespace

double compute_peak_gflops(PeakUnit unit, int threads, int64_t iters, int accumulators) {
  if (threads < 1 || iters < 1) throw std::invalid_argument("compute_peak_gflops: threads and iters must be >= 1");
  if (accumulators < 1 || accumulators > 6) throw std::invalid_argument("compute_peak_gflops: accumulators must be 1..6");
  const bool amx_unit = unit == PeakUnit::kAmxBf16 || unit == PeakUnit::kAmxInt8;
  const bool bf16_unit = unit == PeakUnit::kAmxBf16 || unit == PeakUnit::kAmxBf16Loaded;
  const bool int8_unit = unit == PeakUnit::kAmxInt8 || unit == PeakUnit::kAmxInt8Loaded;
  if ((bf16_unit && !amx_bf16_supported()) || (int8_unit && !quant::amx_supported()))
    throw std::runtime_error("compute_peak_gflops: this CPU has no AMX tiles of that kind");
#ifndef KILN_HAS_FMA_PEAK
  if (unit == PeakUnit::kFma) throw std::runtime_error("compute_peak_gflops: built without AVX2/FMA or AVX-512");
#endif
  if (unit == PeakUnit::kDotBf16 && !dot_bf16_supported())
    throw std::runtime_error("compute_peak_gflops: this CPU (or build) has no AVX512-BF16");
  if (unit == PeakUnit::kDotInt8 && !quant::vnni_supported())
    throw std::runtime_error("compute_peak_gflops: this CPU (or build) has no AVX512-VNNI");
  std::vector<double> flops(threads, 0.0), secs(threads, 0.0);
  std::atomic<int> ready{0};
  parallel_run(threads, [&](int id) {
    // start together (the figure is for threads running at once); a runtime that granted
    // fewer threads runs the ids in turn, so the wait is bounded
    ready.fetch_add(1);
    const auto wait0 = std::chrono::steady_clock::now();
    while (ready.load() < threads && std::chrono::steady_clock::now() - wait0 < std::chrono::milliseconds(20)) {}
    const auto t0 = std::chrono::steady_clock::now();
#if defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__AMX_TILE__)
    if (unit == PeakUnit::kAmxBf16) flops[id] = amx_ops_n<false>(accumulators, iters);
    if (unit == PeakUnit::kAmxInt8) flops[id] = amx_ops_n<true>(accumulators, iters);
    if (unit == PeakUnit::kAmxBf16Loaded) flops[id] = amx_loaded_ops<false>(iters);
    if (unit == PeakUnit::kAmxInt8Loaded) flops[id] = amx_loaded_ops<true>(iters);
#endif
    if (unit == PeakUnit::kClock) flops[id] = scalar_clock(iters);
#ifdef KILN_HAS_FMA_PEAK
    if (unit == PeakUnit::kFma) flops[id] = fma_flops(iters);
#endif
#ifdef KILN_HAS_DOT_BF16_PEAK
    if (unit == PeakUnit::kDotBf16) flops[id] = dot_bf16_flops(iters);
#endif
#ifdef KILN_HAS_DOT_INT8_PEAK
    if (unit == PeakUnit::kDotInt8) flops[id] = dot_int8_ops(iters);
#endif
    secs[id] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
  double total = 0.0;
  for (int i = 0; i < threads; ++i) total += secs[i] > 0 ? flops[i] / secs[i] : 0.0;
  return total / 1e9;
}

}  // namespace kiln
