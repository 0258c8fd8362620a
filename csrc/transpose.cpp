// Batched 2-D transposition, the NCHW <-> NHWC layout change (kiln._C.transpose_batched).
// torch's strided copy walks the output in order and reads the input a whole row apart each
// element, so a [C, H*W] plane of a few MB misses the cache and the TLB on nearly every read;
// here the plane is copied in square tiles that fit L1 (both sides touch a few cache lines
// per tile row). Elements are moved as raw bytes of their size (1, 2, 4 or 8), so any dtype
// works; bf16 and fp32 are the ones Kiln's layouts carry.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd_math.h"

namespace py = pybind11;

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

void transpose_batched_py(py::array x, py::array y, int threads) {
  if (x.ndim() != 3 || y.ndim() != 3) throw py::value_error("x and y: expected (batch, rows, cols) and (batch, cols, rows)");
  if (!(x.flags() & py::array::c_style) || !(y.flags() & py::array::c_style))
    throw py::value_error("x and y must be C-contiguous");
  if (!y.writeable()) throw py::value_error("y must be writable");
  if (x.itemsize() != y.itemsize()) throw py::type_error("x and y must have the same element size");
  if (y.shape(0) != x.shape(0) || y.shape(1) != x.shape(2) || y.shape(2) != x.shape(1))
    throw py::value_error("y must have shape (batch, cols, rows) of x's (batch, rows, cols)");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const int64_t b = x.shape(0), r = x.shape(1), c = x.shape(2);
  const void* xp = x.data();
  void* yp = y.mutable_data();
  const auto size = x.itemsize();
  py::gil_scoped_release nogil;
  switch (size) {
    case 1: transpose_tiles(static_cast<const uint8_t*>(xp), static_cast<uint8_t*>(yp), b, r, c, threads); break;
    case 2: transpose_tiles(static_cast<const uint16_t*>(xp), static_cast<uint16_t*>(yp), b, r, c, threads); break;
    case 4: transpose_tiles(static_cast<const uint32_t*>(xp), static_cast<uint32_t*>(yp), b, r, c, threads); break;
    case 8: transpose_tiles(static_cast<const uint64_t*>(xp), static_cast<uint64_t*>(yp), b, r, c, threads); break;
    default: throw py::type_error("element size must be 1, 2, 4 or 8 bytes");
  }
}

}  // namespace

void register_transpose_kernels(py::module_& m) {
  m.def("transpose_batched", &transpose_batched_py, py::arg("x"), py::arg("y"), py::arg("threads") = 1,
        "y (batch, cols, rows) = x (batch, rows, cols) transposed per batch, in cache-sized tiles; any element "
        "size of 1, 2, 4 or 8 bytes (both C-contiguous).");
}
