"""Quantized kernels for the ``cpu`` target on oneDNN through torch's ``onednn`` ops
(u8 x s8 with int32 accumulation: AVX512-VNNI / AMX-INT8 on CPUs that have them), with
weights prepacked once at plan build and the epilogue fused where oneDNN allows. They
require VNNI: without it oneDNN multiplies u8 x s8 pairs with VPMADDUBSW, whose 16-bit sums
saturate, so its results are not the exact int32 sums the reference computes.

Like every fast kernel these are candidates: ``kernels.choice`` checks each against the
reference (``kiln.ir.reference``) on the node's shapes and times it.
"""
from __future__ import annotations

import torch
from kiln.ir import Node, OpKind
from kiln.ir import attrs as A
from kiln.ir import qformat

from kiln.ir.reference import epilogue
from .registry import VNNI, register_kernel

_ONEDNN = hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")

# activation -> (oneDNN post-op, algorithm); absent ones run after the call in torch
_POST = {A.Activation.NONE: ("none", ""), A.Activation.RELU: ("relu", ""),
         A.Activation.GELU: ("gelu", "none"), A.Activation.GELU_TANH: ("gelu", "tanh"),
         A.Activation.TANH: ("tanh", "")}


def _opt(ins, i):
    return ins[i] if len(ins) > i else None


def _static(node: Node) -> bool:
    return _ONEDNN and node.inputs[0].type.is_static


def _unusable(ins, a):
    raise RuntimeError("quantized oneDNN kernel needs constant weights")


def _const_weights(prepare):
    def wrapped(node, consts):
        if consts[1] is None or consts[2] is None:
            return _unusable
        return prepare(node, consts)
    return wrapped


# ----------------------------------------------------------------------------- dynamic int8
def _prepare_qlinear_dynamic(node: Node, consts: list):
    """Per-row u8 activations: oneDNN computes sum_k x_q * w_q * w_scale (x scale 1, zero
    point 0); the row's zero point is removed with the weight row sums, then the row scale,
    bias, residual and activation are applied on the float32 result."""
    wq, ws = consts[1], consts[2]
    k = wq.shape[1]
    rows = int(torch.tensor(node.inputs[0].type.shape[:-1]).prod()) if node.inputs[0].type.rank > 1 else 1
    packed = torch.ops.onednn.qlinear_prepack(wq, [rows, k])
    zeros = torch.zeros(wq.shape[0], dtype=torch.long)
    row_sums = (wq.float().sum(1) * ws).contiguous()
    bias_c = consts[3] if len(consts) > 3 else None

    def run(ins, a):
        x = ins[0]
        lead = x.shape[:-1]
        xq, s, zp = qformat.quantize_rows(x.reshape(-1, k))
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, ws, zeros, None, 1.0, 0, torch.float32,
                                               "none", [], "")
        y = y.addr_(zp.view(-1), row_sums, alpha=-1).mul_(s)  # one pass: y -= zp (x) row_sums
        bias = bias_c if bias_c is not None else _opt(ins, 3)
        if bias is not None:
            y = y.add_(bias)
        return epilogue(y.reshape(*lead, wq.shape[0]), _opt(ins, 4), a.activation)
    return run


register_kernel(OpKind.QLINEAR_DYNAMIC, "cpu", name="cpu.onednn_qlinear_dynamic", accepts=_static,
                prepare=_const_weights(_prepare_qlinear_dynamic), requires=VNNI)(_unusable)


# ----------------------------------------------------------------------------- weight-only int4
_INT4PACK = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _int4_ok(node: Node) -> bool:
    # torch's packing wants N a multiple of 16
    return (_INT4PACK and node.attrs.bits == 4 and node.inputs[0].type.is_static and
            node.inputs[1].shape[0] % 16 == 0)


def _prepare_int4(node: Node, consts: list):
    """torch's int4 CPU GEMM reads unsigned nibbles u as (u - 8) * scale + zero per group:
    u = q + 8 with zero 0 is our q * scale."""
    wq, s = consts[1], consts[2]
    a: A.WeightOnlyAttrs = node.attrs
    q = qformat.unpack_int4(wq).to(torch.int32) + 8  # [N, K] in [0, 15]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([s.t(), torch.zeros_like(s.t())], dim=2).contiguous()  # [K // G, N, 2]
    bias_c = consts[3] if len(consts) > 3 else None
    k = q.shape[1]

    def run(ins, at):
        x = ins[0]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, k), packed, a.group_size, sz)
        bias = bias_c if bias_c is not None else _opt(ins, 3)
        if bias is not None:
            y = y.add_(bias)
        return epilogue(y.reshape(*x.shape[:-1], y.shape[-1]), _opt(ins, 4), at.activation)
    return run


register_kernel(OpKind.LINEAR_WEIGHT_ONLY, "cpu", name="cpu.int4pack_linear", accepts=_int4_ok,
                prepare=_const_weights(_prepare_int4))(_unusable)


# ----------------------------------------------------------------------------- static int8
def _prepare_qlinear(node: Node, consts: list):
    wq, ws = consts[1], consts[2]
    a: A.QLinearAttrs = node.attrs
    k = wq.shape[1]
    x_t = node.inputs[0].type
    rows = 1
    for d in x_t.shape[:-1]:
        rows *= d
    packed = torch.ops.onednn.qlinear_prepack(wq, [rows, k])
    zeros = torch.zeros(wq.shape[0], dtype=torch.long)
    bias = consts[3] if len(consts) > 3 else None
    post, algo = _POST.get(a.activation, ("none", ""))
    after = A.Activation.NONE if a.activation in _POST else a.activation
    if after is not A.Activation.NONE and a.out_scale is not None:
        return _unusable  # an activation oneDNN cannot fuse must precede requantization
    out_dtype = None if a.out_scale is not None else torch.float32
    osc, ozp = (a.out_scale, a.out_zero_point) if a.out_scale is not None else (1.0, 0)

    def run(ins, at):
        x = ins[0]
        y = torch.ops.onednn.qlinear_pointwise(x.reshape(-1, k), a.x_scale, a.x_zero_point, packed, ws, zeros,
                                               bias if bias is not None else _opt(ins, 3), osc, ozp, out_dtype,
                                               post, [], algo)
        return epilogue(y.reshape(*x.shape[:-1], wq.shape[0]), None, after)
    return run


register_kernel(OpKind.QLINEAR, "cpu", name="cpu.onednn_qlinear", accepts=_static,
                prepare=_const_weights(_prepare_qlinear), requires=VNNI)(_unusable)


def _qconv_ok(node: Node) -> bool:
    return _static(node) and node.attrs.activation in (A.Activation.NONE, A.Activation.RELU)


def _prepare_qconv(node: Node, consts: list):
    wq, ws = consts[1], consts[2]
    a: A.QConv2dAttrs = node.attrs
    st, pad, dil = list(a.stride), list(a.padding), list(a.dilation)
    packed = torch.ops.onednn.qconv_prepack(wq, ws, a.x_scale, a.x_zero_point, st, pad, dil, a.groups,
                                            list(node.inputs[0].type.shape))
    zeros = torch.zeros(wq.shape[0], dtype=torch.long)
    bias = consts[3] if len(consts) > 3 else None
    has_res = len(node.inputs) > 4 and node.inputs[4] is not None
    u8_out = a.out_scale is not None
    out_dtype = None if u8_out else torch.float32
    osc, ozp = (a.out_scale, a.out_zero_point) if u8_out else (1.0, 0)
    rsc, rzp = (a.residual_scale, a.residual_zero_point) if u8_out else (1.0, 0)
    act = "relu" if a.activation is A.Activation.RELU else "none"

    def run(ins, at):
        x = ins[0]
        if not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        b = bias if bias is not None else _opt(ins, 3)
        if has_res:  # oneDNN's sum post-op accumulates into the residual buffer: give it a copy
            acc = ins[4].contiguous(memory_format=torch.channels_last)
            if acc.data_ptr() == ins[4].data_ptr():
                acc = acc.clone(memory_format=torch.channels_last)
            return torch.ops.onednn.qconv2d_pointwise.binary(
                x, a.x_scale, a.x_zero_point, packed, ws, zeros, acc, b, st, pad, dil, a.groups, osc, ozp,
                out_dtype, rsc, rzp, "sum", 1.0, None if act == "none" else act, [], None)
        return torch.ops.onednn.qconv2d_pointwise(x, a.x_scale, a.x_zero_point, packed, ws, zeros, b, st, pad,
                                                  dil, a.groups, osc, ozp, out_dtype, act, [], "")
    return run


register_kernel(OpKind.QCONV2D, "cpu", name="cpu.onednn_qconv2d", accepts=_qconv_ok,
                prepare=_const_weights(_prepare_qconv), requires=VNNI)(_unusable)
