// Python bindings of the NHWC max-pool (kiln._C.max_pool2d_nhwc) and of the per-tensor uint8
// quantize / dequantize of activations, registered from module.cpp.
// Like module.cpp: arrays are checked (dtype, rank, C-contiguity, matching shapes, writable
// output) before the GIL is released; nothing is copied. kiln/kernels/pool_cpu.py wraps it
// for torch tensors (a channels-last tensor's NHWC view; bf16 passed as its int16 bits).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <utility>

#include "array_checks.h"
#include "kiln.h"

namespace py = pybind11;

namespace {

void max_pool2d_nhwc_py(py::array x, py::array y, std::array<int64_t, 2> kernel, std::array<int64_t, 2> stride,
                        std::array<int64_t, 2> padding, std::array<int64_t, 2> dilation, int threads) {
  const bool f32 = x.dtype().is(py::dtype::of<float>());
  const bool b16 = kiln::bindings::is_bf16_bits(x);
  const bool u8 = x.dtype().is(py::dtype::of<uint8_t>());
  if (!f32 && !b16 && !u8) throw py::type_error("x: expected float32, uint8, or bfloat16 bits as int16/uint16");
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
  if (u8)
    kiln::max_pool2d_nhwc_u8(static_cast<const uint8_t*>(xp), static_cast<uint8_t*>(yp), s, threads);
  else
    kiln::max_pool2d_nhwc(xp, yp, s, b16, threads);
}

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

// Elementwise: x and y the same shape, both C-contiguous (the same memory format's view).
template <typename In, typename Out>
std::pair<const In*, Out*> same_shape(carray<In>& x, carray<Out>& y) {
  if (x.ndim() != y.ndim()) throw py::value_error("x and y must have the same shape");
  for (py::ssize_t i = 0; i < x.ndim(); ++i)
    if (x.shape(i) != y.shape(i)) throw py::value_error("x and y must have the same shape");
  if (!y.writeable()) throw py::value_error("y must be writable");
  return {x.data(), y.mutable_data()};
}

void quantize_u8_py(carray<float> x, carray<uint8_t> y, double scale, int32_t zero_point, int threads) {
  auto [xp, yp] = same_shape(x, y);
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  kiln::quantize_u8(xp, yp, n, scale, zero_point, threads);
}

void dequantize_u8_py(carray<uint8_t> x, carray<float> y, double scale, int32_t zero_point, int threads) {
  auto [xp, yp] = same_shape(x, y);
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const int64_t n = x.size();
  py::gil_scoped_release nogil;
  kiln::dequantize_u8(xp, yp, n, scale, zero_point, threads);
}

}  // namespace

void register_pool_kernels(py::module_& m) {
  m.def("max_pool_supported", &kiln::max_pool_supported, "Whether the NHWC max-pool was built (AVX-512).");
  m.def("quantize_u8", &quantize_u8_py, py::arg("x").noconvert(), py::arg("y").noconvert(), py::arg("scale"),
        py::arg("zero_point"), py::arg("threads") = 1,
        "y = clamp(round(x * float(1/scale)) + zero_point, 0, 255), ties to even (per-tensor uint8 QUANTIZE).");
  m.def("dequantize_u8", &dequantize_u8_py, py::arg("x").noconvert(), py::arg("y").noconvert(), py::arg("scale"),
        py::arg("zero_point"), py::arg("threads") = 1, "y = (x - zero_point) * scale (per-tensor uint8 DEQUANTIZE).");
  m.def("max_pool_u8_supported", &kiln::max_pool_u8_supported, "Whether its uint8 path was built (AVX-512BW).");
  m.def("max_pool2d_nhwc", &max_pool2d_nhwc_py, py::arg("x"), py::arg("y"), py::arg("kernel"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("threads") = 1,
        "y (N,OH,OW,C) = max over each window of x (N,H,W,C); fp32, uint8, or bf16 as int16 bits.");
}
