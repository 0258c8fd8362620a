// The fused-epilogue activation names the Python side passes to the GEMM bindings.
#pragma once
#include <pybind11/pybind11.h>

#include <string>

#include "quant_gemm.h"

namespace kiln::quant {

inline Activation parse_activation(const std::string& s) {
  if (s == "none") return Activation::kNone;
  if (s == "relu") return Activation::kRelu;
  if (s == "gelu") return Activation::kGelu;
  if (s == "gelu_tanh") return Activation::kGeluTanh;
  if (s == "silu") return Activation::kSilu;
  if (s == "tanh") return Activation::kTanh;
  if (s == "sigmoid") return Activation::kSigmoid;
  throw pybind11::value_error("activation must be one of none, relu, gelu, gelu_tanh, silu, tanh, sigmoid; got '" +
                              s + "'");
}

}  // namespace kiln::quant
