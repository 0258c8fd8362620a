"""Kiln's own C++ quantized GEMMs (``kernels/int8_cpu.py``: AVX512-VNNI / AMX-INT8 int8,
int4 weight-only) as kernel candidates for the quantized IR ops on the ``cpu`` target.

They compete with the oneDNN kernels of ``kernels/quant.py``: ``kernels.choice`` checks each
against the reference and keeps the fastest. The C++ per-row activation quantization
(``int8_cpu.ref_quantize_per_row``) follows ``qformat.quantize_rows`` (the reference's) to
the bit — same range, scale, zero point and ties-to-even rounding — except in rows whose
whole range is under 255e-8, so the int8 products are the reference's and only float
rounding in the epilogue differs.
"""
from __future__ import annotations

import functools

import torch

from kiln.ir import Node, OpKind
from kiln.ir import attrs as A
from kiln.ir import qformat

from . import int8_cpu
from kiln.ir.reference import epilogue
from .registry import VNNI, register_kernel

_ACT = {A.Activation.NONE: "none", A.Activation.RELU: "relu", A.Activation.GELU: "gelu",
        A.Activation.GELU_TANH: "gelu_tanh", A.Activation.SILU: "silu"}


@functools.lru_cache(maxsize=None)
def _caps() -> dict:  # asked once per node by ``accepts``: the CPU does not change
    try:
        return int8_cpu.capabilities()
    except Exception:  # noqa: BLE001  (an extension built without the kernels: no candidates)
        return {}


def _opt(ins, i):
    return ins[i] if len(ins) > i else None


def _unusable(ins, a):
    raise RuntimeError("Kiln's quantized kernels need constant weights")


def _fp32_static(node: Node) -> bool:
    x = node.inputs[0].type
    return x.is_static and x.dtype.to_torch() == torch.float32


def _fused_run(call, bias_c):
    """The plan's function for a kernel ``call(x, bias, activation)`` that fuses bias and
    the activations in ``_ACT``: a residual must be added before the activation, so with one
    (or an activation the kernel lacks) the kernel runs without it and the rest follows here."""
    def run(ins, a):
        res = _opt(ins, 4)
        fuse = res is None and a.activation in _ACT
        bias = bias_c if bias_c is not None else _opt(ins, 3)
        y = call(ins[0], bias, _ACT[a.activation] if fuse else "none")
        return y if fuse else epilogue(y, res, a.activation)
    return run


# ----------------------------------------------------------------------------- dynamic int8
def _dynamic_ok(node: Node) -> bool:
    return _fp32_static(node) and _caps().get("vnni", False) and node.inputs[1].shape[1] <= 65536


def _prepare_dynamic(node: Node, consts: list):
    wq, ws = consts[1], consts[2]
    if wq is None or ws is None:
        return _unusable
    packed = int8_cpu.prepack_int8(wq, ws)
    bias_c = _opt(consts, 3)
    if bias_c is None and _opt(node.inputs, 3) is not None:  # a bias computed at run time
        return _fused_run(lambda x, bias, act: int8_cpu.qlinear_dynamic(x, packed, bias, act), None)
    fast = int8_cpu.qlinear_dynamic_runner(packed, bias_c)
    return _fused_run(lambda x, bias, act: fast(x, act), bias_c)


register_kernel(OpKind.QLINEAR_DYNAMIC, "cpu", name="cpu.kiln_qlinear_dynamic", accepts=_dynamic_ok,
                prepare=_prepare_dynamic, requires=VNNI)(_unusable)


# ----------------------------------------------------------------------------- int4 weight-only
def _int4_ok(node: Node) -> bool:
    a: A.WeightOnlyAttrs = node.attrs
    return (_fp32_static(node) and a.bits == 4 and a.group_size in qformat.INT4_GROUP_SIZES and
            _caps().get("int4", False))


def _prepare_int4(node: Node, consts: list):
    wq, scales = consts[1], consts[2]
    if wq is None or scales is None:
        return _unusable
    packed = int8_cpu.prepack_int4(wq, scales, node.attrs.group_size)
    return _fused_run(lambda x, bias, act: int8_cpu.linear_int4(x, packed, bias, act), _opt(consts, 3))


register_kernel(OpKind.LINEAR_WEIGHT_ONLY, "cpu", name="cpu.kiln_linear_int4", accepts=_int4_ok,
                prepare=_prepare_int4, requires=("avx512f", "avx512bw"))(_unusable)
