// bf16 GEMM on AMX-BF16 tiles (tdpbf16ps, fp32 sums) with a fused epilogue:
//   y[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n] + residual[m, n]),
// stored as bf16 (round to nearest even) or fp32. x and w are bf16 (raw 16-bit patterns).
//
// Why Kiln has its own: at BERT's shapes (128 rows, K 768/3072, N 768-3072) the weights do
// not stay in cache between calls, so a linear layer is a stream of weight panels past 128
// rows of activations. The kernel streams each panel from memory once, reuses it from L2
// for every row block, and prefetches the next panel while computing this one. That makes
// it about as fast as oneDNN's prepacked bf16 linear, not clearly faster
// (`python -m kiln.bench.bf16_gemm` times both); the measured choice picks per node.
#pragma once
#include <cstdint>
#include <memory>

#include "quant_gemm.h"  // AlignedBytes, Activation

namespace kiln::bf16 {

// Prepacked weight: panels of 16 output channels; inside a panel, each pair of consecutive
// k of a channel is adjacent: element ((p * k_pad + 2 * q) * 16 + 2 * c + i) holds
// w[16 p + c, 2 q + i] (zero past N and K). That is the AMX-BF16 B-tile layout: one tile of
// 32 k x 16 channels is 1 KiB, contiguous.
struct Bf16Weight {
  int64_t n = 0, k = 0, k_pad = 0, panels = 0;  // k_pad: K rounded up to 32
  quant::AlignedBytes packed;                   // panels * k_pad * 16 bf16
};
std::shared_ptr<Bf16Weight> prepack_bf16(const uint16_t* w, int64_t n, int64_t k);

struct Bf16Epilogue {
  const float* bias = nullptr;  // [N] or null
  const void* residual = nullptr;  // [M, ldr] bf16 or fp32 (residual_bf16), or null
  int64_t ldr = 0;
  bool residual_bf16 = true;
  quant::Activation act = quant::Activation::kNone;
  void* out = nullptr;  // [M, ldo] bf16 or fp32 (out_bf16)
  int64_t ldo = 0;
  bool out_bf16 = true;
};

bool bf16_gemm_supported();  // built with AMX-BF16, the CPU has it, and tile state granted

// x bf16 [M, K] with row stride lda (elements). Copies x into a padded buffer when M is not
// a multiple of 16 or K of 32 (the tiles read whole 16 x 32 blocks).
void bf16_gemm(const uint16_t* x, int64_t m, int64_t lda, const Bf16Weight& w, const Bf16Epilogue& ep, int threads);

// The same product on AVX512-BF16 dot products (vdpbf16ps) instead of tiles, from the same
// packed weight, for CPUs without AMX: no padding copy (any M and K; x is read pair by pair).
bool bf16_dot_gemm_supported();  // built with AVX512-BF16 and the CPU has it
void bf16_dot_gemm(const uint16_t* x, int64_t m, int64_t lda, const Bf16Weight& w, const Bf16Epilogue& ep,
                   int threads);

}  // namespace kiln::bf16
