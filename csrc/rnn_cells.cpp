// Fused recurrent-cell pointwise kernels: everything after a step's GEMMs in one pass over
// the gates, so each gate value is read once and no temporaries are allocated per step.
// (rnn_recurrence.cpp fuses the GEMM in as well; these serve shapes it does not take.)
#include <cmath>
#include <cstdint>

#include "kiln.h"
#include "simd_math.h"

namespace kiln {
namespace {

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
