// Per-tensor uint8 quantization of activations (QUANTIZE / DEQUANTIZE of int8-static), the
// reference's arithmetic lane by lane: q = clamp(round_half_even(x * inv) + zp, 0, 255) with
// inv = float(1 / scale), and x = (q - zp) * scale, both in float32. Elementwise over
// contiguous memory, so any memory format works as long as input and output share it.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "kiln.h"
#include "thread_pool.h"

namespace kiln {

namespace {
constexpr int64_t kGrain = 1 << 14;  // elements per task: small tensors stay on one thread
}

void quantize_u8(const float* x, uint8_t* y, int64_t n, double scale, int32_t zero_point, int threads) {
  if (!(scale > 0)) throw std::invalid_argument("quantize_u8: scale must be positive");
  const float inv = static_cast<float>(1.0 / scale);
  const float zp = static_cast<float>(zero_point);
  const int tasks = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, n / kGrain)));
  parallel_ranges(n, tasks, [&](int64_t a, int64_t b) {
    int64_t i = a;
#if defined(__AVX512F__)
    const __m512 vinv = _mm512_set1_ps(inv), vzp = _mm512_set1_ps(zp);
    const __m512 lo = _mm512_setzero_ps(), hi = _mm512_set1_ps(255.0f);
    for (; i + 16 <= b; i += 16) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + i), vinv);
      v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vzp);
      v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(v)));
    }
#endif
    for (; i < b; ++i) {
      const float v = std::nearbyint(x[i] * inv) + zp;  // the default rounding mode: ties to even
      y[i] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, v)));
    }
  });
}

void dequantize_u8(const uint8_t* x, float* y, int64_t n, double scale, int32_t zero_point, int threads) {
  const float s = static_cast<float>(scale);
  const float zp = static_cast<float>(zero_point);
  const int tasks = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, n / kGrain)));
  parallel_ranges(n, tasks, [&](int64_t a, int64_t b) {
    int64_t i = a;
#if defined(__AVX512F__)
    const __m512 vs = _mm512_set1_ps(s), vzp = _mm512_set1_ps(zp);
    for (; i + 16 <= b; i += 16) {
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
      _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_sub_ps(q, vzp), vs));
    }
#endif
    for (; i < b; ++i) y[i] = (static_cast<float>(x[i]) - zp) * s;
  });
}

}  // namespace kiln
