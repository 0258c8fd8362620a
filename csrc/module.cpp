// Python bindings for kiln._C. Every entry point checks shapes, strides and dtypes of its
// arguments and raises (TypeError / ValueError) rather than reading or writing out of bounds.
// Array arguments are noconvert: a wrong dtype or a non-contiguous array is rejected, never
// silently copied (a copied output would drop the kernel's writes).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "kiln.h"

namespace py = pybind11;
void register_quant_kernels(py::module_& m);  // bindings/quant.cpp
void register_pool_kernels(py::module_& m);   // bindings/pool.cpp
void register_winograd_kernels(py::module_& m);  // bindings/winograd.cpp
void register_attention_kernels(py::module_& m);  // bindings/attention.cpp
void register_bf16_gemm_kernels(py::module_& m);  // bindings/bf16_gemm.cpp
void register_f32_gemm_kernels(py::module_& m);  // bindings/f32_gemm.cpp
void register_rnn_amx_kernels(py::module_& m);  // bindings/rnn_amx.cpp
void register_transpose_kernels(py::module_& m);  // transpose.cpp
void register_checksum(py::module_& m);  // checksum.cpp
void register_group_norm_kernels(py::module_& m);  // bindings/group_norm.cpp
using farray = py::array_t<float, py::array::c_style>;

namespace {

void check_2d(const py::buffer_info& b, const char* name, int64_t rows, int64_t cols) {
  if (b.ndim != 2 || b.shape[0] != rows || b.shape[1] != cols)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(rows) + ", " +
                          std::to_string(cols) + ")");
}

void check_writable(const farray& a, const char* name) {
  if (!a.writeable()) throw py::value_error(std::string(name) + " must be writable");
}

void lstm_cell_py(farray gx, farray gh, farray c, farray h_out, farray c_out) {
  auto x = gx.request(), r = gh.request(), cb = c.request(), hb = h_out.request(), cob = c_out.request();
  if (x.ndim != 2 || x.shape[1] % 4 != 0) throw py::value_error("gx: expected shape (B, 4H)");
  const int64_t batch = x.shape[0], hidden = x.shape[1] / 4;
  check_2d(r, "gh", batch, 4 * hidden);
  check_2d(cb, "c", batch, hidden);
  check_2d(hb, "h_out", batch, hidden);
  check_2d(cob, "c_out", batch, hidden);
  check_writable(h_out, "h_out");
  check_writable(c_out, "c_out");
  py::gil_scoped_release nogil;
  kiln::lstm_cell(static_cast<const float*>(x.ptr), static_cast<const float*>(r.ptr), static_cast<const float*>(cb.ptr),
                  static_cast<float*>(hb.ptr), static_cast<float*>(cob.ptr), batch, hidden);
}

void gru_cell_py(farray gx, farray gh, farray b_hh, farray h, farray h_out) {
  auto x = gx.request(), r = gh.request(), bb = b_hh.request(), hb = h.request(), ob = h_out.request();
  if (x.ndim != 2 || x.shape[1] % 3 != 0) throw py::value_error("gx: expected shape (B, 3H)");
  const int64_t batch = x.shape[0], hidden = x.shape[1] / 3;
  check_2d(r, "gh", batch, 3 * hidden);
  if (bb.ndim != 1 || bb.shape[0] != 3 * hidden) throw py::value_error("b_hh: expected shape (3H,)");
  check_2d(hb, "h", batch, hidden);
  check_2d(ob, "h_out", batch, hidden);
  check_writable(h_out, "h_out");
  py::gil_scoped_release nogil;
  kiln::gru_cell(static_cast<const float*>(x.ptr), static_cast<const float*>(r.ptr), static_cast<const float*>(bb.ptr),
                 static_cast<const float*>(hb.ptr), static_cast<float*>(ob.ptr), batch, hidden);
}

void need(const py::buffer_info& b, std::initializer_list<int64_t> shape, const char* name) {
  bool ok = b.ndim == static_cast<py::ssize_t>(shape.size());
  size_t i = 0;
  for (int64_t s : shape) ok = ok && b.shape[i++] == s;
  if (!ok) throw py::value_error(std::string(name) + ": wrong shape");
}

const float* optional_array(const py::object& o, int64_t size, const char* name) {
  if (o.is_none()) return nullptr;
  // no conversion: a converted copy would die before the kernel reads it
  if (!farray::check_(o)) throw py::type_error(std::string(name) + ": expected a C-contiguous float32 array");
  auto a = py::reinterpret_borrow<farray>(o);
  if (a.size() != size) throw py::value_error(std::string(name) + ": wrong size");
  return a.data();
}

// The recurrences read their packed weights as whole vectors: a panel that starts off a
// 64-byte line splits every other 32- or 64-byte load across two lines, which a few-row step
// (bound by those loads) feels directly, and numpy places an array at any 16-byte offset.
// So a packing is returned as a 64-byte-aligned view into a slightly larger array.
constexpr uintptr_t kPanelAlign = 64;

farray to_farray(const std::vector<float>& v) {
  const auto n = static_cast<py::ssize_t>(v.size());
  farray buf(n + static_cast<py::ssize_t>(kPanelAlign / sizeof(float)));
  float* first = buf.mutable_data();
  const uintptr_t skip = (kPanelAlign - reinterpret_cast<uintptr_t>(first) % kPanelAlign) % kPanelAlign;
  float* data = first + skip / sizeof(float);
  std::copy(v.begin(), v.end(), data);
  return farray({n}, {static_cast<py::ssize_t>(sizeof(float))}, data, buf);
}

// A packing the caller copied (np.copy, unpickling) may have lost that alignment: the
// kernels then read an aligned copy, made for this call (correct, and slower by one copy).
struct AlignedPanels {
  const float* data;
  std::unique_ptr<float, decltype(&std::free)> copy{nullptr, &std::free};
  explicit AlignedPanels(const py::buffer_info& p) : data(static_cast<const float*>(p.ptr)) {
    if (reinterpret_cast<uintptr_t>(data) % kPanelAlign == 0) return;
    const size_t bytes = (static_cast<size_t>(p.size) * sizeof(float) + kPanelAlign - 1) / kPanelAlign * kPanelAlign;
    copy.reset(static_cast<float*>(std::aligned_alloc(kPanelAlign, bytes)));
    if (!copy) throw std::bad_alloc();
    std::memcpy(copy.get(), data, static_cast<size_t>(p.size) * sizeof(float));
    data = copy.get();
  }
};

farray pack_recurrent_weight_py(farray w_hh, int64_t gates) {
  auto w = w_hh.request();
  if (w.ndim != 2 || gates <= 0 || w.shape[0] != gates * w.shape[1]) throw py::value_error("w_hh: expected (G*H, H)");
  const int64_t H = w.shape[1];
  return to_farray(kiln::pack_recurrent_weight(static_cast<const float*>(w.ptr), gates, H));
}

// gx and y of the recurrences may be strided [T, B, .] views (batch-first tensors
// transposed) as long as each row is contiguous; returns their strides in elements.
using sarray = py::array_t<float>;

kiln::SeqStrides seq_strides(const py::buffer_info& x, const py::buffer_info& y, int64_t T, int64_t B, int64_t H,
                             const sarray& ya) {
  if (!ya.writeable()) throw py::value_error("y must be writable");
  need(y, {T, B, H}, "y");
  for (auto* b : {&x, &y})
    if (b->strides[2] != static_cast<py::ssize_t>(sizeof(float)) || b->strides[0] % 4 || b->strides[1] % 4)
      throw py::value_error("gx and y need contiguous rows (last-dimension stride 1)");
  return {x.strides[0] / 4, x.strides[1] / 4, y.strides[0] / 4, y.strides[1] / 4};
}

void lstm_recurrence_py(sarray gx, farray packed, farray h0, farray c0, sarray y, farray hn, farray cn, int threads) {
  auto x = gx.request(), p = packed.request(), a = h0.request(), c = c0.request(), yb = y.request(), hb = hn.request(),
       cb = cn.request();
  if (x.ndim != 3 || x.shape[2] % 4 != 0) throw py::value_error("gx: expected (T, B, 4H)");
  const int64_t T = x.shape[0], B = x.shape[1], H = x.shape[2] / 4;
  need(p, {kiln::recurrent_blocks(H) * H * 4 * kiln::recurrent_block_units()}, "packed");
  need(a, {B, H}, "h0");
  need(c, {B, H}, "c0");
  const auto st = seq_strides(x, yb, T, B, H, y);
  need(hb, {B, H}, "hn");
  need(cb, {B, H}, "cn");
  check_writable(hn, "hn");
  check_writable(cn, "cn");
  const AlignedPanels panels(p);
  py::gil_scoped_release nogil;
  kiln::lstm_recurrence(static_cast<const float*>(x.ptr), panels.data,
                        static_cast<const float*>(a.ptr), static_cast<const float*>(c.ptr), static_cast<float*>(yb.ptr),
                        static_cast<float*>(hb.ptr), static_cast<float*>(cb.ptr), T, B, H, st, threads);
}

void gru_recurrence_py(sarray gx, farray packed, farray b_hh, farray h0, sarray y, farray hn, int threads) {
  auto x = gx.request(), p = packed.request(), bb = b_hh.request(), a = h0.request(), yb = y.request(),
       hb = hn.request();
  if (x.ndim != 3 || x.shape[2] % 3 != 0) throw py::value_error("gx: expected (T, B, 3H)");
  const int64_t T = x.shape[0], B = x.shape[1], H = x.shape[2] / 3;
  need(p, {kiln::recurrent_blocks(H) * H * 3 * kiln::recurrent_block_units()}, "packed");
  need(bb, {3 * H}, "b_hh");
  need(a, {B, H}, "h0");
  const auto st = seq_strides(x, yb, T, B, H, y);
  need(hb, {B, H}, "hn");
  check_writable(hn, "hn");
  const AlignedPanels panels(p);
  py::gil_scoped_release nogil;
  kiln::gru_recurrence(static_cast<const float*>(x.ptr), panels.data,
                       static_cast<const float*>(bb.ptr), static_cast<const float*>(a.ptr), static_cast<float*>(yb.ptr),
                       static_cast<float*>(hb.ptr), T, B, H, st, threads);
}

farray pack_layer_weight_py(farray w_ih, farray w_hh, py::object b_ih, py::object b_hh, int64_t gates) {
  auto wi = w_ih.request(), wh = w_hh.request();
  if (gates != 3 && gates != 4) throw py::value_error("gates: 4 (LSTM) or 3 (GRU)");
  if (wh.ndim != 2 || wh.shape[0] != gates * wh.shape[1]) throw py::value_error("w_hh: expected (G*H, H)");
  const int64_t H = wh.shape[1];
  if (wi.ndim != 2 || wi.shape[0] != gates * H) throw py::value_error("w_ih: expected (G*H, I)");
  const int64_t I = wi.shape[1];
  const float* bi = optional_array(b_ih, gates * H, "b_ih");
  const float* bh = optional_array(b_hh, gates * H, "b_hh");
  return to_farray(kiln::pack_layer_weight(static_cast<const float*>(wi.ptr), static_cast<const float*>(wh.ptr), bi,
                                           bh, gates, I, H));
}

// The fused layers: x (T, B, I), y (T, B, H); H comes from y, I from x.
struct LayerShape {
  int64_t T, B, I, H;
  kiln::SeqStrides st;
};

LayerShape layer_shape(const py::buffer_info& x, const py::buffer_info& p, const sarray& y, int64_t gates) {
  auto yb = y.request();
  if (x.ndim != 3 || yb.ndim != 3) throw py::value_error("x and y: expected (T, B, I) and (T, B, H)");
  const int64_t T = x.shape[0], B = x.shape[1], I = x.shape[2], H = yb.shape[2];
  need(p, {kiln::recurrent_blocks(H) * kiln::layer_block_floats(gates, I, H)}, "packed");
  return {T, B, I, H, seq_strides(x, yb, T, B, H, y)};
}

void lstm_layer_py(sarray x, farray packed, farray h0, farray c0, sarray y, farray hn, farray cn, int threads) {
  auto xb = x.request(), p = packed.request(), a = h0.request(), c = c0.request(), hb = hn.request(), cb = cn.request();
  const LayerShape s = layer_shape(xb, p, y, 4);
  for (auto* b : {&a, &c, &hb, &cb}) need(*b, {s.B, s.H}, "h0, c0, hn and cn");
  check_writable(hn, "hn");
  check_writable(cn, "cn");
  const AlignedPanels panels(p);
  py::gil_scoped_release nogil;
  kiln::lstm_layer(static_cast<const float*>(xb.ptr), panels.data, static_cast<const float*>(a.ptr),
                   static_cast<const float*>(c.ptr), static_cast<float*>(y.request().ptr), static_cast<float*>(hb.ptr),
                   static_cast<float*>(cb.ptr), s.T, s.B, s.I, s.H, s.st, threads);
}

void gru_layer_py(sarray x, farray packed, farray h0, sarray y, farray hn, int threads) {
  auto xb = x.request(), p = packed.request(), a = h0.request(), hb = hn.request();
  const LayerShape s = layer_shape(xb, p, y, 3);
  for (auto* b : {&a, &hb}) need(*b, {s.B, s.H}, "h0 and hn");
  check_writable(hn, "hn");
  const AlignedPanels panels(p);
  py::gil_scoped_release nogil;
  kiln::gru_layer(static_cast<const float*>(xb.ptr), panels.data, static_cast<const float*>(a.ptr),
                  static_cast<float*>(y.request().ptr), static_cast<float*>(hb.ptr), s.T, s.B, s.I, s.H, s.st, threads);
}

using iarray = py::array_t<int32_t, py::array::c_style>;

// Checks a BSR weight completely (row_ptr monotone from 0, block columns in range, array
// sizes) so the kernel can index without bounds checks.
kiln::SparseWeight sparse_weight(const farray& values, const iarray& col, const iarray& row_ptr, int64_t N, int64_t K,
                                 int bh, int bw) {
  if (N < 0 || K < 0 || bh <= 0 || bw <= 0) throw py::value_error("sparse weight: bad shape or block");
  if (bh != 1 && bh != 2 && bh != 4 && bh != 8 && bh != 16) throw py::value_error("block height must be 1, 2, 4, 8 or 16");
  const int64_t rows = (N + bh - 1) / bh, bcols = (K + bw - 1) / bw;
  auto rp = row_ptr.request(), cb = col.request(), vb = values.request();
  if (rp.ndim != 1 || rp.shape[0] != rows + 1) throw py::value_error("row_ptr: expected ceil(N/bh)+1 entries");
  const int32_t* r = static_cast<const int32_t*>(rp.ptr);
  if (r[0] != 0) throw py::value_error("row_ptr[0] must be 0");
  for (int64_t i = 0; i < rows; ++i)
    if (r[i + 1] < r[i]) throw py::value_error("row_ptr must be non-decreasing");
  const int64_t nnzb = r[rows];
  if (cb.ndim != 1 || cb.shape[0] != nnzb) throw py::value_error("col: expected row_ptr[-1] entries");
  if (vb.size != nnzb * bh * bw) throw py::value_error("values: expected row_ptr[-1] * bh * bw entries");
  const int32_t* c = static_cast<const int32_t*>(cb.ptr);
  for (int64_t i = 0; i < nnzb; ++i)
    if (c[i] < 0 || c[i] >= bcols) throw py::value_error("col: block column out of range");
  for (int64_t i = 0; i < rows; ++i)  // the kernel walks each row's columns in order
    for (int64_t j = r[i] + 1; j < r[i + 1]; ++j)
      if (c[j] <= c[j - 1]) throw py::value_error("col: block columns must increase within a row");
  return {static_cast<const float*>(vb.ptr), c, r, N, K, bh, bw};
}

void sparse_linear_py(farray x, farray values, iarray col, iarray row_ptr, int64_t N, int bh, int bw, py::object bias,
                      py::object residual, int act, farray y, int threads) {
  auto xb = x.request(), yb = y.request();
  if (xb.ndim != 2) throw py::value_error("x: expected (M, K)");
  const int64_t M = xb.shape[0], K = xb.shape[1];
  const kiln::SparseWeight w = sparse_weight(values, col, row_ptr, N, K, bh, bw);
  check_2d(yb, "y", M, N);
  check_writable(y, "y");
  if (act < 0 || act > kiln::kActSilu) throw py::value_error("unknown activation");
  const float* b = optional_array(bias, N, "bias");
  const float* r = optional_array(residual, M * N, "residual");
  py::gil_scoped_release nogil;
  kiln::sparse_linear(w, static_cast<const float*>(xb.ptr), M, b, r, act, static_cast<float*>(yb.ptr), threads);
}

void sparse_gemm_t_py(farray xT, farray values, iarray col, iarray row_ptr, int64_t N, int bh, int bw, py::object bias,
                      py::object residual, int act, farray yT, int threads) {
  auto xb = xT.request(), yb = yT.request();
  if (xb.ndim != 3) throw py::value_error("xT: expected (B, K, M)");
  const int64_t B = xb.shape[0], K = xb.shape[1], M = xb.shape[2];
  const kiln::SparseWeight w = sparse_weight(values, col, row_ptr, N, K, bh, bw);
  need(yb, {B, N, M}, "yT");
  check_writable(yT, "yT");
  if (act < 0 || act > kiln::kActSilu) throw py::value_error("unknown activation");
  const float* b = optional_array(bias, N, "bias");
  const float* r = optional_array(residual, B * N * M, "residual");
  py::gil_scoped_release nogil;
  kiln::sparse_gemm_t(w, static_cast<const float*>(xb.ptr), B, M, b, r, act, static_cast<float*>(yb.ptr), threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Kiln C++ kernels and runtime helpers";
  m.def("lstm_cell", &lstm_cell_py, py::arg("gx").noconvert(), py::arg("gh").noconvert(), py::arg("c").noconvert(),
        py::arg("h_out").noconvert(), py::arg("c_out").noconvert(),
        "Fused LSTM step: gates = gx + gh (B,4H) pre-activation [i,f,g,o]; c (B,H) -> h_out, c_out (B,H).");
  m.def("gru_cell", &gru_cell_py, py::arg("gx").noconvert(), py::arg("gh").noconvert(), py::arg("b_hh").noconvert(),
        py::arg("h").noconvert(), py::arg("h_out").noconvert(),
        "Fused GRU step: gx = xW_ih^T+b_ih, gh = hW_hh^T (B,3H) [r,z,n], b_hh (3H), h (B,H) -> h_out (B,H).");
  m.def("pack_recurrent_weight", &pack_recurrent_weight_py, py::arg("w_hh").noconvert(), py::arg("gates"),
        "Prepack W_hh (G*H, H) into the panels lstm_recurrence / gru_recurrence read.");
  m.def("recurrence_supported", &kiln::recurrence_supported, "Whether the fused recurrences were built (AVX-512, or AVX2 + FMA).");
  m.def("lstm_recurrence", &lstm_recurrence_py, py::arg("gx").noconvert(), py::arg("packed").noconvert(),
        py::arg("h0").noconvert(), py::arg("c0").noconvert(), py::arg("y").noconvert(), py::arg("hn").noconvert(),
        py::arg("cn").noconvert(), py::arg("threads") = 1, "One LSTM layer over all steps: gx (T,B,4H) hoisted projection -> y (T,B,H); gx and y may be strided views with contiguous rows.");
  m.def("gru_recurrence", &gru_recurrence_py, py::arg("gx").noconvert(), py::arg("packed").noconvert(),
        py::arg("b_hh").noconvert(), py::arg("h0").noconvert(), py::arg("y").noconvert(), py::arg("hn").noconvert(),
        py::arg("threads") = 1, "One GRU layer over all steps: gx (T,B,3H) = x W_ih^T + b_ih -> y (T,B,H); gx and y may be strided views with contiguous rows.");
  m.def("pack_layer_weight", &pack_layer_weight_py, py::arg("w_ih").noconvert(), py::arg("w_hh").noconvert(),
        py::arg("b_ih"), py::arg("b_hh"), py::arg("gates"),
        "Prepack W_ih (G*H, I), W_hh (G*H, H) and the biases (or None) for lstm_layer / gru_layer.");
  m.def("lstm_layer", &lstm_layer_py, py::arg("x").noconvert(), py::arg("packed").noconvert(),
        py::arg("h0").noconvert(), py::arg("c0").noconvert(), py::arg("y").noconvert(), py::arg("hn").noconvert(),
        py::arg("cn").noconvert(), py::arg("threads") = 1,
        "One LSTM layer over all steps, input projection inside each step: x (T,B,I) -> y (T,B,H); x and y may be strided views with contiguous rows.");
  m.def("gru_layer", &gru_layer_py, py::arg("x").noconvert(), py::arg("packed").noconvert(), py::arg("h0").noconvert(),
        py::arg("y").noconvert(), py::arg("hn").noconvert(), py::arg("threads") = 1,
        "One GRU layer over all steps, input projection inside each step: x (T,B,I) -> y (T,B,H); x and y may be strided views with contiguous rows.");
  m.def("tvm_parallel_launch_address", &kiln::tvm_parallel_launch_address,
        "Address of a TVMBackendParallelLaunch replacement that runs tasks on torch's OpenMP workers.");
  m.def("tvm_parallel_launches", &kiln::tvm_parallel_launches, "Parallel launches that replacement has taken.");
  m.def("tvm_serial_launches", &kiln::tvm_serial_launches,
        "Of those launches, the ones run on the calling thread alone (tvm_parallel_serial on).");
  m.def("tvm_parallel_serial", &kiln::tvm_parallel_serial, py::arg("on"),
        "While on, parallel launches from this thread run their tasks on it, in order (a call too small to share).");
  m.def(
      "compute_peak_gflops",
      [](const std::string& unit, int threads, int64_t iters, int accumulators) {
        kiln::PeakUnit u;
        if (unit == "fma") u = kiln::PeakUnit::kFma;
        else if (unit == "amx_bf16") u = kiln::PeakUnit::kAmxBf16;
        else if (unit == "amx_int8") u = kiln::PeakUnit::kAmxInt8;
        else if (unit == "amx_bf16_loaded") u = kiln::PeakUnit::kAmxBf16Loaded;
        else if (unit == "amx_int8_loaded") u = kiln::PeakUnit::kAmxInt8Loaded;
        else if (unit == "clock") u = kiln::PeakUnit::kClock;
        else if (unit == "dot_bf16") u = kiln::PeakUnit::kDotBf16;
        else if (unit == "dot_int8") u = kiln::PeakUnit::kDotInt8;
        else throw py::value_error("unit: expected 'fma', 'amx_bf16', 'amx_int8', 'amx_bf16_loaded', "
                                   "'amx_int8_loaded', 'dot_bf16', 'dot_int8' or 'clock'");
        if (threads < 1 || iters < 1 || accumulators < 1 || accumulators > 6)
          throw py::value_error("threads and iters must be >= 1, accumulators 1..6");
        py::gil_scoped_release nogil;
        return kiln::compute_peak_gflops(u, threads, iters, accumulators);
      },
      py::arg("unit"), py::arg("threads") = 1, py::arg("iters") = 2000000, py::arg("accumulators") = 6,
      "Register-only throughput of the fp32 FMA units or the AMX tiles (bf16 GFLOP/s, int8 GOP/s) with "
      "`accumulators` independent accumulator tiles ('amx_*_loaded': a 2 x 2 GEMM block whose four source tiles are "
      "loaded from L1 every step), summed over threads run at once; 'clock': the core clock in GHz "
      "(per thread).");
  register_quant_kernels(m);
  register_pool_kernels(m);
  register_winograd_kernels(m);
  register_attention_kernels(m);
  register_bf16_gemm_kernels(m);
  register_f32_gemm_kernels(m);
  register_rnn_amx_kernels(m);
  register_transpose_kernels(m);
  register_checksum(m);
  register_group_norm_kernels(m);
  m.def("sparse_gemm_supported", &kiln::sparse_gemm_supported, "Whether the sparse GEMM kernels were built (AVX-512).");
  m.def("sparse_linear", &sparse_linear_py, py::arg("x").noconvert(), py::arg("values").noconvert(),
        py::arg("col").noconvert(), py::arg("row_ptr").noconvert(), py::arg("N"), py::arg("bh"), py::arg("bw"),
        py::arg("bias"), py::arg("residual"), py::arg("act"), py::arg("y").noconvert(), py::arg("threads") = 1,
        "y (M,N) = act(x (M,K) @ W^T + bias + residual), W (N,K) in BSR (bh x bw blocks; CSR: 1x1).");
  m.def("sparse_gemm_t", &sparse_gemm_t_py, py::arg("xT").noconvert(), py::arg("values").noconvert(),
        py::arg("col").noconvert(), py::arg("row_ptr").noconvert(), py::arg("N"), py::arg("bh"), py::arg("bw"),
        py::arg("bias"), py::arg("residual"), py::arg("act"), py::arg("yT").noconvert(), py::arg("threads") = 1,
        "yT (B,N,M) = act(W @ xT (B,K,M) + bias[:,None] + residual): convolutions after im2col.");
}
