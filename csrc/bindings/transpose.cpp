// Python binding of the tiled batched transpose (csrc/transpose.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

#include "kiln.h"

namespace py = pybind11;

namespace {

void transpose_batched_py(py::array x, py::array y, int threads) {
  if (x.ndim() != 3 || y.ndim() != 3) throw py::value_error("x and y: expected (batch, rows, cols) and (batch, cols, rows)");
  if (!(x.flags() & py::array::c_style) || !(y.flags() & py::array::c_style))
    throw py::value_error("x and y must be C-contiguous");
  if (!y.writeable()) throw py::value_error("y must be writable");
  if (x.itemsize() != y.itemsize()) throw py::type_error("x and y must have the same element size");
  if (y.shape(0) != x.shape(0) || y.shape(1) != x.shape(2) || y.shape(2) != x.shape(1))
    throw py::value_error("y must have shape (batch, cols, rows) of x's (batch, rows, cols)");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const int64_t size = x.itemsize();
  if (size != 1 && size != 2 && size != 4 && size != 8) throw py::type_error("element size must be 1, 2, 4 or 8 bytes");
  const int64_t b = x.shape(0), r = x.shape(1), c = x.shape(2);
  const void* xp = x.data();
  void* yp = y.mutable_data();
  py::gil_scoped_release nogil;
  kiln::transpose_batched(xp, yp, b, r, c, size, threads);
}

}  // namespace

void register_transpose_kernels(py::module_& m) {
  m.def("transpose_batched", &transpose_batched_py, py::arg("x"), py::arg("y"), py::arg("threads") = 1,
        "y (batch, cols, rows) = x (batch, rows, cols) transposed per batch, in cache-sized tiles; any element "
        "size of 1, 2, 4 or 8 bytes (both C-contiguous).");
}
