// int4 group-wise weight-only GEMM: y = act(x @ (q * scale)^T + bias), x fp32 [M, K].
//
// A nibble becomes an fp32 weight with one vpermps: its 4 bits index a 16-entry table
// {0..7, -8..-1} (sign extension and conversion in one instruction; vpermps ignores the
// upper bits, so the byte holding two nibbles serves as the index for the low one and,
// shifted by 4, for the high one).
//  - few rows (decode, GEMV-like): weights are dequantized in registers per 4-k step and
//    reused by every row of the block; each group's partial sums are scaled once per group.
//  - many rows: a 64-column x 256-k block is dequantized (times its scales) into an fp32
//    buffer that stays in L2, then an fp32 6 x 64 FMA kernel runs over it, so dequantization
//    costs 1/M of the multiply-adds.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "quant_gemm.h"
#include "thread_pool.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KILN_HAVE_INT4 1
#include "quant_simd.h"
#endif

namespace kiln::quant {

std::shared_ptr<Int4Weight> prepack_int4(const uint8_t* w_packed, const float* scales, int64_t n, int64_t k,
                                         int64_t group) {
  auto w = std::make_shared<Int4Weight>();
  w->n = n;
  w->k = k;
  w->group = group;
  w->panels = (n + 15) / 16;
  const int64_t half = k / 2, groups = k / group;
  w->packed = aligned_bytes(static_cast<size_t>(w->panels * half * 16));
  w->scales = aligned_bytes(static_cast<size_t>(w->panels * groups * 16) * sizeof(float));
  uint8_t* dst = w->packed.get();
  float* sdst = reinterpret_cast<float*>(w->scales.get());
  for (int64_t row = 0; row < n; ++row) {
    const int64_t p = row / 16, c = row % 16;
    for (int64_t j = 0; j < half; ++j) dst[(p * half + j) * 16 + c] = w_packed[row * half + j];
    for (int64_t g = 0; g < groups; ++g) sdst[(p * groups + g) * 16 + c] = scales[row * groups + g];
  }
  return w;
}

bool int4_supported() {
#if KILN_HAVE_INT4
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
#else
  return false;
#endif
}

#if KILN_HAVE_INT4
namespace {

constexpr int64_t kManyRows = 16;      // from this many rows on, dequantize into a buffer
constexpr int64_t kChunkK = 256;       // k per dequantized block (a multiple of every group size)
constexpr int kWideRows = 6, kWidePanels = 4;

struct Args {
  const float* x;
  const Int4Weight* w;
  const float* bias;
  Activation act;
  float* y;
};

inline __m512 nibble_table() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
}

inline void finish16(__m512 v, int64_t row, int64_t col, const Args& a) {
  const __mmask16 mask = col_mask(a.w->n - col);
  if (a.bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, a.bias + col));
  _mm512_mask_storeu_ps(a.y + row * a.w->n + col, mask, activate16(v, a.act));
}

// ---- few rows: dequantize in registers ----
// With few accumulators the FMA latency (4 cycles) bounds the loop, so small blocks keep
// the even-k and odd-k products in separate accumulators (kSplit) to double the chains.
template <int MR, int NR>
void narrow_block(int64_t row0, int64_t p, const Args& a) {
  constexpr bool kSplit = MR * NR < 8;
  constexpr int kSets = kSplit ? 2 : 1;
  const Int4Weight& w = *a.w;
  const int64_t k = w.k, half = k / 2, groups = k / w.group, pairs = w.group / 2;
  const uint8_t* b = w.packed.get() + p * half * 16;
  const float* sc = reinterpret_cast<const float*>(w.scales.get()) + p * groups * 16;
  const float* x = a.x + row0 * k;
  const __m512 table = nibble_table();
  __m512 out[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) out[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[kSets][MR][NR];
#pragma GCC unroll 8
    for (int h = 0; h < kSets; ++h)
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) acc[h][i][j] = _mm512_setzero_ps();
    for (int64_t kp = g * pairs; kp < (g + 1) * pairs; ++kp) {
      __m512 lo[NR], hi[NR];
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) {
        const __m512i raw =
            _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(b + (j * half + kp) * 16)));
        lo[j] = _mm512_permutexvar_ps(raw, table);
        hi[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(raw, 4), table);
      }
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 x0 = _mm512_set1_ps(x[i * k + 2 * kp]), x1 = _mm512_set1_ps(x[i * k + 2 * kp + 1]);
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) {
          acc[0][i][j] = _mm512_fmadd_ps(x0, lo[j], acc[0][i][j]);
          acc[kSets - 1][i][j] = _mm512_fmadd_ps(x1, hi[j], acc[kSets - 1][i][j]);
        }
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512 s = _mm512_load_ps(sc + (j * groups + g) * 16);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m512 sum = kSplit ? _mm512_add_ps(acc[0][i][j], acc[kSets - 1][i][j]) : acc[0][i][j];
        out[i][j] = _mm512_fmadd_ps(sum, s, out[i][j]);
      }
    }
  }
  // finish from memory: a rolled loop over `out` would keep it out of registers
  alignas(64) float sums[MR][NR * 16];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) _mm512_store_ps(sums[i] + 16 * j, out[i][j]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) finish16(_mm512_load_ps(sums[i] + 16 * j), row0 + i, (p + j) * 16, a);
}

// Row blocks of up to 4; one row takes 4 panels at a time, more rows 2 (register budget).
using NarrowFn = void (*)(int64_t, int64_t, const Args&);
const NarrowFn kNarrow[4][4] = {{narrow_block<1, 1>, narrow_block<1, 2>, narrow_block<1, 3>, narrow_block<1, 4>},
                                {narrow_block<2, 1>, narrow_block<2, 2>, nullptr, nullptr},
                                {narrow_block<3, 1>, narrow_block<3, 2>, nullptr, nullptr},
                                {narrow_block<4, 1>, narrow_block<4, 2>, nullptr, nullptr}};
constexpr int64_t kNarrowPanels = 4;

void narrow_region(int64_t m0, int64_t m1, int64_t p0, int64_t p1, const Args& a) {
  // panels outer: a block of weights is read from memory once and reused by all rows
  for (int64_t pb = p0; pb < p1; pb += kNarrowPanels) {
    const int64_t pb_end = std::min(p1, pb + kNarrowPanels);
    for (int64_t r = m0; r < m1; r += 4) {
      const int64_t mr = std::min<int64_t>(4, m1 - r), step = mr == 1 ? 4 : 2;
      for (int64_t p = pb; p < pb_end; p += step) kNarrow[mr - 1][std::min(step, pb_end - p) - 1](r, p, a);
    }
  }
}

// ---- many rows: dequantize a block into an fp32 buffer, then an fp32 FMA kernel ----
// buf: [kc][64] floats (4 panels side by side; columns past the block are zero).
template <int MR>
void wide_block(const float* buf, int64_t kc, int64_t row0, int64_t k0, int64_t col0, int np, bool first, bool last,
                const Args& a) {
  const int64_t k = a.w->k, n = a.w->n;
  __m512 acc[MR][kWidePanels];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < kWidePanels; ++j)
      acc[i][j] = (first || j >= np)
                      ? _mm512_setzero_ps()
                      : _mm512_maskz_loadu_ps(col_mask(n - col0 - 16 * j), a.y + (row0 + i) * n + col0 + 16 * j);
  const float* x = a.x + row0 * k + k0;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const float* bk = buf + kk * 64;
    const __m512 b0 = _mm512_load_ps(bk), b1 = _mm512_load_ps(bk + 16), b2 = _mm512_load_ps(bk + 32),
                 b3 = _mm512_load_ps(bk + 48);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * k + kk]);
      acc[i][0] = _mm512_fmadd_ps(xv, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, b1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xv, b2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(xv, b3, acc[i][3]);
    }
  }
  alignas(64) float sums[MR][kWidePanels * 16];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < kWidePanels; ++j) _mm512_store_ps(sums[i] + 16 * j, acc[i][j]);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < np; ++j) {
      const int64_t col = col0 + 16 * j;
      const __m512 v = _mm512_load_ps(sums[i] + 16 * j);
      if (last) finish16(v, row0 + i, col, a);
      else _mm512_mask_storeu_ps(a.y + (row0 + i) * n + col, col_mask(n - col), v);
    }
}

using WideFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int, bool, bool, const Args&);
const WideFn kWide[kWideRows] = {wide_block<1>, wide_block<2>, wide_block<3>,
                                 wide_block<4>, wide_block<5>, wide_block<6>};

void wide_region(int64_t m0, int64_t m1, int64_t p0, int64_t p1, const Args& a) {
  const Int4Weight& w = *a.w;
  const int64_t half = w.k / 2, groups = w.k / w.group;
  const float* scales = reinterpret_cast<const float*>(w.scales.get());
  alignas(64) static thread_local float buf[kChunkK * 64];
  const __m512 table = nibble_table();
  for (int64_t p = p0; p < p1; p += kWidePanels) {
    const int np = static_cast<int>(std::min<int64_t>(kWidePanels, p1 - p));
    for (int64_t k0 = 0; k0 < w.k; k0 += kChunkK) {
      const int64_t kc = std::min<int64_t>(kChunkK, w.k - k0);
#pragma GCC unroll 8
      for (int j = 0; j < kWidePanels; ++j) {
        if (j >= np) {
          for (int64_t kk = 0; kk < kc; ++kk) _mm512_store_ps(buf + kk * 64 + 16 * j, _mm512_setzero_ps());
          continue;
        }
        const uint8_t* b = w.packed.get() + (p + j) * half * 16;
        const float* sc = scales + (p + j) * groups * 16;
        for (int64_t kk = 0; kk < kc; kk += 2) {
          const int64_t kabs = k0 + kk;
          const __m512 s = _mm512_load_ps(sc + (kabs / w.group) * 16);
          const __m512i raw =
              _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(b + (kabs / 2) * 16)));
          _mm512_store_ps(buf + kk * 64 + 16 * j, _mm512_mul_ps(_mm512_permutexvar_ps(raw, table), s));
          _mm512_store_ps(buf + (kk + 1) * 64 + 16 * j,
                          _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(raw, 4), table), s));
        }
      }
      const bool first = k0 == 0, last = k0 + kc >= w.k;
      for (int64_t r = m0; r < m1; r += kWideRows)
        kWide[std::min<int64_t>(kWideRows, m1 - r) - 1](buf, kc, r, k0, p * 16, np, first, last, a);
    }
  }
}

}  // namespace
#endif

void linear_int4(const float* x, int64_t m, const Int4Weight& w, const float* bias, Activation act, float* y,
                 int threads) {
#if KILN_HAVE_INT4
  if (!int4_supported()) throw std::runtime_error("int4 GEMM needs AVX-512");
  if (m == 0) return;
  const Args a{x, &w, bias, act, y};
  const bool wide = m >= kManyRows;
  const int64_t panel_block = wide ? kWidePanels : kNarrowPanels, row_block = wide ? 4 * kWideRows : 4;
  const int64_t nblk = (w.panels + panel_block - 1) / panel_block, mblk = (m + row_block - 1) / row_block;
  const bool by_columns = nblk >= threads || nblk >= mblk;
  const int64_t blocks = by_columns ? nblk : mblk;
  const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
  parallel_run(used, [&](int t) {
    const int64_t lo = blocks * t / used, hi = blocks * (t + 1) / used;
    int64_t m0 = 0, m1 = m, p0 = 0, p1 = w.panels;
    if (by_columns) {
      p0 = lo * panel_block;
      p1 = std::min(w.panels, hi * panel_block);
    } else {
      m0 = lo * row_block;
      m1 = std::min(m, hi * row_block);
    }
    if (m0 >= m1 || p0 >= p1) return;
    if (wide) wide_region(m0, m1, p0, p1, a);
    else narrow_region(m0, m1, p0, p1, a);
  });
#else
  (void)x; (void)m; (void)w; (void)bias; (void)act; (void)y; (void)threads;
  throw std::runtime_error("Kiln was built without AVX-512");
#endif
}

}  // namespace kiln::quant
