// bf16 LSTM and GRU layers on AMX tiles (precision="bf16"): per time step the GEMM
// [x_t, h_{t-1}] @ [W_ih; W_hh]^T runs as tdpbf16ps with fp32 sums, and the cell finishes
// the gates in fp32 from the tiles' sums; the cell state c stays fp32 for the whole
// sequence, h is rounded to bf16 once per step (it is the next step's GEMM operand and the
// layer's bf16 output).
//
// Why: at a forecaster's shapes (batch 32, hidden 128) the fp32 step is a 32 x 256 x 512
// FMA GEMM, which even at the machine's fp32 GEMM rate is most of the layer's time (the
// `fp32 floor` column of `kiln bench models`); on AMX tiles that GEMM is several times
// cheaper and the fp32 gate math is what is left.
//
// Weight layout (rnn_amx_pack): K = [x part padded to Ip (a multiple of 32); h part padded
// to Hp]; for each block of 16 hidden units and each 32-k step, the four gates' B tiles
// (16 k-pairs x 16 units, 1 KiB each) one after another, so a block's weights stream in
// order (a GRU's n gate takes two of the four slots, see rnn_amx_pack). Tiles: 0-3 two
// slots' sums for 32 batch rows, 4-5 the A slices, 6-7 the B tiles.
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

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
namespace {

using namespace rnn;

inline __m256i f32_to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

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

}  // namespace
#endif

bool rnn_amx_supported() {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  return amx_bf16_supported();
#else
  return false;
#endif
}

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
namespace {

// The layer loop both cells share. cell(t, slot_sums(r, s) -> __m512, b, j0, mask, hprev row,
// h out) finishes 16 units of one row: slot_sums gives the four slots' sums plus bias.
template <typename Cell>
void run_amx_layer(const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, uint16_t* y, uint16_t* hn, int64_t T,
                   int64_t B, SeqStrides st, int threads, Cell&& cell) {
  const int64_t I = w.I, H = w.H, Ip = w.Ip, Hp = w.Hp, Bp = round_to(std::max<int64_t>(B, 1), 32);
  const int64_t kbx = Ip / 32, kbh = Hp / 32, blocks = blocks_of(H);
  // the A operands, zero-padded: x of every step [T][Bp][Ip] and h in two buffers [Bp][Hp]
  std::vector<uint16_t> xs(static_cast<size_t>(T * Bp * Ip), 0), hb(static_cast<size_t>(2 * Bp * Hp), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(&xs[(t * Bp + b) * Ip], x + t * st.x_t + b * st.x_b, static_cast<size_t>(I) * 2);
  for (int64_t b = 0; b < B; ++b) std::memcpy(&hb[b * Hp], h0 + b * H, static_cast<size_t>(H) * 2);
  run_steps(T, blocks, threads, [&](int64_t t, int64_t lo, int64_t hi) {
    load_full_tiles();
    alignas(64) float sums[2][32 * 64];  // 32 rows x the four slots' 16 units; two units in flight
    const uint16_t* hprev = &hb[(t % 2) * Bp * Hp];
    uint16_t* hnext = &hb[((t + 1) % 2) * Bp * Hp];
    const char* xa = reinterpret_cast<const char*>(&xs[t * Bp * Ip]);
    // one unit (32 rows x 16 hidden units) from its sums; h (bf16) is the output and the next
    // step's operand
    auto unit = [&](const float* su, int64_t r0, int64_t jb) {
      const int64_t j0 = jb * kBlock;
      const __mmask16 m = tail_mask(H - j0);
      const float* bias = &w.bias[jb * 4 * kBlock];
      for (int64_t r = 0; r < 32 && r0 + r < B; ++r) {
        const int64_t b = r0 + r;
        auto slot = [&](int s) { return _mm512_add_ps(_mm512_load_ps(su + r * 64 + 16 * s), _mm512_loadu_ps(bias + 16 * s)); };
        const __m256i h = f32_to_bf16(cell(slot, b, j0, m, hprev + b * Hp + j0));
        _mm256_mask_storeu_epi16(y + t * st.y_t + b * st.y_b + j0, m, h);
        _mm256_mask_storeu_epi16(hnext + b * Hp + j0, m, h);
      }
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
  const uint16_t* last = &hb[(T % 2) * Bp * Hp];
  for (int64_t b = 0; b < B; ++b) std::memcpy(hn + b * H, last + b * Hp, static_cast<size_t>(H) * 2);
}

}  // namespace
#endif

void lstm_layer_amx(const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, const float* c0, uint16_t* y,
                    uint16_t* hn, float* cn, int64_t T, int64_t B, SeqStrides st, int threads) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  if (!rnn_amx_supported()) throw std::runtime_error("lstm_layer_amx needs AMX-BF16");
  if (w.gates != 4) throw std::invalid_argument("lstm_layer_amx: the weights were packed for a GRU");
  const int64_t H = w.H;
  std::memcpy(cn, c0, sizeof(float) * B * H);  // cn is the running cell state
  run_amx_layer(x, w, h0, y, hn, T, B, st, threads,
                [&](auto slot, int64_t b, int64_t j0, __mmask16 m, const uint16_t*) {
                  float* c = cn + b * H + j0;
                  const __m512 cnew = _mm512_fmadd_ps(gate_sigmoid(slot(1)), _mm512_maskz_loadu_ps(m, c),
                                                      _mm512_mul_ps(gate_sigmoid(slot(0)), gate_tanh(slot(2))));
                  _mm512_mask_storeu_ps(c, m, cnew);
                  return _mm512_mul_ps(gate_sigmoid(slot(3)), gate_tanh(cnew));
                });
#else
  (void)x; (void)w; (void)h0; (void)c0; (void)y; (void)hn; (void)cn; (void)T; (void)B; (void)st; (void)threads;
  throw std::runtime_error("Kiln was built without AMX-BF16");
#endif
}

void gru_layer_amx(const uint16_t* x, const RnnAmxWeight& w, const uint16_t* h0, uint16_t* y, uint16_t* hn, int64_t T,
                   int64_t B, SeqStrides st, int threads) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
  if (!rnn_amx_supported()) throw std::runtime_error("gru_layer_amx needs AMX-BF16");
  if (w.gates != 3) throw std::invalid_argument("gru_layer_amx: the weights were packed for an LSTM");
  // n = tanh(n_x + r n_h); h = (1 - z) n + z h_prev == n + z (h_prev - n), h_prev as the
  // bf16 operand the step multiplied
  run_amx_layer(x, w, h0, y, hn, T, B, st, threads,
                [&](auto slot, int64_t, int64_t, __mmask16 m, const uint16_t* hp) {
                  const __m512 n = gate_tanh(_mm512_fmadd_ps(gate_sigmoid(slot(0)), slot(3), slot(2)));
                  const __m512 h_prev = _mm512_castsi512_ps(
                      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, hp)), 16));
                  return _mm512_fmadd_ps(gate_sigmoid(slot(1)), _mm512_sub_ps(h_prev, n), n);
                });
#else
  (void)x; (void)w; (void)h0; (void)y; (void)hn; (void)T; (void)B; (void)st; (void)threads;
  throw std::runtime_error("Kiln was built without AMX-BF16");
#endif
}

}  // namespace kiln
