// Python binding of the channels-last group norm (csrc/group_norm.cpp), registered from
// module.cpp. Arrays are checked (dtype, C-contiguity, shapes, a writable output) before the
// GIL is released; nothing is copied. kiln/kernels/group_norm.py wraps it for torch tensors.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "array_checks.h"
#include "kiln.h"

namespace py = pybind11;
using farray = py::array_t<float, py::array::c_style>;

namespace {

bool bf16_bits(const py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<float>())) return false;
  if (kiln::bindings::is_bf16_bits(a)) return true;
  throw py::value_error(std::string(name) + ": expected float32, or bfloat16 passed as 16-bit integers");
}

void group_norm_py(py::array x, py::array y, std::optional<farray> weight, std::optional<farray> bias,
                   int64_t groups, float eps, bool relu, int threads) {
  const bool x_bf16 = bf16_bits(x, "x"), y_bf16 = bf16_bits(y, "y");
  if (!(x.flags() & py::array::c_style) || !(y.flags() & py::array::c_style))
    throw py::value_error("x and y must be C-contiguous");
  auto xb = x.request(), yb = y.request(true);
  if (xb.ndim != 3) throw py::value_error("x: expected (N, H*W, C)");
  if (yb.ndim != 3 || yb.shape[0] != xb.shape[0] || yb.shape[1] != xb.shape[1] || yb.shape[2] != xb.shape[2])
    throw py::value_error("y must have x's shape");
  if (!y.writeable()) throw py::value_error("y must be writable");
  const int64_t N = xb.shape[0], HW = xb.shape[1], C = xb.shape[2];
  if (groups < 1 || C % groups) throw py::value_error("the channels must split into the groups");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const float* wp = nullptr;
  const float* bp = nullptr;
  if (weight) {
    if (weight->ndim() != 1 || weight->shape(0) != C) throw py::value_error("weight: expected (C,)");
    wp = weight->data();
  }
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != C) throw py::value_error("bias: expected (C,)");
    bp = bias->data();
  }
  const void* xp = xb.ptr;
  void* yp = yb.ptr;
  py::gil_scoped_release nogil;
  kiln::group_norm_nhwc(xp, x_bf16, yp, y_bf16, wp, bp, N, HW, C, groups, eps, relu, threads);
}

}  // namespace

void register_group_norm_kernels(py::module_& m) {
  m.def("group_norm_nhwc", &group_norm_py, py::arg("x").noconvert(), py::arg("y").noconvert(), py::arg("weight"),
        py::arg("bias"), py::arg("groups"), py::arg("eps"), py::arg("relu") = false, py::arg("threads") = 1,
        "y (N, H*W, C) = the group norm of channels-last images x (N, H*W, C), then ReLU if relu: two passes,\n"
        "sums in double. x and y float32 or bfloat16 (as 16-bit integers): fp32 math, the result rounded once.");
}
