// Python bindings of the quantized GEMMs (kiln._C.int8_* / linear_int4), registered from
// module.cpp. Kept out of csrc/*.cpp, which the sanitizer test builds without pybind11. Like
// module.cpp: arrays are noconvert (a wrong dtype or layout is rejected, never copied), every
// shape is checked before the GIL is released. kiln/kernels/int8_cpu.py wraps these for torch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "activation.h"
#include "quant_gemm.h"

namespace py = pybind11;

namespace kiln::quant {
namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

Path parse_path(const std::string& s) {
  if (s == "auto") return Path::kAuto;
  if (s == "vnni") return Path::kVnni;
  if (s == "amx") return Path::kAmx;
  throw py::value_error("path must be auto, vnni or amx; got '" + s + "'");
}

const char* path_name(Path p) { return p == Path::kAmx ? "amx" : "vnni"; }

void check_threads(int threads) {
  if (threads < 1 || threads > 256) throw py::value_error("threads must be in [1, 256]");
}

void check_shape(const py::buffer_info& b, std::initializer_list<int64_t> shape, const char* name) {
  bool ok = b.ndim == static_cast<py::ssize_t>(shape.size());
  std::string want = "(";
  size_t i = 0;
  for (int64_t s : shape) {
    ok = ok && b.shape[i++] == s;
    want += std::to_string(s) + (i < shape.size() ? ", " : "");
  }
  if (!ok) throw py::value_error(std::string(name) + ": expected shape " + want + ")");
}

const float* bias_ptr(const std::optional<carray<float>>& bias, int64_t n) {
  if (!bias) return nullptr;
  check_shape(bias->request(), {n}, "bias");
  return bias->data();
}

// x: 2-D [M, K] with K matching the weight.
int64_t rows_of(const py::buffer_info& x, int64_t k, const char* name) {
  if (x.ndim != 2 || x.shape[1] != k)
    throw py::value_error(std::string(name) + ": expected shape (M, " + std::to_string(k) + ")");
  return x.shape[0];
}

// The caller's output array (checked: dtype, C-contiguous, shape, writable) or a new one.
// Reusing one output buffer saves the page faults of a fresh multi-megabyte allocation.
template <typename T>
carray<T> output(const std::optional<py::array>& out, int64_t m, int64_t n) {
  if (!out) return carray<T>({m, n});
  if (!py::isinstance<carray<T>>(*out) || !(out->flags() & py::array::c_style))
    throw py::type_error("out: expected a C-contiguous array of the output dtype");
  carray<T> o = py::reinterpret_borrow<carray<T>>(*out);
  check_shape(o.request(), {m, n}, "out");
  if (!o.writeable()) throw py::value_error("out must be writable");
  return o;
}

struct Int8Packed {
  std::shared_ptr<Int8Weight> w;
};
struct Int4Packed {
  std::shared_ptr<Int4Weight> w;
};

Int8Packed int8_prepack_py(carray<int8_t> w_q, carray<float> w_scale) {
  auto wb = w_q.request();
  if (wb.ndim != 2) throw py::value_error("w_q: expected shape (N, K)");
  const int64_t n = wb.shape[0], k = wb.shape[1];
  if (n < 1 || k < 1) throw py::value_error("w_q: N and K must be positive");
  if (k > 65536) throw py::value_error("K must be at most 65536 (int32 accumulators)");
  check_shape(w_scale.request(), {n}, "w_scale");
  return {prepack_int8(w_q.data(), w_scale.data(), n, k)};
}

py::array int8_gemm_py(carray<uint8_t> x_q, const Int8Packed& p, carray<float> x_scale, carray<int32_t> x_zp,
                       std::optional<carray<float>> bias, const std::string& activation, const std::string& out,
                       float out_scale, int out_zp, const std::string& path, int threads,
                       std::optional<py::array> out_array) {
  const Int8Weight& w = *p.w;
  auto xb = x_q.request();
  const int64_t m = rows_of(xb, w.k, "x_q");
  auto sb = x_scale.request(), zb = x_zp.request();
  if (sb.ndim != 1 || (sb.shape[0] != 1 && sb.shape[0] != m))
    throw py::value_error("x_scale: expected shape (1,) or (M,)");
  if (zb.ndim != 1 || (zb.shape[0] != 1 && zb.shape[0] != m))
    throw py::value_error("x_zp: expected shape (1,) or (M,)");
  check_threads(threads);
  Epilogue ep;
  ep.x_scale = x_scale.data();
  ep.x_scale_stride = sb.shape[0] == 1 ? 0 : 1;
  ep.x_zp = x_zp.data();
  ep.x_zp_stride = zb.shape[0] == 1 ? 0 : 1;
  ep.bias = bias_ptr(bias, w.n);
  ep.act = parse_activation(activation);
  ep.ldo = w.n;
  py::array result;
  if (out == "s32") {
    ep.kind = OutKind::kS32;
    result = output<int32_t>(out_array, m, w.n);
  } else if (out == "f32") {
    ep.kind = OutKind::kF32;
    result = output<float>(out_array, m, w.n);
  } else if (out == "u8") {
    if (!(out_scale > 0.0f)) throw py::value_error("out_scale must be positive");
    if (out_zp < 0 || out_zp > 255) throw py::value_error("out_zp must be in [0, 255]");
    ep.kind = OutKind::kU8;
    ep.out_scale = out_scale;
    ep.out_zp = out_zp;
    result = output<uint8_t>(out_array, m, w.n);
  } else {
    throw py::value_error("out must be s32, f32 or u8; got '" + out + "'");
  }
  ep.out = result.mutable_data();
  const Path chosen = parse_path(path);
  {
    py::gil_scoped_release nogil;
    int8_gemm(x_q.data(), m, w.k, w, ep, chosen, threads);
  }
  return result;
}

py::tuple quantize_rows_py(carray<float> x, int threads) {
  auto xb = x.request();
  if (xb.ndim != 2) throw py::value_error("x: expected shape (M, K)");
  check_threads(threads);
  const int64_t m = xb.shape[0], k = xb.shape[1];
  carray<uint8_t> q({m, k});
  carray<float> scale(m);
  carray<int32_t> zp(m);
  {
    py::gil_scoped_release nogil;
    quantize_rows_u8(x.data(), m, k, q.mutable_data(), k, scale.mutable_data(), zp.mutable_data(), threads);
  }
  return py::make_tuple(q, scale, zp);
}

carray<float> qlinear_dynamic_py(carray<float> x, const Int8Packed& p, std::optional<carray<float>> bias,
                                 const std::string& activation, const std::string& path, int threads,
                                 std::optional<py::array> out) {
  const Int8Weight& w = *p.w;
  const int64_t m = rows_of(x.request(), w.k, "x");
  check_threads(threads);
  const float* b = bias_ptr(bias, w.n);
  const Activation act = parse_activation(activation);
  const Path chosen = parse_path(path);
  carray<float> y = output<float>(out, m, w.n);
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    qlinear_dynamic(x.data(), m, w, b, act, yp, chosen, threads);
  }
  return y;
}

Int4Packed int4_prepack_py(carray<uint8_t> w_packed, carray<float> scales, int64_t group) {
  auto wb = w_packed.request(), sb = scales.request();
  if (group != 32 && group != 64 && group != 128) throw py::value_error("group must be 32, 64 or 128");
  if (wb.ndim != 2 || wb.shape[0] < 1 || wb.shape[1] < 1) throw py::value_error("w_packed: expected shape (N, K // 2)");
  const int64_t n = wb.shape[0], k = 2 * wb.shape[1];
  if (k % group != 0) throw py::value_error("K = 2 * w_packed.shape[1] must be a multiple of the group size");
  check_shape(sb, {n, k / group}, "scales");
  return {prepack_int4(w_packed.data(), scales.data(), n, k, group)};
}

carray<float> linear_int4_py(carray<float> x, const Int4Packed& p, std::optional<carray<float>> bias,
                             const std::string& activation, int threads, std::optional<py::array> out) {
  const Int4Weight& w = *p.w;
  const int64_t m = rows_of(x.request(), w.k, "x");
  check_threads(threads);
  const float* b = bias_ptr(bias, w.n);
  const Activation act = parse_activation(activation);
  carray<float> y = output<float>(out, m, w.n);
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    linear_int4(x.data(), m, w, b, act, yp, threads);
  }
  return y;
}

}  // namespace
}  // namespace kiln::quant

void register_quant_kernels(py::module_& m) {
  using namespace kiln::quant;
  py::class_<Int8Packed>(m, "Int8PackedWeight", "int8 weight prepacked for int8_gemm / qlinear_dynamic")
      .def_property_readonly("n", [](const Int8Packed& p) { return p.w->n; })
      .def_property_readonly("k", [](const Int8Packed& p) { return p.w->k; })
      .def_property_readonly("nbytes", [](const Int8Packed& p) { return p.w->panels * p.w->k_pad * 16; });
  py::class_<Int4Packed>(m, "Int4PackedWeight", "int4 group-wise weight prepacked for linear_int4")
      .def_property_readonly("n", [](const Int4Packed& p) { return p.w->n; })
      .def_property_readonly("k", [](const Int4Packed& p) { return p.w->k; })
      .def_property_readonly("group", [](const Int4Packed& p) { return p.w->group; });
  m.def("quant_capabilities", [] {
    py::dict d;
    d["vnni"] = vnni_supported();
    d["amx"] = amx_supported();
    d["int4"] = int4_supported();
    return d;
  }, "Which quantized GEMM paths this CPU and build can run: {'vnni', 'amx', 'int4'} -> bool.");
  m.def("int8_prepack", &int8_prepack_py, py::arg("w_q").noconvert(), py::arg("w_scale").noconvert(),
        "Prepack w_q int8 (N, K) with per-channel w_scale fp32 (N,) for int8_gemm / qlinear_dynamic.");
  m.def("int8_gemm", &int8_gemm_py, py::arg("x_q").noconvert(), py::arg("packed"), py::arg("x_scale").noconvert(),
        py::arg("x_zp").noconvert(), py::arg("bias").noconvert() = py::none(), py::arg("activation") = "none",
        py::arg("out") = "f32", py::arg("out_scale") = 1.0f, py::arg("out_zp") = 0, py::arg("path") = "auto",
        py::arg("threads") = 1, py::arg("out_array").noconvert() = py::none(),
        "x_q uint8 (M, K) x packed weight: out 's32' (raw sums), 'f32' or 'u8' (requantized) (M, N), written to\n"
        "out_array when given.");
  m.def("quantize_rows_u8", &quantize_rows_py, py::arg("x").noconvert(), py::arg("threads") = 1,
        "Per-row asymmetric uint8 quantization of x fp32 (M, K) -> (x_q, scale (M,), zp int32 (M,)).");
  m.def("qlinear_dynamic", &qlinear_dynamic_py, py::arg("x").noconvert(), py::arg("packed"),
        py::arg("bias").noconvert() = py::none(), py::arg("activation") = "none", py::arg("path") = "auto",
        py::arg("threads") = 1, py::arg("out").noconvert() = py::none(),
        "Dynamic int8 linear: quantize x fp32 (M, K) per row, int8 GEMM, fp32 (M, N) (into out when given).");
  m.def("int4_prepack", &int4_prepack_py, py::arg("w_packed").noconvert(), py::arg("scales").noconvert(),
        py::arg("group"), "Prepack int4 weights (N, K // 2) uint8 with scales fp32 (N, K // group).");
  m.def("linear_int4", &linear_int4_py, py::arg("x").noconvert(), py::arg("packed"),
        py::arg("bias").noconvert() = py::none(), py::arg("activation") = "none", py::arg("threads") = 1,
        py::arg("out").noconvert() = py::none(),
        "int4 weight-only linear: x fp32 (M, K) -> fp32 (M, N) (into out when given).");
  m.def("int8_path", [](int64_t rows, const std::string& path) {
    try {
      return std::string(path_name(resolve_path(parse_path(path), rows)));
    } catch (const std::runtime_error&) {
      return std::string("none");
    }
  }, py::arg("m"), py::arg("path") = "auto",
        "The path int8_gemm / qlinear_dynamic take for M rows: 'amx', 'vnni', or 'none' (cannot run here).");
}
