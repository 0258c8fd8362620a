// Fused scaled-dot-product attention, O = softmax(Q K^T * scale + mask) V, for fp32 or bf16
// Q/K/V/O in any [B, H, S, D] strides with unit stride along D.
//
// Why a kernel of Kiln's own: in a Transformer block Q, K and V are strided views of one
// QKV projection, and the heads are merged right after; torch's sdpa runs three passes
// over them at these sizes (BERT-base: 128 x 128 scores per head, D = 64) and measured
// about half of one core's FMA rate. Here each task takes one (batch, head, block of query
// rows), widens its K^T and V into fp32 scratch once, and keeps the score block in L1/L2:
//   scores = (scale Q) K^T   register-blocked 4 rows x 64 keys, broadcast-FMA over D
//   P      = exp(scores + mask - rowmax)   (masked and causal-hidden keys give exactly 0)
//   O      = (P V) / rowsum                4 rows x 64 of D per register block
// All arithmetic is fp32; bf16 inputs are widened exactly and O is rounded to nearest even.
// Rows whose keys are all masked give 0 (as torch's sdpa does); NaN inputs give NaN rows.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "kiln.h"
#include "simd_math.h"
#include "thread_pool.h"

namespace kiln {

#ifdef __AVX512F__
namespace {

constexpr int64_t kRows = 4;  // query rows per register block
// A task's score block stays under this many floats (256 KB: L2-resident beside K^T and V).
constexpr int64_t kMaxScores = 64 * 1024;

inline __m512 load16(const void* base, int64_t i, bool bf16, __mmask16 m) {
  if (bf16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
}

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
inline __m256i to_bf16(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

inline void store16(void* base, int64_t i, bool bf16, __mmask16 m, __m512 x) {
  if (bf16)
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, m, to_bf16(x));
  else
    _mm512_mask_storeu_ps(static_cast<float*>(base) + i, m, x);
}

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// In-register transpose of a 16 x 16 fp32 block: r[i][j] -> r[j][i].
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}

// scores[r][j0 .. j0+16 NV) = sum_d q[r][d] kt[d][j0 ..]: kRows rows x NV vectors of keys.
template <int NV>
inline void qk_block(const float* q, int64_t D, const float* kt, int64_t ldk, float* s, int64_t lds) {
  __m512 acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = _mm512_loadu_ps(kt + d * ldk + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      const __m512 qb = _mm512_set1_ps(q[r * D + d]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(s + r * lds + 16 * c, acc[r][c]);
}

// o[r][d0 .. d0+16 NV) = sum_j p[r][j] v[j][d0 ..]: kRows rows x NV vectors of D. The sums
// stay in registers and are written to `out` once.
template <int NV>
inline void pv_block(const float* p, int64_t lds, int64_t Sk, const float* v, int64_t ldv, __m512 (*out)[4]) {
  __m512 acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < Sk; ++j) {
    __m512 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_ps(v + j * ldv + 16 * c);
    for (int r = 0; r < kRows; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * lds + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NV; ++c) out[r][c] = acc[r][c];
}

struct Scratch {
  std::vector<float> kt, v, q, s, inv;
};

void attend_block(const AttentionArgs& a, int64_t b, int64_t h, int64_t r0, int64_t r1, Scratch& w) {
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
  for (int64_t j = 0; j < Sk; ++j)
    for (int64_t d0 = 0; d0 < D; d0 += 16)
      _mm512_storeu_ps(w.v.data() + j * Dp + d0, load16(a.v, vbase + j * a.v_stride[2] + d0, bf, tail_mask(D - d0)));
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
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 m = tail_mask(D - d0);
      _mm512_mask_storeu_ps(w.q.data() + r * D + d0, m,
                            _mm512_mul_ps(scale, load16(a.q, qbase + (r0 + r) * a.q_stride[2] + d0, bf, m)));
    }

  // scores
  for (int64_t r = 0; r < rows_p; r += kRows) {
    int64_t j = 0;
    for (; j + 64 <= Skp; j += 64) qk_block<4>(&w.q[r * D], D, &w.kt[j], Skp, &w.s[r * Skp + j], Skp);
    switch ((Skp - j) / 16) {
      case 3: qk_block<3>(&w.q[r * D], D, &w.kt[j], Skp, &w.s[r * Skp + j], Skp); break;
      case 2: qk_block<2>(&w.q[r * D], D, &w.kt[j], Skp, &w.s[r * Skp + j], Skp); break;
      case 1: qk_block<1>(&w.q[r * D], D, &w.kt[j], Skp, &w.s[r * Skp + j], Skp); break;
      default: break;
    }
  }

  // softmax numerators in place; 1 / row sums (0 for a row with every key masked)
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 lo = _mm512_set1_ps(-104.f);  // exp(-104) rounds to 0 in fp32
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = r0 + r;
    float* s = &w.s[r * Skp];
    const int64_t visible = a.causal ? std::min(Sk, row + 1) : Sk;
    const float* mrow = a.mask ? a.mask + b * a.mask_stride[0] + h * a.mask_stride[1] + row * a.mask_stride[2] : nullptr;
    __m512 mx = ninf;
    for (int64_t j = 0; j < Skp; j += 16) {
      const __mmask16 live = tail_mask(visible - j > 0 ? visible - j : 0);
      __m512 x = _mm512_mask_mov_ps(ninf, live, _mm512_loadu_ps(s + j));
      if (mrow) {
        const __m512 mv = a.mask_stride[3] ? _mm512_maskz_loadu_ps(live, mrow + j) : _mm512_set1_ps(mrow[0]);
        x = _mm512_mask_add_ps(x, live, x, mv);
      }
      _mm512_storeu_ps(s + j, x);
      mx = _mm512_max_ps(mx, x);
    }
    const float m = _mm512_reduce_max_ps(mx);
    if (m == -std::numeric_limits<float>::infinity()) {  // nothing visible: the row is 0
      std::fill(s, s + Skp, 0.f);
      w.inv[r] = 0.f;
      continue;
    }
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < Skp; j += 16) {
      const __m512 x = _mm512_loadu_ps(s + j);
      // -inf (masked) stays -inf - m = -inf; max(lo, .) keeps NaN (second operand)
      const __mmask16 hidden = _mm512_cmp_ps_mask(x, ninf, _CMP_EQ_OQ);
      const __m512 p = _mm512_maskz_mov_ps(static_cast<__mmask16>(~hidden), exp16(_mm512_max_ps(lo, _mm512_sub_ps(x, mv))));
      _mm512_storeu_ps(s + j, p);
      sum = _mm512_add_ps(sum, p);
    }
    w.inv[r] = 1.f / _mm512_reduce_add_ps(sum);
  }
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
      switch (nv) {
        case 4: pv_block<4>(&w.s[r * Skp], Skp, Sk, &w.v[d0], Dp, acc); break;
        case 3: pv_block<3>(&w.s[r * Skp], Skp, Sk, &w.v[d0], Dp, acc); break;
        case 2: pv_block<2>(&w.s[r * Skp], Skp, Sk, &w.v[d0], Dp, acc); break;
        default: pv_block<1>(&w.s[r * Skp], Skp, Sk, &w.v[d0], Dp, acc); break;
      }
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

}  // namespace
#endif

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
  parallel_ranges(bh_count * blocks, threads, [&](int64_t t0, int64_t t1) {
    Scratch w;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t % blocks, bh = t / blocks;
      const int64_t r0 = blk * rows, r1 = std::min(a.Sq, r0 + rows);
      attend_block(a, bh / a.H, bh % a.H, r0, r1, w);
    }
  });
#else
  (void)a; (void)threads;
  throw std::runtime_error("attention needs AVX-512");
#endif
}

}  // namespace kiln
