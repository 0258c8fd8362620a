// Python binding of the fused attention (kiln._C.attention), registered from module.cpp.
// Arrays keep their strides (Q/K/V arrive as views of one QKV projection, O is written in
// the layout the caller chose); each is checked (rank, dtype, shapes, unit stride along D,
// writable output) before the GIL is released; nothing is copied. kiln/kernels/attention_cpu.py
// passes torch tensors (bf16 as int16 views).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "kiln.h"

namespace py = pybind11;

namespace {

// Element strides of a rank-4 array whose last dimension has unit stride (or 0 if allowed).
void strides_of(const py::buffer_info& b, const char* name, int64_t* out, int n, bool broadcast_last) {
  if (b.ndim != 4) throw py::value_error(std::string(name) + ": expected a rank-4 array");
  for (int i = 0; i < 4; ++i)
    if (b.strides[i] < 0 || b.strides[i] % b.itemsize != 0)
      throw py::value_error(std::string(name) + ": negative or misaligned strides");
  const int64_t last = b.strides[3] / b.itemsize;
  if (!(last == 1 || (broadcast_last && last == 0) || b.shape[3] == 1))
    throw py::value_error(std::string(name) + ": the last dimension must be contiguous");
  for (int i = 0; i < n; ++i) out[i] = b.strides[i] / b.itemsize;
  if (n == 4) out[3] = b.shape[3] == 1 ? 0 : last;
}

void expect_shape(const py::buffer_info& b, const char* name, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
  if (b.shape[0] != d0 || b.shape[1] != d1 || b.shape[2] != d2 || b.shape[3] != d3)
    throw py::value_error(std::string(name) + ": shape does not match q, k and v");
}

void attention_py(py::array q, py::array k, py::array v, py::array o, std::optional<py::array_t<float>> mask,
                  double scale, bool causal, int threads, const std::string& path) {
  if (threads < 1) throw py::value_error("threads must be >= 1");
  if (path != "auto" && path != "fma" && path != "amx" && path != "dot")
    throw py::value_error("path must be auto, fma, amx or dot");
  const bool bf16 = q.dtype().itemsize() == 2 && q.dtype().kind() != 'f';
  if (!(q.dtype().is(py::dtype::of<float>()) || (bf16 && (q.dtype().kind() == 'i' || q.dtype().kind() == 'u'))))
    throw py::value_error("q: expected float32, or bfloat16 passed as 16-bit integers");
  for (const py::array* a : {&k, &v, &o})
    if (!a->dtype().is(q.dtype())) throw py::value_error("q, k, v and o must share one dtype");
  if (!o.writeable()) throw py::value_error("o must be writable");
  const py::buffer_info qb = q.request(), kb = k.request(), vb = v.request(), ob = o.request(true);
  kiln::AttentionArgs a{};
  strides_of(qb, "q", a.q_stride, 3, false);
  strides_of(kb, "k", a.k_stride, 3, false);
  strides_of(vb, "v", a.v_stride, 3, false);
  strides_of(ob, "o", a.o_stride, 3, false);
  a.B = qb.shape[0];
  a.H = qb.shape[1];
  a.Sq = qb.shape[2];
  a.D = qb.shape[3];
  a.Sk = kb.shape[2];
  expect_shape(kb, "k", a.B, a.H, a.Sk, a.D);
  expect_shape(vb, "v", a.B, a.H, a.Sk, a.D);
  expect_shape(ob, "o", a.B, a.H, a.Sq, a.D);
  if (a.D < 1) throw py::value_error("q: head dimension must be >= 1");
  a.q = qb.ptr;
  a.k = kb.ptr;
  a.v = vb.ptr;
  a.o = ob.ptr;
  a.mask = nullptr;
  std::optional<py::buffer_info> mb;
  if (mask) {
    mb = mask->request();
    strides_of(*mb, "mask", a.mask_stride, 4, true);
    expect_shape(*mb, "mask", a.B, a.H, a.Sq, a.Sk);
    a.mask = static_cast<const float*>(mb->ptr);
  }
  a.scale = static_cast<float>(scale);
  a.causal = causal;
  a.bf16 = bf16;
  a.path = path == "fma" ? kiln::AttentionPath::kFma
           : path == "amx" ? kiln::AttentionPath::kAmx
           : path == "dot" ? kiln::AttentionPath::kDot
                           : kiln::AttentionPath::kAuto;
  if (a.path == kiln::AttentionPath::kAmx && !(bf16 && kiln::amx_bf16_supported()))
    throw py::value_error("path='amx' needs bf16 arrays and a CPU with AMX-BF16");
  if (a.path == kiln::AttentionPath::kDot && !(bf16 && kiln::dot_bf16_supported()))
    throw py::value_error("path='dot' needs bf16 arrays and a CPU with AVX512-BF16");
  py::gil_scoped_release nogil;
  kiln::attention(a, threads);
}

}  // namespace

void register_attention_kernels(py::module_& m) {
  m.def("attention_supported", &kiln::attention_supported, "Whether the fused attention was built (AVX-512).");
  m.def("attention", &attention_py, py::arg("q").noconvert(), py::arg("k").noconvert(), py::arg("v").noconvert(),
        py::arg("o").noconvert(), py::arg("mask").noconvert(), py::arg("scale"), py::arg("causal") = false,
        py::arg("threads") = 1, py::arg("path") = "auto",
        "o (B,H,Sq,D) = softmax(q k^T * scale + mask) v over strided float32 or bf16 (int16) arrays; "
        "mask: float32 (B,H,Sq,Sk), 0 strides broadcast. path: auto (for bf16: AMX where present, else "
        "AVX512-BF16 where present, else fp32 FMAs), fma, amx, dot (AVX512-BF16).");
  m.def("amx_bf16_supported", &kiln::amx_bf16_supported, "Whether the bf16 attention can use AMX tiles here.");
  m.def("dot_bf16_supported", &kiln::dot_bf16_supported,
        "Whether the bf16 attention can use AVX512-BF16 dot products here.");
}
