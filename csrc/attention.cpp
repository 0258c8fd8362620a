// Fused scaled-dot-product attention, O = softmax(Q K^T * scale + mask) V, for fp32 or bf16
// Q/K/V/O in any [B, H, S, D] strides with unit stride along D.
//
// Why a kernel of Kiln's own: in a Transformer block Q, K and V are strided views of one
// QKV projection, and the heads are merged right after; torch's sdpa runs three passes
// over them at these sizes (BERT-base: 128 x 128 scores per head, D = 64), well below one
// core's FMA rate (`kiln bench kernels --op attention` times both and gives the fraction of
// the roofline). Here each task takes one (batch, head, block of query
// rows), widens its K^T and V into fp32 scratch once, and keeps the score block in L1/L2:
//   scores = (scale Q) K^T   register-blocked 4 rows x 64 keys, broadcast-FMA over D
//   P      = exp(scores + mask - rowmax)   (masked and causal-hidden keys give exactly 0)
//   O      = (P V) / rowsum                4 rows x 64 of D per register block
// All arithmetic is fp32; bf16 inputs are widened exactly and O is rounded to nearest even.
// bf16 on a CPU with AMX-BF16 takes the tile path instead (attend_block_amx): the two
// products run as tdpbf16ps (bf16 products, fp32 sums) over K and V packed in the tiles'
// pair-interleaved layout, P is rounded to bf16 for the second product (as torch's bf16 sdpa
// does), the softmax stays fp32. Without AMX but with AVX512-BF16, the same arithmetic on the
// same packing runs as vdpbf16ps in registers (attend_block_dot).
// Rows whose keys are all masked give 0 (as torch's sdpa does); NaN inputs give NaN rows.
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "amx_tiles.h"
#include "kiln.h"
#include "simd_math.h"
#include "thread_pool.h"

namespace kiln {

#ifdef __AVX512F__
namespace {

constexpr int64_t kRows = 4;  // query rows per register block
// A task's score block stays under this many floats (256 KB: L2-resident beside K^T and V).
constexpr int64_t kMaxScores = 64 * 1024;
// Per-thread scratch is kept between calls up to this many K^T/V elements (4 MB of fp32),
// and freed after a call that needed more.
constexpr size_t kKeepScratch = 1 << 20;

inline __m512 load16(const void* base, int64_t i, bool bf16, __mmask16 m) {
  if (bf16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
}

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
inline __m256i to_bf16(__m512 x) {
#ifdef __AVX512BF16__
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));  // one instruction, same rounding
#else
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
#endif
}

inline void store16(void* base, int64_t i, bool bf16, __mmask16 m, __m512 x) {
  if (bf16)
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, m, to_bf16(x));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(base) + i, m, x);
}

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// exp(t) for t = score - row max <= 0, as 0 below -80: exp(-80) = 1.8e-35, so what is dropped
// is far under fp32 resolution next to the row's largest term (exp(0) = 1), and no
// denormal ever reaches the sums or the P V products (denormal operands take microcode
// assists, which with wide score ranges dominated the kernel's time). Masked keys (t = -inf)
// give exactly 0; NaN stays NaN (the comparison is unordered-true).
inline __m512 softmax_numerator(__m512 t) {
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-80.f), _CMP_NLT_UQ);
  return _mm512_maskz_mov_ps(keep, exp16(_mm512_max_ps(_mm512_set1_ps(-80.f), t)));
}

// out[r][c] = sum_k a[r * lda + k] * b[k * ldb + 16 c .. +16): kRows rows x NV vectors, the
// sums kept in registers (broadcast one a element, FMA it into NV vectors of b's row k).
// Scores are (scaled q) x K^T with k over D; the output is P x V with k over the keys.
template <int NV>
inline void fma_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, __m512 (*out)[4]) {
  __m512 acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NV];
    for (int c = 0; c < NV; ++c) bv[c] = _mm512_loadu_ps(b + k * ldb + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      const __m512 ab = _mm512_set1_ps(a[r * lda + k]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(ab, bv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) out[r][c] = acc[r][c];
}

inline void fma_block_n(int nv, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, __m512 (*out)[4]) {
  switch (nv) {
    case 4: fma_block<4>(a, lda, b, ldb, K, out); break;
    case 3: fma_block<3>(a, lda, b, ldb, K, out); break;
    case 2: fma_block<2>(a, lda, b, ldb, K, out); break;
    default: fma_block<1>(a, lda, b, ldb, K, out); break;
  }
}

// The softmax of R score rows (row0 .. row0 + R - 1, rows ld floats apart), R <= 4 at a
// time: each row's chains (max, then exp and sum) are serial, and one row of 128 keys is too
// short for the core to overlap it with the next, so R rows are interleaved instead (a
// small gain for the whole attention at BERT's shapes: the products and the packing weigh
// more than the softmax). First pass: scale, add
// the mask, set keys the row may not see (causal, padding) to -inf, written back, row max.
// Second pass: the numerators go to store(i, j, p), 16 keys at a time, and inv[i] = 1 / their
// sum; a row that sees no key stores zeros and gets inv 0.
template <int R, typename Store>
inline void softmax_rows(const AttentionArgs& a, int64_t b, int64_t h, int64_t row0, float* s, int64_t ld,
                         int64_t Skp, const int64_t* visible, __m512 scale, Store store, float* inv) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const float* mrow[R];
  __m512 mx[R];
  for (int i = 0; i < R; ++i) {
    mrow[i] = a.mask ? a.mask + b * a.mask_stride[0] + h * a.mask_stride[1] + (row0 + i) * a.mask_stride[2] : nullptr;
    mx[i] = ninf;
  }
  for (int64_t j = 0; j < Skp; j += 16)
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __mmask16 live = tail_mask(visible[i] - j > 0 ? visible[i] - j : 0);
      __m512 x = _mm512_mask_mov_ps(ninf, live, _mm512_mul_ps(scale, _mm512_loadu_ps(s + i * ld + j)));
      if (mrow[i]) {
        const __m512 mv = a.mask_stride[3] ? _mm512_maskz_loadu_ps(live, mrow[i] + j) : _mm512_set1_ps(mrow[i][0]);
        x = _mm512_mask_add_ps(x, live, x, mv);
      }
      _mm512_storeu_ps(s + i * ld + j, x);
      mx[i] = _mm512_max_ps(mx[i], x);
    }
  __m512 mv[R], sum[R];
  bool dead[R];
  for (int i = 0; i < R; ++i) {
    const float m = _mm512_reduce_max_ps(mx[i]);
    dead[i] = m == -std::numeric_limits<float>::infinity();
    mv[i] = _mm512_set1_ps(dead[i] ? 0.f : m);  // a dead row: -inf - 0 gives numerators of 0
    sum[i] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < Skp; j += 16)
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512 p = softmax_numerator(_mm512_sub_ps(_mm512_loadu_ps(s + i * ld + j), mv[i]));
      store(i, j, p);
      sum[i] = _mm512_add_ps(sum[i], p);
    }
  for (int i = 0; i < R; ++i) inv[i] = dead[i] ? 0.f : 1.f / _mm512_reduce_add_ps(sum[i]);
}

// softmax_rows over rows [0, rows) of a block whose first row is row0, four at a time.
template <typename Store>
inline void softmax_block(const AttentionArgs& a, int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t Sk,
                          float* s, int64_t Skp, __m512 scale, Store store, float* inv) {
  int64_t r = 0;
  for (; r < rows; r += 4) {
    int64_t visible[4];
    const int n = static_cast<int>(std::min<int64_t>(4, rows - r));
    for (int i = 0; i < n; ++i) visible[i] = a.causal ? std::min(Sk, row0 + r + i + 1) : Sk;
    auto st = [&store, r](int i, int64_t j, __m512 p) { store(r + i, j, p); };
    if (n == 4) softmax_rows<4>(a, b, h, row0 + r, s + r * Skp, Skp, Skp, visible, scale, st, inv + r);
    else
      for (int i = 0; i < n; ++i)
        softmax_rows<1>(a, b, h, row0 + r + i, s + (r + i) * Skp, Skp, Skp, visible + i, scale,
                        [&st, i](int, int64_t j, __m512 p) { st(i, j, p); }, inv + r + i);
  }
}

// The rows of Q, K and V the thread's next task reads, fetched into L2 while this task packs
// its own. In a Transformer block Q, K and V were written by the QKV projection, whose
// weights have streamed through L2 since: they come from L3, one head's slice of each row at
// a time, a strided pattern the hardware prefetchers do not follow, so without this every
// task's packing waits on L3 latency row by row.
struct NextRows {
  const char* q = nullptr;  // the next task's first Q row (nullptr: no next task)
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t q_rows = 0, kv_rows = 0;
  int64_t q_ld = 0, k_ld = 0, v_ld = 0;  // bytes between rows
  int64_t row_bytes = 0;                 // one head's slice of a row

  void q_row(int64_t r) const {
    if (q != nullptr && r < q_rows) fetch(q + r * q_ld);
  }
  void kv_row(int64_t j) const {
    if (k != nullptr && j < kv_rows) {
      fetch(k + j * k_ld);
      fetch(v + j * v_ld);
    }
  }
  void all() const {
    for (int64_t r = 0; r < q_rows; ++r) q_row(r);
    for (int64_t j = 0; j < kv_rows; ++j) kv_row(j);
  }

 private:
  void fetch(const char* row) const {
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(row + o, _MM_HINT_T1);
  }
};

NextRows next_rows(const AttentionArgs& a, int64_t task, int64_t blocks, int64_t rows) {
  NextRows n;
  const int64_t es = a.bf16 ? 2 : 4;
  const int64_t blk = task % blocks, bh = task / blocks, b = bh / a.H, h = bh % a.H;
  const int64_t r0 = blk * rows, r1 = std::min(a.Sq, r0 + rows);
  n.q = static_cast<const char*>(a.q) + (b * a.q_stride[0] + h * a.q_stride[1] + r0 * a.q_stride[2]) * es;
  n.k = static_cast<const char*>(a.k) + (b * a.k_stride[0] + h * a.k_stride[1]) * es;
  n.v = static_cast<const char*>(a.v) + (b * a.v_stride[0] + h * a.v_stride[1]) * es;
  n.q_rows = r1 - r0;
  n.kv_rows = a.causal ? std::min(a.Sk, r1) : a.Sk;
  n.q_ld = a.q_stride[2] * es;
  n.k_ld = a.k_stride[2] * es;
  n.v_ld = a.v_stride[2] * es;
  n.row_bytes = a.D * es;
  return n;
}

struct Scratch {
  std::vector<float> kt, v, q, s, inv;
  size_t held() const { return kt.capacity() + v.capacity(); }  // the K^T and V elements kept
};

void attend_block(const AttentionArgs& a, int64_t b, int64_t h, int64_t r0, int64_t r1, Scratch& w,
                  const NextRows& next) {
  const int64_t D = a.D, Dp = round16(D);
  // keys a causal block can see: j <= row, so up to r1 - 1
  const int64_t Sk = a.causal ? std::min(a.Sk, r1) : a.Sk;
  const int64_t Skp = round16(Sk);
  const int64_t rows = r1 - r0, rows_p = (rows + kRows - 1) / kRows * kRows;
  // every element of kt, v and q's real rows is written below; only q's padding rows are zeroed
  w.kt.resize(D * Skp);
  w.v.resize(Sk * Dp);
  w.q.resize(rows_p * D);
  std::fill(w.q.begin() + rows * D, w.q.end(), 0.f);
  w.s.resize(rows_p * Skp);
  w.inv.resize(rows_p);
  const bool bf = a.bf16;
  const __mmask16 dtail = tail_mask(D - (Dp - 16));

  // V widened to fp32; K^T through 16 x 16 register transposes (K's rows are contiguous in D)
  const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
  const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
  for (int64_t j = 0; j < Sk; ++j) {
    next.kv_row(j);
    for (int64_t d0 = 0; d0 < D; d0 += 16)
      _mm512_storeu_ps(w.v.data() + j * Dp + d0, load16(a.v, vbase + j * a.v_stride[2] + d0, bf, tail_mask(D - d0)));
  }
  for (int64_t j = Sk; j < next.kv_rows; ++j) next.kv_row(j);
  for (int64_t j0 = 0; j0 < Sk; j0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512 r[16];
      const __mmask16 m = tail_mask(D - d0);
      for (int64_t i = 0; i < 16; ++i)
        r[i] = j0 + i < Sk ? load16(a.k, kbase + (j0 + i) * a.k_stride[2] + d0, bf, m) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t i = 0; i < 16 && d0 + i < D; ++i) _mm512_storeu_ps(w.kt.data() + (d0 + i) * Skp + j0, r[i]);
    }
  const __m512 scale = _mm512_set1_ps(a.scale);
  const int64_t qbase = b * a.q_stride[0] + h * a.q_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    next.q_row(r);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 m = tail_mask(D - d0);
      _mm512_mask_storeu_ps(w.q.data() + r * D + d0, m,
                            _mm512_mul_ps(scale, load16(a.q, qbase + (r0 + r) * a.q_stride[2] + d0, bf, m)));
    }
  }
  for (int64_t r = rows; r < next.q_rows; ++r) next.q_row(r);

  // scores, 64 keys per block
  for (int64_t r = 0; r < rows_p; r += kRows)
    for (int64_t j = 0; j < Skp; j += 64) {
      const int nv = static_cast<int>(std::min<int64_t>(4, (Skp - j) / 16));
      __m512 acc[kRows][4];
      fma_block_n(nv, &w.q[r * D], D, &w.kt[j], Skp, D, acc);
      for (int i = 0; i < kRows; ++i)
        for (int c = 0; c < nv; ++c) _mm512_storeu_ps(&w.s[(r + i) * Skp + j + 16 * c], acc[i][c]);
    }

  // softmax numerators in place; 1 / row sums (0 for a row with every key masked)
  const __m512 one = _mm512_set1_ps(1.f);  // the scale is already in q
  float* sc = w.s.data();
  softmax_block(a, b, h, r0, rows, Sk, sc, Skp, one,
                [sc, Skp](int64_t r, int64_t j, __m512 p) { _mm512_storeu_ps(sc + r * Skp + j, p); }, w.inv.data());
  for (int64_t r = rows; r < rows_p; ++r) {
    std::fill(&w.s[r * Skp], &w.s[r * Skp] + Skp, 0.f);
    w.inv[r] = 0.f;
  }

  // O = P V / rowsum, written straight into the output's strides
  const int64_t obase = b * a.o_stride[0] + h * a.o_stride[1];
  for (int64_t r = 0; r < rows_p; r += kRows) {
    for (int64_t d0 = 0; d0 < Dp; d0 += 64) {
      const int nv = static_cast<int>(std::min<int64_t>(4, (Dp - d0) / 16));
      __m512 acc[kRows][4];
      fma_block_n(nv, &w.s[r * Skp], Skp, &w.v[d0], Dp, Sk, acc);
      for (int64_t i = 0; i < kRows && r + i < rows; ++i) {
        const __m512 inv = _mm512_set1_ps(w.inv[r + i]);
        const int64_t oo = obase + (r0 + r + i) * a.o_stride[2];
        for (int c = 0; c < nv; ++c) {
          const int64_t d = d0 + 16 * c;
          store16(a.o, oo + d, bf, d + 16 >= Dp ? dtail : static_cast<__mmask16>(0xFFFF),
                  _mm512_mul_ps(acc[i][c], inv));
        }
      }
    }
  }
}


// ---- bf16 products over pairs (AMX tiles, or AVX512-BF16 dot products): both read Q as bf16 rows, K^T
// and V in the pair-interleaved layout (one 32-bit lane = two consecutive elements of the sum) and P
// rounded to bf16; the sums are fp32.
#if (defined(__AMX_BF16__) && defined(__AMX_TILE__)) || defined(__AVX512BF16__)
inline int64_t round32(int64_t n) { return (n + 31) / 32 * 32; }

struct PairScratch {
  std::vector<uint16_t> q, kv, vv, p;
  std::vector<float> s, inv;
  alignas(64) float c[16 * 64];
  size_t held() const { return kv.capacity() + vv.capacity(); }  // the K^T and V pairs kept
};

// The task's operands in pairs: q [rows_p x Dk] bf16 (zero-padded to Dk columns and rows_p rows),
// kv [Dk / 2][Skp] pairs (kv[kk][n] = K[n][2kk, 2kk+1]), vv [Skp / 2][Dn] pairs
// (vv[kk][d] = V[2kk][d], V[2kk+1][d]); every pair past the real rows and columns is zero. The
// scores (s), P (p) and 1 / row sums (inv) are sized for rows_p rows.
void pack_pairs(const AttentionArgs& a, int64_t b, int64_t h, int64_t r0, int64_t rows, int64_t rows_p, int64_t Sk,
                PairScratch& w, const NextRows& next) {
  const int64_t D = a.D, Dk = round32(D), Dn = round16(D), Skp = round32(Sk);
  const uint16_t* q = static_cast<const uint16_t*>(a.q);
  const uint16_t* k = static_cast<const uint16_t*>(a.k);
  const uint16_t* v = static_cast<const uint16_t*>(a.v);
  w.q.assign(rows_p * Dk, 0);
  w.kv.resize(Dk / 2 * Skp * 2);
  w.vv.resize(Skp / 2 * Dn * 2);
  w.p.resize(rows_p * Skp);
  w.s.resize(rows_p * Skp);
  w.inv.resize(rows_p);

  // Q rows, zero-padded to Dk columns and rows_p rows
  const int64_t qbase = b * a.q_stride[0] + h * a.q_stride[1];
  for (int64_t r = 0; r < rows; ++r) {
    next.q_row(r);
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const __mmask32 m = D - d0 >= 32 ? 0xFFFFFFFFu : (1u << (D - d0)) - 1;
      _mm512_mask_storeu_epi16(&w.q[r * Dk + d0], m,
                               _mm512_maskz_loadu_epi16(m, q + qbase + (r0 + r) * a.q_stride[2] + d0));
    }
  }
  for (int64_t r = rows; r < next.q_rows; ++r) next.q_row(r);
  // K^T in pairs: a 16 x 16 transpose of pairs
  const int64_t kbase = b * a.k_stride[0] + h * a.k_stride[1];
  uint32_t* kv32 = reinterpret_cast<uint32_t*>(w.kv.data());
  for (int64_t j0 = 0; j0 < Skp; j0 += 16)
    for (int64_t d0 = 0; d0 < Dk; d0 += 32) {
      if (d0 == 0)
        for (int64_t i = j0; i < j0 + 16; ++i) next.kv_row(i);
      __m512 r[16];
      const __mmask32 m = D - d0 >= 32 ? 0xFFFFFFFFu : D > d0 ? (1u << (D - d0)) - 1 : 0u;
      for (int64_t i = 0; i < 16; ++i)
        r[i] = j0 + i < Sk ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, k + kbase + (j0 + i) * a.k_stride[2] + d0))
                           : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(kv32 + (d0 / 2 + i) * Skp + j0), r[i]);
    }
  // V in pairs, rows past Sk zero
  const int64_t vbase = b * a.v_stride[0] + h * a.v_stride[1];
  uint32_t* vv32 = reinterpret_cast<uint32_t*>(w.vv.data());
  for (int64_t kk = 0; kk < Skp / 2; ++kk) {
    for (int64_t d0 = 0; d0 < Dn; d0 += 16) {
      const __mmask16 m = tail_mask(D - d0);
      const int64_t j = 2 * kk;
      const __m256i lo = j < Sk ? _mm256_maskz_loadu_epi16(m, v + vbase + j * a.v_stride[2] + d0) : _mm256_setzero_si256();
      const __m256i hi = j + 1 < Sk ? _mm256_maskz_loadu_epi16(m, v + vbase + (j + 1) * a.v_stride[2] + d0)
                                    : _mm256_setzero_si256();
      const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      _mm512_storeu_si512(vv32 + kk * Dn + d0, pair);
    }
  }
  for (int64_t i = Skp; i < next.kv_rows; ++i) next.kv_row(i);  // a longer next task (causal row blocks)
}

// The softmax of the task's scores w.s: fp32 numerators rounded to bf16 into w.p (padding zero),
// 1 / fp32 row sums into w.inv.
void softmax_to_pairs(const AttentionArgs& a, int64_t b, int64_t h, int64_t r0, int64_t rows, int64_t Sk,
                      PairScratch& w) {
  const int64_t Skp = round32(Sk);
  std::fill(w.p.begin(), w.p.end(), 0);
  uint16_t* pb = w.p.data();
  softmax_block(a, b, h, r0, rows, Sk, w.s.data(), Skp, _mm512_set1_ps(a.scale),
                [pb, Skp](int64_t r, int64_t j, __m512 x) {
                  _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + r * Skp + j), to_bf16(x));
                }, w.inv.data());
}
#endif

// ---- AVX512-BF16: vdpbf16ps, 16 lanes x one pair each, register-blocked as fma_block is ----
#ifdef __AVX512BF16__
// out[r][c] = sum_kk pair(a[r * lda + kk]) . b[kk * ldb + 16 c .. +16) (pairs): kRows rows x NV vectors.
template <int NV>
inline void dot_block(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t kpairs,
                      __m512 (*out)[4]) {
  __m512 acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kpairs; ++kk) {
    __m512bh bv[NV];
    for (int c = 0; c < NV; ++c) bv[c] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + kk * ldb + 16 * c));
    for (int r = 0; r < kRows; ++r) {
      const __m512bh ab = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r * lda + kk])));
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], ab, bv[c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) out[r][c] = acc[r][c];
}

inline void dot_block_n(int nv, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t kpairs,
                        __m512 (*out)[4]) {
  switch (nv) {
    case 4: dot_block<4>(a, lda, b, ldb, kpairs, out); break;
    case 3: dot_block<3>(a, lda, b, ldb, kpairs, out); break;
    case 2: dot_block<2>(a, lda, b, ldb, kpairs, out); break;
    default: dot_block<1>(a, lda, b, ldb, kpairs, out); break;
  }
}

// The AMX path's arithmetic (bf16 products, fp32 sums, P rounded to bf16) on a CPU with
// AVX512-BF16 but no AMX (AMD Zen 4 and later, Intel Cooper Lake): two products per lane per
// instruction where the fp32 path widens every element and does one.
void attend_block_dot(const AttentionArgs& a, int64_t b, int64_t h, int64_t r0, int64_t r1, PairScratch& w,
                      const NextRows& next) {
  const int64_t D = a.D, Dk = round32(D), Dn = round16(D);
  const int64_t Sk = a.causal ? std::min(a.Sk, r1) : a.Sk;
  const int64_t Skp = round32(Sk);
  const int64_t rows = r1 - r0, rows_p = (rows + kRows - 1) / kRows * kRows;  // register blocks, not tiles
  pack_pairs(a, b, h, r0, rows, rows_p, Sk, w, next);
  const uint32_t* q32 = reinterpret_cast<const uint32_t*>(w.q.data());
  const uint32_t* kv32 = reinterpret_cast<const uint32_t*>(w.kv.data());
  const uint32_t* vv32 = reinterpret_cast<const uint32_t*>(w.vv.data());

  // scores = Q K^T (fp32, unscaled: the softmax scales), 64 keys per block
  for (int64_t r = 0; r < rows_p; r += kRows)
    for (int64_t n0 = 0; n0 < Skp; n0 += 64) {
      const int nv = static_cast<int>(std::min<int64_t>(4, (Skp - n0) / 16));
      __m512 acc[kRows][4];
      dot_block_n(nv, q32 + r * (Dk / 2), Dk / 2, kv32 + n0, Skp, Dk / 2, acc);
      for (int i = 0; i < kRows; ++i)
        for (int c = 0; c < nv; ++c) _mm512_storeu_ps(&w.s[(r + i) * Skp + n0 + 16 * c], acc[i][c]);
    }
  softmax_to_pairs(a, b, h, r0, rows, Sk, w);

  // O = P V / rowsum, 64 columns of D per block, written straight into the output's strides
  const uint32_t* p32 = reinterpret_cast<const uint32_t*>(w.p.data());
  const int64_t obase = b * a.o_stride[0] + h * a.o_stride[1];
  for (int64_t r = 0; r < rows_p; r += kRows)
    for (int64_t d0 = 0; d0 < Dn; d0 += 64) {
      const int nv = static_cast<int>(std::min<int64_t>(4, (Dn - d0) / 16));
      __m512 acc[kRows][4];
      dot_block_n(nv, p32 + r * (Skp / 2), Skp / 2, vv32 + d0, Dn, Skp / 2, acc);
      for (int64_t i = 0; i < kRows && r + i < rows; ++i) {
        const __m512 inv = _mm512_set1_ps(w.inv[r + i]);
        const int64_t oo = obase + (r0 + r + i) * a.o_stride[2];
        for (int c = 0; c < nv; ++c) {
          const int64_t d = d0 + 16 * c;
          store16(a.o, oo + d, true, tail_mask(D - d), _mm512_mul_ps(acc[i][c], inv));
        }
      }
    }
}
#endif

// ---- AMX-BF16: every tile 16 rows x 64 bytes (16 x 32 bf16, or 16 x 16 fp32; load_full_tiles) ----
// tiles 0-3: fp32 accumulators (4 x 16 columns), 4: A (16 rows x 32 bf16), 5-7: B (16 pairs x 16 columns)
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)

// C[16 x 16 nt] += A (16 x 32 k, row stride lda bytes) * B (16 k-pairs x 16 nt columns), over kblocks.
template <int NT>
inline void tile_gemm(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t b_kstep, int64_t ldb, int64_t kblocks,
                      float* c, int64_t ldc) {
  _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (NT > 2) _tile_zero(2);
  if (NT > 3) _tile_zero(3);
  // B rotates through tiles 5-7: a load into the tile an unfinished tdpbf16ps still reads
  // would wait for it (one B tile serialized the loads behind the products)
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    _tile_loadd(4, a + kb * 32, lda);
    const uint16_t* bk = b + kb * b_kstep;
    _tile_loadd(5, bk, ldb);
    _tile_dpbf16ps(0, 4, 5);
    if (NT > 1) { _tile_loadd(6, bk + 32, ldb); _tile_dpbf16ps(1, 4, 6); }
    if (NT > 2) { _tile_loadd(7, bk + 64, ldb); _tile_dpbf16ps(2, 4, 7); }
    if (NT > 3) { _tile_loadd(5, bk + 96, ldb); _tile_dpbf16ps(3, 4, 5); }
  }
  _tile_stored(0, c, ldc);
  if (NT > 1) _tile_stored(1, c + 16, ldc);
  if (NT > 2) _tile_stored(2, c + 32, ldc);
  if (NT > 3) _tile_stored(3, c + 48, ldc);
}

inline void tile_gemm_n(int nt, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t b_kstep, int64_t ldb,
                        int64_t kblocks, float* c, int64_t ldc) {
  switch (nt) {
    case 4: tile_gemm<4>(a, lda, b, b_kstep, ldb, kblocks, c, ldc); break;
    case 3: tile_gemm<3>(a, lda, b, b_kstep, ldb, kblocks, c, ldc); break;
    case 2: tile_gemm<2>(a, lda, b, b_kstep, ldb, kblocks, c, ldc); break;
    default: tile_gemm<1>(a, lda, b, b_kstep, ldb, kblocks, c, ldc); break;
  }
}

void attend_block_amx(const AttentionArgs& a, int64_t b, int64_t h, int64_t r0, int64_t r1, PairScratch& w,
                      const NextRows& next) {
  const int64_t D = a.D, Dk = round32(D), Dn = round16(D);
  const int64_t Sk = a.causal ? std::min(a.Sk, r1) : a.Sk;
  const int64_t Skp = round32(Sk);
  const int64_t rows = r1 - r0, rows_p = round16(rows);
  pack_pairs(a, b, h, r0, rows, rows_p, Sk, w, next);

  // scores = Q K^T (fp32), 64 keys per pass
  for (int64_t r = 0; r < rows_p; r += 16)
    for (int64_t n0 = 0; n0 < Skp; n0 += 64) {
      const int nt = static_cast<int>(std::min<int64_t>(4, (Skp - n0) / 16));
      tile_gemm_n(nt, &w.q[r * Dk], Dk * 2, &w.kv[n0 * 2], 16 * Skp * 2, Skp * 4, Dk / 32, &w.s[r * Skp + n0], Skp * 4);
    }

  softmax_to_pairs(a, b, h, r0, rows, Sk, w);

  // O = P V / rowsum, 64 columns of D per pass
  const int64_t obase = b * a.o_stride[0] + h * a.o_stride[1];
  for (int64_t r = 0; r < rows_p; r += 16)
    for (int64_t d0 = 0; d0 < Dn; d0 += 64) {
      const int nt = static_cast<int>(std::min<int64_t>(4, (Dn - d0) / 16));
      tile_gemm_n(nt, &w.p[r * Skp], Skp * 2, &w.vv[d0 * 2], 16 * Dn * 2, Dn * 4, Skp / 32, w.c, 64 * 4);
      for (int64_t i = 0; i < 16 && r + i < rows; ++i) {
        const __m512 inv = _mm512_set1_ps(w.inv[r + i]);
        const int64_t oo = obase + (r0 + r + i) * a.o_stride[2];
        for (int c = 0; c < nt; ++c) {
          const int64_t d = d0 + 16 * c;
          store16(a.o, oo + d, true, tail_mask(D - d), _mm512_mul_ps(_mm512_loadu_ps(w.c + i * 64 + 16 * c), inv));
        }
      }
    }
}
#endif

// Tasks [t0, t1) (a (batch, head) and a block of query rows each) on the calling thread, with
// its scratch `w` kept across calls (no allocation per call) unless a long sequence grew it.
template <typename S, typename Block>
void attend_tasks(const AttentionArgs& a, int64_t t0, int64_t t1, int64_t blocks, int64_t rows, S& w, Block block) {
  next_rows(a, t0, blocks, rows).all();  // the first task's misses in flight at once, not row by row
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t blk = t % blocks, bh = t / blocks;
    const int64_t r0 = blk * rows, r1 = std::min(a.Sq, r0 + rows);
    block(a, bh / a.H, bh % a.H, r0, r1, w, t + 1 < t1 ? next_rows(a, t + 1, blocks, rows) : NextRows{});
  }
  if (w.held() > kKeepScratch) w = S{};  // long sequences: give it back
}

bool cpu_has_amx_bf16() {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  // AMX-BF16 and AMX-TILE (CPUID.7.0:EDX bits 22, 24), and the tile state granted by Linux
  // (ARCH_REQ_XCOMP_PERM for XTILEDATA; the grant holds for the whole process)
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512_bf16() {
#ifdef __AVX512BF16__
  // AVX512_BF16: CPUID.(EAX=7, ECX=1):EAX bit 5 (the build's -march may be another machine's)
  static const bool ok = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u);
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace
#endif

bool dot_bf16_supported() {
#ifdef __AVX512F__
  return cpu_has_avx512_bf16();
#else
  return false;
#endif
}

bool amx_bf16_supported() {
#ifdef __AVX512F__
  return cpu_has_amx_bf16();
#else
  return false;
#endif
}

bool attention_supported() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

void attention(const AttentionArgs& a, int threads) {
#ifdef __AVX512F__
  if (a.B < 0 || a.H < 0 || a.Sq < 0 || a.Sk < 0 || a.D < 1) throw std::invalid_argument("attention: bad shape");
  if (a.B * a.H * a.Sq == 0) return;
  // Whole heads per task where there are enough heads for the threads (K^T and V are
  // widened once per task); otherwise split the query rows, and always keep the score
  // block under kMaxScores.
  const int64_t bh_count = a.B * a.H;
  int64_t split = std::max<int64_t>(1, (2 * threads + bh_count - 1) / bh_count);
  int64_t rows = (a.Sq + split - 1) / split;
  const int64_t max_rows = std::max<int64_t>(kRows, kMaxScores / round16(std::max<int64_t>(a.Sk, 1)) / kRows * kRows);
  rows = std::min(std::max<int64_t>(rows, std::min<int64_t>(a.Sq, 16)), max_rows);
  const int64_t blocks = (a.Sq + rows - 1) / rows;
  const bool amx = a.bf16 && (a.path == AttentionPath::kAuto || a.path == AttentionPath::kAmx) && amx_bf16_supported();
  if (a.path == AttentionPath::kAmx && !amx) throw std::runtime_error("attention: the AMX-BF16 path needs bf16 and AMX");
  const bool dot = a.bf16 && !amx && (a.path == AttentionPath::kAuto || a.path == AttentionPath::kDot) &&
                   dot_bf16_supported();
  if (a.path == AttentionPath::kDot && !dot)
    throw std::runtime_error("attention: the AVX512-BF16 path needs bf16 and AVX512-BF16");
  parallel_ranges(bh_count * blocks, threads, [&](int64_t t0, int64_t t1) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
    if (amx) {
      load_full_tiles();
      static thread_local PairScratch w;
      attend_tasks(a, t0, t1, blocks, rows, w, attend_block_amx);
      _tile_release();
      return;
    }
#endif
#ifdef __AVX512BF16__
    if (dot) {
      static thread_local PairScratch w;
      attend_tasks(a, t0, t1, blocks, rows, w, attend_block_dot);
      return;
    }
#endif
    static thread_local Scratch w;
    attend_tasks(a, t0, t1, blocks, rows, w, attend_block);
  });
#else
  (void)a; (void)threads;
  throw std::runtime_error("attention needs AVX-512");
#endif
}

}  // namespace kiln
