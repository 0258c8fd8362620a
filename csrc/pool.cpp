// Max pooling over channels-last (NHWC) activations, fp32, bf16 or uint8 (quantized
// activations: max commutes with a monotone quantization, so pooling the uint8 values is
// exactly quantizing the pooled floats).
//
// On ResNet's stem this kernel is faster than torch's channels-last max-pool
// (`kiln bench kernels --op max_pool2d --threads 1` times both). In NHWC every window
// position is a contiguous run of C channels, so one output pixel is an elementwise max of
// kh*kw channel vectors (16 lanes per zmm), and each input row is read from cache by the
// overlapping windows. bf16 is widened to fp32 for the
// max and narrowed back by truncation, which is exact: every value is a bf16 value.
// NaN propagates as in torch (a window holding a NaN yields NaN).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "kiln.h"
#include "simd_math.h"
#include "thread_pool.h"

namespace kiln {

#ifdef __AVX512F__
namespace {

struct F32 {
  using T = float;
  static __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
};

struct BF16 {
  using T = uint16_t;
  static __m512 load(const uint16_t* p, __mmask16 m) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void store(uint16_t* p, __mmask16 m, __m512 v) {
    const __m512i w = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(w));
  }
};

template <typename D>
void pool_rows(const typename D::T* x, typename D::T* y, const PoolShape& s, int64_t row_begin, int64_t row_end) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t row = row_begin; row < row_end; ++row) {  // row = n * OH + oh
    const int64_t n = row / s.OH, oh = row % s.OH;
    const int64_t h0 = oh * s.sh - s.ph;
    for (int64_t ow = 0; ow < s.OW; ++ow) {
      const int64_t w0 = ow * s.sw - s.pw;
      typename D::T* out = y + (row * s.OW + ow) * s.C;
      for (int64_t c = 0; c < s.C; c += 16) {
        const __mmask16 m = tail_mask(s.C - c);
        __m512 acc = lowest;
        __mmask16 nan = 0;
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t h = h0 + i * s.dh;
          if (h < 0 || h >= s.H) continue;
          const typename D::T* xrow = x + ((n * s.H + h) * s.W) * s.C + c;
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t w = w0 + j * s.dw;
            if (w < 0 || w >= s.W) continue;
            const __m512 v = D::load(xrow + w * s.C, m);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            acc = _mm512_max_ps(acc, v);
          }
        }
        acc = _mm512_mask_mov_ps(acc, nan, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
        D::store(out + c, m, acc);
      }
    }
  }
}

#ifdef __AVX512BW__
// uint8: 64 channels per zmm; 0 is the type's lowest value, and a window always holds at
// least one element (padding is excluded, as in torch), so starting from 0 is exact.
void pool_rows_u8(const uint8_t* x, uint8_t* y, const PoolShape& s, int64_t row_begin, int64_t row_end) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / s.OH, oh = row % s.OH;
    const int64_t h0 = oh * s.sh - s.ph;
    for (int64_t ow = 0; ow < s.OW; ++ow) {
      const int64_t w0 = ow * s.sw - s.pw;
      uint8_t* out = y + (row * s.OW + ow) * s.C;
      for (int64_t c = 0; c < s.C; c += 64) {
        const int64_t left = s.C - c;
        const __mmask64 m = left >= 64 ? ~__mmask64{0} : ((__mmask64{1} << left) - 1);
        __m512i acc = _mm512_setzero_si512();
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t h = h0 + i * s.dh;
          if (h < 0 || h >= s.H) continue;
          const uint8_t* xrow = x + ((n * s.H + h) * s.W) * s.C + c;
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t w = w0 + j * s.dw;
            if (w < 0 || w >= s.W) continue;
            acc = _mm512_max_epu8(acc, _mm512_maskz_loadu_epi8(m, xrow + w * s.C));
          }
        }
        _mm512_mask_storeu_epi8(out + c, m, acc);
      }
    }
  }
}
#endif

template <typename D>
void pool(const typename D::T* x, typename D::T* y, const PoolShape& s, int threads) {
  parallel_ranges(s.N * s.OH, threads, [&](int64_t a, int64_t b) { pool_rows<D>(x, y, s, a, b); });
}

}  // namespace
#endif

bool max_pool_u8_supported() {
#ifdef __AVX512BW__
  return true;
#else
  return false;
#endif
}

void max_pool2d_nhwc_u8(const uint8_t* x, uint8_t* y, const PoolShape& s, int threads) {
#ifdef __AVX512BW__
  if (s.kh < 1 || s.kw < 1 || s.sh < 1 || s.sw < 1 || s.dh < 1 || s.dw < 1)
    throw std::invalid_argument("max_pool2d_nhwc: kernel, stride and dilation must be positive");
  parallel_ranges(s.N * s.OH, threads, [&](int64_t a, int64_t b) { pool_rows_u8(x, y, s, a, b); });
#else
  (void)x; (void)y; (void)s; (void)threads;
  throw std::runtime_error("max_pool2d_nhwc on uint8 needs AVX-512BW");
#endif
}

bool max_pool_supported() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

void max_pool2d_nhwc(const void* x, void* y, const PoolShape& s, bool bf16, int threads) {
#ifdef __AVX512F__
  if (s.kh < 1 || s.kw < 1 || s.sh < 1 || s.sw < 1 || s.dh < 1 || s.dw < 1)
    throw std::invalid_argument("max_pool2d_nhwc: kernel, stride and dilation must be positive");
  if (bf16)
    pool<BF16>(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), s, threads);
  else
    pool<F32>(static_cast<const float*>(x), static_cast<float*>(y), s, threads);
#else
  (void)x; (void)y; (void)s; (void)bf16; (void)threads;
  throw std::runtime_error("max_pool2d_nhwc needs AVX-512");
#endif
}

}  // namespace kiln
