// Python binding of the AMX-BF16 GEMM (kiln._C.bf16_prepack / bf16_linear), registered from
// module.cpp. bf16 arrays arrive as 16-bit integer views (numpy has no bfloat16); rows may
// be strided (a slice of a wider activation), the last dimension must be contiguous. Every
// shape is checked before the GIL is released; nothing is copied here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "activation.h"
#include "array_checks.h"
#include "bf16_gemm.h"

namespace py = pybind11;

namespace kiln::bf16 {
namespace {

struct Bf16Packed {
  std::shared_ptr<Bf16Weight> w;
};

bool is_f32(const py::array& a) { return a.dtype().is(py::dtype::of<float>()); }

using bindings::is_bf16_bits;
using bindings::row_stride;

Bf16Packed prepack_py(py::array w) {
  if (!is_bf16_bits(w)) throw py::value_error("w: expected bfloat16 passed as 16-bit integers");
  const py::buffer_info b = w.request();
  if (b.ndim != 2) throw py::value_error("w: expected a rank-2 (N, K) array");
  const int64_t n = b.shape[0], k = b.shape[1];
  if (row_stride(b, n, k, "w") != k) throw py::value_error("w: expected a C-contiguous array");
  return {prepack_bf16(static_cast<const uint16_t*>(b.ptr), n, k)};
}

using Bias = std::optional<py::array_t<float, py::array::c_style>>;

void linear_py(py::array x, const Bf16Packed& p, Bias bias, std::optional<py::array> residual,
               const std::string& activation, py::array out, int threads, bool dot) {
  if (threads < 1 || threads > 256) throw py::value_error("threads must be in [1, 256]");
  const Bf16Weight& w = *p.w;
  if (!is_bf16_bits(x)) throw py::value_error("x: expected bfloat16 passed as 16-bit integers");
  const py::buffer_info xb = x.request();
  if (xb.ndim != 2) throw py::value_error("x: expected a rank-2 (M, K) array");
  const int64_t m = xb.shape[0];
  Bf16Epilogue ep;
  const int64_t lda = row_stride(xb, m, w.k, "x");
  ep.act = quant::parse_activation(activation);
  std::optional<py::buffer_info> bb, rb;
  if (bias) {
    bb = bias->request();
    if (bb->ndim != 1 || bb->shape[0] != w.n) throw py::value_error("bias: expected shape (N,)");
    ep.bias = static_cast<const float*>(bb->ptr);
  }
  if (residual) {
    if (!is_bf16_bits(*residual) && !is_f32(*residual)) throw py::value_error("residual: expected bfloat16 or float32");
    rb = residual->request();
    ep.ldr = row_stride(*rb, m, w.n, "residual");
    ep.residual = rb->ptr;
    ep.residual_bf16 = is_bf16_bits(*residual);
  }
  if (!is_bf16_bits(out) && !is_f32(out)) throw py::value_error("out: expected bfloat16 or float32");
  if (!out.writeable()) throw py::value_error("out must be writable");
  const py::buffer_info ob = out.request(true);
  ep.ldo = row_stride(ob, m, w.n, "out");
  ep.out = ob.ptr;
  ep.out_bf16 = is_bf16_bits(out);
  py::gil_scoped_release release;
  if (dot) {
    bf16_dot_gemm(static_cast<const uint16_t*>(xb.ptr), m, lda, w, ep, threads);
  } else {
    bf16_gemm(static_cast<const uint16_t*>(xb.ptr), m, lda, w, ep, threads);
  }
}

}  // namespace
}  // namespace kiln::bf16

void register_bf16_gemm_kernels(py::module_& m) {
  using namespace kiln::bf16;
  py::class_<Bf16Packed>(m, "Bf16PackedWeight", "bf16 weight prepacked for bf16_linear (AMX B-tile panels)")
      .def_property_readonly("n", [](const Bf16Packed& p) { return p.w->n; })
      .def_property_readonly("k", [](const Bf16Packed& p) { return p.w->k; })
      .def_property_readonly("nbytes", [](const Bf16Packed& p) { return p.w->panels * p.w->k_pad * 32; });
  m.def("bf16_gemm_supported", &bf16_gemm_supported,
        "Whether bf16_linear can run here (built with AMX-BF16, the CPU has it, tile state granted).");
  m.def("bf16_prepack", &prepack_py, py::arg("w"), "Prepack w bf16 (N, K), as int16 bits, for bf16_linear.");
  m.def("bf16_dot_gemm_supported", &bf16_dot_gemm_supported,
        "Whether bf16_dot_linear can run here (built with AVX512-BF16 and the CPU has it).");
  m.def(
      "bf16_dot_linear",
      [](py::array x, const Bf16Packed& p, Bias bias, std::optional<py::array> residual, const std::string& activation,
         py::array out, int threads) { linear_py(x, p, bias, residual, activation, out, threads, true); },
      py::arg("x"), py::arg("packed"), py::arg("bias").noconvert() = py::none(), py::arg("residual") = py::none(),
      py::arg("activation") = "none", py::arg("out"), py::arg("threads") = 1,
      "bf16_linear on AVX512-BF16 dot products (no AMX), from the same packed weight.");
  m.def(
      "bf16_linear",
      [](py::array x, const Bf16Packed& p, Bias bias, std::optional<py::array> residual, const std::string& activation,
         py::array out, int threads) { linear_py(x, p, bias, residual, activation, out, threads, false); },
      py::arg("x"), py::arg("packed"), py::arg("bias").noconvert() = py::none(),
        py::arg("residual") = py::none(), py::arg("activation") = "none", py::arg("out"), py::arg("threads") = 1,
        "out (M, N) = act(x (M, K) @ w^T + bias + residual), x bf16 as int16 bits; out and residual bf16 (int16\n"
        "bits) or float32; bias float32 (N,). Rows of x, residual and out may be strided.");
}
