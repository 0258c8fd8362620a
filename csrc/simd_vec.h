// One register of fp32 lanes and the operations Kiln's ISA-generic kernels use (the Winograd
// transforms, the fp32 LSTM/GRU recurrences): Vec16, 16 lanes of a zmm (AVX-512), and Vec8,
// 8 lanes of a ymm (AVX2 + FMA; the AVX2 GEMM uses it on any such build); Vec is the widest
// the build has. KILN_HAS_VEC says whether either was compiled in. A tail of fewer than W
// lanes is a Mask.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "simd_math.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define KILN_HAS_VEC 1

namespace kiln::simd {

#ifdef __AVX512F__
struct Vec16 {
  using T = __m512;
  using Mask = __mmask16;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
  static T fmsub(T a, T b, T c) { return _mm512_fmsub_ps(a, b, c); }    // a b - c
  static T fnmadd(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  static T max(T a, T b) { return _mm512_max_ps(a, b); }                // b where either is NaN
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T round(T a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p 2^n for an integral n (vscalefps: saturates, passes NaN)
  static T scale2(T p, T n) { return _mm512_scalef_ps(p, n); }
  static T recip(T d) { return recip16(d); }  // about 2^-27 relative error
  static T loadu(const float* p) { return _mm512_loadu_ps(p); }
  static Mask mask(int64_t n) { return tail_mask(n); }
  static T load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, Mask m, T v) { _mm512_mask_storeu_ps(p, m, v); }
};
#endif

struct Vec8 {
  using T = __m256;
  struct Mask {
    __m256i lanes;
    bool full;  // a whole register: plain loads and stores (masked stores are slow on some CPUs)
  };
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T fmsub(T a, T b, T c) { return _mm256_fmsub_ps(a, b, c); }
  static T fnmadd(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T round(T a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p 2^n for an integral n in [-126, 127] (the callers clamp their arguments to it): the
  // exponent field built directly, as AVX2 has no vscalefps. A NaN n gives a finite scale
  // and its NaN p passes through.
  static T scale2(T p, T n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  // vrcpps (12 bits) plus one Newton step: about 2^-23 relative error
  static T recip(T d) {
    const T r = _mm256_rcp_ps(d);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f)));
  }
  static T loadu(const float* p) { return _mm256_loadu_ps(p); }
  static Mask mask(int64_t n) {
    const int k = static_cast<int>(std::min<int64_t>(n, W));
    return {_mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), k == W};
  }
  static T load(const Mask& m, const float* p) { return m.full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m.lanes); }
  static void store(float* p, const Mask& m, T v) {
    if (m.full) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, m.lanes, v);
  }
};

#ifdef __AVX512F__
using Vec = Vec16;
#else
using Vec = Vec8;
#endif

// 2^t as 2^round(t) (V::scale2) times a degree-5 polynomial for 2^f, f in [-0.5, 0.5]
// (relative error 2e-7), for t whose round(t) is in [-126, 127] (callers clamp).
template <typename V>
inline typename V::T exp2_reduced(typename V::T t) {
  const typename V::T n = V::round(t);
  const typename V::T f = V::sub(t, n);
  typename V::T p = V::set1(1.32765e-3f);
  p = V::fmadd(p, f, V::set1(9.67554e-3f));
  p = V::fmadd(p, f, V::set1(5.550713e-2f));
  p = V::fmadd(p, f, V::set1(2.402212e-1f));
  p = V::fmadd(p, f, V::set1(6.9314697e-1f));
  p = V::fmadd(p, f, V::set1(1.00000007f));
  return V::scale2(p, n);
}

}  // namespace kiln::simd

#endif
