// Kiln's quantized CPU GEMMs (formats: kiln.ir.qformat, ir/qformat.py; summarized here).
//
// int8: weights w_q int8 [N, K], symmetric per output channel (w ~ w_q * w_scale[n]);
// activations uint8, asymmetric (x ~ (x_q - x_zp) * x_scale) per row or per tensor. The
// int32 core is  acc[m, n] = sum_k x_q[m, k] * w_q[n, k]  (AVX512-VNNI vpdpbusd or AMX
// tdpbusd, both exact), and the fused epilogue computes
//   y = x_scale[m] * w_scale[n] * (acc[m, n] - x_zp[m] * sum_k w_q[n, k]) + bias[n],
//   y = act(y), stored as fp32, or requantized to uint8: clamp(round(y / s_out) + zp_out).
// int4: weights packed two per byte [N, K/2] (k = 2j low nibble, 2j + 1 high nibble,
// two's complement), fp32 scales [N, K/G]: y = x @ (q * scale)^T + bias, fp32 activations.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

namespace kiln::quant {

enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kTanh = 5, kSigmoid = 6 };
enum class Path : int { kAuto = 0, kVnni = 1, kAmx = 2 };
enum class OutKind : int { kS32 = 0, kF32 = 1, kU8 = 2 };

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<uint8_t, FreeDeleter>;
AlignedBytes aligned_bytes(size_t bytes, bool zero = true);  // 64-byte aligned, zero-filled unless told

bool vnni_supported();  // AVX512-VNNI (built and present)
bool amx_supported();   // AMX-INT8 present and the kernel granted tile state to this process
// The path a GEMM of M rows takes: kAuto picks AMX when available and M >= 16 (one tile
// of rows), else VNNI. Throws when the requested path cannot run here.
Path resolve_path(Path path, int64_t m);

// Prepacked int8 weight. Panels of 16 output channels; inside a panel, 4 consecutive k of
// each channel are adjacent: byte ((p * k_pad + 4 * g) * 16 + 4 * c + i) holds
// w_q[16 p + c, 4 g + i] (zero past N and K). That is the VNNI operand order and also
// exactly the AMX B-tile layout (16 rows of 4-k groups), so both paths share one prepack.
struct Int8Weight {
  int64_t n = 0, k = 0, k_pad = 0, panels = 0;  // k_pad: K rounded up to 64
  AlignedBytes packed;                         // panels * k_pad * 16 bytes
  std::vector<float> w_scale;                  // [panels * 16], zero past N
  std::vector<int32_t> w_sum;                  // sum_k w_q[n, k], [panels * 16]
};
std::shared_ptr<Int8Weight> prepack_int8(const int8_t* w_q, const float* w_scale, int64_t n, int64_t k);

// Per-row (stride 1) or per-tensor (stride 0) activation quantization parameters, and the
// output form. `out` is [M, ldo] of the OutKind's element type.
struct Epilogue {
  const float* x_scale = nullptr;
  int64_t x_scale_stride = 0;
  const int32_t* x_zp = nullptr;
  int64_t x_zp_stride = 0;
  const float* bias = nullptr;  // [N] or null
  Activation act = Activation::kNone;
  OutKind kind = OutKind::kF32;
  void* out = nullptr;
  int64_t ldo = 0;
  float out_scale = 1.0f;  // kU8 only
  int32_t out_zp = 0;
};

// x_q uint8 [M, K] (row stride lda) times the prepacked weight, fused epilogue. Copies x_q
// into a padded buffer when a path needs one. Returns the path that ran.
Path int8_gemm(const uint8_t* x_q, int64_t m, int64_t lda, const Int8Weight& w, const Epilogue& ep, Path path,
               int threads);

// Dynamic per-row asymmetric uint8 quantization (see qlinear_dynamic) of x fp32 [M, K]:
// x_q [M, ldq] (only the first K columns written), scale [M], zp [M].
void quantize_rows_u8(const float* x, int64_t m, int64_t k, uint8_t* x_q, int64_t ldq, float* scale, int32_t* zp,
                      int threads);

// Quantize x per row, then int8_gemm with an fp32 epilogue into y [M, N].
Path qlinear_dynamic(const float* x, int64_t m, const Int8Weight& w, const float* bias, Activation act, float* y,
                     Path path, int threads);

// int4 group-wise weight-only GEMM. Panels of 16 channels: byte (p * (K/2) + j) * 16 + c
// is the source byte j of channel 16 p + c (two k per byte, as in the format); scales are
// [panels][K/G][16].
struct Int4Weight {
  int64_t n = 0, k = 0, group = 0, panels = 0;
  AlignedBytes packed;
  AlignedBytes scales;  // float
};
std::shared_ptr<Int4Weight> prepack_int4(const uint8_t* w_packed, const float* scales, int64_t n, int64_t k,
                                         int64_t group);
void linear_int4(const float* x, int64_t m, const Int4Weight& w, const float* bias, Activation act, float* y,
                 int threads);
bool int4_supported();

}  // namespace kiln::quant
