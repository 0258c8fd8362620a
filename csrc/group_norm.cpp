// Group norm over channels-last (NHWC) images, fp32.
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
#include <stdexcept>
#include <vector>

#include "kiln.h"
#include "thread_pool.h"

namespace kiln {

namespace {

// per-channel sums of f(x[p, c]) over the pixels of one image, split across threads
template <typename F>
void channel_sums(const float* x, int64_t HW, int64_t C, int threads, std::vector<double>& out, F f) {
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, HW)));
  std::vector<double> partial(static_cast<size_t>(t) * C, 0.0);
  parallel_run(t, [&](int id) {
    double* acc = partial.data() + static_cast<size_t>(id) * C;
    for (int64_t p = HW * id / t; p < HW * (id + 1) / t; ++p) {
      const float* row = x + p * C;
      for (int64_t c = 0; c < C; ++c) acc[c] += f(row[c], c);
    }
  });
  out.assign(C, 0.0);
  for (int i = 0; i < t; ++i)
    for (int64_t c = 0; c < C; ++c) out[c] += partial[static_cast<size_t>(i) * C + c];
}

}  // namespace

void group_norm_nhwc(const float* x, float* y, const float* weight, const float* bias, int64_t N, int64_t HW,
                     int64_t C, int64_t G, float eps, int threads) {
  if (G < 1 || C % G) throw std::invalid_argument("group_norm_nhwc: channels must split into the groups");
  const int64_t K = C / G;
  const double count = static_cast<double>(K) * static_cast<double>(HW);
  std::vector<double> sums, mean_c(C), scale_d(C);
  std::vector<float> scale(C), shift(C);
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = x + n * HW * C;
    float* yn = y + n * HW * C;
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
        const float* row = xn + p * C;
        float* out = yn + p * C;
        for (int64_t c = 0; c < C; ++c) out[c] = row[c] * sc[c] + sh[c];
      }
    });
  }
}

}  // namespace kiln
