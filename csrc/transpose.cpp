// Batched 2-D transposition, the NCHW <-> NHWC layout change (kiln._C.transpose_batched).
// torch's strided copy walks the output in order and reads the input a whole row apart each
// element, so a [C, H*W] plane of a few MB misses the cache and the TLB on nearly every read;
// here the plane is copied in square tiles that fit L1 (both sides touch a few cache lines
// per tile row). Elements are moved as raw bytes of their size (1, 2, 4 or 8), so any dtype
// works; bf16 and fp32 are the ones Kiln's layouts carry.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace py = pybind11;

namespace {

constexpr int64_t kTile = 32;

template <typename T>
void transpose_tiles(const T* x, T* y, int64_t batch, int64_t rows, int64_t cols, int threads) {
  // x [batch, rows, cols] -> y [batch, cols, rows], both contiguous
  const int64_t rt = (rows + kTile - 1) / kTile, ct = (cols + kTile - 1) / kTile;
  const int64_t tiles = batch * rt * ct;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t b = t / (rt * ct), r0 = (t / ct) % rt * kTile, c0 = t % ct * kTile;
    const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
    const T* xb = x + b * rows * cols;
    T* yb = y + b * rows * cols;
    if (r1 - r0 == kTile && c1 - c0 == kTile) {  // full tile: fixed trip counts vectorize
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
