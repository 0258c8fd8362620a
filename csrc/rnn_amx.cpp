// bf16 LSTM and GRU layers (precision="bf16"): per time step the GEMM
// [x_t, h_{t-1}] @ [W_ih; W_hh]^T runs on bf16 operands with fp32 sums, and the cell
// finishes the gates in fp32 from those sums; the cell state c stays fp32 for the whole
// sequence, h is rounded to bf16 once per step (it is the next step's GEMM operand and the
// layer's bf16 output). Two paths share the weights, the operands and the cells:
// - AMX tiles (tdpbf16ps), where the CPU has AMX-BF16;
// - AVX512-BF16 (vdpbf16ps: 16 fp32 sums, each of two bf16 products, per instruction), on
//   CPUs with the instruction but no tiles (Cooper Lake, Zen 4): twice the fp32 FMA rate.
//
// Why: at a forecaster's shapes (batch 32, hidden 128) the fp32 step is a 32 x 256 x 512
// FMA GEMM, which even at the machine's fp32 GEMM rate is most of the layer's time (the
// `fp32 floor` column of `kiln bench models`); in bf16 that GEMM is several times (AMX) or
// twice (AVX512-BF16) cheaper and the fp32 gate math is what is left.
//
// Weight layout (rnn_amx_pack): K = [x part padded to Ip (a multiple of 32); h part padded
// to Hp]; for each block of 16 hidden units and each 32-k step, the four gates' B tiles
// (16 k-pairs x 16 units, 1 KiB each) one after another, so a block's weights stream in
// order (a GRU's n gate takes two of the four slots, see rnn_amx_pack). A tile's row is one
// k-pair of 16 units: also exactly vdpbf16ps's second operand. AMX tiles: 0-3 two slots'
// sums for 32 batch rows, 4-5 the A slices, 6-7 the B tiles.
#include <immintrin.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "amx_tiles.h"
#include "kiln.h"
#include "rnn_steps.h"

namespace kiln {

namespace {
int64_t round_to(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
}  // namespace

RnnAmxWeight rnn_amx_pack(const float* w_ih, const float* w_hh, const float* b_ih, const float* b_hh, int64_t gates,
                          int64_t I, int64_t H) {
  if (gates != 3 && gates != 4) throw std::invalid_argument("rnn_amx_pack: gates must be 3 (GRU) or 4 (LSTM)");
  RnnAmxWeight p;
  p.gates = gates;
  p.I = I;
  p.H = H;
  p.Ip = round_to(std::max<int64_t>(I, 1), 32);
  p.Hp = round_to(H, 32);
  const int64_t blocks = rnn::blocks_of(H), kb_all = (p.Ip + p.Hp) / 32;
  p.tiles.assign(static_cast<size_t>(blocks * kb_all * 4 * 512), 0);
  p.bias.assign(static_cast<size_t>(blocks * 4 * rnn::kBlock), 0.0f);
  auto bf16 = [](float f) {  // round to nearest even (the values are finite weights)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  };
  // Four accumulator slots per unit. LSTM: i, f, g, o, each from both parts. GRU: r, z from
  // both parts; n in two slots, n_x (x part, b_in) and n_h (h part, b_hn), because r
  // multiplies only the second.
  for (int64_t jb = 0; jb < blocks; ++jb)
    for (int64_t slot = 0; slot < 4; ++slot) {
      const int64_t g = gates == 4 || slot < 2 ? slot : 2;
      const bool x_part = gates == 4 || slot != 3, h_part = gates == 4 || slot != 2;
      for (int64_t u = 0; u < rnn::kBlock && jb * rnn::kBlock + u < H; ++u) {
        const int64_t row = g * H + jb * rnn::kBlock + u;
        float b = 0.0f;
        if (b_ih != nullptr && x_part) b += b_ih[row];
        if (b_hh != nullptr && h_part) b += b_hh[row];
        p.bias[(jb * 4 + slot) * rnn::kBlock + u] = b;
        for (int64_t k = 0; k < p.Ip + p.Hp; ++k) {
          float w = 0.0f;
          if (k < p.Ip) w = x_part && k < I ? w_ih[row * I + k] : 0.0f;
          else w = h_part && k - p.Ip < H ? w_hh[row * H + (k - p.Ip)] : 0.0f;
          const int64_t kb = k / 32, kk = k % 32;
          p.tiles[static_cast<size_t>(((jb * kb_all + kb) * 4 + slot) * 512 + (kk / 2) * 32 + u * 2 + kk % 2)] = bf16(w);
        }
      }
    }
  return p;
}

#if defined(__AVX512BF16__)
namespace {

using namespace rnn;

inline __m256i f32_to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// The A operands: h in two zero-padded buffers [Bp][Hp] (the step's output is the next one's
// operand), and x of every step either read in place (row stride x_b) or, where a path reads
// past the real k (AMX: whole 32-k steps and 32-row tiles; AVX512-BF16: the last k-pair of an
// odd I), copied zero-padded to [T][Bp][Ip] (row stride Ip).
struct Operands {
  int64_t Bp;
  const uint16_t* x;
  SeqStrides st;
  std::vector<uint16_t> xs, hb;
  Operands(const uint16_t* x_, const uint16_t* h0, const RnnAmxWeight& w, int64_t T, int64_t B, SeqStrides st_,
           bool pad_x)
      : Bp(round_to(std::max<int64_t>(B, 1), 32)), x(x_), st(st_), hb(static_cast<size_t>(2 * Bp * w.Hp), 0) {
    if (pad_x) {
      xs.assign(static_cast<size_t>(T * Bp * w.Ip), 0);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t b = 0; b < B; ++b)
          std::memcpy(&xs[(t * Bp + b) * w.Ip], x + t * st.x_t + b * st.x_b, static_cast<size_t>(w.I) * 2);
      st.x_t = Bp * w.Ip;
      st.x_b = w.Ip;
      x = xs.data();
    }
    for (int64_t b = 0; b < B; ++b) std::memcpy(&hb[b * w.Hp], h0 + b * w.H, static_cast<size_t>(w.H) * 2);
  }
  const uint16_t* x_at(int64_t t) const { return x + t * st.x_t; }
  int64_t x_stride() const { return st.x_b; }  // between rows
  uint16_t* h_at(int64_t t, int64_t Hp) { return &hb[(t % 2) * Bp * Hp]; }
  // hn: the h after step T (unpadded)
  void last_h(uint16_t* hn, int64_t T, int64_t B, const RnnAmxWeight& w) {
    const uint16_t* last = h_at(T, w.Hp);
    for (int64_t b = 0; b < B; ++b) std::memcpy(hn + b * w.H, last + b * w.Hp, static_cast<size_t>(w.H) * 2);
  }
};

// Finishes rows r0.. r0 + rows - 1 of hidden block jb from their four slots' sums
// (su[r * 64 + 16 * slot], bias not yet added): h (bf16) is the step's output and the next
// step's operand.
template <typename Cell>
KILN_INLINE void finish_rows(const float* su, int64_t rows, int64_t r0, int64_t jb, int64_t t, const RnnAmxWeight& w,
                             const uint16_t* hprev, uint16_t* hnext, uint16_t* y, SeqStrides st, Cell& cell) {
  const int64_t j0 = jb * kBlock, Hp = w.Hp;
  const __mmask16 m = tail_mask(w.H - j0);
  const float* bias = &w.bias[jb * 4 * kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r0 + r;
    auto slot = [&](int s) { return _mm512_add_ps(_mm512_load_ps(su + r * 64 + 16 * s), _mm512_loadu_ps(bias + 16 * s)); };
    const __m256i h = f32_to_bf16(cell(slot, b, j0, m, hprev + b * Hp + j0));
    _mm256_mask_storeu_epi16(y + t * st.y_t + b * st.y_b + j0, m, h);
    _mm256_mask_storeu_epi16(hnext + b * Hp + j0, m, h);
  }
}

// R rows' sums for the slots in Slots (bit s: slot s) over `pairs` k-pairs: A rows at
// a + r * lda (bf16; a pair past the real k reads zero padding), B the block's tiles of this
// part (k-pair q: tile q / 16, row q % 16). A GRU's n_x slot has no h part and its n_h slot
// no x part: their zero weights are skipped, a quarter of the products.
template <int R, int Slots>
KILN_INLINE void dot_part(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t pairs, __m512 (&acc)[R][4]) {
  for (int64_t q = 0; q < pairs; ++q) {
    const uint16_t* bq = b + (q / 16) * 4 * 512 + (q % 16) * 32;
    __m512bh bs[4];
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s)
      if (Slots >> s & 1) bs[s] = (__m512bh)_mm512_loadu_si512(bq + 512 * s);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * q, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s)
        if (Slots >> s & 1) acc[r][s] = _mm512_dpbf16_ps(acc[r][s], av, bs[s]);
    }
  }
}

// R (<= 6: 24 accumulators, 4 weight rows and the broadcast fill the 32 registers) rows of
// block jb: both parts' products, then the cell.
template <int R, typename Cell>
void dot_rows(const Operands& op, int64_t t, int64_t r0, int64_t jb, const RnnAmxWeight& w, const uint16_t* hprev,
              uint16_t* hnext, uint16_t* y, SeqStrides st, Cell& cell) {
  const int64_t kbx = w.Ip / 32, kbh = w.Hp / 32;
  const uint16_t* wb = &w.tiles[static_cast<size_t>(jb * (kbx + kbh) * 4 * 512)];
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_setzero_ps();
  const uint16_t *xa = op.x_at(t) + r0 * op.x_stride(), *ha = hprev + r0 * w.Hp, *wh = wb + kbx * 4 * 512;
  if (w.gates == 4) {
    dot_part<R, 0b1111>(xa, op.x_stride(), wb, (w.I + 1) / 2, acc);
    dot_part<R, 0b1111>(ha, w.Hp, wh, (w.H + 1) / 2, acc);
  } else {  // GRU: r, z, n_x from x; r, z, n_h from h
    dot_part<R, 0b0111>(xa, op.x_stride(), wb, (w.I + 1) / 2, acc);
    dot_part<R, 0b1011>(ha, w.Hp, wh, (w.H + 1) / 2, acc);
  }
  alignas(64) float sums[R * 64];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < 4; ++s) _mm512_store_ps(sums + r * 64 + 16 * s, acc[r][s]);
  finish_rows(sums, R, r0, jb, t, w, hprev, hnext, y, st, cell);
}

// The layer loop on AVX512-BF16: rows in groups of six per hidden block.
template <typename Cell>
void run_dot_layer(const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, uint16_t* y, uint16_t* hn, int64_t T,
                   int64_t B, SeqStrides st, int threads, Cell&& cell) {
  Operands op(x, h0, w, T, B, st, /*pad_x=*/w.I % 2 != 0);
  run_steps(T, blocks_of(w.H), threads, [&](int64_t t, int64_t lo, int64_t hi) {
    const uint16_t* hprev = op.h_at(t, w.Hp);
    uint16_t* hnext = op.h_at(t + 1, w.Hp);
    // rows in near-equal groups of at most six (32 rows: 6, 6, 5, 5, 5, 5): a short last group
    // would load each weight row for only a few products
    const int64_t groups = (B + 5) / 6;
    for (int64_t jb = lo; jb < hi; ++jb)
      for (int64_t g = 0, r0 = 0; g < groups; ++g) {
        const int64_t rows = (B - r0) / (groups - g) + ((B - r0) % (groups - g) != 0);
        switch (rows) {
          case 6: dot_rows<6>(op, t, r0, jb, w, hprev, hnext, y, st, cell); break;
          case 5: dot_rows<5>(op, t, r0, jb, w, hprev, hnext, y, st, cell); break;
          case 4: dot_rows<4>(op, t, r0, jb, w, hprev, hnext, y, st, cell); break;
          case 3: dot_rows<3>(op, t, r0, jb, w, hprev, hnext, y, st, cell); break;
          case 2: dot_rows<2>(op, t, r0, jb, w, hprev, hnext, y, st, cell); break;
          default: dot_rows<1>(op, t, r0, jb, w, hprev, hnext, y, st, cell); break;
        }
        r0 += rows;
      }
  });
  op.last_h(hn, T, B, w);
}

}  // namespace
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
namespace {

// Two gates' sums (g0 = 2 * half, g0 + 1) for 32 rows, as a 2 x 2 block of tiles: 0-1 rows
// 0-15, 2-3 rows 16-31; A from `a` (row stride lda bytes) over kbs k steps. Each B tile
// feeds both row tiles, so a step reads its weights from L2 once, not once per 16 rows.
inline void gate_pair(const char* a, int64_t lda, const uint16_t* b, int64_t kbs, int half) {
  for (int64_t kb = 0; kb < kbs; ++kb) {
    const uint16_t* bk = b + (kb * 4 + 2 * half) * 512;
    _tile_loadd(4, a + kb * 64, lda);
    _tile_loadd(6, bk, 64);
    _tile_loadd(5, a + 16 * lda + kb * 64, lda);
    _tile_loadd(7, bk + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// The layer loop on AMX tiles: 32 rows per hidden block.
template <typename Cell>
void run_amx_layer(const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, uint16_t* y, uint16_t* hn, int64_t T,
                   int64_t B, SeqStrides st, int threads, Cell&& cell) {
  const int64_t Ip = w.Ip, Hp = w.Hp, kbx = Ip / 32, kbh = Hp / 32;
  Operands op(x, h0, w, T, B, st, /*pad_x=*/true);
  run_steps(T, blocks_of(w.H), threads, [&](int64_t t, int64_t lo, int64_t hi) {
    load_full_tiles();
    alignas(64) float sums[2][32 * 64];  // 32 rows x the four slots' 16 units; two units in flight
    const uint16_t* hprev = op.h_at(t, Hp);
    uint16_t* hnext = op.h_at(t + 1, Hp);
    const char* xa = reinterpret_cast<const char*>(op.x_at(t));
    auto unit = [&](const float* su, int64_t r0, int64_t jb) {
      finish_rows(su, std::min<int64_t>(32, B - r0), r0, jb, t, w, hprev, hnext, y, st, cell);
    };
    // Software pipeline: the previous unit's cell (vector units) runs while this unit's first
    // tile products (AMX unit) are in flight, between their issue and their stores.
    int cur = 0;
    int64_t prev_r0 = -1, prev_jb = -1;
    for (int64_t jb = lo; jb < hi; ++jb) {
      const uint16_t* wb = &w.tiles[static_cast<size_t>(jb * (kbx + kbh) * 4 * 512)];
      for (int64_t r0 = 0; r0 < B; r0 += 32) {
        for (int half = 0; half < 2; ++half) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          gate_pair(xa + r0 * Ip * 2, Ip * 2, wb, kbx, half);
          gate_pair(reinterpret_cast<const char*>(hprev + r0 * Hp), Hp * 2, wb + kbx * 4 * 512, kbh, half);
          if (half == 0 && prev_jb >= 0) unit(sums[cur ^ 1], prev_r0, prev_jb);
          float* out = sums[cur] + 32 * half;  // (tile numbers must be literals)
          _tile_stored(0, out, 256);
          _tile_stored(1, out + 16, 256);
          _tile_stored(2, out + 16 * 64, 256);
          _tile_stored(3, out + 16 * 64 + 16, 256);
        }
        prev_r0 = r0;
        prev_jb = jb;
        cur ^= 1;
      }
    }
    if (prev_jb >= 0) unit(sums[cur ^ 1], prev_r0, prev_jb);
    _tile_release();
  });
  op.last_h(hn, T, B, w);
}

}  // namespace
#endif

bool rnn_amx_supported() {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  return amx_bf16_supported();
#else
  return false;
#endif
}

bool rnn_dot_bf16_supported() {
#if defined(__AVX512BF16__)
  return dot_bf16_supported();
#else
  return false;
#endif
}

#if defined(__AVX512BF16__)
namespace {

// One layer on the chosen path (the caller checked that it runs here).
template <typename Cell>
void run_layer(RnnPath path, const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, uint16_t* y, uint16_t* hn,
               int64_t T, int64_t B, SeqStrides st, int threads, Cell&& cell) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (path == RnnPath::amx) return run_amx_layer(x, w, h0, y, hn, T, B, st, threads, cell);
#endif
  run_dot_layer(x, w, h0, y, hn, T, B, st, threads, cell);
}

}  // namespace
#endif

namespace {
void check_path(RnnPath path) {
  if (path == RnnPath::amx && !rnn_amx_supported()) throw std::runtime_error("the bf16 recurrence's AMX path needs AMX-BF16");
  if (path == RnnPath::dot && !rnn_dot_bf16_supported())
    throw std::runtime_error("the bf16 recurrence's AVX512-BF16 path needs AVX512-BF16");
}
}  // namespace

void lstm_layer_bf16(RnnPath path, const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, const float* c0,
                     uint16_t* y, uint16_t* hn, float* cn, int64_t T, int64_t B, SeqStrides st, int threads) {
  check_path(path);
  if (w.gates != 4) throw std::invalid_argument("lstm_layer_bf16: the weights were packed for a GRU");
#if defined(__AVX512BF16__)
  const int64_t H = w.H;
  std::memcpy(cn, c0, sizeof(float) * B * H);  // cn is the running cell state
  run_layer(path, x, w, h0, y, hn, T, B, st, threads,
            [&](auto slot, int64_t b, int64_t j0, __mmask16 m, const uint16_t*) {
              float* c = cn + b * H + j0;
              const __m512 cnew = _mm512_fmadd_ps(gate_sigmoid(slot(1)), _mm512_maskz_loadu_ps(m, c),
                                                  _mm512_mul_ps(gate_sigmoid(slot(0)), gate_tanh(slot(2))));
              _mm512_mask_storeu_ps(c, m, cnew);
              return _mm512_mul_ps(gate_sigmoid(slot(3)), gate_tanh(cnew));
            });
#else
  (void)x; (void)h0; (void)c0; (void)y; (void)hn; (void)cn; (void)T; (void)B; (void)st; (void)threads;
#endif
}

void gru_layer_bf16(RnnPath path, const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, uint16_t* y,
                    uint16_t* hn, int64_t T, int64_t B, SeqStrides st, int threads) {
  check_path(path);
  if (w.gates != 3) throw std::invalid_argument("gru_layer_bf16: the weights were packed for an LSTM");
#if defined(__AVX512BF16__)
  // n = tanh(n_x + r n_h); h = (1 - z) n + z h_prev == n + z (h_prev - n), h_prev as the
  // bf16 operand the step multiplied
  run_layer(path, x, w, h0, y, hn, T, B, st, threads,
            [&](auto slot, int64_t, int64_t, __mmask16 m, const uint16_t* hp) {
              const __m512 n = gate_tanh(_mm512_fmadd_ps(gate_sigmoid(slot(0)), slot(3), slot(2)));
              const __m512 h_prev = _mm512_castsi512_ps(
                  _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hp)), 16));
              return _mm512_fmadd_ps(gate_sigmoid(slot(1)), _mm512_sub_ps(h_prev, n), n);
            });
#else
  (void)x; (void)h0; (void)y; (void)hn; (void)T; (void)B; (void)st; (void)threads;
#endif
}

}  // namespace kiln
