// Kiln's C++ kernels and runtime helpers, exposed to Python as kiln._C.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace kiln {

// One fused LSTM step over a batch. gates = gx + gh, both [B, 4H] (i, f, g, o blocks,
// pre-activation): gx = x W_ih^T + biases (hoisted, all steps at once), gh = h W_hh^T.
// c [B, H] -> h_out, c_out [B, H]. c_out may alias c.
void lstm_cell(const float* gx, const float* gh, const float* c, float* h_out, float* c_out, int64_t batch,
               int64_t hidden);

// One fused GRU step: gx = x W_ih^T + b_ih and gh = h W_hh^T, both [B, 3H] (r, z, n);
// b_hh [3H] is added here because r multiplies (W_hn h + b_hn). h_out may alias h.
void gru_cell(const float* gx, const float* gh, const float* b_hh, const float* h, float* h_out, int64_t batch,
              int64_t hidden);

// Whole-layer recurrences (AVX-512 or AVX2 + FMA), see rnn_recurrence.cpp. y [T, B, H]. The sequence
// tensors (gx or x, and y) may be strided views (a batch-first tensor seen as [T, B, .]):
// their rows must be contiguous; the strides are in elements.
bool recurrence_supported();
// The packed weights hold the hidden units in blocks of recurrent_block_units() (one
// register of this build's lanes): recurrent_blocks(H) of them.
int64_t recurrent_block_units();
int64_t recurrent_blocks(int64_t hidden);
struct SeqStrides {
  int64_t x_t, x_b, y_t, y_b;  // x: gx for the hoisted forms, x for the fused ones
};
// `threads` split the hidden units of each step (a spin barrier separates steps).
//
// Hoisted: gx [T, B, G*H] is the input projection of every step (LSTM: both biases
// included; GRU: b_ih only), packed = pack_recurrent_weight(w_hh).
std::vector<float> pack_recurrent_weight(const float* w_hh, int64_t gates, int64_t hidden);
void lstm_recurrence(const float* gx, const float* packed, const float* h0, const float* c0, float* y, float* hn,
                     float* cn, int64_t T, int64_t B, int64_t H, SeqStrides st, int threads);
void gru_recurrence(const float* gx, const float* packed, const float* b_hh, const float* h0, float* y, float* hn,
                    int64_t T, int64_t B, int64_t H, SeqStrides st, int threads);
// Fused: x [T, B, I] is the layer's input and the projection runs inside each step;
// packed = pack_layer_weight(w_ih (G*H, I), w_hh (G*H, H), b_ih, b_hh), biases may be null.
int64_t layer_block_floats(int64_t gates, int64_t input, int64_t hidden);  // packed size = blocks x this
std::vector<float> pack_layer_weight(const float* w_ih, const float* w_hh, const float* b_ih, const float* b_hh,
                                     int64_t gates, int64_t input, int64_t hidden);
void lstm_layer(const float* x, const float* packed, const float* h0, const float* c0, float* y, float* hn, float* cn,
                int64_t T, int64_t B, int64_t I, int64_t H, SeqStrides st, int threads);
// bf16 LSTM / GRU layers (rnn_amx.cpp) on AMX tiles or with AVX512-BF16 dot products: x,
// h0, y and hn bf16 (raw 16-bit patterns), the LSTM's c0 and cn fp32; the weights packed by
// rnn_amx_pack (fp32 in, rounded to bf16; gates 4: LSTM, 3: GRU), the same for both paths.
struct RnnAmxWeight {
  int64_t gates = 0, I = 0, H = 0, Ip = 0, Hp = 0;  // Ip, Hp: I and H rounded up to 32
  std::vector<uint16_t> tiles;                      // B tiles, see rnn_amx.cpp
  std::vector<float> bias;                          // per block and accumulator slot, [blocks][4][16]
};
enum class RnnPath { amx, dot };
RnnAmxWeight rnn_amx_pack(const float* w_ih, const float* w_hh, const float* b_ih, const float* b_hh, int64_t gates,
                          int64_t input, int64_t hidden);
bool rnn_amx_supported();       // the AMX path: AMX-BF16 built, present and granted
bool rnn_dot_bf16_supported();  // the AVX512-BF16 path: built and present
void lstm_layer_bf16(RnnPath path, const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, const float* c0,
                     uint16_t* y, uint16_t* hn, float* cn, int64_t T, int64_t B, SeqStrides st, int threads);
void gru_layer_bf16(RnnPath path, const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, uint16_t* y,
                    uint16_t* hn, int64_t T, int64_t B, SeqStrides st, int threads);
void gru_layer(const float* x, const float* packed, const float* h0, float* y, float* hn, int64_t T, int64_t B,
               int64_t I, int64_t H, SeqStrides st, int threads);

// Sparse weight [N, K] in BSR: blocks of bh x bw (CSR is bh = bw = 1). values [nnzb, bh, bw]
// row-major per block, col [nnzb] the block column (k0 = col * bw), row_ptr [ceil(N/bh)+1].
struct SparseWeight {
  const float* values;
  const int32_t* col;
  const int32_t* row_ptr;
  int64_t N, K;
  int bh, bw;
};
// Epilogue activations (the order of kiln.ir.attrs.Activation).
enum SparseAct { kActNone = 0, kActRelu, kActGelu, kActGeluTanh, kActTanh, kActSigmoid, kActSilu };
bool sparse_gemm_supported();
// yT[b] [N, M] = act(W @ xT[b] + bias[:, None] + residual[b]) for b < batch; xT [batch, K, M].
// `threads` split the block rows (balanced by nonzero blocks).
void sparse_gemm_t(const SparseWeight& w, const float* xT, int64_t batch, int64_t M, const float* bias,
                   const float* residual, int act, float* yT, int threads);
// y [M, N] = act(x [M, K] @ W^T + bias + residual [M, N]).
void sparse_linear(const SparseWeight& w, const float* x, int64_t M, const float* bias, const float* residual,
                   int act, float* y, int threads);

}  // namespace kiln

namespace kiln {

// Max pooling over NHWC activations (csrc/pool.cpp): x [N, H, W, C] -> y [N, OH, OW, C],
// fp32 or bf16 (as raw uint16). Window positions outside the input are skipped (torch's
// -inf padding); a NaN in a window makes that output NaN. `threads` split the output rows.
struct PoolShape {
  int64_t N, H, W, C, OH, OW;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};
bool max_pool_supported();
void max_pool2d_nhwc(const void* x, void* y, const PoolShape& s, bool bf16, int threads);
bool max_pool_u8_supported();
// Per-tensor uint8 activations (quantize_u8.cpp): QUANTIZE / DEQUANTIZE over n contiguous elements.
void quantize_u8(const float* x, uint8_t* y, int64_t n, double scale, int32_t zero_point, int threads);
void dequantize_u8(const uint8_t* x, float* y, int64_t n, double scale, int32_t zero_point, int threads);
void max_pool2d_nhwc_u8(const uint8_t* x, uint8_t* y, const PoolShape& s, int threads);

}  // namespace kiln

namespace kiln {

// Winograd F(m x m, 3 x 3) transforms for stride-1 3x3 convolutions over NHWC fp32
// (csrc/winograd.cpp). x [N, H, W, C]; V and M are [(m+2)^2, T, C] and [(m+2)^2, T, K] with
// T = N * ceil(OH/m) * ceil(OW/m) tiles; y [N, OH, OW, K]; bias [K] and residual (shaped as y)
// may be null. The GEMMs V[p] @ U[p] between the two transforms run in the caller.
struct WinogradShape {
  int64_t N, H, W, C, K, OH, OW, ph, pw, m;
};
bool winograd_supported();
int64_t winograd_tiles(const WinogradShape& s);
void winograd_input(const float* x, float* V, const WinogradShape& s, int threads);
// U [(m+2)^2, C, K] = G g G^T of every 3x3 filter of w [K, C, 3, 3] (double arithmetic, rounded once).
void winograd_weight(const float* w, float* U, int64_t K, int64_t C, int64_t m, int threads);
void winograd_output(const float* M, float* y, const float* bias, const float* residual, bool relu,
                     const WinogradShape& s, int threads);
// The same over bf16 (raw 16-bit patterns: x, V, M, y and the residual; the bias fp32), on a
// CPU with AVX512-BF16 (winograd_bf16_supported).
bool winograd_bf16_supported();
void winograd_input_bf16(const uint16_t* x, uint16_t* V, const WinogradShape& s, int threads);
void winograd_output_bf16(const uint16_t* M, uint16_t* y, const float* bias, const uint16_t* residual, bool relu,
                          const WinogradShape& s, int threads);

}  // namespace kiln

namespace kiln {

// Fused attention O = softmax(Q K^T * scale + mask) V (csrc/attention.cpp). q [B, H, Sq, D],
// k and v [B, H, Sk, D], o [B, H, Sq, D], all fp32 or all bf16 (raw uint16), each in any
// strides (in elements) with unit stride along D. mask: an fp32 additive mask read at
// mask + b*ms[0] + h*ms[1] + i*ms[2] + j*ms[3] (ms[3] is 0 or 1; 0 strides broadcast),
// or null. causal hides keys j > i. Computed in fp32.
// kAuto: for bf16, AMX where the CPU has it, else AVX512-BF16 dot products where it has those
enum class AttentionPath { kAuto, kFma, kAmx, kDot };
struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  const float* mask;
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3], mask_stride[4];
  int64_t B, H, Sq, Sk, D;
  float scale;
  bool causal, bf16;
  AttentionPath path;
};
bool attention_supported();
bool amx_bf16_supported();  // AMX-BF16 built, present, and tile state granted to this process
bool dot_bf16_supported();  // the AVX512-BF16 path built and the CPU has the instructions
// Register-only FMA or AMX-BF16 throughput (GFLOP/s summed over `threads` running at once;
// peak.cpp): the ceilings kernels are read against.
// kClock: dependent one-cycle adds, so the figure is the core clock in GHz;
// accumulators: independent AMX accumulator tiles in flight (1..6); the *Loaded units run a
// 2 x 2 GEMM block that loads its four source tiles from L1 every step.
enum class PeakUnit { kFma, kAmxBf16, kAmxInt8, kAmxBf16Loaded, kAmxInt8Loaded, kClock, kDotBf16, kDotInt8 };
double compute_peak_gflops(PeakUnit unit, int threads, int64_t iters, int accumulators = 6);
void attention(const AttentionArgs& a, int threads);

}  // namespace kiln

namespace kiln {

// The address of a TVMBackendParallelLaunch-compatible launcher that runs a generated
// kernel's parallel tasks on the OpenMP workers (torch's intra-op threads).
uintptr_t tvm_parallel_launch_address();
int64_t tvm_parallel_launches();  // how many launches it has taken (tests, diagnostics)
int64_t tvm_serial_launches();    // of which ran on the calling thread alone
// Launches from the calling thread run their tasks on it alone while on (one kernel call's worth)
void tvm_parallel_serial(bool on);

}  // namespace kiln

namespace kiln {

// y [b, c, r] = x [b, r, c] transposed per batch in 16 x 16 tiles, for elements of
// ``itemsize`` bytes (1, 2, 4 or 8; false for any other size); both C-contiguous.
bool transpose_batched(const void* x, void* y, int64_t b, int64_t r, int64_t c, int64_t itemsize, int threads);

// Group norm of N channels-last images x (N, HW, C) into y, G groups of C / G channels, the
// optional per-channel affine (weight, bias: C each, or null), then ReLU if relu; two passes,
// sums in double. x and y are fp32, or bf16 bit patterns (x_bf16 / y_bf16): fp32 math, one
// rounding of the result.
void group_norm_nhwc(const void* x, bool x_bf16, void* y, bool y_bf16, const float* weight, const float* bias,
                     int64_t N, int64_t HW, int64_t C, int64_t G, float eps, bool relu, int threads);

// CRC-32 (zlib's polynomial and value) of n bytes, continuing from crc (0 to start); crc32.cpp.
uint32_t crc32(const void* data, size_t n, uint32_t crc);

}  // namespace kiln
