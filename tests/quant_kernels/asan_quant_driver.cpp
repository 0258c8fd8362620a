// Runs Kiln's quantized GEMMs on awkward shapes with exactly sized heap buffers, so that
// AddressSanitizer sees any read or write past an operand (AMX tile loads are not
// instrumented; the padded-copy rules that keep them in bounds are exercised all the same),
// and checks the int32 sums and the int4 results against scalar loops.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "quant_gemm.h"

using namespace kiln::quant;

static int failures = 0;
#define CHECK(cond, ...)             \
  do {                               \
    if (!(cond)) {                   \
      std::printf(__VA_ARGS__);      \
      std::printf("\n");             \
      ++failures;                    \
    }                                \
  } while (0)

static void int8_case(std::mt19937& rng, int64_t m, int64_t n, int64_t k, Path path, int threads) {
  std::uniform_int_distribution<int> s8(-128, 127), u8(0, 255);
  std::vector<int8_t> w(n * k);
  std::vector<uint8_t> x(m * k);
  std::vector<float> ws(n, 0.01f), bias(n, 0.5f), xf(m * k);
  for (auto& v : w) v = static_cast<int8_t>(s8(rng));
  for (auto& v : x) v = static_cast<uint8_t>(u8(rng));
  for (auto& v : xf) v = static_cast<float>(s8(rng)) / 16.0f;
  auto packed = prepack_int8(w.data(), ws.data(), n, k);
  std::vector<int32_t> sums(m * n);
  const float one = 1.0f;
  const int32_t zero = 0;
  Epilogue ep;
  ep.x_scale = &one;
  ep.x_zp = &zero;
  ep.kind = OutKind::kS32;
  ep.out = sums.data();
  ep.ldo = n;
  int8_gemm(x.data(), m, k, *packed, ep, path, threads);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int32_t ref = 0;
      for (int64_t kk = 0; kk < k; ++kk) ref += int32_t(x[i * k + kk]) * int32_t(w[j * k + kk]);
      CHECK(sums[i * n + j] == ref, "int8 m=%ld n=%ld k=%ld path=%d: [%ld,%ld] %d != %d", long(m), long(n), long(k),
            int(path), long(i), long(j), sums[i * n + j], ref);
    }
  std::vector<uint8_t> q(m * n);
  ep.kind = OutKind::kU8;
  ep.out = q.data();
  ep.out_scale = 0.5f;
  ep.out_zp = 3;
  ep.bias = bias.data();
  ep.act = Activation::kGelu;
  int8_gemm(x.data(), m, k, *packed, ep, path, threads);
  std::vector<float> y(m * n);
  qlinear_dynamic(xf.data(), m, *packed, bias.data(), Activation::kSilu, y.data(), path, threads);
  for (float v : y) CHECK(std::isfinite(v), "qlinear_dynamic produced a non-finite value");
}

static void int4_case(std::mt19937& rng, int64_t m, int64_t n, int64_t k, int64_t group, int threads) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal;
  std::vector<uint8_t> w(n * k / 2);
  std::vector<float> scales(n * (k / group)), x(m * k), y(m * n), bias(n);
  for (auto& v : w) v = static_cast<uint8_t>(byte(rng));
  for (auto& v : scales) v = 0.1f + std::fabs(normal(rng));
  for (auto& v : x) v = normal(rng);
  for (auto& v : bias) v = normal(rng);
  auto packed = prepack_int4(w.data(), scales.data(), n, k, group);
  linear_int4(x.data(), m, *packed, bias.data(), Activation::kNone, y.data(), threads);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double ref = bias[j], mag = std::fabs(bias[j]);
      for (int64_t kk = 0; kk < k; ++kk) {
        const int nib = (w[j * (k / 2) + kk / 2] >> (4 * (kk % 2))) & 0xF;
        const double wv = (nib >= 8 ? nib - 16 : nib) * double(scales[j * (k / group) + kk / group]);
        ref += wv * x[i * k + kk];
        mag += std::fabs(wv * x[i * k + kk]);
      }
      CHECK(std::fabs(y[i * n + j] - ref) <= 1e-5 * mag + 1e-6, "int4 m=%ld n=%ld k=%ld g=%ld: %f != %f", long(m),
            long(n), long(k), long(group), y[i * n + j], ref);
    }
}

int main() {
  std::mt19937 rng(0);
  if (vnni_supported()) {
    const int64_t shapes[][3] = {{1, 1, 1}, {3, 17, 13}, {17, 16, 5}, {33, 47, 65}, {64, 32, 128}, {7, 50, 129}};
    std::vector<Path> paths = {Path::kVnni};
    if (amx_supported()) paths.push_back(Path::kAmx);
    for (auto& s : shapes)
      for (Path p : paths)
        for (int t : {1, 2}) int8_case(rng, s[0], s[1], s[2], p, t);
  }
  if (int4_supported()) {
    const int64_t shapes[][4] = {{1, 16, 64, 32}, {5, 17, 128, 64}, {20, 33, 640, 128}, {3, 1, 32, 32}};
    for (auto& s : shapes)
      for (int t : {1, 2}) int4_case(rng, s[0], s[1], s[2], s[3], t);
  }
  if (failures) return 1;
  std::printf("asan ok\n");
  return 0;
}
