// Fused recurrent-cell pointwise kernels. The GEMMs of each step run in a BLAS; these
// kernels do everything after them in one pass over the gates, so each gate value is read
// once and no temporaries are allocated per step.
//
// libm's expf/tanhf are scalar calls (about 60 ns per LSTM element here). With AVX-512 the
// kernels use a 16-lane exp (Cephes' range reduction and polynomial, about 2 ulp, with
// vscalefps for 2^n so overflow/underflow saturate correctly); other CPUs use libm.
#include <cmath>
#include <cstdint>

#include "kiln.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace kiln {
namespace {

#ifdef __AVX512F__
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
inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}
inline __m512 tanh16(__m512 x) {
  // tanh(x) = 2 sigmoid(2x) - 1; absolute error about 1e-7
  const __m512 two = _mm512_set1_ps(2.0f);
  return _mm512_sub_ps(_mm512_mul_ps(two, sigmoid16(_mm512_mul_ps(two, x))), _mm512_set1_ps(1.0f));
}
inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1);
}
#endif

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

}  // namespace

void lstm_cell(const float* gx, const float* gh, const float* c, float* h_out, float* c_out, int64_t batch,
               int64_t hidden) {
  const int64_t gs = 4 * hidden;
  for (int64_t b = 0; b < batch; ++b) {
    const float* x = gx + b * gs;
    const float* r = gh + b * gs;
    const float* cb = c + b * hidden;
    float* hb = h_out + b * hidden;
    float* cob = c_out + b * hidden;
#ifdef __AVX512F__
    for (int64_t j = 0; j < hidden; j += 16) {
      const __mmask16 m = tail_mask(hidden - j);
      auto gate = [&](int64_t k) {
        return _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + k * hidden + j), _mm512_maskz_loadu_ps(m, r + k * hidden + j));
      };
      const __m512 i = sigmoid16(gate(0));
      const __m512 f = sigmoid16(gate(1));
      const __m512 gg = tanh16(gate(2));
      const __m512 o = sigmoid16(gate(3));
      const __m512 cn = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, cb + j), _mm512_mul_ps(i, gg));
      _mm512_mask_storeu_ps(cob + j, m, cn);
      _mm512_mask_storeu_ps(hb + j, m, _mm512_mul_ps(o, tanh16(cn)));
    }
#else
    for (int64_t j = 0; j < hidden; ++j) {
      const float i = sigmoid(x[j] + r[j]);
      const float f = sigmoid(x[hidden + j] + r[hidden + j]);
      const float gg = std::tanh(x[2 * hidden + j] + r[2 * hidden + j]);
      const float o = sigmoid(x[3 * hidden + j] + r[3 * hidden + j]);
      const float cn = f * cb[j] + i * gg;
      cob[j] = cn;
      hb[j] = o * std::tanh(cn);
    }
#endif
  }
}

void gru_cell(const float* gx, const float* gh, const float* b_hh, const float* h, float* h_out, int64_t batch,
              int64_t hidden) {
  const int64_t gs = 3 * hidden;
  for (int64_t b = 0; b < batch; ++b) {
    const float* x = gx + b * gs;
    const float* r_h = gh + b * gs;
    const float* hb = h + b * hidden;
    float* ob = h_out + b * hidden;
#ifdef __AVX512F__
    for (int64_t j = 0; j < hidden; j += 16) {
      const __mmask16 m = tail_mask(hidden - j);
      auto ld = [m](const float* p) { return _mm512_maskz_loadu_ps(m, p); };
      const __m512 r = sigmoid16(_mm512_add_ps(ld(x + j), _mm512_add_ps(ld(r_h + j), ld(b_hh + j))));
      const __m512 z = sigmoid16(
          _mm512_add_ps(ld(x + hidden + j), _mm512_add_ps(ld(r_h + hidden + j), ld(b_hh + hidden + j))));
      const __m512 hn = _mm512_add_ps(ld(r_h + 2 * hidden + j), ld(b_hh + 2 * hidden + j));
      const __m512 n = tanh16(_mm512_fmadd_ps(r, hn, ld(x + 2 * hidden + j)));
      // (1 - z) * n + z * h  ==  n + z * (h - n)
      _mm512_mask_storeu_ps(ob + j, m, _mm512_fmadd_ps(z, _mm512_sub_ps(ld(hb + j), n), n));
    }
#else
    for (int64_t j = 0; j < hidden; ++j) {
      const float r = sigmoid(x[j] + r_h[j] + b_hh[j]);
      const float z = sigmoid(x[hidden + j] + r_h[hidden + j] + b_hh[hidden + j]);
      const float n = std::tanh(x[2 * hidden + j] + r * (r_h[2 * hidden + j] + b_hh[2 * hidden + j]));
      ob[j] = (1.0f - z) * n + z * hb[j];
    }
#endif
  }
}

}  // namespace kiln
