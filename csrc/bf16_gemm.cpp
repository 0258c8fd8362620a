// bf16 GEMM on AMX-BF16 tiles with a fused epilogue (see bf16_gemm.h).
//
// Tiles 0-3 accumulate a 32 x 32 fp32 block of C (2 x 2 tiles of 16 x 16), tiles 4-5 hold
// two 16-row slices of x (16 x 32 bf16 each), tiles 6-7 two 32 k x 16 channel panels of the
// weight. Loop order per thread: for each pair of weight panels (32 output channels), for
// each 32-row block of the row chunk, all of K. The pair (k_pad * 64 bytes) comes from
// memory on the first row block and from L2 on the others, and while it is in use the next
// pair is prefetched into L2 a few cache lines per k step, so the stream of weights keeps
// going during the tile arithmetic.
#include "bf16_gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "amx_tiles.h"
#include "gemm_split.h"
#include "kiln.h"
#include "thread_pool.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include "quant_simd.h"
#define KILN_HAVE_BF16_EPILOGUE 1
#endif

namespace kiln::bf16 {

namespace {

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

}  // namespace

std::shared_ptr<Bf16Weight> prepack_bf16(const uint16_t* w, int64_t n, int64_t k) {
  auto p = std::make_shared<Bf16Weight>();
  p->n = n;
  p->k = k;
  p->k_pad = round_up(std::max<int64_t>(k, 1), 32);
  p->panels = (n + 15) / 16;
  p->packed = quant::aligned_bytes(static_cast<size_t>(p->panels * p->k_pad * 16 * 2));
  uint16_t* dst = reinterpret_cast<uint16_t*>(p->packed.get());
  for (int64_t row = 0; row < n; ++row) {
    const int64_t panel = row / 16, c = row % 16;
    for (int64_t kk = 0; kk < k; ++kk) dst[(panel * p->k_pad + (kk / 2) * 2) * 16 + 2 * c + kk % 2] = w[row * k + kk];
  }
  return p;
}

#ifdef KILN_HAVE_BF16_EPILOGUE
namespace {

// The epilogue for 16 columns of one row: bias, residual, activation, store.
inline void store16(__m512 acc, int64_t row, int64_t col, int64_t n, const Bf16Epilogue& ep) {
  const __mmask16 mask = quant::col_mask(n - col);
  if (ep.bias != nullptr) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, ep.bias + col));
  if (ep.residual != nullptr) {
    if (ep.residual_bf16) {
      const __m256i r = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(ep.residual) + row * ep.ldr + col);
      acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16)));
    } else {
      acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, static_cast<const float*>(ep.residual) + row * ep.ldr + col));
    }
  }
  acc = quant::activate16(acc, ep.act);
  if (ep.out_bf16) {
    const __m256i y = (__m256i)_mm512_cvtneps_pbh(acc);  // round to nearest even
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(ep.out) + row * ep.ldo + col, mask, y);
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(ep.out) + row * ep.ldo + col, mask, acc);
  }
}

}  // namespace
#endif

bool bf16_gemm_supported() {
#if defined(KILN_HAVE_BF16_EPILOGUE) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
  return amx_bf16_supported();  // CPUID and the XTILEDATA grant (attention.cpp)
#else
  return false;
#endif
}

#if defined(KILN_HAVE_BF16_EPILOGUE) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
namespace {

constexpr int64_t kRowBlock = 32, kPanelBlock = 2;
constexpr int64_t kChunkBytes = 1 << 20;  // rows of x per chunk: about 1 MiB, half of L2

// The epilogue of the previous block, run a few vectors at a time between this block's tile
// instructions: tdpbf16ps keeps the AMX unit busy for 16 cycles while the vector units would
// otherwise idle, so bias, activation and bf16 rounding cost (almost) nothing extra. Without
// this overlap a GELU epilogue left BERT's 128 x 3072 layer behind oneDNN's
// (`python -m kiln.bench.bf16_gemm` times both).
struct Pending {
  const float* scratch = nullptr;  // 32 x 32 fp32, 128-byte rows
  int64_t row = 0, col = 0, n = 0;
  int np = 0, done = 0, total = 0;
  const Bf16Epilogue* ep = nullptr;

  inline void run(int count) {
    const int end = std::min(total, done + count);
    for (; done < end; ++done) {
      const int i = done / np, j = done % np;
      store16(_mm512_load_ps(scratch + i * 32 + 16 * j), row + i, col + 16 * j, n, *ep);
    }
  }
};

// One MT x NT block of 16 x 16 tiles over all of K, into `scratch` (32 x 32 fp32, 128-byte
// rows). Meanwhile it runs `pend`, and prefetches pf_lines cache lines per k step from `pf`
// onwards (advancing it; null: none).
template <int MT, int NT>
void amx_block(const char* a, int64_t lda_bytes, const uint16_t* b, int64_t panel_elems, int64_t kblocks,
               float* scratch, const char*& pf, int64_t pf_lines, Pending& pend) {
  _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (MT > 1) _tile_zero(2);
  if (MT > 1 && NT > 1) _tile_zero(3);
  const int per_step = static_cast<int>((pend.total - pend.done + kblocks - 1) / kblocks);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    _tile_loadd(4, a + kb * 64, lda_bytes);
    _tile_loadd(6, b + kb * 512, 64);
    if (MT > 1) _tile_loadd(5, a + 16 * lda_bytes + kb * 64, lda_bytes);
    if (NT > 1) _tile_loadd(7, b + panel_elems + kb * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (NT > 1) _tile_dpbf16ps(1, 4, 7);
    if (MT > 1) _tile_dpbf16ps(2, 5, 6);
    if (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
    if (pf != nullptr) {
      for (int64_t i = 0; i < pf_lines; ++i) _mm_prefetch(pf + i * 64, _MM_HINT_T1);
      pf += pf_lines * 64;
    }
    pend.run(per_step);
  }
  pend.run(pend.total);  // whatever is left (fewer k steps than epilogue vectors)
  _tile_stored(0, scratch, 128);
  if (NT > 1) _tile_stored(1, scratch + 16, 128);
  if (MT > 1) _tile_stored(2, scratch + 16 * 32, 128);
  if (MT > 1 && NT > 1) _tile_stored(3, scratch + 16 * 32 + 16, 128);
}

using BlockFn = void (*)(const char*, int64_t, const uint16_t*, int64_t, int64_t, float*, const char*&, int64_t,
                         Pending&);
const BlockFn kBlocks[2][2] = {{amx_block<1, 1>, amx_block<1, 2>}, {amx_block<2, 1>, amx_block<2, 2>}};

// Rows [m0, m1) x panels [p0, p1) on the calling thread. (Splitting K into chunks whose
// weight part stays in L1 was tried and was slower at BERT's shapes.)
void amx_region(const uint16_t* a, int64_t lda, int64_t m0, int64_t m1, int64_t p0, int64_t p1, const Bf16Weight& w,
                const Bf16Epilogue& ep) {
  load_full_tiles();
  alignas(64) float scratch[2][32 * 32];  // the sums of this block and of the previous one
  Pending pend;
  pend.n = w.n;
  pend.ep = &ep;
  int cur = 0;
  const int64_t panel_elems = w.k_pad * 16, kblocks = w.k_pad / 32, lda_bytes = lda * 2;
  const uint16_t* packed = reinterpret_cast<const uint16_t*>(w.packed.get());
  const int64_t chunk = std::max<int64_t>(kRowBlock, kChunkBytes / lda_bytes / kRowBlock * kRowBlock);
  for (int64_t mc = m0; mc < m1; mc += chunk) {
    const int64_t mc_end = std::min(m1, mc + chunk), row_blocks = (mc_end - mc + kRowBlock - 1) / kRowBlock;
    // the next pair's bytes spread over every k step of this pair's row blocks
    const int64_t pair_lines = kPanelBlock * panel_elems * 2 / 64;
    const int64_t pf_lines = (pair_lines + row_blocks * kblocks - 1) / (row_blocks * kblocks);
    for (int64_t p = p0; p < p1; p += kPanelBlock) {
      const int np = static_cast<int>(std::min<int64_t>(kPanelBlock, p1 - p));
      const uint16_t* b = packed + p * panel_elems;
      // (the rounded-up pf_lines may reach a little past the next pair: prefetches never fault)
      const char* pf = p + kPanelBlock < p1 ? reinterpret_cast<const char*>(b + kPanelBlock * panel_elems) : nullptr;
      for (int64_t r = mc; r < mc_end; r += kRowBlock) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, mc_end - r));
        kBlocks[rows > 16][np > 1](reinterpret_cast<const char*>(a + r * lda), lda_bytes, b, panel_elems, kblocks,
                                   scratch[cur], pf, pf_lines, pend);
        pend.scratch = scratch[cur];
        pend.row = r;
        pend.col = p * 16;
        pend.np = np;
        pend.done = 0;
        pend.total = rows * np;
        cur ^= 1;
      }
    }
  }
  pend.run(pend.total);
  _tile_release();
}

void gemm_ready(const uint16_t* a, int64_t lda, int64_t m, const Bf16Weight& w, const Bf16Epilogue& ep, int threads) {
  const Split s = plan_split(threads, m, w.panels, kPanelBlock, kRowBlock);
  parallel_run(s.threads, [&](int t) {
    int64_t m0, m1, p0, p1;
    s.range(t, m, w.panels, m0, m1, p0, p1);
    if (m0 < m1 && p0 < p1) amx_region(a, lda, m0, m1, p0, p1, w, ep);
  });
}

}  // namespace
#endif

// ---- AVX512-BF16 without AMX: vdpbf16ps on the same packed panels ----------------------
// A panel's k-pair q of its 16 channels is one 64-byte vector (the B-tile layout above), so a
// register block of MR rows x NP panels is MR * NP accumulators fed by one broadcast pair of x
// per row and NP panel vectors per k pair. Its use is the shapes where oneDNN's per-call cost
// dominates (a few thousand MACs per output row): kernel choice measures it against oneDNN.
#if defined(KILN_HAVE_BF16_EPILOGUE)
namespace {

constexpr int kDotRows = 6, kDotPanels = 4;

template <int MR, int NP>
void dot_block(const uint16_t* a, int64_t lda, int64_t row, const uint16_t* panels, int64_t panel_elems, int64_t k,
               int64_t col, const Bf16Weight& w, const Bf16Epilogue& ep) {
  __m512 acc[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t full = k / 2, pairs = (k + 1) / 2;
  for (int64_t q = 0; q < pairs; ++q) {
    __m512bh bv[NP];
    for (int j = 0; j < NP; ++j)
      bv[j] = reinterpret_cast<__m512bh>(_mm512_load_si512(panels + j * panel_elems + q * 32));
    for (int i = 0; i < MR; ++i) {
      const uint16_t* xr = a + (row + i) * lda;
      uint32_t v = xr[2 * q];  // an odd K's last pair: its high half zero (x has no element there)
      if (q < full) std::memcpy(&v, xr + 2 * q, 4);
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(v)));
      for (int j = 0; j < NP; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], av, bv[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NP; ++j) store16(acc[i][j], row + i, col + 16 * j, w.n, ep);
}

using DotFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t,
                       const Bf16Weight&, const Bf16Epilogue&);

template <int MR>
constexpr DotFn dot_row(int np) {
  return np == 1 ? dot_block<MR, 1> : np == 2 ? dot_block<MR, 2> : np == 3 ? dot_block<MR, 3> : dot_block<MR, 4>;
}

DotFn dot_fn(int mr, int np) {
  switch (mr) {
    case 1: return dot_row<1>(np);
    case 2: return dot_row<2>(np);
    case 3: return dot_row<3>(np);
    case 4: return dot_row<4>(np);
    case 5: return dot_row<5>(np);
    default: return dot_row<6>(np);
  }
}

// Rows [m0, m1) x panels [p0, p1): panel blocks outside (their k_pad x 64 weights stay in L2
// while every row block passes), row blocks inside.
void dot_region(const uint16_t* a, int64_t lda, int64_t m0, int64_t m1, int64_t p0, int64_t p1, const Bf16Weight& w,
                const Bf16Epilogue& ep) {
  const int64_t panel_elems = w.k_pad * 16;
  const uint16_t* packed = reinterpret_cast<const uint16_t*>(w.packed.get());
  for (int64_t p = p0; p < p1; p += kDotPanels) {
    const int np = static_cast<int>(std::min<int64_t>(kDotPanels, p1 - p));
    for (int64_t r = m0; r < m1; r += kDotRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kDotRows, m1 - r));
      dot_fn(mr, np)(a, lda, r, packed + p * panel_elems, panel_elems, w.k, p * 16, w, ep);
    }
  }
}

}  // namespace
#endif

bool bf16_dot_gemm_supported() {
#if defined(KILN_HAVE_BF16_EPILOGUE)
  return dot_bf16_supported();
#else
  return false;
#endif
}

void bf16_dot_gemm(const uint16_t* x, int64_t m, int64_t lda, const Bf16Weight& w, const Bf16Epilogue& ep,
                   int threads) {
#if defined(KILN_HAVE_BF16_EPILOGUE)
  if (!bf16_dot_gemm_supported()) throw std::runtime_error("the bf16 dot-product GEMM needs AVX512-BF16");
  if (m == 0) return;
  const Split s = plan_split(threads, m, w.panels, kDotPanels, kDotRows);
  parallel_run(s.threads, [&](int t) {
    int64_t m0, m1, p0, p1;
    s.range(t, m, w.panels, m0, m1, p0, p1);
    if (m0 < m1 && p0 < p1) dot_region(x, lda, m0, m1, p0, p1, w, ep);
  });
#else
  (void)x; (void)m; (void)lda; (void)w; (void)ep; (void)threads;
  throw std::runtime_error("Kiln was built without AVX512-BF16");
#endif
}

void bf16_gemm(const uint16_t* x, int64_t m, int64_t lda, const Bf16Weight& w, const Bf16Epilogue& ep, int threads) {
#if defined(KILN_HAVE_BF16_EPILOGUE) && defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (!bf16_gemm_supported()) throw std::runtime_error("the bf16 GEMM needs AMX-BF16");
  if (m == 0) return;
  if (m % 16 == 0 && w.k == w.k_pad) return gemm_ready(x, lda, m, w, ep, threads);
  // a padded copy: rows rounded up to 16, K to k_pad, the padding zero
  const int64_t rows = round_up(m, 16);
  quant::AlignedBytes pad = quant::aligned_bytes(static_cast<size_t>(rows * w.k_pad * 2), /*zero=*/false);
  uint16_t* base = reinterpret_cast<uint16_t*>(pad.get());
  for (int64_t r = 0; r < m; ++r) {
    std::memcpy(base + r * w.k_pad, x + r * lda, static_cast<size_t>(w.k * 2));
    std::memset(base + r * w.k_pad + w.k, 0, static_cast<size_t>((w.k_pad - w.k) * 2));
  }
  std::memset(base + m * w.k_pad, 0, static_cast<size_t>((rows - m) * w.k_pad * 2));
  // rows past m are computed into nothing: the epilogue stores only rows < m
  gemm_ready(base, w.k_pad, m, w, ep, threads);
#else
  (void)x; (void)m; (void)lda; (void)w; (void)ep; (void)threads;
  throw std::runtime_error("Kiln was built without AMX-BF16");
#endif
}

}  // namespace kiln::bf16
