// fp32 GEMM on AVX2 + FMA with the weight packed once:
//   y[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n]),   any number of rows m,
// act none, ReLU or GELU (erf), applied in registers as the last k block's tile is stored.
//
// Why Kiln has its own: on CPUs without AVX-512 (AMD Zen among them) the fp32 GEMMs at
// hand -- MKL's packed sgemm, oneDNN's inner product, torch's addmm -- run a text model's
// short row counts (16-128 tokens) well below the FMA units' peak, and oneDNN's prepacked
// GEMM serves a new row count only by padding it to a bucket. This kernel takes any row
// count with one packed weight, so one plan serves every sequence length.
//
// Layout: the weight is packed once into blocks of KC consecutive k; inside a block, panels
// of 16 output channels, k-major: element (k0 * n_pad + p * 16 * kc + kk * 16 + j) holds
// w[16 p + j, k0 + kk] (zero past N), kc = min(KC, K - k0). A 6 x 16 register tile (12 ymm
// accumulators) runs over a block: per k, two loads of the panel, six broadcasts of x, twelve
// FMAs. Loop order per block: chunks of 120 rows, panel, row tiles -- the 16 KiB panel slice
// stays in L1 while every row tile of the chunk uses it, the chunk's x rows of the block in
// L2. Threads split the panels (each streams its own weight columns).
#include "f32_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "simd_vec.h"
#include "thread_pool.h"

#if defined(__AVX2__) && defined(__FMA__)
#define KILN_F32_GEMM 1
#endif

namespace kiln::f32 {

constexpr int64_t kNR = 16;  // output channels per panel (two ymm)
constexpr int64_t kKC = 256; // k per block (the packing and the kernel must agree on both)

#ifdef KILN_F32_GEMM
namespace {

constexpr int64_t kMR = 6;   // rows per register tile
// rows per chunk (a multiple of kMR): a chunk's slice of x for one k block (120 KiB) stays in
// L2 while every panel passes it; more rows at once would push it out with the stores
constexpr int64_t kMC = 120;

inline __m256i lane_mask(int64_t count) {  // the first `count` (0..8) of 8 lanes
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(8, count)))), idx);
}

// GELU, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, with erf by Abramowitz & Stegun 7.1.26
// (simd_math.h's kErfPoly, absolute error <= 1.5e-7, as the AVX-512 kernels' erf16): torch's
// exact GELU to about 1e-7 |x|. |x / sqrt 2| is clamped to 4, where erf rounds to +-1; NaN
// propagates.
inline __m256 gelu8(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 a = _mm256_min_ps(_mm256_set1_ps(4.0f), _mm256_andnot_ps(sign, z));
  const __m256 t = simd::Vec8::recip(_mm256_fmadd_ps(a, _mm256_set1_ps(kErfP), _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(kErfPoly[0]);
  for (int i = 1; i < 5; ++i) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kErfPoly[i]));
  p = _mm256_mul_ps(p, t);
  // exp(-a^2) = 2^(-a^2 log2 e), a <= 4: within exp2_reduced's range
  const __m256 e =
      simd::exp2_reduced<simd::Vec8>(_mm256_mul_ps(_mm256_mul_ps(a, a), _mm256_set1_ps(-1.44269504088896341f)));
  const __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
  const __m256 erf = _mm256_or_ps(y, _mm256_and_ps(sign, z));  // z's sign on y >= 0
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}

inline __m256 activate(quant::Activation act, __m256 v) {
  if (act == quant::Activation::kRelu) return _mm256_max_ps(_mm256_setzero_ps(), v);  // NaN stays NaN, as in torch
  if (act == quant::Activation::kGelu) return gelu8(v);
  return v;
}

// R rows x 16 channels over one k block. first: the tile starts from the bias (or zero),
// else it adds to what the earlier blocks stored; act: applied as the last block stores.
// nr < 16: only the first nr channels exist.
// The accumulators are named registers, not an array: GCC stores an indexed __m256 array
// back to the stack on every iteration.
template <int R>
void tile(const float* a, int64_t lda, const float* b, int64_t kc, float* c, int64_t ldc, int64_t nr, bool first,
          const float* bias, const float* next, quant::Activation act) {
  const bool full = nr == kNR;
  // (the lane masks are made again for the stores: held across the loop they would take
  // two of the sixteen registers the loop needs)
  __m256i m0 = full ? _mm256_set1_epi32(-1) : lane_mask(nr), m1 = full ? m0 : lane_mask(nr - 8);
  auto load = [&](const float* p, const __m256i& m) { return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m); };
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  if (first) {
    if (bias != nullptr) {
      const __m256 b0 = load(bias, m0), b1 = load(bias + 8, m1);
      c00 = c10 = c20 = c30 = c40 = c50 = b0;
      c01 = c11 = c21 = c31 = c41 = c51 = b1;
    }
  } else {
    c00 = load(c, m0), c01 = load(c + 8, m1);
    if constexpr (R > 1) c10 = load(c + ldc, m0), c11 = load(c + ldc + 8, m1);
    if constexpr (R > 2) c20 = load(c + 2 * ldc, m0), c21 = load(c + 2 * ldc + 8, m1);
    if constexpr (R > 3) c30 = load(c + 3 * ldc, m0), c31 = load(c + 3 * ldc + 8, m1);
    if constexpr (R > 4) c40 = load(c + 4 * ldc, m0), c41 = load(c + 4 * ldc + 8, m1);
    if constexpr (R > 5) c50 = load(c + 5 * ldc, m0), c51 = load(c + 5 * ldc + 8, m1);
  }
  const float* a0 = a;
  const float* a1 = a + lda;
  const float* a2 = a + 2 * lda;
  const float* a3 = a + 3 * lda;
  const float* a4 = a + 4 * lda;
  const float* a5 = a + 5 * lda;
#pragma GCC unroll 2
  for (int64_t kk = 0; kk < kc; ++kk) {
    // the next panel slice, one 64-byte line (one k of it) per k: it streams from memory
    // while this one computes (a short row count does too little work per weight to hide it)
    if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + kk * kNR), _MM_HINT_T0);
    const __m256 w0 = _mm256_load_ps(b + kk * kNR), w1 = _mm256_load_ps(b + kk * kNR + 8);
    __m256 x;
// row i of the tile: one broadcast of x, two FMAs (a macro: the accumulators must stay named
// registers, see above)
#define KILN_F32_ROW(i)                                                                      \
    if constexpr (R > i) {                                                                   \
      x = _mm256_broadcast_ss(a##i + kk);                                                    \
      c##i##0 = _mm256_fmadd_ps(x, w0, c##i##0), c##i##1 = _mm256_fmadd_ps(x, w1, c##i##1); \
    }
    KILN_F32_ROW(0) KILN_F32_ROW(1) KILN_F32_ROW(2) KILN_F32_ROW(3) KILN_F32_ROW(4) KILN_F32_ROW(5)
#undef KILN_F32_ROW
  }
  m0 = full ? _mm256_set1_epi32(-1) : lane_mask(nr), m1 = full ? m0 : lane_mask(nr - 8);
  auto store = [&](float* p, const __m256i& m, __m256 v) {
    v = activate(act, v);
    if (full) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, m, v);
  };
  store(c, m0, c00), store(c + 8, m1, c01);
  if constexpr (R > 1) store(c + ldc, m0, c10), store(c + ldc + 8, m1, c11);
  if constexpr (R > 2) store(c + 2 * ldc, m0, c20), store(c + 2 * ldc + 8, m1, c21);
  if constexpr (R > 3) store(c + 3 * ldc, m0, c30), store(c + 3 * ldc + 8, m1, c31);
  if constexpr (R > 4) store(c + 4 * ldc, m0, c40), store(c + 4 * ldc + 8, m1, c41);
  if constexpr (R > 5) store(c + 5 * ldc, m0, c50), store(c + 5 * ldc + 8, m1, c51);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, bool, const float*,
                        const float*, quant::Activation);
constexpr TileFn kTiles[kMR + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

// Panels [p0, p1) for every row, on the calling thread.
void panels(const float* x, int64_t m, int64_t lda, const F32Weight& w, const float* bias, float* out, int64_t ldo,
            int64_t p0, int64_t p1, quant::Activation act) {
  for (int64_t k0 = 0; k0 < w.k; k0 += kKC) {
    const int64_t kc = std::min(kKC, w.k - k0);
    const quant::Activation block_act = k0 + kc == w.k ? act : quant::Activation::kNone;
    const float* block = w.data() + k0 * w.panels * kNR;
    for (int64_t c0 = 0; c0 < m; c0 += kMC) {
      const int64_t c1 = std::min(m, c0 + kMC);
      for (int64_t p = p0; p < p1; ++p) {
        const float* b = block + p * kNR * kc;
        const int64_t n0 = p * kNR, nr = std::min(kNR, w.n - n0);
        const float* bias_p = bias == nullptr ? nullptr : bias + n0;
        const float* next = p + 1 < p1 ? b + kNR * kc : nullptr;
        for (int64_t r0 = c0; r0 < c1; r0 += kMR) {
          const int64_t rows = std::min(kMR, c1 - r0);
          kTiles[rows](x + r0 * lda + k0, lda, b, kc, out + r0 * ldo + n0, ldo, nr, k0 == 0, bias_p,
                       r0 == c0 ? next : nullptr, block_act);
        }
      }
    }
  }
}

}  // namespace
#endif

const float* F32Weight::data() const { return reinterpret_cast<const float*>(packed.get()); }

std::shared_ptr<F32Weight> prepack_f32(const float* w, int64_t n, int64_t k) {
  auto out = std::make_shared<F32Weight>();
  out->n = n, out->k = k;
  out->panels = (n + kNR - 1) / kNR;
  const int64_t n_pad = out->panels * kNR;
  out->packed = quant::aligned_bytes(static_cast<size_t>(n_pad * k) * sizeof(float), /*zero=*/true);
  float* dst = reinterpret_cast<float*>(out->packed.get());
  for (int64_t k0 = 0; k0 < k; k0 += kKC) {
    const int64_t kc = std::min(kKC, k - k0);
    for (int64_t p = 0; p < out->panels; ++p) {
      float* panel = dst + k0 * n_pad + p * kNR * kc;
      for (int64_t j = 0; j < kNR && p * kNR + j < n; ++j) {
        const float* row = w + (p * kNR + j) * k + k0;
        for (int64_t kk = 0; kk < kc; ++kk) panel[kk * kNR + j] = row[kk];
      }
    }
  }
  return out;
}

bool f32_gemm_supported() {
#ifdef KILN_F32_GEMM
  return true;
#else
  return false;
#endif
}

void f32_gemm(const float* x, int64_t m, int64_t lda, const F32Weight& w, const float* bias, float* out, int64_t ldo,
              int threads, quant::Activation act) {
#ifdef KILN_F32_GEMM
  if (m <= 0 || w.n <= 0) return;
  if (w.k == 0) {  // an empty sum: act(the bias, or zeros) in every row
    for (int64_t r = 0; r < m; ++r) {
      float* row = out + r * ldo;
      if (bias != nullptr) std::memcpy(row, bias, static_cast<size_t>(w.n) * sizeof(float));
      else std::memset(row, 0, static_cast<size_t>(w.n) * sizeof(float));
      for (int64_t j = 0; j < w.n; j += 8) {
        const __m256i mask = lane_mask(w.n - j);
        _mm256_maskstore_ps(row + j, mask, activate(act, _mm256_maskload_ps(row + j, mask)));
      }
    }
    return;
  }
  parallel_ranges(w.panels, threads,
                  [&](int64_t p0, int64_t p1) { panels(x, m, lda, w, bias, out, ldo, p0, p1, act); });
#else
  (void)x, (void)m, (void)lda, (void)w, (void)bias, (void)out, (void)ldo, (void)threads, (void)act;
#endif
}

}  // namespace kiln::f32
