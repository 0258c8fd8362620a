"""GEMM and convolution through oneDNN (torch's mkldnn ops) with weights prepacked once,
at plan build, and the epilogue fused as oneDNN post-ops (bias, residual add, activation).

These are candidates, not defaults: ``kernels.choice`` times them against the reference
(and checks their numbers) on each node's shapes and keeps whichever is faster.
"""
from __future__ import annotations

import functools
import math

import torch

from kiln.ir import Node, OpKind
from kiln.ir import attrs as A

from kiln.ir.reference import epilogue
from .registry import register_kernel

_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache  # asked once, when a bf16 node first comes
def _bf16_ok() -> bool:
    """oneDNN's bf16 GEMM and convolution need AVX512-BW/VL/DQ or AVX-NE-CONVERT: on a CPU
    without them (AVX2 only) torch refuses the weight reorder, so they are not candidates."""
    ask = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(ask()) if ask is not None else False

# activation -> (oneDNN post-op name, algorithm)
_POST_OPS = {A.Activation.NONE: ("none", ""), A.Activation.RELU: ("relu", ""), A.Activation.TANH: ("tanh", ""),
             A.Activation.SIGMOID: ("sigmoid", ""), A.Activation.SILU: ("swish", ""),
             A.Activation.GELU: ("gelu", "none"), A.Activation.GELU_TANH: ("gelu", "tanh"),
             A.Activation.RELU6: ("hardtanh", "")}
# the post-op's scalars (oneDNN's clip bounds for hardtanh)
_POST_SCALARS = {A.Activation.RELU6: [0.0, 6.0]}


def _ok(node: Node) -> bool:
    # batch dims may be symbolic (a plan serving many sizes): the weight is packed at the
    # representative size and oneDNN's prepacked primitives take any row count
    x = node.inputs[0].type
    return (_MKLDNN and isinstance(x.shape[-1], int) and x.dtype.value in ("float32", "bfloat16") and
            node.inputs[1].type.dtype == x.dtype and (x.dtype.value == "float32" or _bf16_ok()))


def _linear_ok(node: Node) -> bool:
    return _ok(node) and node.inputs[0].type.rank >= 2


def _prepare_linear(node: Node, consts: list):
    w = consts[1]
    x = node.inputs[0].type
    if w is None:
        return None
    rows = math.prod(x.shape[:-1])
    packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)
    bias_c = consts[2] if len(consts) > 2 else None
    attr, algo = _POST_OPS[node.attrs.activation]
    has_res = len(node.inputs) > 3 and node.inputs[3] is not None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None

    k = x.shape[-1]

    def gemm(x, bias, post, post_algo):
        m = x.numel() // k if k else 0
        if m == rows or m == 0 or row_bucket(m) == m:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post, [], post_algo)
        # a row count the plan has not run at (a dynamic plan's new length): oneDNN would
        # create (JIT-compile) a primitive for it, which costs more than the GEMM at these
        # sizes. Rows are independent in a GEMM and its row-wise post-ops, so the rows padded
        # up to a bucket give the same first m rows, from a primitive many lengths share.
        mb = row_bucket(m)
        buf = x.new_empty((mb, k))
        buf[:m].copy_(x.reshape(m, k))
        buf[m:].zero_()
        y = torch.ops.mkldnn._linear_pointwise(buf, packed, bias, post, [], post_algo)
        return y[:m].view(*x.shape[:-1], y.shape[-1])

    def run(ins, a):
        x = ins[0] if ins[0].is_contiguous() else ins[0].contiguous()  # views (slices) arrive strided
        bias = (bias_c if bias_c is not None else ins[2]) if has_bias else None
        if has_res:  # residual, then activation: after the GEMM (oneDNN's sum post-op order differs)
            return epilogue(gemm(x, bias, "none", ""), ins[3], a.activation)
        return gemm(x, bias, attr, algo)
    return run


def row_bucket(m: int) -> int:
    """The row count a GEMM of ``m`` rows runs at when ``m`` is not the one its plan was
    built for: ``m`` rounded up to a multiple of 8 up to 256 rows, then of a 32nd of the
    power of two at or above it (16 up to 512, 32 up to 1024, ...): at most 7 padded rows up
    to 256, at most 1/16 more rows above. 48 buckets cover 1-512 rows. Each bucket is a
    oneDNN primitive per weight shape, JIT-compiled once and held in oneDNN's primitive cache
    with its scratchpad (most of a megabyte for BERT-base's shapes): coarser buckets (an eighth of the power of two above 64 rows) padded a stream
    of text lengths by 8.5% of its rows, where these pad it by 3.5% (``kiln bench
    dynamic``'s BERT stream); one primitive per exact row count pads none but holds a
    primitive per length seen (docs/benchmarks.md: oneDNN's row buckets)."""
    step = 8 if m <= 256 else max(8, 1 << ((m - 1).bit_length() - 5))
    return -(-m // step) * step


def _conv_ok(node: Node) -> bool:
    x = node.inputs[0].type
    return _ok(node) and x.rank == 4 and all(isinstance(d, int) for d in x.shape[1:])  # only the batch varies


def _prepare_conv(node: Node, consts: list):
    w = consts[1]
    if w is None:
        return None
    a: A.Conv2dAttrs = node.attrs
    pad, stride, dil = list(a.padding), list(a.stride), list(a.dilation)
    x_shape = list(node.inputs[0].type.shape)
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, pad, stride, dil, a.groups, x_shape)
    bias_c = consts[2] if len(consts) > 2 else None
    attr, algo = _POST_OPS[a.activation]
    scalars = _POST_SCALARS.get(a.activation, [])
    has_res = len(node.inputs) > 3 and node.inputs[3] is not None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    cl = node.inputs[0].type.layout.kind.value == "channels_last"

    def run(ins, at):
        x = ins[0]
        fmt = torch.channels_last if cl else torch.contiguous_format
        if not x.is_contiguous(memory_format=fmt):
            x = x.contiguous(memory_format=fmt)
        bias = (bias_c if bias_c is not None else ins[2]) if has_bias else None
        if has_res:  # act(conv + bias + residual): one oneDNN call with a binary-add post-op
            r = ins[3]
            if cl and not r.is_contiguous(memory_format=torch.channels_last):
                r = r.contiguous(memory_format=torch.channels_last)
            if scalars:  # torch's binary convolution takes no clip after the add: a clamp after it
                y = torch.ops.mkldnn._convolution_pointwise.binary(x, r, packed, bias, pad, stride, dil, a.groups,
                                                                   "add", 1.0, None, [], None)
                return y.clamp_(*scalars)
            return torch.ops.mkldnn._convolution_pointwise.binary(x, r, packed, bias, pad, stride, dil, a.groups,
                                                                  "add", 1.0, None if attr == "none" else attr,
                                                                  [], algo or None)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, pad, stride, dil, a.groups, attr, scalars,
                                                       algo)
    return run


def with_fallback(prepare, reference):
    """A ``prepare`` that falls back to ``reference`` when ``prepare`` returns None."""
    def wrapped(node, consts):
        fn = prepare(node, consts)
        return fn if fn is not None else reference
    return wrapped


def _unusable(ins, a):
    raise RuntimeError("oneDNN kernel needs a constant weight")


register_kernel(OpKind.LINEAR, "cpu", name="cpu.onednn_linear", accepts=_linear_ok, dynamic=True,
                prepare=with_fallback(_prepare_linear, _unusable))(_unusable)
register_kernel(OpKind.CONV2D, "cpu", name="cpu.onednn_conv", accepts=_conv_ok, dynamic=True,
                prepare=with_fallback(_prepare_conv, _unusable))(_unusable)
