// Python binding of the Winograd transforms (kiln._C.winograd_input / winograd_output, and
// winograd_input_bf16 / winograd_output_bf16 over bf16 as int16 arrays), registered from
// module.cpp. Arrays are checked (dtype, C-contiguity, shapes, writable
// outputs) before the GIL is released; nothing is copied. kiln/kernels/winograd.py wraps
// them for channels-last torch tensors and runs the GEMMs between them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <type_traits>

#include "kiln.h"

namespace py = pybind11;
using farray = py::array_t<float, py::array::c_style>;
using harray = py::array_t<int16_t, py::array::c_style>;  // bf16 bits

namespace {

void expect(const py::buffer_info& b, const char* name, std::initializer_list<int64_t> shape) {
  bool ok = b.ndim == static_cast<py::ssize_t>(shape.size());
  int i = 0;
  for (int64_t d : shape) ok = ok && b.shape[i++] == d;
  if (!ok) throw py::value_error(std::string(name) + ": shape does not match the convolution");
}

// The convolution's shape from x (N, H, W, C) and y (N, OH, OW, K), checked: a 3x3 stride-1 conv.
kiln::WinogradShape shape_of(int64_t N, int64_t H, int64_t W, int64_t C, int64_t K, int64_t OH, int64_t OW,
                             int64_t ph, int64_t pw, int64_t m, int threads) {
  if (m != 2 && m != 4) throw py::value_error("m must be 2 or 4");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  if (OH != H + 2 * ph - 2 || OW != W + 2 * pw - 2)
    throw py::value_error("y: spatial size must be that of a stride-1 3x3 convolution of x");
  return {N, H, W, C, K, OH, OW, ph, pw, m};
}

// E: the element (float, or int16_t holding bf16); the C++ transforms take uint16_t for bf16.
template <typename E>
using earray = py::array_t<E, py::array::c_style>;
template <typename E>
using native_t = std::conditional_t<std::is_same_v<E, float>, float, uint16_t>;

template <typename E>
void input_py(earray<E> x, earray<E> V, int64_t OH, int64_t OW, int64_t K, int64_t ph, int64_t pw, int64_t m,
              int threads) {
  auto xb = x.request();
  if (xb.ndim != 4) throw py::value_error("x: expected (N, H, W, C)");
  if (!V.writeable()) throw py::value_error("V must be writable");
  const kiln::WinogradShape s = shape_of(xb.shape[0], xb.shape[1], xb.shape[2], xb.shape[3], K, OH, OW, ph, pw, m, threads);
  expect(V.request(), "V", {(m + 2) * (m + 2), kiln::winograd_tiles(s), s.C});
  const auto* xp = reinterpret_cast<const native_t<E>*>(x.data());
  auto* vp = reinterpret_cast<native_t<E>*>(V.mutable_data());
  py::gil_scoped_release nogil;
  if constexpr (std::is_same_v<E, float>) kiln::winograd_input(xp, vp, s, threads);
  else kiln::winograd_input_bf16(xp, vp, s, threads);
}

template <typename E>
void output_py(earray<E> M, earray<E> y, std::optional<farray> bias, std::optional<earray<E>> residual, bool relu,
               int64_t H, int64_t W, int64_t C, int64_t ph, int64_t pw, int64_t m, int threads) {
  auto yb = y.request();
  if (yb.ndim != 4) throw py::value_error("y: expected (N, OH, OW, K)");
  if (!y.writeable()) throw py::value_error("y must be writable");
  const kiln::WinogradShape s = shape_of(yb.shape[0], H, W, C, yb.shape[3], yb.shape[1], yb.shape[2], ph, pw, m, threads);
  expect(M.request(), "M", {(m + 2) * (m + 2), kiln::winograd_tiles(s), s.K});
  const float* bp = nullptr;
  const native_t<E>* rp = nullptr;
  if (bias) {
    expect(bias->request(), "bias", {s.K});
    bp = bias->data();
  }
  if (residual) {
    expect(residual->request(), "residual", {s.N, s.OH, s.OW, s.K});
    rp = reinterpret_cast<const native_t<E>*>(residual->data());
  }
  const auto* mp = reinterpret_cast<const native_t<E>*>(M.data());
  auto* yp = reinterpret_cast<native_t<E>*>(y.mutable_data());
  py::gil_scoped_release nogil;
  if constexpr (std::is_same_v<E, float>) kiln::winograd_output(mp, yp, bp, rp, relu, s, threads);
  else kiln::winograd_output_bf16(mp, yp, bp, rp, relu, s, threads);
}

void weight_py(farray w, farray U, int64_t m, int threads) {
  auto wb = w.request();
  if (wb.ndim != 4 || wb.shape[2] != 3 || wb.shape[3] != 3) throw py::value_error("w: expected (K, C, 3, 3)");
  if (m != 2 && m != 4) throw py::value_error("m must be 2 or 4");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  if (!U.writeable()) throw py::value_error("U must be writable");
  const int64_t K = wb.shape[0], C = wb.shape[1];
  expect(U.request(), "U", {(m + 2) * (m + 2), C, K});
  const float* wp = w.data();
  float* up = U.mutable_data();
  py::gil_scoped_release nogil;
  kiln::winograd_weight(wp, up, K, C, m, threads);
}

}  // namespace

void register_winograd_kernels(py::module_& m) {
  m.def("winograd_supported", &kiln::winograd_supported, "Whether the Winograd transforms were built (AVX-512).");
  m.def("winograd_input", &input_py<float>, py::arg("x").noconvert(), py::arg("V").noconvert(), py::arg("OH"),
        py::arg("OW"), py::arg("K"), py::arg("ph"), py::arg("pw"), py::arg("m"), py::arg("threads") = 1,
        "V ((m+2)^2, T, C) = input transform of every m x m output tile of a 3x3 stride-1 conv over x (N,H,W,C).");
  m.def("winograd_output", &output_py<float>, py::arg("M").noconvert(), py::arg("y").noconvert(), py::arg("bias"),
        py::arg("residual"), py::arg("relu"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("ph"), py::arg("pw"),
        py::arg("m"), py::arg("threads") = 1,
        "y (N,OH,OW,K) = act(output transform of M ((m+2)^2, T, K) + bias + residual).");
  m.def("winograd_bf16_supported", &kiln::winograd_bf16_supported,
        "Whether winograd_input_bf16 / winograd_output_bf16 can run here (AVX512-BF16).");
  m.def("winograd_input_bf16", &input_py<int16_t>, py::arg("x").noconvert(), py::arg("V").noconvert(), py::arg("OH"),
        py::arg("OW"), py::arg("K"), py::arg("ph"), py::arg("pw"), py::arg("m"), py::arg("threads") = 1,
        "winograd_input over bf16 (int16 views): the transform in fp32, V rounded to bf16.");
  m.def("winograd_output_bf16", &output_py<int16_t>, py::arg("M").noconvert(), py::arg("y").noconvert(),
        py::arg("bias"), py::arg("residual"), py::arg("relu"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("ph"),
        py::arg("pw"), py::arg("m"), py::arg("threads") = 1,
        "winograd_output over bf16 (int16 views; bias fp32): the transform and epilogue in fp32, y rounded to bf16.");
  m.def("winograd_weight", &weight_py, py::arg("w").noconvert(), py::arg("U").noconvert(), py::arg("m"),
        py::arg("threads") = 1, "U ((m+2)^2, C, K) = G g G^T of every 3x3 filter g of w (K, C, 3, 3), in double.");
}
