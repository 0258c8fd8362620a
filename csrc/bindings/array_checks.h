// Array checks shared by the bindings (GEMMs, norms, pooling).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace kiln::bindings {

// bf16 arrives as its bit patterns (numpy has no bfloat16): a 16-bit integer array.
inline bool is_bf16_bits(const pybind11::array& a) {
  return a.itemsize() == 2 && (a.dtype().kind() == 'i' || a.dtype().kind() == 'u');
}

// A rank-2 [rows, cols] array with a contiguous last dimension: its row stride in elements
// (rows may be strided, as a slice of a wider activation hands them over; never overlapping).
inline int64_t row_stride(const pybind11::buffer_info& b, int64_t rows, int64_t cols, const char* name) {
  namespace py = pybind11;
  if (b.ndim != 2 || b.shape[0] != rows || b.shape[1] != cols)
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(rows) + ", " +
                          std::to_string(cols) + ")");
  if (cols > 1 && b.strides[1] != b.itemsize) throw py::value_error(std::string(name) + ": the last dimension must be contiguous");
  if (b.strides[0] < 0 || b.strides[0] % b.itemsize != 0) throw py::value_error(std::string(name) + ": bad row stride");
  const int64_t ld = rows > 1 ? b.strides[0] / b.itemsize : cols;
  if (ld < cols) throw py::value_error(std::string(name) + ": rows overlap");
  return ld;
}

}  // namespace kiln::bindings
