// Fused recurrent-cell pointwise kernels. The GEMMs of each step run in a BLAS; these
// kernels do everything after them in one pass over the gates, so each gate value is read
// once and no temporaries are allocated per step.
#include <cmath>

#include "kiln.h"

namespace kiln {
namespace {
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
}  // namespace

void lstm_cell(const float* gates, const float* c, float* h_out, float* c_out, int64_t batch,
               int64_t hidden, int64_t gates_stride, int64_t h_stride) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* g = gates + b * gates_stride;
    const float* cb = c + b * h_stride;
    float* hb = h_out + b * h_stride;
    float* cob = c_out + b * h_stride;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const float i = sigmoid(g[j]);
      const float f = sigmoid(g[hidden + j]);
      const float gg = std::tanh(g[2 * hidden + j]);
      const float o = sigmoid(g[3 * hidden + j]);
      const float cn = f * cb[j] + i * gg;
      cob[j] = cn;
      hb[j] = o * std::tanh(cn);
    }
  }
}

void gru_cell(const float* gx, const float* gh, const float* h, float* h_out, int64_t batch,
              int64_t hidden, int64_t gx_stride, int64_t h_stride, int64_t h_out_stride) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* x = gx + b * gx_stride;
    const float* r_h = gh + b * 3 * hidden;
    const float* hb = h + b * h_stride;
    float* ob = h_out + b * h_out_stride;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const float r = sigmoid(x[j] + r_h[j]);
      const float z = sigmoid(x[hidden + j] + r_h[hidden + j]);
      const float n = std::tanh(x[2 * hidden + j] + r * r_h[2 * hidden + j]);
      ob[j] = (1.0f - z) * n + z * hb[j];
    }
  }
}

}  // namespace kiln
