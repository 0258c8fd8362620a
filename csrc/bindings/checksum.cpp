// Python binding of the CRC-32 (csrc/crc32.cpp).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "kiln.h"

namespace py = pybind11;

namespace {

uint32_t crc32_py(py::buffer data, uint32_t crc) {
  py::buffer_info info = data.request();
  if (info.ndim > 1) {
    // a contiguous buffer of any shape is its bytes in order; a strided one is refused
    py::ssize_t expect = info.itemsize;
    for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
      if (info.shape[i] > 1 && info.strides[i] != expect) throw py::value_error("crc32: the buffer must be contiguous");
      expect *= info.shape[i];
    }
  } else if (info.ndim == 1 && info.shape[0] > 1 && info.strides[0] != info.itemsize) {
    throw py::value_error("crc32: the buffer must be contiguous");
  }
  const size_t n = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  const void* p = info.ptr;
  py::gil_scoped_release nogil;
  return kiln::crc32(p, n, crc);
}

}  // namespace

void register_checksum(py::module_& m) {
  m.def("crc32", &crc32_py, py::arg("data"), py::arg("crc") = 0,
        "CRC-32 of a contiguous buffer's bytes, the value zlib.crc32 gives (continuing from ``crc``); "
        "releases the GIL.");
}
