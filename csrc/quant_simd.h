// AVX-512 helpers shared by the quantized GEMMs: the fused activations.
#pragma once
#include <immintrin.h>

#include "quant_gemm.h"
#include "simd_math.h"

namespace kiln::quant {

inline __m512 activate16(__m512 y, Activation act) {
  switch (act) {
    case Activation::kNone:
      return y;
    case Activation::kRelu:
      return _mm512_max_ps(y, _mm512_setzero_ps());
    case Activation::kGelu: {
      const __m512 half_y = _mm512_mul_ps(y, _mm512_set1_ps(0.5f));
      return _mm512_fmadd_ps(half_y, erf16(_mm512_mul_ps(y, _mm512_set1_ps(0.70710678118654752f))), half_y);
    }
    case Activation::kGeluTanh: {
      // 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))
      const __m512 y3 = _mm512_mul_ps(_mm512_mul_ps(y, y), y);
      const __m512 in = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                      _mm512_fmadd_ps(y3, _mm512_set1_ps(0.044715f), y));
      const __m512 half_y = _mm512_mul_ps(y, _mm512_set1_ps(0.5f));
      return _mm512_fmadd_ps(half_y, tanh16(in), half_y);
    }
    case Activation::kSilu:
      return _mm512_mul_ps(y, sigmoid16(y));
    case Activation::kTanh:
      return tanh16(y);
    case Activation::kSigmoid:
      return sigmoid16(y);
  }
  return y;
}

inline __mmask16 col_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}

}  // namespace kiln::quant
