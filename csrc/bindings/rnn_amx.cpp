// Python binding of the bf16 LSTM / GRU layers (kiln._C.rnn_amx_pack; lstm_layer_amx and
// gru_layer_amx on AMX tiles, lstm_layer_dot_bf16 and gru_layer_dot_bf16 with AVX512-BF16),
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

struct RnnAmxPacked {
  kiln::RnnAmxWeight w;
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

RnnAmxPacked pack_py(farray w_ih, farray w_hh, std::optional<farray> b_ih, std::optional<farray> b_hh) {
  auto wi = w_ih.request(), wh = w_hh.request();
  if (wi.ndim != 2 || wh.ndim != 2 || wh.shape[1] < 1 || wh.shape[0] % wh.shape[1] != 0)
    throw py::value_error("w_ih, w_hh: expected (G*H, I), (G*H, H)");
  const int64_t H = wh.shape[1], G = wh.shape[0] / H, I = wi.shape[1];
  if (G != 3 && G != 4) throw py::value_error("w_hh: expected 4H (LSTM) or 3H (GRU) rows");
  expect(wi, {G * H, I}, "w_ih");
  const float* bi = nullptr;
  const float* bh = nullptr;
  if (b_ih) { expect(b_ih->request(), {G * H}, "b_ih"); bi = b_ih->data(); }
  if (b_hh) { expect(b_hh->request(), {G * H}, "b_hh"); bh = b_hh->data(); }
  return {kiln::rnn_amx_pack(w_ih.data(), w_hh.data(), bi, bh, G, I, H)};
}

// x, y (T, B, F) with contiguous rows: their strides
kiln::SeqStrides seq_strides(const py::buffer_info& xb, const py::buffer_info& yb, const kiln::RnnAmxWeight& w) {
  if (xb.ndim != 3 || yb.ndim != 3) throw py::value_error("x and y: expected (T, B, I) and (T, B, H)");
  expect(xb, {xb.shape[0], xb.shape[1], w.I}, "x");
  expect(yb, {xb.shape[0], xb.shape[1], w.H}, "y");
  for (auto* b : {&xb, &yb})
    if ((b->shape[2] > 1 && b->strides[2] != 2) || b->strides[0] % 2 || b->strides[1] % 2)
      throw py::value_error("x and y need contiguous rows (last-dimension stride 1)");
  return {xb.strides[0] / 2, xb.strides[1] / 2, yb.strides[0] / 2, yb.strides[1] / 2};
}

void check_state(const py::buffer_info& b, int64_t B, int64_t H, const char* name) {
  expect(b, {B, H}, name);
  if (!c_contiguous(b)) throw py::value_error(std::string(name) + " must be C-contiguous");
}

template <kiln::RnnPath path>
void lstm_py(harray x, const RnnAmxPacked& p, harray h0, farray c0, harray y, harray hn, farray cn, int threads) {
  if (threads < 1 || threads > 256) throw py::value_error("threads must be in [1, 256]");
  if (p.w.gates != 4) throw py::value_error("packed: these are a GRU's weights");
  if (!y.writeable() || !hn.writeable() || !cn.writeable()) throw py::value_error("y, hn and cn must be writable");
  auto xb = x.request(), yb = y.request(true), hb0 = h0.request(), cb0 = c0.request(), hbn = hn.request(true),
       cbn = cn.request(true);
  const kiln::SeqStrides st = seq_strides(xb, yb, p.w);
  const int64_t T = xb.shape[0], B = xb.shape[1];
  check_state(hb0, B, p.w.H, "h0");
  check_state(hbn, B, p.w.H, "hn");
  check_state(cb0, B, p.w.H, "c0");
  check_state(cbn, B, p.w.H, "cn");
  py::gil_scoped_release nogil;
  kiln::lstm_layer_bf16(path, static_cast<const uint16_t*>(xb.ptr), p.w, static_cast<const uint16_t*>(hb0.ptr),
                        static_cast<const float*>(cb0.ptr), static_cast<uint16_t*>(yb.ptr),
                        static_cast<uint16_t*>(hbn.ptr), static_cast<float*>(cbn.ptr), T, B, st, threads);
}

template <kiln::RnnPath path>
void gru_py(harray x, const RnnAmxPacked& p, harray h0, harray y, harray hn, int threads) {
  if (threads < 1 || threads > 256) throw py::value_error("threads must be in [1, 256]");
  if (p.w.gates != 3) throw py::value_error("packed: these are an LSTM's weights");
  if (!y.writeable() || !hn.writeable()) throw py::value_error("y and hn must be writable");
  auto xb = x.request(), yb = y.request(true), hb0 = h0.request(), hbn = hn.request(true);
  const kiln::SeqStrides st = seq_strides(xb, yb, p.w);
  const int64_t T = xb.shape[0], B = xb.shape[1];
  check_state(hb0, B, p.w.H, "h0");
  check_state(hbn, B, p.w.H, "hn");
  py::gil_scoped_release nogil;
  kiln::gru_layer_bf16(path, static_cast<const uint16_t*>(xb.ptr), p.w, static_cast<const uint16_t*>(hb0.ptr),
                       static_cast<uint16_t*>(yb.ptr), static_cast<uint16_t*>(hbn.ptr), T, B, st, threads);
}

}  // namespace

void register_rnn_amx_kernels(py::module_& m) {
  py::class_<RnnAmxPacked>(m, "RnnAmxPackedWeight", "LSTM / GRU layer weights prepacked for lstm_layer_amx / gru_layer_amx")
      .def_property_readonly("gates", [](const RnnAmxPacked& p) { return p.w.gates; })
      .def_property_readonly("input_size", [](const RnnAmxPacked& p) { return p.w.I; })
      .def_property_readonly("hidden_size", [](const RnnAmxPacked& p) { return p.w.H; });
  m.def("rnn_amx_supported", &kiln::rnn_amx_supported, "Whether lstm_layer_amx / gru_layer_amx can run here (AMX-BF16).");
  m.def("rnn_amx_pack", &pack_py, py::arg("w_ih").noconvert(), py::arg("w_hh").noconvert(),
        py::arg("b_ih").noconvert() = py::none(), py::arg("b_hh").noconvert() = py::none(),
        "Prepack an LSTM (4H rows) or GRU (3H rows) layer's W_ih (G*H, I), W_hh (G*H, H) fp32 (rounded to bf16)\n"
        "and biases for lstm_layer_amx / gru_layer_amx.");
  m.def("rnn_dot_bf16_supported", &kiln::rnn_dot_bf16_supported,
        "Whether lstm_layer_dot_bf16 / gru_layer_dot_bf16 can run here (AVX512-BF16).");
  struct Path {
    const char *suffix, *how;
  };
  for (const auto& [path, p] : {std::pair{kiln::RnnPath::amx, Path{"amx", "on AMX tiles"}},
                                std::pair{kiln::RnnPath::dot, Path{"dot_bf16", "with AVX512-BF16 dot products"}}}) {
    m.def((std::string("lstm_layer_") + p.suffix).c_str(),
          path == kiln::RnnPath::amx ? &lstm_py<kiln::RnnPath::amx> : &lstm_py<kiln::RnnPath::dot>,
          py::arg("x").noconvert(), py::arg("packed"), py::arg("h0").noconvert(), py::arg("c0").noconvert(),
          py::arg("y").noconvert(), py::arg("hn").noconvert(), py::arg("cn").noconvert(), py::arg("threads") = 1,
          (std::string("One bf16 LSTM layer ") + p.how +
           ": x (T, B, I) and h0 (B, H) bf16 as int16, c0 (B, H) fp32 -> y (T, B, H),\n"
           "hn (B, H) bf16 and cn (B, H) fp32, written in place.").c_str());
    m.def((std::string("gru_layer_") + p.suffix).c_str(),
          path == kiln::RnnPath::amx ? &gru_py<kiln::RnnPath::amx> : &gru_py<kiln::RnnPath::dot>,
          py::arg("x").noconvert(), py::arg("packed"), py::arg("h0").noconvert(), py::arg("y").noconvert(),
          py::arg("hn").noconvert(), py::arg("threads") = 1,
          (std::string("One bf16 GRU layer ") + p.how +
           ": x (T, B, I) and h0 (B, H) bf16 as int16 -> y (T, B, H) and hn (B, H) bf16,\n"
           "written in place.").c_str());
  }
}
