// Python binding of the NHWC max-pool (kiln._C.max_pool2d_nhwc), registered from module.cpp.
// Like module.cpp: arrays are checked (dtype, rank, C-contiguity, matching shapes, writable
// output) before the GIL is released; nothing is copied. kiln/kernels/pool_cpu.py wraps it
// for torch tensors (a channels-last tensor's NHWC view; bf16 passed as its int16 bits).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>

#include "kiln.h"

namespace py = pybind11;

namespace {

void max_pool2d_nhwc_py(py::array x, py::array y, std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride,
                        std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation, int threads) {
  const bool f32 = x.dtype().is(py::dtype::of<float>());
  const bool b16 = x.dtype().itemsize() == 2 && (x.dtype().kind() == 'i' || x.dtype().kind() == 'u');
  if (!f32 && !b16) throw py::type_error("x: expected float32, or bfloat16 bits as int16/uint16");
  if (!y.dtype().is(x.dtype())) throw py::type_error("y: must have x's dtype");
  if (x.ndim() != 4 || y.ndim() != 4) throw py::value_error("x and y: expected (N, H, W, C)");
  if (!(x.flags() & py::array::c_style) || !(y.flags() & py::array::c_style))
    throw py::value_error("x and y must be C-contiguous (an NHWC view of a channels-last tensor)");
  if (!y.writeable()) throw py::value_error("y must be writable");
  if (y.shape(0) != x.shape(0) || y.shape(3) != x.shape(3)) throw py::value_error("y: batch and channels must match x");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  kiln::PoolShape s{x.shape(0), x.shape(1), x.shape(2), x.shape(3), y.shape(1), y.shape(2),
                    kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  const void* xp = x.data();
  void* yp = y.mutable_data();
  py::gil_scoped_release nogil;
  kiln::max_pool2d_nhwc(xp, yp, s, b16, threads);
}

}  // namespace

void register_pool_kernels(py::module_& m) {
  m.def("max_pool_supported", &kiln::max_pool_supported, "Whether the NHWC max-pool was built (AVX-512).");
  m.def("max_pool2d_nhwc", &max_pool2d_nhwc_py, py::arg("x"), py::arg("y"), py::arg("kernel"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("threads") = 1,
        "y (N,OH,OW,C) = max over each window of x (N,H,W,C); fp32, or bf16 as int16 bits.");
}
