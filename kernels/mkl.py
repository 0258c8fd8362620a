"""fp32 GEMM through MKL's packed sgemm (torch's ``mkl::_mkl_linear``), weights packed once
at plan build for the node's row count.

On BERT-base's GEMM shapes (128 rows, one thread) MKL's packed kernel measured 5-12%
faster than oneDNN's prepacked inner product (``kiln bench kernels --op linear --shapes
128x768x768,128x768x2304,128x768x3072,128x3072x768 --threads 1``), so it is a candidate
beside ``cpu.onednn_linear`` and the reference;
``kernels.choice`` keeps whichever is fastest per node. The epilogue (residual add,
activation) runs after the GEMM, as torch ops: MKL has no post-ops, and where a fused
oneDNN epilogue is worth more, the oneDNN candidate wins the measurement.
"""
from __future__ import annotations

import math

import torch

from kiln.ir import Node, OpKind

from kiln.ir.reference import epilogue
from .registry import register_kernel

_MKL = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _accepts(node: Node) -> bool:
    x, w = node.inputs[0].type, node.inputs[1].type
    return _MKL and x.is_static and x.rank >= 2 and x.dtype.value == "float32" and w.dtype.value == "float32"


def _prepare(node: Node, consts: list):
    w = consts[1]
    if w is None:
        return None
    w = w.contiguous()
    x = node.inputs[0].type
    rows, k = math.prod(x.shape[:-1]), x.shape[-1]
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    bias_c = consts[2] if len(consts) > 2 else None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    has_res = len(node.inputs) > 3 and node.inputs[3] is not None
    out_shape = tuple(x.shape[:-1]) + (w.shape[0],)

    def run(ins, a):
        bias = (bias_c if bias_c is not None else ins[2]) if has_bias else None
        # a strided view (rows apart by more than k) is fine: MKL takes the row stride
        y = torch.ops.mkl._mkl_linear(ins[0].reshape(rows, k), packed, w, bias, rows).view(out_shape)
        return epilogue(y, ins[3] if has_res else None, a.activation)
    return run


def _unusable(ins, a):
    raise RuntimeError("cpu.mkl_linear needs a constant weight")


def _prepare_or_unusable(node, consts):
    fn = _prepare(node, consts)
    return fn if fn is not None else _unusable


register_kernel(OpKind.LINEAR, "cpu", name="cpu.mkl_linear", accepts=_accepts, prepare=_prepare_or_unusable)(_unusable)
