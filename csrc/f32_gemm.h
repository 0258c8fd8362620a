// fp32 GEMM on AVX2 + FMA with a weight packed once (f32_gemm.cpp says why and how):
//   out[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n]).
#pragma once
#include <cstdint>
#include <memory>

#include "quant_gemm.h"  // AlignedBytes

namespace kiln::f32 {

// Prepacked weight: blocks of 256 k, inside each panels of 16 output channels, k-major
// (zero past N); see f32_gemm.cpp.
struct F32Weight {
  int64_t n = 0, k = 0, panels = 0;
  quant::AlignedBytes packed;  // panels * 16 * k floats
  const float* data() const;
};
std::shared_ptr<F32Weight> prepack_f32(const float* w, int64_t n, int64_t k);  // w: [N, K], C-contiguous

bool f32_gemm_supported();  // built with AVX2 and FMA

// x: [M, lda] (the first K columns used), out: [M, ldo]; bias [N] or null; act kNone, kRelu
// or kGelu (others are applied as none: the binding refuses them). Nothing when not
// supported (callers check f32_gemm_supported first).
void f32_gemm(const float* x, int64_t m, int64_t lda, const F32Weight& w, const float* bias, float* out, int64_t ldo,
              int threads, quant::Activation act = quant::Activation::kNone);

}  // namespace kiln::f32
