// Batched 2-D transposition, the NCHW <-> NHWC layout change (kiln._C.transpose_batched).
// torch's strided copy walks the output in order and reads the input a whole row apart each
// element, so a [C, H*W] plane of a few MB misses the cache and the TLB on nearly every read;
// here the plane is copied in square tiles that fit L1 (both sides touch a few cache lines
// per tile row). Elements are moved as raw bytes of their size (1, 2, 4 or 8), so any dtype
// works; bf16 and fp32 are the ones Kiln's layouts carry.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kiln.h"
#include "simd_math.h"

namespace {

// 16 x 16 tiles: 16 rows of one operand a power-of-two stride apart (C = 512 channels) still
// fit the L1's sets, where 32 rows evicted each other.
constexpr int64_t kTile = 16;

#ifdef __AVX512F__

// A full 16 x 16 tile of 4-byte elements: 16 row loads, the register transpose, 16 row stores.
inline bool full_tile(const uint32_t* x, uint32_t* y, int64_t rows, int64_t cols) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(x + i * cols);
  kiln::transpose16(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(y + i * rows, r[i]);
  return true;
}
#endif

template <typename T>
inline bool full_tile(const T*, T*, int64_t, int64_t) {
  return false;  // other element sizes: the loops below
}

template <typename T>
void transpose_tiles(const T* x, T* y, int64_t batch, int64_t rows, int64_t cols, int threads) {
  // x [batch, rows, cols] -> y [batch, cols, rows], both contiguous
  const int64_t rt = (rows + kTile - 1) / kTile, ct = (cols + kTile - 1) / kTile;
  const int64_t tiles = batch * rt * ct;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    // row tiles fastest: each task's 16 output rows are written front to back, whole cache
    // lines while they are hot (an output row length like 3199 puts tile edges mid-line)
    const int64_t b = t / (rt * ct), c0 = (t / rt) % ct * kTile, r0 = t % rt * kTile;
    const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
    const T* xb = x + b * rows * cols;
    T* yb = y + b * rows * cols;
    if (r1 - r0 == kTile && c1 - c0 == kTile && full_tile(xb + r0 * cols + c0, yb + c0 * rows + r0, rows, cols)) {
      // done in registers
    } else if (r1 - r0 == kTile && c1 - c0 == kTile) {  // full tile: fixed trip counts vectorize
      for (int64_t c = 0; c < kTile; ++c)
        for (int64_t r = 0; r < kTile; ++r) yb[(c0 + c) * rows + r0 + r] = xb[(r0 + r) * cols + c0 + c];
    } else {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) yb[c * rows + r] = xb[r * cols + c];
    }
  }
}

}  // namespace

namespace kiln {

bool transpose_batched(const void* x, void* y, int64_t b, int64_t r, int64_t c, int64_t itemsize, int threads) {
  switch (itemsize) {
    case 1: transpose_tiles(static_cast<const uint8_t*>(x), static_cast<uint8_t*>(y), b, r, c, threads); return true;
    case 2: transpose_tiles(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), b, r, c, threads); return true;
    case 4: transpose_tiles(static_cast<const uint32_t*>(x), static_cast<uint32_t*>(y), b, r, c, threads); return true;
    case 8: transpose_tiles(static_cast<const uint64_t*>(x), static_cast<uint64_t*>(y), b, r, c, threads); return true;
    default: return false;
  }
}

}  // namespace kiln
