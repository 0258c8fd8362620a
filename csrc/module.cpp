// Python bindings for kiln._C. Every entry point checks shapes, strides and dtypes of its
// arguments and raises (TypeError / ValueError) rather than reading or writing out of bounds.
// Array arguments are noconvert: a wrong dtype or a non-contiguous array is rejected, never
// silently copied (a copied output would drop the kernel's writes).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "kiln.h"

namespace py = pybind11;
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Kiln C++ kernels and runtime helpers";
  m.def("lstm_cell", &lstm_cell_py, py::arg("gx").noconvert(), py::arg("gh").noconvert(), py::arg("c").noconvert(),
        py::arg("h_out").noconvert(), py::arg("c_out").noconvert(),
        "Fused LSTM step: gates = gx + gh (B,4H) pre-activation [i,f,g,o]; c (B,H) -> h_out, c_out (B,H).");
  m.def("gru_cell", &gru_cell_py, py::arg("gx").noconvert(), py::arg("gh").noconvert(), py::arg("b_hh").noconvert(),
        py::arg("h").noconvert(), py::arg("h_out").noconvert(),
        "Fused GRU step: gx = xW_ih^T+b_ih, gh = hW_hh^T (B,3H) [r,z,n], b_hh (3H), h (B,H) -> h_out (B,H).");
  m.def(
      "plan_memory",
      [](const std::vector<int64_t>& sizes, const std::vector<int64_t>& first, const std::vector<int64_t>& last,
         int64_t alignment) {
        auto p = kiln::plan_memory(sizes, first, last, alignment);
        return py::make_tuple(p.offsets, p.arena_bytes);
      },
      py::arg("sizes"), py::arg("first"), py::arg("last"), py::arg("alignment") = 64,
      "Assign arena offsets to buffers with lifetimes [first, last]; returns (offsets, arena_bytes).");
}
