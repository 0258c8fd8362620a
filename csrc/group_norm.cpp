// Group norm over channels-last (NHWC) images: fp32 or bf16 in and out (bf16 read as the
// fp32 values it holds, the result rounded once to nearest even), an optional ReLU fused.
//
// In NHWC each pixel is a contiguous run of all C channels, so every pass is a loop over
// pixels whose inner loop runs across the channels (vectorized by the compiler): per-channel
// sums, combined per group; then per-channel sums of squared deviations from the group's
// mean (two passes, so no cancellation: a one-pass E[x^2] - E[x]^2 loses the variance of
// activations whose mean is large beside their spread, as torch's channels-last kernel
// does); then y = x * scale[c] + shift[c], the affine folded into scale and shift. Sums are
// in double.
// The pixel loops are split across threads, each with its own per-channel partial sums.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kiln.h"
#include "thread_pool.h"

namespace kiln {

namespace {

// an element as fp32: itself, or a bf16 bit pattern widened (exact)
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// fp32 to an output element: itself, or bf16 rounded to nearest even (NaN stays a quiet NaN)
inline void narrow(float v, float* out) { *out = v; }
inline void narrow(float v, uint16_t* out) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *out = static_cast<uint16_t>((bits >> 16) | 0x40u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}

// per-channel sums of f(x[p, c]) over the pixels of one image, split across threads
template <typename T, typename F>
void channel_sums(const T* x, int64_t HW, int64_t C, int threads, std::vector<double>& out, F f) {
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, HW)));
  std::vector<double> partial(static_cast<size_t>(t) * C, 0.0);
  parallel_run(t, [&](int id) {
    double* acc = partial.data() + static_cast<size_t>(id) * C;
    for (int64_t p = HW * id / t; p < HW * (id + 1) / t; ++p) {
      const T* row = x + p * C;
      for (int64_t c = 0; c < C; ++c) acc[c] += f(widen(row[c]), c);
    }
  });
  out.assign(C, 0.0);
  for (int i = 0; i < t; ++i)
    for (int64_t c = 0; c < C; ++c) out[c] += partial[static_cast<size_t>(i) * C + c];
}

}  // namespace

namespace {

template <typename In, typename Out>
void group_norm_typed(const In* x, Out* y, const float* weight, const float* bias, int64_t N, int64_t HW, int64_t C,
                      int64_t G, float eps, bool relu, int threads) {
  const int64_t K = C / G;
  const double count = static_cast<double>(K) * static_cast<double>(HW);
  std::vector<double> sums, mean_c(C), scale_d(C);
  std::vector<float> scale(C), shift(C);
  for (int64_t n = 0; n < N; ++n) {
    const In* xn = x + n * HW * C;
    Out* yn = y + n * HW * C;
    channel_sums(xn, HW, C, threads, sums, [](float v, int64_t) { return static_cast<double>(v); });
    for (int64_t g = 0; g < G; ++g) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) s += sums[g * K + k];
      for (int64_t k = 0; k < K; ++k) mean_c[g * K + k] = s / count;
    }
    const double* mean = mean_c.data();
    channel_sums(xn, HW, C, threads, sums, [mean](float v, int64_t c) {
      const double d = static_cast<double>(v) - mean[c];
      return d * d;
    });
    for (int64_t g = 0; g < G; ++g) {
      double s = 0.0;
      for (int64_t k = 0; k < K; ++k) s += sums[g * K + k];
      const double rstd = 1.0 / std::sqrt(s / count + static_cast<double>(eps));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t c = g * K + k;
        const double sc = rstd * (weight ? static_cast<double>(weight[c]) : 1.0);
        scale[c] = static_cast<float>(sc);
        shift[c] = static_cast<float>((bias ? static_cast<double>(bias[c]) : 0.0) - mean[c] * sc);
      }
    }
    const float* sc = scale.data();
    const float* sh = shift.data();
    parallel_ranges(HW, threads, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const In* row = xn + p * C;
        Out* out = yn + p * C;
        if (relu) {
          for (int64_t c = 0; c < C; ++c) narrow(std::max(widen(row[c]) * sc[c] + sh[c], 0.0f), out + c);
        } else {
          for (int64_t c = 0; c < C; ++c) narrow(widen(row[c]) * sc[c] + sh[c], out + c);
        }
      }
    });
  }
}

}  // namespace

void group_norm_nhwc(const void* x, bool x_bf16, void* y, bool y_bf16, const float* weight, const float* bias,
                     int64_t N, int64_t HW, int64_t C, int64_t G, float eps, bool relu, int threads) {
  if (G < 1 || C % G) throw std::invalid_argument("group_norm_nhwc: channels must split into the groups");
  const auto* xf = static_cast<const float*>(x);
  const auto* xh = static_cast<const uint16_t*>(x);
  auto* yf = static_cast<float*>(y);
  auto* yh = static_cast<uint16_t*>(y);
  if (x_bf16 && y_bf16) return group_norm_typed(xh, yh, weight, bias, N, HW, C, G, eps, relu, threads);
  if (x_bf16) return group_norm_typed(xh, yf, weight, bias, N, HW, C, G, eps, relu, threads);
  if (y_bf16) return group_norm_typed(xf, yh, weight, bias, N, HW, C, G, eps, relu, threads);
  group_norm_typed(xf, yf, weight, bias, N, HW, C, G, eps, relu, threads);
}

}  // namespace kiln
