// Python binding of the AVX2 fp32 GEMM (kiln._C.f32_prepack / f32_linear), registered from
// module.cpp. Rows of x and out may be strided (a slice of a wider activation); the last
// dimension must be contiguous. Every shape is checked before the GIL is released; nothing
// is copied here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "activation.h"
#include "array_checks.h"
#include "f32_gemm.h"

namespace py = pybind11;

namespace kiln::f32 {
namespace {

struct F32Packed {
  std::shared_ptr<F32Weight> w;
};

// A rank-2 float32 [rows, cols] array with a contiguous last dimension: its row stride.
int64_t row_stride(const py::array& a, const py::buffer_info& b, int64_t rows, int64_t cols, const char* name) {
  if (!a.dtype().is(py::dtype::of<float>())) throw py::value_error(std::string(name) + ": expected float32");
  return bindings::row_stride(b, rows, cols, name);
}

F32Packed prepack_py(py::array w) {
  const py::buffer_info b = w.request();
  if (b.ndim != 2) throw py::value_error("w: expected a rank-2 (N, K) array");
  const int64_t n = b.shape[0], k = b.shape[1];
  if (row_stride(w, b, n, k, "w") != k) throw py::value_error("w: expected a C-contiguous array");
  if (!f32_gemm_supported()) throw py::value_error("f32_linear needs a build with AVX2 and FMA");
  return {prepack_f32(static_cast<const float*>(b.ptr), n, k)};
}

void linear_py(py::array x, const F32Packed& p, std::optional<py::array_t<float, py::array::c_style>> bias,
               py::array out, int threads, const std::string& activation) {
  if (threads < 1 || threads > 256) throw py::value_error("threads must be in [1, 256]");
  const quant::Activation act = quant::parse_activation(activation);
  if (act != quant::Activation::kNone && act != quant::Activation::kRelu && act != quant::Activation::kGelu)
    throw py::value_error("f32_linear fuses the activations none, relu and gelu; got '" + activation + "'");
  const F32Weight& w = *p.w;
  const py::buffer_info xb = x.request();
  if (xb.ndim != 2) throw py::value_error("x: expected a rank-2 (M, K) array");
  const int64_t m = xb.shape[0];
  const int64_t lda = row_stride(x, xb, m, w.k, "x");
  const float* bias_ptr = nullptr;
  std::optional<py::buffer_info> bb;
  if (bias) {
    bb = bias->request();
    if (bb->ndim != 1 || bb->shape[0] != w.n) throw py::value_error("bias: expected shape (N,)");
    bias_ptr = static_cast<const float*>(bb->ptr);
  }
  if (!out.writeable()) throw py::value_error("out must be writable");
  const py::buffer_info ob = out.request(true);
  const int64_t ldo = row_stride(out, ob, m, w.n, "out");
  py::gil_scoped_release release;
  f32_gemm(static_cast<const float*>(xb.ptr), m, lda, w, bias_ptr, static_cast<float*>(ob.ptr), ldo, threads, act);
}

}  // namespace
}  // namespace kiln::f32

void register_f32_gemm_kernels(py::module_& m) {
  using namespace kiln::f32;
  py::class_<F32Packed>(m, "F32PackedWeight", "fp32 weight prepacked for f32_linear (16-channel panels)")
      .def_property_readonly("n", [](const F32Packed& p) { return p.w->n; })
      .def_property_readonly("k", [](const F32Packed& p) { return p.w->k; })
      .def_property_readonly("nbytes", [](const F32Packed& p) { return p.w->panels * 16 * p.w->k * 4; });
  m.def("f32_gemm_supported", &f32_gemm_supported, "Whether f32_linear was built (AVX2 and FMA).");
  m.def("f32_prepack", &prepack_py, py::arg("w"), "Prepack w float32 (N, K) for f32_linear.");
  m.def("f32_linear", &linear_py, py::arg("x"), py::arg("packed"), py::arg("bias").noconvert() = py::none(),
        py::arg("out"), py::arg("threads") = 1, py::arg("activation") = "none",
        "out (M, N) = act(x (M, K) @ w^T + bias), float32; bias (N,); activation none, relu or gelu. "
        "Rows of x and out may be strided.");
}
