// int8 GEMM for CPUs with AVX512-VNNI (vpdpbusd) and AMX-INT8 (tdpbusd), with the
// dequantize / bias / activation / requantize epilogue fused into the store of each tile.
//
// Both paths read the same prepacked weight (quant_gemm.h) and compute the same exact
// int32 dot products; they differ in how many rows and columns one instruction covers:
//   VNNI: a 6 x 64 block in 24 zmm accumulators, one vpdpbusd per 16 columns x 4 k.
//   AMX:  a 32 x 32 block in four 16 x 16 int32 tiles, one tdpbusd per 16 x 16 x 64.
// The activation operand must be readable a whole 4-k group (VNNI) or 64-k tile row and
// 16-row tile (AMX) past its end; int8_gemm copies it into a zero-padded buffer when not.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "amx_tiles.h"
#include "gemm_split.h"
#include "quant_gemm.h"
#include "thread_pool.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define KILN_HAVE_VNNI 1
#include "quant_simd.h"
#endif

namespace kiln::quant {

AlignedBytes aligned_bytes(size_t bytes, bool zero) {
  const size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, rounded);
  if (p == nullptr) throw std::bad_alloc();
  if (zero) std::memset(p, 0, rounded);
  return AlignedBytes(static_cast<uint8_t*>(p));
}

namespace {

constexpr int64_t kAmxMinRows = 16;  // below one tile of rows AMX wastes most of each tile

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

bool cpu_has(int leaf_bit_edx7 = -1, int leaf_bit_ecx7 = -1) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (leaf_bit_edx7 >= 0 && !((d >> leaf_bit_edx7) & 1u)) return false;
  if (leaf_bit_ecx7 >= 0 && !((c >> leaf_bit_ecx7) & 1u)) return false;
  return true;
}

}  // namespace

bool vnni_supported() {
#if KILN_HAVE_VNNI
  static const bool ok = __builtin_cpu_supports("avx512bw") && cpu_has(-1, 11 /* AVX512_VNNI */);
  return ok;
#else
  return false;
#endif
}

bool amx_supported() {
#if KILN_HAVE_VNNI && defined(__AMX_INT8__) && defined(__AMX_TILE__)
  // Linux hands out AMX tile state only on request (ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA); the grant holds for the whole process.
  static const bool ok = vnni_supported() && cpu_has(24 /* AMX_TILE */) && cpu_has(25 /* AMX_INT8 */) &&
                         syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
#else
  return false;
#endif
}

Path resolve_path(Path path, int64_t m) {
  if (path == Path::kAuto) return amx_supported() && m >= kAmxMinRows ? Path::kAmx : Path::kVnni;
  if (path == Path::kAmx && !amx_supported())
    throw std::runtime_error("the AMX-INT8 path is not available on this CPU");
  if (!vnni_supported()) throw std::runtime_error("the int8 GEMM needs AVX512-VNNI");
  return path;
}

std::shared_ptr<Int8Weight> prepack_int8(const int8_t* w_q, const float* w_scale, int64_t n, int64_t k) {
  auto w = std::make_shared<Int8Weight>();
  w->n = n;
  w->k = k;
  w->k_pad = round_up(std::max<int64_t>(k, 1), 64);
  w->panels = (n + 15) / 16;
  w->packed = aligned_bytes(static_cast<size_t>(w->panels * w->k_pad * 16));
  w->w_scale.assign(static_cast<size_t>(w->panels * 16), 0.0f);
  w->w_sum.assign(static_cast<size_t>(w->panels * 16), 0);
  int8_t* dst = reinterpret_cast<int8_t*>(w->packed.get());
  for (int64_t row = 0; row < n; ++row) {
    const int64_t p = row / 16, c = row % 16;
    int32_t sum = 0;
    for (int64_t kk = 0; kk < k; ++kk) {
      const int8_t v = w_q[row * k + kk];
      dst[(p * w->k_pad + (kk / 4) * 4) * 16 + 4 * c + kk % 4] = v;
      sum += v;
    }
    w->w_sum[row] = sum;
    w->w_scale[row] = w_scale[row];
  }
  return w;
}

#if KILN_HAVE_VNNI
namespace {

struct Ctx {
  const Int8Weight* w;
  const Epilogue* ep;
  float out_inv_scale;
};

// What the fused epilogue needs of 16 output columns: the same for every row.
struct Columns16 {
  int64_t col;
  __mmask16 mask;
  __m512i w_sum;
  __m512 w_scale, bias;
};

inline Columns16 columns16(int64_t col, const Ctx& c) {
  const __mmask16 mask = col_mask(c.w->n - col);
  const float* bias = c.ep->bias;
  return {col, mask, _mm512_loadu_si512(c.w->w_sum.data() + col), _mm512_loadu_ps(c.w->w_scale.data() + col),
          bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + col) : _mm512_setzero_ps()};
}

// The fused epilogue for 16 columns of one row.
inline void finish16(__m512i acc, int64_t row, const Columns16& k, const Epilogue& ep, float out_inv_scale) {
  if (ep.kind == OutKind::kS32) {
    _mm512_mask_storeu_epi32(static_cast<int32_t*>(ep.out) + row * ep.ldo + k.col, k.mask, acc);
    return;
  }
  const __m512i zp = _mm512_set1_epi32(ep.x_zp[row * ep.x_zp_stride]);
  const __m512i exact = _mm512_sub_epi32(acc, _mm512_mullo_epi32(zp, k.w_sum));
  const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(ep.x_scale[row * ep.x_scale_stride]), k.w_scale);
  __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), scale);
  if (ep.bias != nullptr) y = _mm512_add_ps(y, k.bias);
  y = activate16(y, ep.act);
  if (ep.kind == OutKind::kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(ep.out) + row * ep.ldo + k.col, k.mask, y);
    return;
  }
  // clamp before the conversion: out-of-range floats convert to INT_MIN
  __m512 r = _mm512_mul_ps(y, _mm512_set1_ps(out_inv_scale));
  r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-512.0f)), _mm512_set1_ps(512.0f));
  __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(r), _mm512_set1_epi32(ep.out_zp));
  q = _mm512_max_epi32(q, _mm512_setzero_si512());
  _mm512_mask_cvtusepi32_storeu_epi8(static_cast<uint8_t*>(ep.out) + row * ep.ldo + k.col, k.mask, q);
}

inline void store16(__m512i acc, int64_t row, int64_t col, const Ctx& c) {
  finish16(acc, row, columns16(col, c), *c.ep, c.out_inv_scale);
}

// ---- VNNI: MR rows x NR panels of 16 columns, all of K in registers ----
template <int MR, int NR>
void vnni_block(const uint8_t* a, int64_t lda, const int8_t* b, int64_t panel_bytes, int64_t groups, int64_t row0,
                int64_t col0, const Ctx& c) {
  // Every loop over MR / NR is unrolled so that acc lives in registers; the epilogue reads
  // the sums back from memory (a rolled loop over acc would make GCC keep acc in memory).
  __m512i acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i bv[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) bv[j] = _mm512_load_si512(b + j * panel_bytes + g * 64);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t four;
      std::memcpy(&four, a + i * lda + 4 * g, 4);
      const __m512i av = _mm512_set1_epi32(four);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, bv[j]);
    }
  }
  alignas(64) int32_t sums[MR][NR * 16];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) _mm512_store_si512(sums[i] + 16 * j, acc[i][j]);
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) store16(_mm512_load_si512(sums[i] + 16 * j), row0 + i, col0 + 16 * j, c);
}

using VnniFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int64_t, int64_t, const Ctx&);
constexpr int kVnniRows = 6, kVnniPanels = 4;
#define KILN_VNNI_ROW(MR) {vnni_block<MR, 1>, vnni_block<MR, 2>, vnni_block<MR, 3>, vnni_block<MR, 4>}
const VnniFn kVnniBlocks[kVnniRows][kVnniPanels] = {KILN_VNNI_ROW(1), KILN_VNNI_ROW(2), KILN_VNNI_ROW(3),
                                                    KILN_VNNI_ROW(4), KILN_VNNI_ROW(5), KILN_VNNI_ROW(6)};
#undef KILN_VNNI_ROW

// Rows per outer chunk: the chunk's activations (about 256 KiB) stay in L2 while every
// weight panel streams past them once per chunk. A multiple of the row block.
int64_t row_chunk(int64_t lda, int64_t rows_per_block) {
  const int64_t rows = std::max<int64_t>(rows_per_block, (256 * 1024) / std::max<int64_t>(lda, 1));
  return rows / rows_per_block * rows_per_block;
}

void vnni_region(const uint8_t* a, int64_t lda, int64_t m0, int64_t m1, int64_t p0, int64_t p1, const Ctx& c) {
  const Int8Weight& w = *c.w;
  const int64_t panel_bytes = w.k_pad * 16, groups = (w.k + 3) / 4;
  const int8_t* packed = reinterpret_cast<const int8_t*>(w.packed.get());
  const int64_t chunk = row_chunk(lda, kVnniRows);
  for (int64_t mc = m0; mc < m1; mc += chunk) {
    const int64_t mc_end = std::min(m1, mc + chunk);
    for (int64_t p = p0; p < p1; p += kVnniPanels) {
      const int64_t np = std::min<int64_t>(kVnniPanels, p1 - p);
      for (int64_t r = mc; r < mc_end; r += kVnniRows) {
        const int64_t nr = std::min<int64_t>(kVnniRows, mc_end - r);
        kVnniBlocks[nr - 1][np - 1](a + r * lda, lda, packed + p * panel_bytes, panel_bytes, groups, r, p * 16, c);
      }
    }
  }
}

// ---- AMX: tiles 0-3 accumulate C (2 x 2 of 16 x 16 int32), 4-5 hold A, 6-7 hold B ----
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
template <int MT, int NT>
void amx_block(const uint8_t* a, int64_t lda, const int8_t* b, int64_t panel_bytes, int64_t kblocks,
               int32_t* scratch) {
  _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (MT > 1) _tile_zero(2);
  if (MT > 1 && NT > 1) _tile_zero(3);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    _tile_loadd(4, a + kb * 64, lda);
    if (MT > 1) _tile_loadd(5, a + 16 * lda + kb * 64, lda);
    _tile_loadd(6, b + kb * 1024, 64);
    if (NT > 1) _tile_loadd(7, b + panel_bytes + kb * 1024, 64);
    _tile_dpbusd(0, 4, 6);
    if (NT > 1) _tile_dpbusd(1, 4, 7);
    if (MT > 1) _tile_dpbusd(2, 5, 6);
    if (MT > 1 && NT > 1) _tile_dpbusd(3, 5, 7);
  }
  // scratch is 32 x 32 int32 (128-byte rows)
  _tile_stored(0, scratch, 128);
  if (NT > 1) _tile_stored(1, scratch + 16, 128);
  if (MT > 1) _tile_stored(2, scratch + 16 * 32, 128);
  if (MT > 1 && NT > 1) _tile_stored(3, scratch + 16 * 32 + 16, 128);
}

// The fused epilogue of one AMX block: `rows` rows of up to two 16-column panels of int32
// sums in scratch (128-byte rows), from row r0 and panel p0. What is the same down a
// column (the weight's sums and scales, the bias) is loaded once per panel and the
// epilogue's fields once per block (a local copy: the output stores could alias the
// struct, so finish16 through the pointer reloaded them for every row).
void store_block(const int32_t* scratch, int64_t r0, int64_t rows, int64_t p0, int panels, const Ctx& c) {
  const Epilogue ep = *c.ep;
  const float out_inv_scale = c.out_inv_scale;
  for (int j = 0; j < panels && (p0 + j) * 16 < c.w->n; ++j) {
    const Columns16 k = columns16((p0 + j) * 16, c);
    for (int64_t i = 0; i < rows; ++i) finish16(_mm512_load_si512(scratch + i * 32 + 16 * j), r0 + i, k, ep, out_inv_scale);
  }
}

void amx_region(const uint8_t* a, int64_t lda, int64_t m0, int64_t m1, int64_t p0, int64_t p1, const Ctx& c) {
  load_full_tiles();
  alignas(64) int32_t scratch[32 * 32];
  const Int8Weight& w = *c.w;
  const int64_t panel_bytes = w.k_pad * 16, kblocks = w.k_pad / 64;
  const int8_t* packed = reinterpret_cast<const int8_t*>(w.packed.get());
  const int64_t chunk = row_chunk(lda, 32);
  for (int64_t mc = m0; mc < m1; mc += chunk) {
    const int64_t mc_end = std::min(m1, mc + chunk);
    for (int64_t p = p0; p < p1; p += 2) {
      const bool two_n = p1 - p > 1;
      const int8_t* b = packed + p * panel_bytes;
      for (int64_t r = mc; r < mc_end; r += 32) {
        const bool two_m = mc_end - r > 16;
        const uint8_t* ar = a + r * lda;
        if (two_m && two_n) amx_block<2, 2>(ar, lda, b, panel_bytes, kblocks, scratch);
        else if (two_m) amx_block<2, 1>(ar, lda, b, panel_bytes, kblocks, scratch);
        else if (two_n) amx_block<1, 2>(ar, lda, b, panel_bytes, kblocks, scratch);
        else amx_block<1, 1>(ar, lda, b, panel_bytes, kblocks, scratch);
        store_block(scratch, r, std::min<int64_t>(32, mc_end - r), p, two_n ? 2 : 1, c);
      }
    }
  }
  _tile_release();
}
#endif

// The core: a is readable as the chosen path needs (see the file comment).
void gemm_ready(const uint8_t* a, int64_t lda, int64_t m, const Int8Weight& w, const Epilogue& ep, Path path,
                int threads) {
  const Ctx c{&w, &ep, 1.0f / ep.out_scale};
  const bool amx = path == Path::kAmx;
  const Split s = amx ? plan_split(threads, m, w.panels, 2, 32) : plan_split(threads, m, w.panels, kVnniPanels, 24);
  parallel_run(s.threads, [&](int t) {
    int64_t m0, m1, p0, p1;
    s.range(t, m, w.panels, m0, m1, p0, p1);
    if (m0 >= m1 || p0 >= p1) return;
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
    if (amx) return amx_region(a, lda, m0, m1, p0, p1, c);
#endif
    vnni_region(a, lda, m0, m1, p0, p1, c);
  });
}

// Activation buffer with rows rounded up to 32 and row length k_pad; only the padding is
// zeroed here (the caller writes the first K columns of the first M rows).
struct PaddedA {
  AlignedBytes bytes;
  int64_t ld;
};
PaddedA padded_a(int64_t m, const Int8Weight& w) {
  const int64_t rows = round_up(std::max<int64_t>(m, 1), 32);
  PaddedA pad{aligned_bytes(static_cast<size_t>(rows * w.k_pad), /*zero=*/false), w.k_pad};
  uint8_t* base = pad.bytes.get();
  if (w.k < w.k_pad)
    for (int64_t r = 0; r < m; ++r) std::memset(base + r * w.k_pad + w.k, 0, static_cast<size_t>(w.k_pad - w.k));
  std::memset(base + m * w.k_pad, 0, static_cast<size_t>((rows - m) * w.k_pad));
  return pad;
}

}  // namespace
#endif  // KILN_HAVE_VNNI

Path int8_gemm(const uint8_t* x_q, int64_t m, int64_t lda, const Int8Weight& w, const Epilogue& ep, Path path,
               int threads) {
#if KILN_HAVE_VNNI
  if (!vnni_supported()) throw std::runtime_error("int8 GEMM needs AVX512-VNNI");
  path = resolve_path(path, m);
  if (m == 0) return path;
  const bool direct = path == Path::kAmx ? (w.k == w.k_pad && m % 32 == 0) : (w.k % 4 == 0);
  if (direct) {
    gemm_ready(x_q, lda, m, w, ep, path, threads);
  } else {
    PaddedA pad = padded_a(m, w);
    for (int64_t r = 0; r < m; ++r) std::memcpy(pad.bytes.get() + r * pad.ld, x_q + r * lda, static_cast<size_t>(w.k));
    gemm_ready(pad.bytes.get(), pad.ld, m, w, ep, path, threads);
  }
  return path;
#else
  (void)x_q; (void)m; (void)lda; (void)w; (void)ep; (void)path; (void)threads;
  throw std::runtime_error("Kiln was built without AVX512-VNNI");
#endif
}

void quantize_rows_u8(const float* x, int64_t m, int64_t k, uint8_t* x_q, int64_t ldq, float* scale, int32_t* zp,
                      int threads) {
#if KILN_HAVE_VNNI
  const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, m / 8)));
  parallel_run(used, [&](int t) {
    for (int64_t r = m * t / used; r < m * (t + 1) / used; ++r) {
      const float* xr = x + r * k;
      // masked-off lanes load 0.0, harmless: the range always includes 0
      __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
      for (int64_t j = 0; j < k; j += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(col_mask(k - j), xr + j);
        lo = _mm512_min_ps(lo, v);
        hi = _mm512_max_ps(hi, v);
      }
      const float mn = _mm512_reduce_min_ps(lo), mx = _mm512_reduce_max_ps(hi);
      float s = (mx - mn) / 255.0f;
      if (s == 0.0f) s = 1.0f;
      const float inv = 1.0f / s;
      const int32_t z = static_cast<int32_t>(std::min(255.0f, std::max(0.0f, std::nearbyint(-mn / s))));
      scale[r] = s;
      zp[r] = z;
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i vz = _mm512_set1_epi32(z);
      uint8_t* qr = x_q + r * ldq;
      for (int64_t j = 0; j < k; j += 16) {
        const __mmask16 mask = col_mask(k - j);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + j), vinv);
        const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), vz);
        _mm512_mask_cvtusepi32_storeu_epi8(qr + j, mask, _mm512_max_epi32(q, _mm512_setzero_si512()));
      }
    }
  });
#else
  (void)x; (void)m; (void)k; (void)x_q; (void)ldq; (void)scale; (void)zp; (void)threads;
  throw std::runtime_error("Kiln was built without AVX-512");
#endif
}

Path qlinear_dynamic(const float* x, int64_t m, const Int8Weight& w, const float* bias, Activation act, float* y,
                     Path path, int threads) {
#if KILN_HAVE_VNNI
  if (!vnni_supported()) throw std::runtime_error("int8 GEMM needs AVX512-VNNI");
  path = resolve_path(path, m);
  if (m == 0) return path;
  PaddedA pad = padded_a(m, w);
  std::vector<float> scale(static_cast<size_t>(m));
  std::vector<int32_t> zp(static_cast<size_t>(m));
  quantize_rows_u8(x, m, w.k, pad.bytes.get(), pad.ld, scale.data(), zp.data(), threads);
  Epilogue ep;
  ep.x_scale = scale.data();
  ep.x_scale_stride = 1;
  ep.x_zp = zp.data();
  ep.x_zp_stride = 1;
  ep.bias = bias;
  ep.act = act;
  ep.kind = OutKind::kF32;
  ep.out = y;
  ep.ldo = w.n;
  gemm_ready(pad.bytes.get(), pad.ld, m, w, ep, path, threads);
  return path;
#else
  (void)x; (void)m; (void)w; (void)bias; (void)act; (void)y; (void)path; (void)threads;
  throw std::runtime_error("Kiln was built without AVX512-VNNI");
#endif
}

}  // namespace kiln::quant
