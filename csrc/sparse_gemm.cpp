// Sparse weight x dense activation GEMM (AVX-512): y = act(x @ W^T + bias + residual) with
// W [N, K] stored block-sparse (BSR, blocks of bh x bw; CSR is the bh = bw = 1 case).
//
// Why the transposed formulation: every nonzero W[n, k] multiplies the whole activation
// column x[:, k]. With the activations transposed (xT [K, M], a row per input feature)
// that column is a contiguous row, so one nonzero is one broadcast plus M/16 FMAs into a
// register tile of output rows, vectorized over the tokens M, with no gathers. Blocks of
// bh rows reuse each loaded activation row bh times (the register tile is bh x V vectors).
// Convolutions already are in this form (im2col gives [C*kh*kw, H*W] per image, the
// output is [Co, H*W]); linear layers transpose x in and the result out, applying the
// epilogue in the transposing pass.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kiln.h"
#include "thread_pool.h"
#include "simd_math.h"

namespace kiln {

#ifdef __AVX512F__
namespace {

#define KILN_INLINE inline __attribute__((always_inline))
#define KILN_INLINE_LAMBDA __attribute__((always_inline))

KILN_INLINE __m512 activate(__m512 v, int act) {
  switch (act) {
    case kActRelu: return _mm512_max_ps(v, _mm512_setzero_ps());
    case kActSigmoid: return sigmoid16(v);
    case kActTanh: return tanh16(v);
    case kActSilu: return _mm512_mul_ps(v, sigmoid16(v));
    case kActGeluTanh: {  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
      const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
      const __m512 in = _mm512_mul_ps(_mm512_set1_ps(0.7978845608f), _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715f), v));
      return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.0f), tanh16(in)));
    }
    case kActGelu:  // 0.5 x (1 + erf(x / sqrt 2))
      return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v),
                           _mm512_add_ps(_mm512_set1_ps(1.0f), erf16(_mm512_mul_ps(v, _mm512_set1_ps(0.7071067812f)))));
    default: return v;
  }
}

KILN_INLINE __mmask16 mask_of(int64_t remaining) {
  return remaining <= 0 ? static_cast<__mmask16>(0) : tail_mask(remaining);
}

// Runs f(id, threads) on `threads` threads (the caller is thread 0), on the OpenMP workers
// torch already runs (see thread_pool.h: threads of our own would compete with them).
template <typename F>
void parallel(int threads, F&& f) {
  if (threads <= 1) {
    f(0, 1);
    return;
  }
  parallel_run(threads, [&](int id) { f(id, threads); });
}

// Floats of xT one K chunk may span (1 MiB): half of a Sapphire Rapids core's L2.
constexpr int64_t kChunkFloats = int64_t{1} << 18;

// One block row (R output rows) x one tile of V*16 tokens starting at m0, over the nonzero
// blocks [b0, b1) of that row. `accumulate` adds to what yT holds (an earlier K chunk);
// `finish` applies the epilogue (the last K chunk).
template <int R, int V, bool kMasked, int BW>
KILN_INLINE void block_row_tile(const SparseWeight& w, int64_t br, int32_t b0, int32_t b1, const float* xT, int64_t M,
                                int64_t m0, bool accumulate, bool finish, const float* bias, const float* res, int act,
                                float* yT) {
  __m512 acc[R][V];
  __mmask16 mk[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) mk[v] = kMasked ? mask_of(M - m0 - 16 * v) : static_cast<__mmask16>(0xFFFF);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t n = std::min<int64_t>(br * R + r, w.N - 1);  // rows past N: padding, never stored
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mk[v], yT + n * M + m0 + 16 * v) : _mm512_setzero_ps();
  }
  const int bw = BW > 0 ? BW : w.bw;  // BW: the block width when known at compile time (loop unrolled)
  for (int32_t b = b0; b < b1; ++b) {
    const int64_t k0 = static_cast<int64_t>(w.col[b]) * bw;
    const float* vb = w.values + static_cast<int64_t>(b) * R * bw;
    auto column = [&](int j) KILN_INLINE_LAMBDA {
      const float* xr = xT + (k0 + j) * M + m0;
      __m512 xv[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) xv[v] = kMasked ? _mm512_maskz_loadu_ps(mk[v], xr + 16 * v) : _mm512_loadu_ps(xr + 16 * v);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 wv = _mm512_set1_ps(vb[r * bw + j]);
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
      }
    };
    if (BW > 0 && k0 + BW <= w.K) {
#pragma GCC unroll 8
      for (int j = 0; j < BW; ++j) column(j);
    } else {  // a block past the last column of K (or a width not known at compile time)
      const int jn = static_cast<int>(std::min<int64_t>(bw, w.K - k0));
      for (int j = 0; j < jn; ++j) column(j);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t n = br * R + r;
    if (n >= w.N) break;
    const __m512 bv = _mm512_set1_ps(bias && finish ? bias[n] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      __m512 a = acc[r][v];
      if (finish) {
        a = _mm512_add_ps(a, bv);
        if (res) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(mk[v], res + n * M + m0 + 16 * v));
        a = activate(a, act);
      }
      _mm512_mask_storeu_ps(yT + n * M + m0 + 16 * v, mk[v], a);
    }
  }
}

// Block rows [br0, br1). K is cut into chunks whose slice of xT (chunk x M floats) stays in
// L2: unstructured rows touch columns all over K, and streaming all of xT from L3 for
// every row made the kernel bandwidth-bound. Columns are sorted within a row, so a
// per-row cursor walks each row's blocks chunk by chunk.
template <int R, int V, int BW>
void block_rows(const SparseWeight& w, int64_t br0, int64_t br1, const float* xT, int64_t M, const float* bias,
                const float* res, int act, float* yT) {
  constexpr int64_t tile = 16 * V;
  const int64_t bw = w.bw;
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkFloats / std::max<int64_t>(M, 1) / bw);
  const int64_t bcols = (w.K + bw - 1) / bw;
  std::vector<int32_t> cursor(w.row_ptr + br0, w.row_ptr + br1);
  for (int64_t c0 = 0; c0 < std::max<int64_t>(bcols, 1); c0 += chunk_blocks) {
    const int64_t c1 = std::min(bcols, c0 + chunk_blocks);
    const bool accumulate = c0 > 0, finish = c1 >= bcols;
    for (int64_t br = br0; br < br1; ++br) {
      const int32_t b0 = cursor[br - br0];
      int32_t b1 = b0;
      while (b1 < w.row_ptr[br + 1] && w.col[b1] < c1) ++b1;
      cursor[br - br0] = b1;
      int64_t m0 = 0;
      for (; m0 + tile <= M; m0 += tile)
        block_row_tile<R, V, false, BW>(w, br, b0, b1, xT, M, m0, accumulate, finish, bias, res, act, yT);
      if (m0 < M) block_row_tile<R, V, true, BW>(w, br, b0, b1, xT, M, m0, accumulate, finish, bias, res, act, yT);
    }
  }
}

// The register tile is R rows x V vectors of 16 tokens: V as wide as M allows (masked
// lanes past M are wasted FMAs), at most 32 accumulators in all.
template <int R, int Vmax, int BW>
void dispatch_v(const SparseWeight& w, int64_t br0, int64_t br1, const float* xT, int64_t M, const float* bias,
                const float* res, int act, float* yT) {
  if constexpr (Vmax > 1) {
    if (M <= 16 * (Vmax / 2)) return dispatch_v<R, Vmax / 2, BW>(w, br0, br1, xT, M, bias, res, act, yT);
  }
  block_rows<R, Vmax, BW>(w, br0, br1, xT, M, bias, res, act, yT);
}

template <int R, int Vmax>
void dispatch_bw(const SparseWeight& w, int64_t br0, int64_t br1, const float* xT, int64_t M, const float* bias,
                 const float* res, int act, float* yT) {
  switch (w.bw) {
    case 1: return dispatch_v<R, Vmax, 1>(w, br0, br1, xT, M, bias, res, act, yT);
    case 4: return dispatch_v<R, Vmax, 4>(w, br0, br1, xT, M, bias, res, act, yT);
    default: return dispatch_v<R, Vmax, 0>(w, br0, br1, xT, M, bias, res, act, yT);
  }
}

void dispatch_rows(const SparseWeight& w, int64_t br0, int64_t br1, const float* xT, int64_t M, const float* bias,
                   const float* res, int act, float* yT) {
  switch (w.bh) {
    case 1: return dispatch_bw<1, 8>(w, br0, br1, xT, M, bias, res, act, yT);
    case 2: return dispatch_bw<2, 8>(w, br0, br1, xT, M, bias, res, act, yT);
    case 4: return dispatch_bw<4, 4>(w, br0, br1, xT, M, bias, res, act, yT);
    case 8: return dispatch_bw<8, 2>(w, br0, br1, xT, M, bias, res, act, yT);
    case 16: return dispatch_bw<16, 1>(w, br0, br1, xT, M, bias, res, act, yT);
    default: throw std::invalid_argument("sparse_gemm: block height must be 1, 2, 4, 8 or 16");
  }
}

// Threads pay off only with enough work to cover starting them (tens of microseconds).
int useful_threads(const SparseWeight& w, int64_t batch, int64_t M, int threads) {
  const int64_t rows = (w.N + w.bh - 1) / w.bh;
  const int64_t macs = static_cast<int64_t>(w.row_ptr[rows]) * w.bh * w.bw * M * batch;
  const int64_t by_work = 1 + macs / (int64_t{1} << 21);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(threads), rows, by_work})));
}

// First block row of thread `id`'s share, balancing nonzero blocks (plus one per row for
// the epilogue) rather than rows: pruned layers are uneven.
int64_t split_point(const SparseWeight& w, int64_t rows, int id, int threads) {
  const int64_t total = w.row_ptr[rows] + rows;
  const int64_t want = total * id / threads;
  int64_t lo = 0, hi = rows;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (w.row_ptr[mid] + mid < want) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// dst [cols, rows] = src [rows, cols]^T for destination rows [c0, c1), in 32 x 32 tiles so
// both sides stay in cache (gathers with a page-sized stride were TLB-bound).
void transpose_rows(const float* src, int64_t rows, int64_t cols, float* dst, int64_t c0, int64_t c1) {
  constexpr int64_t T = 32;
  for (int64_t cb = c0; cb < c1; cb += T)
    for (int64_t rb = 0; rb < rows; rb += T) {
      const int64_t ce = std::min(c1, cb + T), re = std::min(rows, rb + T);
      for (int64_t c = cb; c < ce; ++c)
        for (int64_t r = rb; r < re; ++r) dst[c * rows + r] = src[r * cols + c];
    }
}


}  // namespace

bool sparse_gemm_supported() { return true; }

void sparse_gemm_t(const SparseWeight& w, const float* xT, int64_t batch, int64_t M, const float* bias,
                   const float* residual, int act, float* yT, int threads) {
  const int64_t rows = (w.N + w.bh - 1) / w.bh;
  threads = useful_threads(w, batch, M, threads);
  parallel(threads, [&](int id, int nt) {
    const int64_t r0 = split_point(w, rows, id, nt), r1 = split_point(w, rows, id + 1, nt);
    for (int64_t b = 0; b < batch; ++b)
      dispatch_rows(w, r0, r1, xT + b * w.K * M, M, bias, residual ? residual + b * w.N * M : nullptr, act,
                    yT + b * w.N * M);
  });
}

void sparse_linear(const SparseWeight& w, const float* x, int64_t M, const float* bias, const float* residual,
                   int act, float* y, int threads) {
  const int64_t N = w.N, K = w.K;
  std::vector<float> xT(static_cast<size_t>(K * M)), yT(static_cast<size_t>(N * M));
  threads = useful_threads(w, 1, M, threads);
  parallel(std::min<int64_t>(threads, K), [&](int id, int nt) {
    transpose_rows(x, M, K, xT.data(), K * id / nt, K * (id + 1) / nt);
  });
  // without a residual the activation runs in the GEMM's registers; with one it must wait
  // for the residual, which arrives in y's layout: then it runs in the transposing pass
  sparse_gemm_t(w, xT.data(), 1, M, bias, nullptr, residual ? kActNone : act, yT.data(), threads);
  parallel(std::min<int64_t>(threads, M), [&](int id, int nt) {
    const int64_t m0 = M * id / nt, m1 = M * (id + 1) / nt;
    transpose_rows(yT.data(), N, M, y, m0, m1);
    if (residual)
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; n += 16) {
          const __mmask16 mk = mask_of(N - n);
          __m512 a = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, y + m * N + n), _mm512_maskz_loadu_ps(mk, residual + m * N + n));
          _mm512_mask_storeu_ps(y + m * N + n, mk, activate(a, act));
        }
  });
}

#else  // no AVX-512: the Python side checks sparse_gemm_supported() and never calls these

bool sparse_gemm_supported() { return false; }
void sparse_gemm_t(const SparseWeight&, const float*, int64_t, int64_t, const float*, const float*, int, float*, int) {
  throw std::runtime_error("sparse_gemm needs AVX-512");
}
void sparse_linear(const SparseWeight&, const float*, int64_t, const float*, const float*, int, float*, int) {
  throw std::runtime_error("sparse_gemm needs AVX-512");
}

#endif

}  // namespace kiln
