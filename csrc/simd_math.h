// Vectorized math shared by Kiln's C++ kernels.
//
// libm's expf/tanhf are scalar calls that keep the gate loops from vectorizing. With AVX-512
// the kernels use a 16-lane exp: Cephes' range reduction and polynomial (about 2 ulp),
// with vscalefps for 2^n so overflow and underflow saturate correctly, and NaN passes
// through. tanh(x) = 2 sigmoid(2x) - 1 (absolute error about 1e-7).
#pragma once
#include <cstdint>

namespace kiln {
// erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7): for a >= 0,
// erf(a) = 1 - t P(t) e^(-a^2), t = 1 / (1 + kErfP a); P's coefficients highest first. Shared
// by the AVX-512 erf16 below and the AVX2 GEMM's GELU (f32_gemm.cpp).
constexpr float kErfP = 0.3275911f;
constexpr float kErfPoly[5] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f};
}  // namespace kiln

#ifdef __AVX512F__
#include <immintrin.h>

namespace kiln {

inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 1/d from vrcp14ps plus one Newton step (about 2^-27 relative error): a division costs
// 16+ cycles per vector, which made the LSTM cell slower than its GEMM.
inline __m512 recip16(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

// Saturating functions clamp their argument where the fp32 result stops changing, so no
// step underflows: an exp, scalef or reciprocal whose result is denormal (or underflows to
// 0) takes a microcode assist per vector without flush-to-zero, which torch leaves off.
// With the clamps an activation costs about as much at |x| ~ 30 as at |x| ~ 1; without them
// large arguments were many times costlier. `python -m kiln.bench.int8_gemm --only epilogue
// --threads 1` (linear_int4 with an identity weight) measures each activation at both.
inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  // |x| <= 87: exp(-x) and 1 / (1 + exp(-x)) stay normal (sigmoid(87) rounds to 1; below
  // -87 the result is off by under 1.6e-38). max/min return their second operand when it
  // is NaN, so NaN still propagates.
  x = _mm512_min_ps(_mm512_set1_ps(87.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  return recip16(_mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

inline __m512 tanh16(__m512 x) {
  const __m512 two = _mm512_set1_ps(2.0f);
  // past |x| = 10 tanh is +-1 in fp32, and so is this form (2 sigmoid(20) - 1 == 1 exactly;
  // at 9 it would still be 1 - 6e-8)
  x = _mm512_min_ps(_mm512_set1_ps(10.0f), _mm512_max_ps(_mm512_set1_ps(-10.0f), x));
  return _mm512_sub_ps(_mm512_mul_ps(two, sigmoid16(_mm512_mul_ps(two, x))), _mm512_set1_ps(1.0f));
}

// erf (kErfPoly above), so gelu matches torch's exact (erf) gelu to about 1e-7 * |x|.
inline __m512 erf16(__m512 x) {
  // erf(4) rounds to 1 in fp32; past it exp(-a^2) would underflow (see sigmoid16)
  const __m512 a = _mm512_min_ps(_mm512_set1_ps(4.0f), _mm512_abs_ps(x));
  const __m512 t = recip16(_mm512_fmadd_ps(a, _mm512_set1_ps(kErfP), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(kErfPoly[0]);
  for (int i = 1; i < 5; ++i) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kErfPoly[i]));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
  const __m512 y = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0f));
  // copy x's sign onto y (y >= 0)
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u)));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

// In-register transpose of a 16 x 16 block of 4-byte elements: r[i][j] -> r[j][i]. The
// shuffles move bits, so any 4-byte type (fp32, int32) goes through unchanged.
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}

}  // namespace kiln
#endif
