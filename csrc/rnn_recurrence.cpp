// The whole LSTM/GRU recurrence of one layer in C++: per time step one small GEMM
// (h_{t-1} @ W_hh^T) fused with the gate nonlinearities, with no Python between steps.
//
// W_hh is prepacked once: for each block of 16 hidden units, a K x (16*G) panel holding
// the G gates of those units side by side, so one register tile (R batch rows x G
// vectors) accumulates every gate of 16 units and the cell finishes them in registers —
// the gate pre-activations never touch memory.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <omp.h>
#include <sched.h>

#include "kiln.h"
#include "simd_math.h"

namespace kiln {

#ifdef __AVX512F__
namespace {

constexpr int kBlock = 16;

// The accumulators must live in registers: force inlining and full unrolling of the
// R x G tile (without it GCC keeps acc[][] on the stack).
#define KILN_INLINE inline __attribute__((always_inline))

template <int G, int R>
KILN_INLINE void tile_gemm(const float* h, int64_t h_stride, const float* panel, int64_t K, __m512 (&acc)[R][G]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[G];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) w[g] = _mm512_loadu_ps(panel + k * (G * kBlock) + g * kBlock);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(h[r * h_stride + k]);
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) acc[r][g] = _mm512_fmadd_ps(a, w[g], acc[r][g]);
    }
  }
}

// LSTM: rows [b0, b0+R), hidden units [j0, j0+16) of step t.
// Row b of gx_t / h_prev / h_out is at b * gx_b / h_b / y_b.
template <int R>
KILN_INLINE void lstm_tile(const float* gx_t, int64_t gx_b, const float* h_prev, int64_t h_b, const float* panel,
                           float* h_out, int64_t y_b, float* c, int64_t H, int64_t b0, int64_t j0) {
  __m512 acc[R][4];
  tile_gemm<4, R>(h_prev + b0 * h_b, h_b, panel, H, acc);
  const __mmask16 m = tail_mask(H - j0);
  for (int r = 0; r < R; ++r) {
    const float* x = gx_t + (b0 + r) * gx_b + j0;
    const __m512 i = sigmoid16(_mm512_add_ps(acc[r][0], _mm512_maskz_loadu_ps(m, x)));
    const __m512 f = sigmoid16(_mm512_add_ps(acc[r][1], _mm512_maskz_loadu_ps(m, x + H)));
    const __m512 g = tanh16(_mm512_add_ps(acc[r][2], _mm512_maskz_loadu_ps(m, x + 2 * H)));
    const __m512 o = sigmoid16(_mm512_add_ps(acc[r][3], _mm512_maskz_loadu_ps(m, x + 3 * H)));
    float* cr = c + (b0 + r) * H + j0;
    const __m512 cn = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, cr), _mm512_mul_ps(i, g));
    _mm512_mask_storeu_ps(cr, m, cn);
    _mm512_mask_storeu_ps(h_out + (b0 + r) * y_b + j0, m, _mm512_mul_ps(o, tanh16(cn)));
  }
}

template <int R>
KILN_INLINE void gru_tile(const float* gx_t, int64_t gx_b, const float* h_prev, int64_t h_b, const float* panel,
                          const float* b_hh, float* h_out, int64_t y_b, int64_t H, int64_t b0, int64_t j0) {
  __m512 acc[R][3];
  tile_gemm<3, R>(h_prev + b0 * h_b, h_b, panel, H, acc);
  const __mmask16 m = tail_mask(H - j0);
  const __m512 br = _mm512_maskz_loadu_ps(m, b_hh + j0);
  const __m512 bz = _mm512_maskz_loadu_ps(m, b_hh + H + j0);
  const __m512 bn = _mm512_maskz_loadu_ps(m, b_hh + 2 * H + j0);
  for (int r = 0; r < R; ++r) {
    const float* x = gx_t + (b0 + r) * gx_b + j0;
    const __m512 rr = sigmoid16(_mm512_add_ps(_mm512_add_ps(acc[r][0], br), _mm512_maskz_loadu_ps(m, x)));
    const __m512 z = sigmoid16(_mm512_add_ps(_mm512_add_ps(acc[r][1], bz), _mm512_maskz_loadu_ps(m, x + H)));
    const __m512 n = tanh16(_mm512_fmadd_ps(rr, _mm512_add_ps(acc[r][2], bn), _mm512_maskz_loadu_ps(m, x + 2 * H)));
    const __m512 hp = _mm512_maskz_loadu_ps(m, h_prev + (b0 + r) * h_b + j0);
    _mm512_mask_storeu_ps(h_out + (b0 + r) * y_b + j0, m, _mm512_fmadd_ps(z, _mm512_sub_ps(hp, n), n));
  }
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

// A sense-reversing spin barrier: the steps are tens of microseconds, far too short for
// a condition variable.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n), waiting_(0), sense_(false) {}
  void wait() {
    const bool my = !sense_.load(std::memory_order_relaxed);
    if (waiting_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      waiting_.store(0, std::memory_order_relaxed);
      sense_.store(my, std::memory_order_release);
    } else {
      // spin (a step is tens of microseconds), but yield now and then so an oversubscribed
      // machine still makes progress
      for (int spins = 1; sense_.load(std::memory_order_acquire) != my; ++spins) {
        _mm_pause();
        if ((spins & 1023) == 0) sched_yield();
      }
    }
  }

 private:
  const int n_;
  std::atomic<int> waiting_;
  std::atomic<bool> sense_;
};

// Runs step(t, block_begin, block_end) for t = 0..T-1 over `blocks` hidden blocks split
// between `threads` threads, with a barrier after every step (step t+1 reads all of h_t).
// The threads are OpenMP's: kiln._C links libgomp.so.1, which is the very runtime torch has
// already loaded, so these are torch's intra-op workers. Threads of our own would compete
// for the cores with torch's workers, which spin for a while after every parallel torch op
// (such as the input projection that runs just before the recurrence).
template <typename Step>
void run_steps(int64_t T, int64_t blocks, int threads, Step&& step) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
  if (threads == 1) {
    for (int64_t t = 0; t < T; ++t) step(t, 0, blocks);
    return;
  }
  SpinBarrier barrier(threads);
#pragma omp parallel num_threads(threads)
  {
    const int n = omp_get_num_threads();  // the runtime may grant fewer than asked
    const int id = omp_get_thread_num();
    if (n == threads) {
      const int64_t lo = blocks * id / threads, hi = blocks * (id + 1) / threads;
      for (int64_t t = 0; t < T; ++t) {
        step(t, lo, hi);
        barrier.wait();
      }
    } else if (id == 0) {
      for (int64_t t = 0; t < T; ++t) step(t, 0, blocks);
    }
  }
}

}  // namespace
#endif

std::vector<float> pack_recurrent_weight(const float* w_hh, int64_t gates, int64_t H) {
  // panel[jb][k][g*16 + u] = w_hh[(g*H + jb*16 + u) * H + k], zero past H
  const int64_t blocks = (H + 15) / 16;
  std::vector<float> packed(static_cast<size_t>(blocks * H * gates * 16), 0.0f);
  for (int64_t jb = 0; jb < blocks; ++jb)
    for (int64_t k = 0; k < H; ++k)
      for (int64_t g = 0; g < gates; ++g)
        for (int64_t u = 0; u < 16; ++u) {
          const int64_t j = jb * 16 + u;
          if (j < H) packed[((jb * H + k) * gates + g) * 16 + u] = w_hh[(g * H + j) * H + k];
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
// The layer loop both cells share: step t reads h_{t-1} (h0 first), and each thread runs
// `tile(R, gx_t, h_prev, h_b, panel, h_out, b0, j0)` over its hidden blocks and all row tiles.
template <int G, typename Tile>
void run_layer(const float* gx, const float* packed, const float* h0, float* y, float* hn, int64_t T, int64_t B,
               int64_t H, SeqStrides st, int threads, Tile&& tile) {
  const int64_t blocks = (H + 15) / 16;
  run_steps(T, blocks, threads, [&](int64_t t, int64_t lo, int64_t hi) {
    const float* h_prev = t == 0 ? h0 : y + (t - 1) * st.y_t;
    const int64_t h_b = t == 0 ? H : st.y_b;
    const float* gx_t = gx + t * st.gx_t;
    float* h_out = y + t * st.y_t;
    for (int64_t jb = lo; jb < hi; ++jb) {
      const float* panel = packed + jb * H * G * kBlock;
      for_row_tiles(B, [&](auto R, int64_t b0) { tile(R, gx_t, h_prev, h_b, panel, h_out, b0, jb * 16); });
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    const float* last = T > 0 ? y + (T - 1) * st.y_t + b * st.y_b : h0 + b * H;
    std::memcpy(hn + b * H, last, sizeof(float) * H);
  }
}
}  // namespace
#endif

void lstm_recurrence(const float* gx, const float* packed, const float* h0, const float* c0, float* y, float* hn,
                     float* cn, int64_t T, int64_t B, int64_t H, SeqStrides st, int threads) {
#ifdef __AVX512F__
  std::memcpy(cn, c0, sizeof(float) * B * H);  // cn is the running cell state
  run_layer<4>(gx, packed, h0, y, hn, T, B, H, st, threads,
               [&](auto R, const float* gx_t, const float* h_prev, int64_t h_b, const float* panel, float* h_out,
                   int64_t b0, int64_t j0) {
                 lstm_tile<decltype(R)::value>(gx_t, st.gx_b, h_prev, h_b, panel, h_out, st.y_b, cn, H, b0, j0);
               });
#else
  (void)gx; (void)packed; (void)h0; (void)c0; (void)y; (void)hn; (void)cn; (void)T; (void)B; (void)H; (void)st;
  (void)threads;
  throw std::runtime_error("lstm_recurrence needs AVX-512");
#endif
}

void gru_recurrence(const float* gx, const float* packed, const float* b_hh, const float* h0, float* y, float* hn,
                    int64_t T, int64_t B, int64_t H, SeqStrides st, int threads) {
#ifdef __AVX512F__
  run_layer<3>(gx, packed, h0, y, hn, T, B, H, st, threads,
               [&](auto R, const float* gx_t, const float* h_prev, int64_t h_b, const float* panel, float* h_out,
                   int64_t b0, int64_t j0) {
                 gru_tile<decltype(R)::value>(gx_t, st.gx_b, h_prev, h_b, panel, b_hh, h_out, st.y_b, H, b0, j0);
               });
#else
  (void)gx; (void)packed; (void)b_hh; (void)h0; (void)y; (void)hn; (void)T; (void)B; (void)H; (void)st;
  (void)threads;
  throw std::runtime_error("gru_recurrence needs AVX-512");
#endif
}

}  // namespace kiln
