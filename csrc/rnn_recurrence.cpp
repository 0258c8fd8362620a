// Whole LSTM/GRU layers in C++: per time step one small GEMM fused with the gate
// nonlinearities, with no Python between steps. Two forms:
//
// - fused (lstm_layer / gru_layer): the step's GEMM is [x_t, h_{t-1}] @ [W_ih; W_hh]^T, so the
//   input projection happens inside the recurrence and no [T, B, G*H] gate buffer is ever
//   written or read back (for a small input size it costs a few extra k iterations per step);
// - hoisted (lstm_recurrence / gru_recurrence): the caller projected every step's input in
//   one GEMM up front (gx) and the step's GEMM is h_{t-1} @ W_hh^T alone.
//
// Weights are prepacked once: for each block of 16 hidden units, a K x (16*G) panel holding
// the G gates of those units side by side, so one register tile (R batch rows x 4 vectors)
// accumulates every gate of 16 units and the cell finishes them in registers — the gate
// pre-activations never touch memory.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <sched.h>

#include "kiln.h"
#include "rnn_steps.h"
#include "simd_math.h"
#include "thread_pool.h"

namespace kiln {

namespace {
using rnn::kBlock;
using rnn::blocks_of;
// A tile's accumulator groups: LSTM i, f, g, o; GRU r, z, and n in two parts (x W_in + b_in
// and h W_hn + b_hn), because r multiplies only the second.
constexpr int kAcc = 4;

// panel[k][g*16 + u] = w[(g*H + j0 + u) * K + k] for a (G*H, K) weight, zero past H
void pack_panel(float* panel, const float* w, int64_t gates, int64_t H, int64_t K, int64_t j0) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t g = 0; g < gates; ++g)
      for (int64_t u = 0; u < kBlock && j0 + u < H; ++u)
        panel[(k * gates + g) * kBlock + u] = w[(g * H + j0 + u) * K + k];
}
}  // namespace

std::vector<float> pack_recurrent_weight(const float* w_hh, int64_t gates, int64_t H) {
  std::vector<float> packed(static_cast<size_t>(blocks_of(H) * H * gates * kBlock), 0.0f);
  for (int64_t jb = 0; jb < blocks_of(H); ++jb) pack_panel(packed.data() + jb * H * gates * kBlock, w_hh, gates, H, H, jb * kBlock);
  return packed;
}

int64_t layer_block_floats(int64_t gates, int64_t I, int64_t H) { return (kAcc + (I + H) * gates) * kBlock; }

std::vector<float> pack_layer_weight(const float* w_ih, const float* w_hh, const float* b_ih, const float* b_hh,
                                     int64_t gates, int64_t I, int64_t H) {
  const int64_t stride = layer_block_floats(gates, I, H);
  std::vector<float> packed(static_cast<size_t>(blocks_of(H) * stride), 0.0f);
  for (int64_t jb = 0; jb < blocks_of(H); ++jb) {
    float* blk = packed.data() + jb * stride;
    const int64_t j0 = jb * kBlock;
    // the accumulators start from the biases; GRU's n gate keeps b_in and b_hn apart
    for (int64_t a = 0; a < kAcc; ++a)
      for (int64_t u = 0; u < kBlock && j0 + u < H; ++u) {
        const int64_t gi = a < gates ? a : -1;                                  // GRU's n_h has no b_ih
        const int64_t gh = gates == 4 || a < 2 ? a : a == 3 ? 2 : -1;           // GRU's n_x has no b_hh
        float v = 0.0f;
        if (b_ih != nullptr && gi >= 0) v += b_ih[gi * H + j0 + u];
        if (b_hh != nullptr && gh >= 0) v += b_hh[gh * H + j0 + u];
        blk[a * kBlock + u] = v;
      }
    pack_panel(blk + kAcc * kBlock, w_ih, gates, H, I, j0);
    pack_panel(blk + kAcc * kBlock + I * gates * kBlock, w_hh, gates, H, H, j0);
  }
  return packed;
}

bool recurrence_supported() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

#ifdef __AVX512F__
namespace {

using namespace rnn;

// acc[r][.] += a[r, k] * panel[k][.] over k < K. The panel has G vectors per k; vector g
// feeds accumulator g, except the last, which feeds `Last` (GRU's h part feeds n_h, not n_x).
template <int G, int Last, int R>
KILN_INLINE void accumulate(const float* a, int64_t a_stride, const float* panel, int64_t K, __m512 (&acc)[R][kAcc]) {
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) w[g] = _mm512_loadu_ps(panel + k * (G * kBlock) + g * kBlock);
    // A panel of K = I + H rows outgrows L1 (64 KB for I = H = 128), and each row tile reads
    // it again: fetch 8 rows ahead (a gain at that size, neutral when the panel fits).
    // A prefetch past the panel's end is a harmless hint.
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
      _mm_prefetch(reinterpret_cast<const char*>(panel + (k + 8) * (G * kBlock) + g * kBlock), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * a_stride + k]);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const int to = g == G - 1 ? Last : g;
        acc[r][to] = _mm512_fmadd_ps(x, w[g], acc[r][to]);
      }
    }
  }
}

template <int R>
KILN_INLINE void fill(__m512 (&acc)[R][kAcc], const float* init) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < kAcc; ++g) acc[r][g] = init == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(init + g * kBlock);
}

// c = f c + i g; h = o tanh(c), for 16 units (m masks the tail past H)
KILN_INLINE void lstm_cell16(__m512 i, __m512 f, __m512 g, __m512 o, float* c, float* h, __mmask16 m) {
  const __m512 cn =
      _mm512_fmadd_ps(gate_sigmoid(f), _mm512_maskz_loadu_ps(m, c), _mm512_mul_ps(gate_sigmoid(i), gate_tanh(g)));
  _mm512_mask_storeu_ps(c, m, cn);
  _mm512_mask_storeu_ps(h, m, _mm512_mul_ps(gate_sigmoid(o), gate_tanh(cn)));
}

// n = tanh(nx + r nh); h = (1 - z) n + z h_prev == n + z (h_prev - n)
KILN_INLINE void gru_cell16(__m512 r, __m512 z, __m512 nx, __m512 nh, const float* h_prev, float* h, __mmask16 m) {
  const __m512 n = gate_tanh(_mm512_fmadd_ps(gate_sigmoid(r), nh, nx));
  const __m512 hp = _mm512_maskz_loadu_ps(m, h_prev);
  _mm512_mask_storeu_ps(h, m, _mm512_fmadd_ps(gate_sigmoid(z), _mm512_sub_ps(hp, n), n));
}

// What one step of one row tile sees. Row b of x / h_prev / h_out is at b * x_b / h_b / y_b;
// x is gx_t (hoisted) or x_t (fused).
struct StepRows {
  const float* x;
  int64_t x_b;
  const float* h_prev;
  int64_t h_b;
  float* h_out;
  int64_t y_b;
};

// Hoisted LSTM: rows [b0, b0+R), units [j0, j0+16); panel = W_hh's for the block.
template <int R>
KILN_INLINE void lstm_hoisted_tile(const StepRows& s, const float* panel, float* c, int64_t H, int64_t b0, int64_t j0) {
  __m512 acc[R][kAcc];
  fill(acc, nullptr);
  accumulate<4, 3>(s.h_prev + b0 * s.h_b, s.h_b, panel, H, acc);
  const __mmask16 m = tail_mask(H - j0);
  for (int r = 0; r < R; ++r) {
    const float* x = s.x + (b0 + r) * s.x_b + j0;
    auto gate = [&](int g) { return _mm512_add_ps(acc[r][g], _mm512_maskz_loadu_ps(m, x + g * H)); };
    lstm_cell16(gate(0), gate(1), gate(2), gate(3), c + (b0 + r) * H + j0, s.h_out + (b0 + r) * s.y_b + j0, m);
  }
}

template <int R>
KILN_INLINE void gru_hoisted_tile(const StepRows& s, const float* panel, const float* b_hh, int64_t H, int64_t b0,
                                  int64_t j0) {
  __m512 acc[R][kAcc];
  fill(acc, nullptr);
  accumulate<3, 2>(s.h_prev + b0 * s.h_b, s.h_b, panel, H, acc);
  const __mmask16 m = tail_mask(H - j0);
  const __m512 br = _mm512_maskz_loadu_ps(m, b_hh + j0);
  const __m512 bz = _mm512_maskz_loadu_ps(m, b_hh + H + j0);
  const __m512 bn = _mm512_maskz_loadu_ps(m, b_hh + 2 * H + j0);
  for (int r = 0; r < R; ++r) {
    const float* x = s.x + (b0 + r) * s.x_b + j0;
    gru_cell16(_mm512_add_ps(_mm512_add_ps(acc[r][0], br), _mm512_maskz_loadu_ps(m, x)),
               _mm512_add_ps(_mm512_add_ps(acc[r][1], bz), _mm512_maskz_loadu_ps(m, x + H)),
               _mm512_maskz_loadu_ps(m, x + 2 * H), _mm512_add_ps(acc[r][2], bn),
               s.h_prev + (b0 + r) * s.h_b + j0, s.h_out + (b0 + r) * s.y_b + j0, m);
  }
}

// Fused: blk = [bias: 4 x 16][x panel: I x G*16][h panel: H x G*16] (pack_layer_weight).
template <int R>
KILN_INLINE void lstm_fused_tile(const StepRows& s, const float* blk, float* c, int64_t I, int64_t H, int64_t b0,
                                 int64_t j0) {
  __m512 acc[R][kAcc];
  fill(acc, blk);
  const float* px = blk + kAcc * kBlock;
  accumulate<4, 3>(s.x + b0 * s.x_b, s.x_b, px, I, acc);
  accumulate<4, 3>(s.h_prev + b0 * s.h_b, s.h_b, px + I * 4 * kBlock, H, acc);
  const __mmask16 m = tail_mask(H - j0);
  for (int r = 0; r < R; ++r)
    lstm_cell16(acc[r][0], acc[r][1], acc[r][2], acc[r][3], c + (b0 + r) * H + j0, s.h_out + (b0 + r) * s.y_b + j0, m);
}

template <int R>
KILN_INLINE void gru_fused_tile(const StepRows& s, const float* blk, int64_t I, int64_t H, int64_t b0, int64_t j0) {
  __m512 acc[R][kAcc];
  fill(acc, blk);
  const float* px = blk + kAcc * kBlock;
  accumulate<3, 2>(s.x + b0 * s.x_b, s.x_b, px, I, acc);                   // r, z, n_x
  accumulate<3, 3>(s.h_prev + b0 * s.h_b, s.h_b, px + I * 3 * kBlock, H, acc);  // r, z, n_h
  const __mmask16 m = tail_mask(H - j0);
  for (int r = 0; r < R; ++r)
    gru_cell16(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s.h_prev + (b0 + r) * s.h_b + j0,
               s.h_out + (b0 + r) * s.y_b + j0, m);
}

// Row tiles of 6 batch rows: 6 x 4 accumulators + 4 weight vectors + 1 broadcast fit
// the 32 zmm registers.
template <typename F>
inline void for_row_tiles(int64_t B, F&& f) {
  int64_t b = 0;
  for (; b + 6 <= B; b += 6) f(std::integral_constant<int, 6>{}, b);
  switch (B - b) {
    case 5: f(std::integral_constant<int, 5>{}, b); break;
    case 4: f(std::integral_constant<int, 4>{}, b); break;
    case 3: f(std::integral_constant<int, 3>{}, b); break;
    case 2: f(std::integral_constant<int, 2>{}, b); break;
    case 1: f(std::integral_constant<int, 1>{}, b); break;
    default: break;
  }
}

// Batch rows are independent recurrences, so with enough rows each thread takes its own
// rows through all T steps: no barrier between steps and no h_{t-1} written by another core
// (each thread reads all the weight panels from its own L2 instead). Below this many rows a
// thread, the threads split each step's hidden blocks (run_steps) instead.
constexpr int64_t kMinRowsPerThread = 12;

// The layer loop every form shares: step t reads h_{t-1} (h0 first) and x's row t, and runs
// `tile(R, rows, b0, jb)` over hidden blocks jb and row tiles of the batch; then hn = h_{T-1}.
template <typename Tile>
void run_layer(const float* x, const float* h0, float* y, float* hn, int64_t T, int64_t B, int64_t H, SeqStrides st,
               int threads, Tile&& tile) {
  auto step = [&](int64_t t, int64_t b_lo, int64_t b_hi, int64_t j_lo, int64_t j_hi, bool shared_h) {
    const StepRows s{x + t * st.x_t, st.x_b, t == 0 ? h0 : y + (t - 1) * st.y_t, t == 0 ? H : st.y_b, y + t * st.y_t,
                     st.y_b};
    // With the hidden blocks split, the other threads wrote their parts of h_{t-1} in their
    // own caches: request all of it up front so the transfers overlap instead of stalling
    // the GEMM loop one line at a time (16 KB for B = 32, H = 128). The one-thread path
    // runs it too; there it was neutral or a small gain.
    if (shared_h)
      for (int64_t b = b_lo; b < b_hi; ++b)
        for (int64_t k = 0; k < H; k += kBlock)
          _mm_prefetch(reinterpret_cast<const char*>(s.h_prev + b * s.h_b + k), _MM_HINT_T0);
    for (int64_t jb = j_lo; jb < j_hi; ++jb)
      for_row_tiles(b_hi - b_lo, [&](auto R, int64_t b0) { tile(R, s, b_lo + b0, jb); });
  };
  const int64_t parts = std::min<int64_t>(threads, B / kMinRowsPerThread);
  if (parts > 1) {
    parallel_run(static_cast<int>(parts), [&](int id) {
      const int64_t lo = B * id / parts, hi = B * (id + 1) / parts;
      for (int64_t t = 0; t < T; ++t) step(t, lo, hi, 0, blocks_of(H), false);
    });
  } else {
    run_steps(T, blocks_of(H), threads,
              [&](int64_t t, int64_t lo, int64_t hi) { step(t, 0, B, lo, hi, true); });
  }
  for (int64_t b = 0; b < B; ++b) {
    const float* last = T > 0 ? y + (T - 1) * st.y_t + b * st.y_b : h0 + b * H;
    std::memcpy(hn + b * H, last, sizeof(float) * H);
  }
}

}  // namespace
#endif

#ifndef __AVX512F__
namespace {
// Without AVX-512 recurrence_supported() is false and no caller gets here.
template <typename... Args>
[[noreturn]] void no_avx512(const char* name, const Args&...) {
  throw std::runtime_error(std::string(name) + " needs AVX-512");
}
}  // namespace
#endif

void lstm_recurrence(const float* gx, const float* packed, const float* h0, const float* c0, float* y, float* hn,
                     float* cn, int64_t T, int64_t B, int64_t H, SeqStrides st, int threads) {
#ifdef __AVX512F__
  std::memcpy(cn, c0, sizeof(float) * B * H);  // cn is the running cell state
  run_layer(gx, h0, y, hn, T, B, H, st, threads, [&](auto R, const StepRows& s, int64_t b0, int64_t jb) {
    lstm_hoisted_tile<decltype(R)::value>(s, packed + jb * H * 4 * kBlock, cn, H, b0, jb * kBlock);
  });
#else
  no_avx512("lstm_recurrence", gx, packed, h0, c0, y, hn, cn, T, B, H, st, threads);
#endif
}

void gru_recurrence(const float* gx, const float* packed, const float* b_hh, const float* h0, float* y, float* hn,
                    int64_t T, int64_t B, int64_t H, SeqStrides st, int threads) {
#ifdef __AVX512F__
  run_layer(gx, h0, y, hn, T, B, H, st, threads, [&](auto R, const StepRows& s, int64_t b0, int64_t jb) {
    gru_hoisted_tile<decltype(R)::value>(s, packed + jb * H * 3 * kBlock, b_hh, H, b0, jb * kBlock);
  });
#else
  no_avx512("gru_recurrence", gx, packed, b_hh, h0, y, hn, T, B, H, st, threads);
#endif
}

void lstm_layer(const float* x, const float* packed, const float* h0, const float* c0, float* y, float* hn, float* cn,
                int64_t T, int64_t B, int64_t I, int64_t H, SeqStrides st, int threads) {
#ifdef __AVX512F__
  std::memcpy(cn, c0, sizeof(float) * B * H);
  const int64_t stride = layer_block_floats(4, I, H);
  run_layer(x, h0, y, hn, T, B, H, st, threads, [&](auto R, const StepRows& s, int64_t b0, int64_t jb) {
    lstm_fused_tile<decltype(R)::value>(s, packed + jb * stride, cn, I, H, b0, jb * kBlock);
  });
#else
  no_avx512("lstm_layer", x, packed, h0, c0, y, hn, cn, T, B, I, H, st, threads);
#endif
}

void gru_layer(const float* x, const float* packed, const float* h0, float* y, float* hn, int64_t T, int64_t B,
               int64_t I, int64_t H, SeqStrides st, int threads) {
#ifdef __AVX512F__
  const int64_t stride = layer_block_floats(3, I, H);
  run_layer(x, h0, y, hn, T, B, H, st, threads, [&](auto R, const StepRows& s, int64_t b0, int64_t jb) {
    gru_fused_tile<decltype(R)::value>(s, packed + jb * stride, I, H, b0, jb * kBlock);
  });
#else
  no_avx512("gru_layer", x, packed, h0, y, hn, T, B, I, H, st, threads);
#endif
}

}  // namespace kiln
