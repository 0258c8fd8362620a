"""Kiln's own C++ quantized GEMMs (``kernels/int8_cpu.py``: AVX512-VNNI / AMX-INT8 int8,
int4 weight-only) as kernel candidates for the quantized IR ops on the ``cpu`` target.

They compete with the oneDNN kernels of ``kernels/quant.py``: ``kernels.choice`` checks each
against the reference and keeps the fastest. The C++ per-row activation quantization follows
``qformat.quantize_rows`` (the reference's) to the bit — same range, scale, zero point and
ties-to-even rounding — so the int8 products are the reference's and only float rounding in
the epilogue differs.
"""
from __future__ import annotations

import torch

from kiln.ir import Node, OpKind
from kiln.ir import attrs as A

from . import int8_cpu as I8
from .reference import epilogue
from .registry import register_kernel

_ACT = {A.Activation.NONE: "none", A.Activation.RELU: "relu", A.Activation.GELU: "gelu",
        A.Activation.GELU_TANH: "gelu_tanh", A.Activation.SILU: "silu"}


def _caps() -> dict:
    try:
        return I8.capabilities()
    except Exception:  # noqa: BLE001  (an extension built without the kernels: no candidates)
        return {}


def _opt(ins, i):
    return ins[i] if len(ins) > i else None


def _unusable(ins, a):
    raise RuntimeError("Kiln's quantized kernels need constant weights")


def _fp32_static(node: Node) -> bool:
    x = node.inputs[0].type
    return x.is_static and x.dtype.to_torch() == torch.float32


def _split_epilogue(ins, act: A.Activation):
    """(activation the kernel fuses, residual added after it): a residual must be added before
    the activation, so with one the kernel runs without its activation."""
    res = _opt(ins, 4)
    if res is None and act in _ACT:
        return _ACT[act], None
    return "none", res


# ----------------------------------------------------------------------------- dynamic int8
def _dynamic_ok(node: Node) -> bool:
    return _fp32_static(node) and _caps().get("vnni", False) and node.inputs[1].shape[1] <= 65536


def _prepare_dynamic(node: Node, consts: list):
    wq, ws = consts[1], consts[2]
    if wq is None or ws is None:
        return _unusable
    packed = I8.prepack_int8(wq, ws)
    bias_c = _opt(consts, 3)

    def run(ins, a: A.QLinearDynamicAttrs):
        fused, res = _split_epilogue(ins, a.activation)
        bias = bias_c if bias_c is not None else _opt(ins, 3)
        y = I8.qlinear_dynamic(ins[0], packed, bias, fused)
        return y if fused != "none" or (res is None and a.activation is A.Activation.NONE) else \
            epilogue(y, res, a.activation)
    return run


register_kernel(OpKind.QLINEAR_DYNAMIC, "cpu", name="cpu.kiln_qlinear_dynamic", accepts=_dynamic_ok,
                prepare=_prepare_dynamic)(_unusable)


# ----------------------------------------------------------------------------- int4 weight-only
def _int4_ok(node: Node) -> bool:
    a: A.WeightOnlyAttrs = node.attrs
    return _fp32_static(node) and a.bits == 4 and a.group_size in (32, 64, 128) and _caps().get("int4", False)


def _prepare_int4(node: Node, consts: list):
    wq, scales = consts[1], consts[2]
    if wq is None or scales is None:
        return _unusable
    packed = I8.prepack_int4(wq, scales, node.attrs.group_size)
    bias_c = _opt(consts, 3)

    def run(ins, a: A.WeightOnlyAttrs):
        fused, res = _split_epilogue(ins, a.activation)
        bias = bias_c if bias_c is not None else _opt(ins, 3)
        y = I8.linear_int4(ins[0], packed, bias, fused)
        return y if fused != "none" or (res is None and a.activation is A.Activation.NONE) else \
            epilogue(y, res, a.activation)
    return run


register_kernel(OpKind.LINEAR_WEIGHT_ONLY, "cpu", name="cpu.kiln_linear_int4", accepts=_int4_ok,
                prepare=_prepare_int4)(_unusable)
