// Whole LSTM/GRU layers in C++: per time step one small GEMM fused with the gate
// nonlinearities, with no Python between steps. Two forms:
//
// - fused (lstm_layer / gru_layer): the step's GEMM is [x_t, h_{t-1}] @ [W_ih; W_hh]^T, so the
//   input projection happens inside the recurrence and no [T, B, G*H] gate buffer is ever
//   written or read back (for a small input size it costs a few extra k iterations per step);
// - hoisted (lstm_recurrence / gru_recurrence): the caller projected every step's input in
//   one GEMM up front (gx) and the step's GEMM is h_{t-1} @ W_hh^T alone.
//
// Weights are prepacked once: for each block of W hidden units (one register: 16 with
// AVX-512, 8 with AVX2 + FMA), a K x (W*G) panel holding the G gates of those units side by
// side, so one register tile (R batch rows x 4 vectors) accumulates every gate of W units
// and the cell finishes them in registers — the gate pre-activations never touch memory.
// The packing follows the register width of the build, so a packed weight is for this
// machine only (plans pack when they are built or loaded, never ship the packing).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <sched.h>

#include "kiln.h"
#include "rnn_steps.h"
#include "simd_math.h"
#include "thread_pool.h"

namespace kiln {

namespace {
// hidden units per block: one register of lanes (simd_vec.h)
#ifdef KILN_HAS_VEC
constexpr int kBlock = simd::Vec::W;
#else
constexpr int kBlock = 16;  // nothing runs the recurrences here (recurrence_supported() is false)
#endif
inline int64_t blocks_of(int64_t H) { return (H + kBlock - 1) / kBlock; }
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

int64_t recurrent_blocks(int64_t H) { return blocks_of(H); }

int64_t recurrent_block_units() { return kBlock; }

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
#ifdef KILN_HAS_VEC
  return true;
#else
  return false;
#endif
}

#ifdef KILN_HAS_VEC
namespace {

using rnn::gate_sigmoid;
using rnn::gate_tanh;
using rnn::run_steps;
using simd::Vec;
using V = Vec::T;

// A register tile: kMaxRows batch rows x the panel vectors of one pass. With AVX-512 (32 zmm)
// a pass takes all G gate vectors: 6 x 4 accumulators, 4 weight vectors and a broadcast.
// AVX2 has 16 ymm: 6 rows x 4 gates would not fit, and 2-3 rows x 4 gates must read each
// weight vector from memory for every row (loads, not FMAs, bound the loop), so its passes
// take 2 gate vectors at a time: 6 x 2 accumulators, 2 weight vectors and a broadcast, the
// shape of a GEMM micro-kernel. The other gates' accumulators wait on the stack.
constexpr int kMaxRows = 6;
constexpr int kGatesPerPass = Vec::W == 16 ? 4 : 2;

// The accumulator vector g of a G-vector panel feeds: g itself, except the last, which
// feeds `Last` (GRU's h part feeds n_h, not n_x).
template <int G, int Last>
constexpr int slot_of(int g) { return g == G - 1 ? Last : g; }

// One GEMM operand of a step: rows a (row r at r * a_stride) times a panel of K rows.
struct Operand {
  const float* a;
  int64_t a_stride;
  const float* panel;
  int64_t K;
};

// f(integral_constant<u>) for each u of the sequence, unrolled
template <typename F, int... u>
KILN_INLINE void each_phase(F&& f, std::integer_sequence<int, u...>) {
  (f(std::integral_constant<int, u>{}), ...);
}

// acc[r][slot_of(g)] += a[r, k] * panel[k][g] over k < K and the panel vectors g in [G0, G1)
// of operand x (its last vector feeding XLast) and then of h (HLast). Both operands run in
// one pass, so the accumulators stay in registers from the first k of x to the last of h.
template <int G, int XLast, int HLast, int G0, int G1, int R>
KILN_INLINE void accumulate_pass(const Operand& x, const Operand& h, V (&out)[R][kAcc]) {
  constexpr auto live = [](int slot) {
    for (int g = G0; g < G1; ++g)
      if (slot_of<G, XLast>(g) == slot || slot_of<G, HLast>(g) == slot) return true;
    return false;
  };
  // An FMA waits for the one before it on the same accumulator: two FMA units of 4-cycle
  // latency need 8 accumulators in flight. A tile of one or two rows has fewer, so it keeps
  // U sets, one per phase of k (k mod U), summed at the end -- where the registers allow.
  // (GRU's n pass updates n_x over x's k and n_h over h's: two accumulators a row held, one
  // a row in flight.)
  constexpr int N = G1 - G0, chains = R * N, phases = (8 + chains - 1) / chains;
  static_assert(kAcc == 4, "held counts four accumulator slots");
  constexpr int held = live(0) + live(1) + live(2) + live(3);
  constexpr int registers = Vec::W == 16 ? 32 : 16;  // zmm / ymm
  constexpr int U = phases * R * held + N + R <= registers ? phases : 1;
  // a local copy of the pass's accumulators, which GCC keeps in registers (through the
  // caller's array it stored every accumulator back to the stack on each k)
  V acc[U][R][kAcc];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < kAcc; ++j) acc[u][r][j] = live(j) && u == 0 ? out[r][j] : Vec::zero();
  auto run = [&](const Operand& o, auto last) __attribute__((always_inline)) {
    constexpr int Last = decltype(last)::value;
    // one k into the phase-u accumulators (u a constant: GCC keeps acc in registers only when
    // every index into it is known at compile time)
    auto step = [&](int64_t k, auto phase) __attribute__((always_inline)) {
      constexpr int u = decltype(phase)::value;
      const float* row = o.panel + k * (G * kBlock);
      V w[N];
#pragma GCC unroll 4
      for (int g = G0; g < G1; ++g) w[g - G0] = Vec::loadu(row + g * kBlock);
      // A panel of K = I + H rows outgrows L1 (64 KB for I = H = 128 with 16-unit blocks),
      // and each row tile reads it again: fetch 8 rows ahead, one line at a time (a gain at
      // that size, neutral when the panel fits). A prefetch past the panel's end is a
      // harmless hint.
#pragma GCC unroll 4
      for (int off = G0 * kBlock; off < G1 * kBlock; off += 16)
        _mm_prefetch(reinterpret_cast<const char*>(row + 8 * (G * kBlock) + off), _MM_HINT_T0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V v = Vec::bcast(o.a + r * o.a_stride + k);
#pragma GCC unroll 4
        for (int g = G0; g < G1; ++g)
          acc[u][r][slot_of<G, Last>(g)] = Vec::fmadd(v, w[g - G0], acc[u][r][slot_of<G, Last>(g)]);
      }
    };
    int64_t k = 0;
    if constexpr (U > 1)
      for (; k + U <= o.K; k += U)
        each_phase([&](auto u) __attribute__((always_inline)) { step(k + decltype(u)::value, u); },
                   std::make_integer_sequence<int, U>{});
    for (; k < o.K; ++k) step(k, std::integral_constant<int, 0>{});
  };
  run(x, std::integral_constant<int, XLast>{});
  run(h, std::integral_constant<int, HLast>{});
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kAcc; ++j)
      if (live(j)) {
        V sum = acc[0][r][j];
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u) sum = Vec::add(sum, acc[u][r][j]);
        out[r][j] = sum;
      }
}

// acc[r][.] += x a[r, k] x-panel[k][.] + h a[r, k] h-panel[k][.], in passes of
// kGatesPerPass panel vectors (an operand with K = 0 adds nothing).
template <int G, int XLast, int HLast, int R>
KILN_INLINE void accumulate(const Operand& x, const Operand& h, V (&acc)[R][kAcc]) {
  constexpr int P = kGatesPerPass < G ? kGatesPerPass : G;
  accumulate_pass<G, XLast, HLast, 0, P>(x, h, acc);
  if constexpr (P < G) accumulate_pass<G, XLast, HLast, P, G>(x, h, acc);
}

template <int R>
KILN_INLINE void fill(V (&acc)[R][kAcc], const float* init) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < kAcc; ++g) acc[r][g] = init == nullptr ? Vec::zero() : Vec::loadu(init + g * kBlock);
}

// c = f c + i g; h = o tanh(c), for one block of units (m masks the tail past H)
KILN_INLINE void lstm_cell(V i, V f, V g, V o, float* c, float* h, const Vec::Mask& m) {
  const V cn = Vec::fmadd(gate_sigmoid(f), Vec::load(m, c), Vec::mul(gate_sigmoid(i), gate_tanh(g)));
  Vec::store(c, m, cn);
  Vec::store(h, m, Vec::mul(gate_sigmoid(o), gate_tanh(cn)));
}

// n = tanh(nx + r nh); h = (1 - z) n + z h_prev == n + z (h_prev - n)
KILN_INLINE void gru_cell(V r, V z, V nx, V nh, const float* h_prev, float* h, const Vec::Mask& m) {
  const V n = gate_tanh(Vec::fmadd(gate_sigmoid(r), nh, nx));
  const V hp = Vec::load(m, h_prev);
  Vec::store(h, m, Vec::fmadd(gate_sigmoid(z), Vec::sub(hp, n), n));
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

// Hoisted LSTM: rows [b0, b0+R), units [j0, j0+kBlock); panel = W_hh's for the block.
template <int R>
KILN_INLINE void lstm_hoisted_tile(const StepRows& s, const float* panel, float* c, int64_t H, int64_t b0, int64_t j0) {
  V acc[R][kAcc];
  fill(acc, nullptr);
  accumulate<4, 3, 3>(Operand{}, Operand{s.h_prev + b0 * s.h_b, s.h_b, panel, H}, acc);
  const auto m = Vec::mask(H - j0);
  for (int r = 0; r < R; ++r) {
    const float* x = s.x + (b0 + r) * s.x_b + j0;
    auto gate = [&](int g) { return Vec::add(acc[r][g], Vec::load(m, x + g * H)); };
    lstm_cell(gate(0), gate(1), gate(2), gate(3), c + (b0 + r) * H + j0, s.h_out + (b0 + r) * s.y_b + j0, m);
  }
}

template <int R>
KILN_INLINE void gru_hoisted_tile(const StepRows& s, const float* panel, const float* b_hh, int64_t H, int64_t b0,
                                  int64_t j0) {
  V acc[R][kAcc];
  fill(acc, nullptr);
  accumulate<3, 2, 2>(Operand{}, Operand{s.h_prev + b0 * s.h_b, s.h_b, panel, H}, acc);
  const auto m = Vec::mask(H - j0);
  const V br = Vec::load(m, b_hh + j0);
  const V bz = Vec::load(m, b_hh + H + j0);
  const V bn = Vec::load(m, b_hh + 2 * H + j0);
  for (int r = 0; r < R; ++r) {
    const float* x = s.x + (b0 + r) * s.x_b + j0;
    gru_cell(Vec::add(Vec::add(acc[r][0], br), Vec::load(m, x)), Vec::add(Vec::add(acc[r][1], bz), Vec::load(m, x + H)),
             Vec::load(m, x + 2 * H), Vec::add(acc[r][2], bn), s.h_prev + (b0 + r) * s.h_b + j0,
             s.h_out + (b0 + r) * s.y_b + j0, m);
  }
}

// Fused: blk = [bias: 4 x kBlock][x panel: I x G*kBlock][h panel: H x G*kBlock] (pack_layer_weight).
template <int R>
KILN_INLINE void lstm_fused_tile(const StepRows& s, const float* blk, float* c, int64_t I, int64_t H, int64_t b0,
                                 int64_t j0) {
  V acc[R][kAcc];
  fill(acc, blk);
  const float* px = blk + kAcc * kBlock;
  accumulate<4, 3, 3>(Operand{s.x + b0 * s.x_b, s.x_b, px, I},
                      Operand{s.h_prev + b0 * s.h_b, s.h_b, px + I * 4 * kBlock, H}, acc);
  const auto m = Vec::mask(H - j0);
  for (int r = 0; r < R; ++r)
    lstm_cell(acc[r][0], acc[r][1], acc[r][2], acc[r][3], c + (b0 + r) * H + j0, s.h_out + (b0 + r) * s.y_b + j0, m);
}

template <int R>
KILN_INLINE void gru_fused_tile(const StepRows& s, const float* blk, int64_t I, int64_t H, int64_t b0, int64_t j0) {
  V acc[R][kAcc];
  fill(acc, blk);
  const float* px = blk + kAcc * kBlock;
  accumulate<3, 2, 3>(Operand{s.x + b0 * s.x_b, s.x_b, px, I},                   // r, z, n_x
                      Operand{s.h_prev + b0 * s.h_b, s.h_b, px + I * 3 * kBlock, H}, acc);  // r, z, n_h
  const auto m = Vec::mask(H - j0);
  for (int r = 0; r < R; ++r)
    gru_cell(acc[r][0], acc[r][1], acc[r][2], acc[r][3], s.h_prev + (b0 + r) * s.h_b + j0,
             s.h_out + (b0 + r) * s.y_b + j0, m);
}

// f(R, b) over row tiles of the batch, of R = `left` rows at b.
template <int R, typename F>
inline void row_tile(int64_t left, int64_t b, F&& f) {
  if constexpr (R > 0) {
    if (left == R)
      f(std::integral_constant<int, R>{}, b);
    else
      row_tile<R - 1>(left, b, f);
  }
}

// The batch in as few tiles as kMaxRows allows, of balanced sizes (32 rows: 6 6 5 5 5 5, not
// 6 6 6 6 6 2).
//
// With AVX2, though, a pass over 3 or 4 rows has only 6 or 8 accumulators (2 gate vectors a
// pass) and runs well below a 5- or 6-row pass, while a 1- or 2-row tile keeps 8 in flight
// (k split in phases: accumulate_pass). So where the balanced split would cut the batch into
// tiles of 3-4 rows and the remainder past full tiles is 1-2 rows, the batch goes in full
// tiles and that remainder: 7 = 6 + 1, not 3 + 4; 8 = 6 + 2, not 4 + 4 (up to 19 rows; from
// 20 the balanced tiles have 5-6 rows).
template <typename F>
inline void for_row_tiles(int64_t B, F&& f) {
  const int64_t tiles = (B + kMaxRows - 1) / kMaxRows, rest = B % kMaxRows;
  if (Vec::W == 8 && B > kMaxRows && rest > 0 && rest <= 2 && B / tiles < 5) {
    int64_t b = 0;
    for (; b + kMaxRows <= B; b += kMaxRows) row_tile<kMaxRows>(kMaxRows, b, f);
    row_tile<kMaxRows>(B - b, b, f);
    return;
  }
  for (int64_t i = 0, b = 0; i < tiles; ++i) {
    const int64_t end = B * (i + 1) / tiles;
    row_tile<kMaxRows>(end - b, b, f);
    b = end;
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
        for (int64_t k = 0; k < H; k += 16)  // one 64-byte line at a time
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

#ifndef KILN_HAS_VEC
namespace {
// Without AVX-512 or AVX2 + FMA recurrence_supported() is false and no caller gets here.
template <typename... Args>
[[noreturn]] void no_simd(const char* name, const Args&...) {
  throw std::runtime_error(std::string(name) + " needs AVX-512 or AVX2 + FMA");
}
}  // namespace
#endif

void lstm_recurrence(const float* gx, const float* packed, const float* h0, const float* c0, float* y, float* hn,
                     float* cn, int64_t T, int64_t B, int64_t H, SeqStrides st, int threads) {
#ifdef KILN_HAS_VEC
  std::memcpy(cn, c0, sizeof(float) * B * H);  // cn is the running cell state
  run_layer(gx, h0, y, hn, T, B, H, st, threads, [&](auto R, const StepRows& s, int64_t b0, int64_t jb) {
    lstm_hoisted_tile<decltype(R)::value>(s, packed + jb * H * 4 * kBlock, cn, H, b0, jb * kBlock);
  });
#else
  no_simd("lstm_recurrence", gx, packed, h0, c0, y, hn, cn, T, B, H, st, threads);
#endif
}

void gru_recurrence(const float* gx, const float* packed, const float* b_hh, const float* h0, float* y, float* hn,
                    int64_t T, int64_t B, int64_t H, SeqStrides st, int threads) {
#ifdef KILN_HAS_VEC
  run_layer(gx, h0, y, hn, T, B, H, st, threads, [&](auto R, const StepRows& s, int64_t b0, int64_t jb) {
    gru_hoisted_tile<decltype(R)::value>(s, packed + jb * H * 3 * kBlock, b_hh, H, b0, jb * kBlock);
  });
#else
  no_simd("gru_recurrence", gx, packed, b_hh, h0, y, hn, T, B, H, st, threads);
#endif
}

void lstm_layer(const float* x, const float* packed, const float* h0, const float* c0, float* y, float* hn, float* cn,
                int64_t T, int64_t B, int64_t I, int64_t H, SeqStrides st, int threads) {
#ifdef KILN_HAS_VEC
  std::memcpy(cn, c0, sizeof(float) * B * H);
  const int64_t stride = layer_block_floats(4, I, H);
  run_layer(x, h0, y, hn, T, B, H, st, threads, [&](auto R, const StepRows& s, int64_t b0, int64_t jb) {
    lstm_fused_tile<decltype(R)::value>(s, packed + jb * stride, cn, I, H, b0, jb * kBlock);
  });
#else
  no_simd("lstm_layer", x, packed, h0, c0, y, hn, cn, T, B, I, H, st, threads);
#endif
}

void gru_layer(const float* x, const float* packed, const float* h0, float* y, float* hn, int64_t T, int64_t B,
               int64_t I, int64_t H, SeqStrides st, int threads) {
#ifdef KILN_HAS_VEC
  const int64_t stride = layer_block_floats(3, I, H);
  run_layer(x, h0, y, hn, T, B, H, st, threads, [&](auto R, const StepRows& s, int64_t b0, int64_t jb) {
    gru_fused_tile<decltype(R)::value>(s, packed + jb * stride, I, H, b0, jb * kBlock);
  });
#else
  no_simd("gru_layer", x, packed, h0, y, hn, T, B, I, H, st, threads);
#endif
}

}  // namespace kiln
