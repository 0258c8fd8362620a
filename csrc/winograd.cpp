// Winograd convolution F(m x m, 3 x 3) over channels-last (NHWC) fp32 or bf16 activations: the
// two transforms (bf16: operands widened to fp32 on load, the arithmetic fp32, each result
// rounded once to bf16 on store). A 3x3 stride-1 convolution becomes
//   V[p][t][c] = (B^T d_t B)[p]          input transform of each m x m output tile t
//   M[p]       = V[p] @ U[p]             one GEMM per transform point p (U: transformed weights)
//   y_t        = act(A^T M_t A + bias + residual)
// F(4x4, 3x3) does 4x fewer multiplies than the direct convolution, F(2x2, 3x3) 2.25x; the
// GEMMs run in the caller (torch.bmm); this file holds the transforms, vectorized over 16
// channels per zmm, or 8 per ymm on an AVX2 CPU (in NHWC a pixel's channels are contiguous). Tiles that overhang the
// input read zeros (the convolution's zero padding); tiles that overhang the output write
// only their valid pixels.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "kiln.h"
#include "simd_math.h"
#include "simd_vec.h"
#include "thread_pool.h"

namespace kiln {

#ifdef KILN_HAS_VEC
#define KILN_WINOGRAD 1
namespace {

// One register of channels (simd_vec.h): 16 lanes with AVX-512, else 8 with AVX2 + FMA; a
// channel tail is a mask.
using simd::Vec;
using Reg = Vec::T;

// 1-D transforms, out = B^T in and y = A^T in (Lavin & Gray's matrices). `in` has R points.
struct F2 {
  static constexpr int M = 2, R = 4;
  static void bt(const Reg* d, Reg* o) {
    o[0] = Vec::sub(d[0], d[2]);
    o[1] = Vec::add(d[1], d[2]);
    o[2] = Vec::sub(d[2], d[1]);
    o[3] = Vec::sub(d[1], d[3]);
  }
  static void at(const Reg* m, Reg* y) {
    y[0] = Vec::add(Vec::add(m[0], m[1]), m[2]);
    y[1] = Vec::sub(Vec::sub(m[1], m[2]), m[3]);
  }
};

struct F4 {
  static constexpr int M = 4, R = 6;
  static void bt(const Reg* d, Reg* o) {
    const Reg four = Vec::set1(4.f), five = Vec::set1(5.f), two = Vec::set1(2.f);
    const Reg s13 = Vec::fnmadd(four, d[2], d[4]);  // d4 - 4 d2
    const Reg t13 = Vec::fnmadd(four, d[1], d[3]);  // d3 - 4 d1
    const Reg s24 = Vec::sub(d[4], d[2]);           // d4 - d2
    const Reg t24 = Vec::mul(two, Vec::sub(d[3], d[1]));  // 2 (d3 - d1)
    o[0] = Vec::add(Vec::fnmadd(five, d[2], Vec::mul(four, d[0])), d[4]);
    o[1] = Vec::add(s13, t13);
    o[2] = Vec::sub(s13, t13);
    o[3] = Vec::add(s24, t24);
    o[4] = Vec::sub(s24, t24);
    o[5] = Vec::add(Vec::fnmadd(five, d[3], Vec::mul(four, d[1])), d[5]);
  }
  static void at(const Reg* m, Reg* y) {
    const Reg two = Vec::set1(2.f), four = Vec::set1(4.f), eight = Vec::set1(8.f);
    const Reg a = Vec::add(m[1], m[2]), b = Vec::sub(m[1], m[2]);
    const Reg c = Vec::add(m[3], m[4]), d = Vec::sub(m[3], m[4]);
    y[0] = Vec::add(Vec::add(m[0], a), c);
    y[1] = Vec::fmadd(two, d, b);
    y[2] = Vec::fmadd(four, c, a);
    y[3] = Vec::add(Vec::fmadd(eight, d, b), m[5]);
  }
};

struct Tiling {
  int64_t TH, TW, T;
};

template <typename F>
Tiling tiling(const WinogradShape& s) {
  const int64_t TH = (s.OH + F::M - 1) / F::M, TW = (s.OW + F::M - 1) / F::M;
  return {TH, TW, s.N * TH * TW};
}

// Element I/O: fp32 as it is; bf16 (raw 16-bit patterns, the bf16 convolution's operands)
// widened exactly on load and rounded to nearest even on store. bf16 needs the 16-lane
// registers and AVX512-BF16's rounding instruction.
inline Reg load_el(Vec::Mask mk, const float* p) { return Vec::load(mk, p); }
inline void store_el(float* p, Vec::Mask mk, Reg v) { Vec::store(p, mk, v); }
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define KILN_WINOGRAD_BF16 1
inline Reg load_el(Vec::Mask mk, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
}
inline void store_el(uint16_t* p, Vec::Mask mk, Reg v) { _mm256_mask_storeu_epi16(p, mk, (__m256i)_mm512_cvtneps_pbh(v)); }
#endif

template <typename F, typename T>
void input_tiles(const T* x, T* V, const WinogradShape& s, const Tiling& g, int64_t t0, int64_t t1) {
  constexpr int R = F::R;
  const Reg zero = Vec::zero();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / (g.TH * g.TW), th = (t / g.TW) % g.TH, tw = t % g.TW;
    const int64_t h0 = th * F::M - s.ph, w0 = tw * F::M - s.pw;
    for (int64_t c = 0; c < s.C; c += Vec::W) {
      const Vec::Mask mk = Vec::mask(s.C - c);
      Reg d[R][R], tmp[R][R];
      for (int i = 0; i < R; ++i) {
        const int64_t h = h0 + i;
        const bool hv = h >= 0 && h < s.H;
        const T* row = x + ((n * s.H + (hv ? h : 0)) * s.W) * s.C + c;
        for (int j = 0; j < R; ++j) {
          const int64_t w = w0 + j;
          d[i][j] = (hv && w >= 0 && w < s.W) ? load_el(mk, row + w * s.C) : zero;
        }
      }
      for (int j = 0; j < R; ++j) {  // columns: tmp = B^T d
        Reg col[R], out[R];
        for (int i = 0; i < R; ++i) col[i] = d[i][j];
        F::bt(col, out);
        for (int i = 0; i < R; ++i) tmp[i][j] = out[i];
      }
      for (int i = 0; i < R; ++i) {  // rows: V = tmp B
        Reg out[R];
        F::bt(tmp[i], out);
        for (int j = 0; j < R; ++j) store_el(V + ((i * R + j) * g.T + t) * s.C + c, mk, out[j]);
      }
    }
  }
}

template <typename F, typename T>
void output_tiles(const T* Mt, T* y, const float* bias, const T* res, bool relu, const WinogradShape& s,
                  const Tiling& g, int64_t t0, int64_t t1) {
  constexpr int R = F::R, M = F::M;
  const Reg zero = Vec::zero();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / (g.TH * g.TW), th = (t / g.TW) % g.TH, tw = t % g.TW;
    const int64_t oh0 = th * M, ow0 = tw * M;
    const int64_t mh = std::min<int64_t>(M, s.OH - oh0), mw = std::min<int64_t>(M, s.OW - ow0);
    for (int64_t k = 0; k < s.K; k += Vec::W) {
      const Vec::Mask mk = Vec::mask(s.K - k);
      Reg tmp[M][R];
      for (int j = 0; j < R; ++j) {  // columns: tmp = A^T m
        Reg col[R], out[M];
        for (int i = 0; i < R; ++i) col[i] = load_el(mk, Mt + ((i * R + j) * g.T + t) * s.K + k);
        F::at(col, out);
        for (int i = 0; i < M; ++i) tmp[i][j] = out[i];
      }
      const Reg b = bias ? Vec::load(mk, bias + k) : zero;
      for (int i = 0; i < mh; ++i) {  // rows: y = tmp A, then the epilogue
        Reg out[M];
        F::at(tmp[i], out);
        const int64_t base = ((n * s.OH + oh0 + i) * s.OW + ow0) * s.K + k;
        for (int j = 0; j < mw; ++j) {
          Reg v = Vec::add(out[j], b);
          if (res) v = Vec::add(v, load_el(mk, res + base + j * s.K));
          if (relu) v = Vec::max(v, zero);
          store_el(y + base + j * s.K, mk, v);
        }
      }
    }
  }
}

}  // namespace
#endif

bool winograd_supported() {
#ifdef KILN_WINOGRAD
  return true;
#else
  return false;
#endif
}

int64_t winograd_tiles(const WinogradShape& s) {
  const int64_t m = s.m;
  if (m != 2 && m != 4) throw std::invalid_argument("winograd: m must be 2 or 4");
  return s.N * ((s.OH + m - 1) / m) * ((s.OW + m - 1) / m);
}

#ifdef KILN_WINOGRAD
namespace {

template <typename T>
void input_any(const T* x, T* V, const WinogradShape& s, int threads) {
  if (s.m == 4) {
    const Tiling g = tiling<F4>(s);
    parallel_ranges(g.T, threads, [&](int64_t a, int64_t b) { input_tiles<F4>(x, V, s, g, a, b); });
  } else if (s.m == 2) {
    const Tiling g = tiling<F2>(s);
    parallel_ranges(g.T, threads, [&](int64_t a, int64_t b) { input_tiles<F2>(x, V, s, g, a, b); });
  } else {
    throw std::invalid_argument("winograd: m must be 2 or 4");
  }
}

template <typename T>
void output_any(const T* Mt, T* y, const float* bias, const T* residual, bool relu, const WinogradShape& s,
                int threads) {
  if (s.m == 4) {
    const Tiling g = tiling<F4>(s);
    parallel_ranges(g.T, threads, [&](int64_t a, int64_t b) { output_tiles<F4>(Mt, y, bias, residual, relu, s, g, a, b); });
  } else if (s.m == 2) {
    const Tiling g = tiling<F2>(s);
    parallel_ranges(g.T, threads, [&](int64_t a, int64_t b) { output_tiles<F2>(Mt, y, bias, residual, relu, s, g, a, b); });
  } else {
    throw std::invalid_argument("winograd: m must be 2 or 4");
  }
}

}  // namespace
#endif

void winograd_input(const float* x, float* V, const WinogradShape& s, int threads) {
#ifdef KILN_WINOGRAD
  input_any(x, V, s, threads);
#else
  (void)x; (void)V; (void)s; (void)threads;
  throw std::runtime_error("winograd needs AVX-512 or AVX2 with FMA");
#endif
}

void winograd_output(const float* Mt, float* y, const float* bias, const float* residual, bool relu,
                     const WinogradShape& s, int threads) {
#ifdef KILN_WINOGRAD
  output_any(Mt, y, bias, residual, relu, s, threads);
#else
  (void)Mt; (void)y; (void)bias; (void)residual; (void)relu; (void)s; (void)threads;
  throw std::runtime_error("winograd needs AVX-512 or AVX2 with FMA");
#endif
}

bool winograd_bf16_supported() {
#ifdef KILN_WINOGRAD_BF16
  return dot_bf16_supported();
#else
  return false;
#endif
}

void winograd_input_bf16(const uint16_t* x, uint16_t* V, const WinogradShape& s, int threads) {
  if (!winograd_bf16_supported()) throw std::runtime_error("bf16 winograd needs AVX512-BF16");
#ifdef KILN_WINOGRAD_BF16
  input_any(x, V, s, threads);
#else
  (void)x; (void)V; (void)s; (void)threads;
#endif
}

void winograd_output_bf16(const uint16_t* Mt, uint16_t* y, const float* bias, const uint16_t* residual, bool relu,
                          const WinogradShape& s, int threads) {
  if (!winograd_bf16_supported()) throw std::runtime_error("bf16 winograd needs AVX512-BF16");
#ifdef KILN_WINOGRAD_BF16
  output_any(Mt, y, bias, residual, relu, s, threads);
#else
  (void)Mt; (void)y; (void)bias; (void)residual; (void)relu; (void)s; (void)threads;
#endif
}

}  // namespace kiln

namespace kiln {

// U [(m+2)^2, C, K] = G g G^T for every 3x3 filter g = w[k, c] of w [K, C, 3, 3], in double,
// each result rounded once to float. One pass over w and U: at load this runs for every
// layer that chose Winograd, so it must cost about writing U. Blocks of 16 filters of one
// input channel are gathered into double lanes, so the two small matrix products
// vectorize across filters; U's rows for that channel are then 16 contiguous floats each.
void winograd_weight(const float* w, float* U, int64_t K, int64_t C, int64_t m, int threads) {
  static const double G2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  static const double G4[6][3] = {{1.0 / 4, 0, 0},
                                  {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                  {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                  {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                  {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                  {0, 0, 1}};
  if (m != 2 && m != 4) throw std::invalid_argument("winograd: m must be 2 or 4");
  const int r = static_cast<int>(m) + 2;
  const double(*G)[3] = m == 4 ? G4 : G2;
  constexpr int L = 16;
  parallel_ranges(C, threads, [&](int64_t c0, int64_t c1) {
    double g[9][L], t[6][3][L], u[L];
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t k0 = 0; k0 < K; k0 += L) {
        const int n = static_cast<int>(std::min<int64_t>(L, K - k0));
        for (int l = 0; l < L; ++l)
          for (int e = 0; e < 9; ++e) g[e][l] = l < n ? w[((k0 + l) * C + c) * 9 + e] : 0.0;
        for (int i = 0; i < r; ++i)  // t = G g: [r, 3]
          for (int b = 0; b < 3; ++b)
            for (int l = 0; l < L; ++l) t[i][b][l] = G[i][0] * g[b][l] + G[i][1] * g[3 + b][l] + G[i][2] * g[6 + b][l];
        for (int i = 0; i < r; ++i)  // U = t G^T: [r, r]
          for (int j = 0; j < r; ++j) {
            for (int l = 0; l < L; ++l) u[l] = t[i][0][l] * G[j][0] + t[i][1][l] * G[j][1] + t[i][2][l] * G[j][2];
            float* dst = U + ((i * r + j) * C + c) * K + k0;
            for (int l = 0; l < n; ++l) dst[l] = static_cast<float>(u[l]);
          }
      }
    }
  });
}

}  // namespace kiln
