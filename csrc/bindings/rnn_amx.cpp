// Python binding of the bf16 AMX LSTM layer (kiln._C.lstm_amx_pack / lstm_layer_amx),
// registered from module.cpp. bf16 arrays arrive as int16 views (numpy has no bfloat16); x
// and y are (T, B, F) views with contiguous rows (a batch-first layer passes transposed
// views); every shape is checked before the GIL is released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "kiln.h"

namespace py = pybind11;

namespace {

using farray = py::array_t<float, py::array::c_style>;
using harray = py::array_t<int16_t>;  // bf16 bits, any strides (checked)

struct LstmAmxPacked {
  kiln::LstmAmxWeight w;
};

void expect(const py::buffer_info& b, std::initializer_list<int64_t> shape, const char* name) {
  bool ok = b.ndim == static_cast<py::ssize_t>(shape.size());
  size_t i = 0;
  for (int64_t s : shape) ok = ok && b.shape[i++] == s;
  if (!ok) throw py::value_error(std::string(name) + ": wrong shape");
}

bool c_contiguous(const py::buffer_info& b) {
  py::ssize_t stride = b.itemsize;
  for (py::ssize_t d = b.ndim - 1; d >= 0; --d) {
    if (b.shape[d] != 1 && b.strides[d] != stride) return false;
    stride *= b.shape[d];
  }
  return true;
}

LstmAmxPacked pack_py(farray w_ih, farray w_hh, std::optional<farray> b_ih, std::optional<farray> b_hh) {
  auto wi = w_ih.request(), wh = w_hh.request();
  if (wi.ndim != 2 || wh.ndim != 2 || wi.shape[0] % 4 != 0) throw py::value_error("w_ih, w_hh: expected (4H, I), (4H, H)");
  const int64_t H = wi.shape[0] / 4, I = wi.shape[1];
  expect(wh, {4 * H, H}, "w_hh");
  const float* bi = nullptr;
  const float* bh = nullptr;
  if (b_ih) { expect(b_ih->request(), {4 * H}, "b_ih"); bi = b_ih->data(); }
  if (b_hh) { expect(b_hh->request(), {4 * H}, "b_hh"); bh = b_hh->data(); }
  return {kiln::lstm_amx_pack(w_ih.data(), w_hh.data(), bi, bh, I, H)};
}

void layer_py(harray x, const LstmAmxPacked& p, harray h0, farray c0, harray y, harray hn, farray cn, int threads) {
  if (threads < 1 || threads > 256) throw py::value_error("threads must be in [1, 256]");
  const auto& w = p.w;
  auto xb = x.request(), yb = y.request(true), hb0 = h0.request(), cb0 = c0.request(), hbn = hn.request(true),
       cbn = cn.request(true);
  if (xb.ndim != 3 || yb.ndim != 3) throw py::value_error("x and y: expected (T, B, I) and (T, B, H)");
  const int64_t T = xb.shape[0], B = xb.shape[1];
  expect(xb, {T, B, w.I}, "x");
  expect(yb, {T, B, w.H}, "y");
  for (auto* b : {&xb, &yb})
    if ((b->shape[2] > 1 && b->strides[2] != 2) || b->strides[0] % 2 || b->strides[1] % 2)
      throw py::value_error("x and y need contiguous rows (last-dimension stride 1)");
  expect(hb0, {B, w.H}, "h0");
  expect(hbn, {B, w.H}, "hn");
  expect(cb0, {B, w.H}, "c0");
  expect(cbn, {B, w.H}, "cn");
  if (!c_contiguous(hb0) || !c_contiguous(hbn)) throw py::value_error("h0 and hn must be C-contiguous");
  if (!y.writeable() || !hn.writeable() || !cn.writeable()) throw py::value_error("y, hn and cn must be writable");
  const kiln::SeqStrides st{xb.strides[0] / 2, xb.strides[1] / 2, yb.strides[0] / 2, yb.strides[1] / 2};
  py::gil_scoped_release nogil;
  kiln::lstm_layer_amx(static_cast<const uint16_t*>(xb.ptr), w, static_cast<const uint16_t*>(hb0.ptr),
                       static_cast<const float*>(cb0.ptr), static_cast<uint16_t*>(yb.ptr),
                       static_cast<uint16_t*>(hbn.ptr), static_cast<float*>(cbn.ptr), T, B, st, threads);
}

}  // namespace

void register_rnn_amx_kernels(py::module_& m) {
  py::class_<LstmAmxPacked>(m, "LstmAmxPackedWeight", "LSTM layer weights prepacked for lstm_layer_amx")
      .def_property_readonly("input_size", [](const LstmAmxPacked& p) { return p.w.I; })
      .def_property_readonly("hidden_size", [](const LstmAmxPacked& p) { return p.w.H; });
  m.def("lstm_amx_supported", &kiln::lstm_amx_supported, "Whether lstm_layer_amx can run here (AMX-BF16).");
  m.def("lstm_amx_pack", &pack_py, py::arg("w_ih").noconvert(), py::arg("w_hh").noconvert(),
        py::arg("b_ih").noconvert() = py::none(), py::arg("b_hh").noconvert() = py::none(),
        "Prepack an LSTM layer's W_ih (4H, I), W_hh (4H, H) fp32 (rounded to bf16) and biases for lstm_layer_amx.");
  m.def("lstm_layer_amx", &layer_py, py::arg("x").noconvert(), py::arg("packed"), py::arg("h0").noconvert(),
        py::arg("c0").noconvert(), py::arg("y").noconvert(), py::arg("hn").noconvert(), py::arg("cn").noconvert(),
        py::arg("threads") = 1,
        "One bf16 LSTM layer on AMX tiles: x (T, B, I) and h0 (B, H) bf16 as int16, c0 (B, H) fp32 -> y (T, B, H),\n"
        "hn (B, H) bf16 and cn (B, H) fp32, written in place.");
}
