"""What each op means: one torch implementation per op kind.

``REFERENCE[op](inputs, attrs)`` computes a node's outputs (a tensor, or a tuple for several).
These functions define the IR's semantics: constant folding evaluates with them, the
``reference`` kernels the runtime registers (kernels/reference.py) are them, and every
faster kernel is checked against them. ``evaluate(node, inputs)`` is the entry point.

FALLBACK nodes (an ATen op Kiln does not convert) have no meaning of their own here: they
run the named torch op, which the runtime's reference kernel does.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import attrs as A
from . import qformat
from .graph import Node
from .ops import OpKind
from .types import LayoutKind

REFERENCE: dict[OpKind, Callable] = {}


def evaluate(node: Node, inputs: list):
    """The outputs of ``node`` on ``inputs`` (tensors, None for an absent optional operand)."""
    fn = REFERENCE.get(node.op)
    if fn is None:
        raise KeyError(f"no reference implementation for {node.op.value}")
    return fn(inputs, node.attrs)


def ref(*ops: OpKind):
    def deco(fn):
        for o in ops:
            REFERENCE[o] = fn
        return fn
    return deco


def _unary(op: OpKind, f):
    REFERENCE[op] = lambda ins, a: f(ins[0])


def _float_in(f):
    # integer inputs to float ops promote to the default float type, as torch does
    return lambda x: f(x if x.is_floating_point() else x.to(torch.get_default_dtype()))


for _op, _f in {
    OpKind.NEG: torch.neg, OpKind.ABS: torch.abs, OpKind.EXP: torch.exp, OpKind.LOG: torch.log,
    OpKind.SQRT: torch.sqrt, OpKind.RSQRT: torch.rsqrt, OpKind.RECIPROCAL: torch.reciprocal,
    OpKind.RELU: torch.relu, OpKind.SIGMOID: torch.sigmoid, OpKind.TANH: torch.tanh, OpKind.ERF: torch.erf,
    OpKind.SILU: F.silu, OpKind.NOT: torch.logical_not, OpKind.SIN: torch.sin, OpKind.COS: torch.cos,
    OpKind.FLOOR: torch.floor, OpKind.ISNAN: torch.isnan, OpKind.CEIL: torch.ceil, OpKind.SIGN: torch.sign, OpKind.IDENTITY: lambda x: x,
    OpKind.ACOS: torch.acos, OpKind.ASIN: torch.asin, OpKind.ATAN: torch.atan, OpKind.ACOSH: torch.acosh,
    OpKind.ASINH: torch.asinh, OpKind.ATANH: torch.atanh, OpKind.ROUND: torch.round,
}.items():
    _unary(_op, _float_in(_f) if _op in (OpKind.EXP, OpKind.LOG, OpKind.SQRT, OpKind.RSQRT, OpKind.RECIPROCAL,
                                         OpKind.SIGMOID, OpKind.TANH, OpKind.ERF, OpKind.SILU, OpKind.SIN,
                                         OpKind.COS, OpKind.ACOS, OpKind.ASIN, OpKind.ATAN, OpKind.ACOSH,
                                         OpKind.ASINH, OpKind.ATANH) else _f)


@ref(OpKind.GELU)
def gelu(ins, a: A.GeluAttrs):
    return F.gelu(ins[0], approximate=a.approximate.value)


@ref(OpKind.LEAKY_RELU)
def leaky_relu(ins, a: A.LeakyReluAttrs):
    return F.leaky_relu(ins[0], a.alpha)


@ref(OpKind.CLAMP)
def clamp(ins, a: A.ClampAttrs):
    x = ins[0]
    if a.min is None and a.max is None:
        return x.clone()
    lo, hi = a.min, a.max
    if not x.is_floating_point():  # integer tensors clamp to integer bounds and stay integers
        lo = None if lo is None else int(lo)
        hi = None if hi is None else int(hi)
    return torch.clamp(x, lo, hi)


@ref(OpKind.CAST)
def cast(ins, a: A.CastAttrs):
    return ins[0].to(a.dtype.to_torch())


for _op, _f in {
    OpKind.ADD: torch.add, OpKind.SUB: torch.sub, OpKind.MUL: torch.mul,
    OpKind.POW: torch.pow, OpKind.ATAN2: torch.atan2, OpKind.EQ: torch.eq,
    OpKind.NE: torch.ne, OpKind.LT: torch.lt, OpKind.LE: torch.le, OpKind.GT: torch.gt, OpKind.GE: torch.ge,
    OpKind.AND: torch.logical_and, OpKind.OR: torch.logical_or,
}.items():
    REFERENCE[_op] = lambda ins, a, f=_f: f(ins[0], ins[1])


def _minmax(f):
    def go(a, b):
        # maximum/minimum need equal dtypes; promote as the IR's type rule does
        dt = torch.result_type(a, b)
        return f(a.to(dt), b.to(dt))
    return go


REFERENCE[OpKind.MAXIMUM] = lambda ins, a: _minmax(torch.maximum)(ins[0], ins[1])
REFERENCE[OpKind.MINIMUM] = lambda ins, a: _minmax(torch.minimum)(ins[0], ins[1])


@ref(OpKind.DIV)
def div(ins, a: A.DivAttrs):
    if a.rounding is A.Rounding.NONE:
        return torch.div(ins[0], ins[1])
    return torch.div(ins[0], ins[1], rounding_mode=a.rounding.value)


@ref(OpKind.CUMSUM)
def cumsum(ins, a: A.AxisAttrs):
    x = ins[0]
    return torch.cumsum(x, a.axis, dtype=None if x.is_floating_point() else torch.int64)


@ref(OpKind.WHERE)
def where(ins, a):
    return torch.where(ins[0], ins[1], ins[2])


@ref(OpKind.SUM)
def reduce_sum(ins, a: A.ReduceAttrs):
    x = ins[0]
    return torch.sum(x, dim=a.axes, keepdim=a.keepdim, dtype=x.dtype) if a.axes else x.clone()


@ref(OpKind.PROD)
def reduce_prod(ins, a: A.ReduceAttrs):
    x = ins[0]
    if not a.axes:
        return x.clone()
    if len(a.axes) == x.dim():
        y = torch.prod(x, dtype=x.dtype)
        return y.reshape((1,) * x.dim()) if a.keepdim else y
    for ax in sorted(a.axes, reverse=True):  # torch.prod takes one dim at a time
        x = torch.prod(x, dim=ax, keepdim=a.keepdim, dtype=x.dtype)
    return x


@ref(OpKind.MEAN)
def reduce_mean(ins, a: A.ReduceAttrs):
    return torch.mean(ins[0], dim=a.axes, keepdim=a.keepdim) if a.axes else ins[0].clone()


def _empty_reduction(x, a: A.ReduceAttrs, largest: bool):
    """max/min over an empty set: the reduction's identity (-inf / +inf, or the dtype's limit)."""
    shape = [1 if i in a.axes else d for i, d in enumerate(x.shape) if a.keepdim or i not in a.axes]
    if x.dtype == torch.bool:
        fill = not largest
    elif x.is_floating_point():
        fill = float("-inf") if largest else float("inf")
    else:
        info = torch.iinfo(x.dtype)
        fill = info.min if largest else info.max
    return torch.full(shape, fill, dtype=x.dtype)


def _extreme(x, a: A.ReduceAttrs, largest: bool):
    if not a.axes:
        return x.clone()
    if any(x.shape[i] == 0 for i in a.axes):
        return _empty_reduction(x, a, largest)
    return (torch.amax if largest else torch.amin)(x, dim=a.axes, keepdim=a.keepdim)


@ref(OpKind.MAX)
def reduce_max(ins, a: A.ReduceAttrs):
    return _extreme(ins[0], a, True)


@ref(OpKind.MIN)
def reduce_min(ins, a: A.ReduceAttrs):
    return _extreme(ins[0], a, False)


@ref(OpKind.ARGMAX)
def argmax(ins, a: A.ArgReduceAttrs):
    return torch.argmax(ins[0], dim=a.axis, keepdim=a.keepdim)


@ref(OpKind.SOFTMAX)
def softmax(ins, a: A.AxisAttrs):
    return torch.softmax(ins[0], a.axis)


@ref(OpKind.LOG_SOFTMAX)
def log_softmax(ins, a: A.AxisAttrs):
    return torch.log_softmax(ins[0], a.axis)


@ref(OpKind.LAYER_NORM)
def layer_norm(ins, a: A.LayerNormAttrs):
    x = ins[0]
    w = ins[1] if len(ins) > 1 else None
    b = ins[2] if len(ins) > 2 else None
    return F.layer_norm(x, x.shape[x.dim() - a.normalized_ndim:], w, b, a.eps)


@ref(OpKind.BATCH_NORM)
def batch_norm(ins, a: A.BatchNormAttrs):
    x, mean, var = ins[:3]
    w = ins[3] if len(ins) > 3 else None
    b = ins[4] if len(ins) > 4 else None
    return F.batch_norm(x, mean, var, w, b, False, 0.0, a.eps)


@ref(OpKind.MATMUL)
def matmul(ins, a):
    x, y = ins
    dt = torch.result_type(x, y)
    return torch.matmul(x.to(dt), y.to(dt))


ACTIVATIONS = {
    A.Activation.NONE: None, A.Activation.RELU: torch.relu, A.Activation.GELU: F.gelu,
    A.Activation.GELU_TANH: lambda x: F.gelu(x, approximate="tanh"), A.Activation.TANH: torch.tanh,
    A.Activation.SIGMOID: torch.sigmoid, A.Activation.SILU: F.silu,
    A.Activation.RELU6: lambda x: torch.clamp(x, 0.0, 6.0),  # as the CLAMP it replaced
}


def epilogue(y, residual, activation):
    """act(y + residual): the fused epilogue of LINEAR and CONV2D, in that order."""
    if residual is not None:
        y = y + residual
    act = ACTIVATIONS[activation]
    return y if act is None else act(y)


def _opt(ins, i):
    return ins[i] if len(ins) > i else None


@ref(OpKind.LINEAR)
def linear(ins, a: A.LinearAttrs):
    return epilogue(F.linear(ins[0], ins[1], _opt(ins, 2)), _opt(ins, 3), a.activation)


@ref(OpKind.CONV2D)
def conv2d(ins, a: A.Conv2dAttrs):
    y = F.conv2d(ins[0], ins[1], _opt(ins, 2), a.stride, a.padding, a.dilation, a.groups)
    return epilogue(y, _opt(ins, 3), a.activation)


@ref(OpKind.TO_LAYOUT)
def to_layout(ins, a: A.LayoutAttrs):
    x = ins[0]
    if a.layout.kind is LayoutKind.CHANNELS_LAST and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if a.layout.kind is LayoutKind.ROW_MAJOR:
        return x.contiguous()
    raise NotImplementedError(f"layout {a.layout!r}")


@ref(OpKind.MAX_POOL2D)
def max_pool2d(ins, a: A.Pool2dAttrs):
    x = ins[0]
    if x.dtype == torch.uint8:  # torch's channels-last uint8 max-pool fails on large planes
        x = x.contiguous()
    return F.max_pool2d(x, a.kernel, a.stride, a.padding, a.dilation, a.ceil_mode)


@ref(OpKind.AVG_POOL2D)
def avg_pool2d(ins, a: A.Pool2dAttrs):
    return F.avg_pool2d(ins[0], a.kernel, a.stride, a.padding, a.ceil_mode, a.count_include_pad)


@ref(OpKind.ADAPTIVE_AVG_POOL2D)
def adaptive_avg_pool2d(ins, a: A.AdaptivePoolAttrs):
    return F.adaptive_avg_pool2d(ins[0], a.output_size)


@ref(OpKind.RESHAPE)
def reshape(ins, a: A.ShapeAttrs):
    return ins[0].reshape(a.shape)


@ref(OpKind.PERMUTE)
def permute(ins, a: A.PermuteAttrs):
    return ins[0].permute(a.perm)


@ref(OpKind.EXPAND)
def expand(ins, a: A.ShapeAttrs):
    return ins[0].expand(a.shape)


@ref(OpKind.CONCAT)
def concat(ins, a: A.AxisAttrs):
    dt = ins[0].dtype
    for t in ins[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return torch.cat([t.to(dt) for t in ins], a.axis)


@ref(OpKind.SLICE)
def slice_(ins, a: A.SliceAttrs):
    idx = [slice(None)] * ins[0].dim()
    idx[a.axis] = slice(a.start, a.end, a.step)
    return ins[0][tuple(idx)]


def _check_index(idx: torch.Tensor, size: int, what: str):
    # out-of-range indices would be a silent wrong answer in some backends: reject them
    if idx.numel() and (int(idx.min()) < -size or int(idx.max()) >= size):
        raise IndexError(f"{what}: index out of range for size {size}")


@ref(OpKind.TAKE)
def take(ins, a: A.AxisAttrs):
    x, idx = ins
    _check_index(idx, x.shape[a.axis], "take")
    idx = torch.where(idx < 0, idx + x.shape[a.axis], idx)
    if a.axis == 0 and x.dim() == 2:
        return F.embedding(idx, x)
    out = torch.index_select(x, a.axis, idx.reshape(-1))
    return out.reshape(x.shape[:a.axis] + idx.shape + x.shape[a.axis + 1:])


@ref(OpKind.GATHER)
def gather(ins, a: A.AxisAttrs):
    x, idx = ins
    _check_index(idx, x.shape[a.axis], "gather")
    return torch.gather(x, a.axis, torch.where(idx < 0, idx + x.shape[a.axis], idx))


@ref(OpKind.INDEX)
def index(ins, a):
    x, idx = ins[0], ins[1:]
    for i, t in enumerate(idx):
        _check_index(t, x.shape[i], "index")
    return x[tuple(idx)]


@ref(OpKind.PAD)
def pad(ins, a: A.PadAttrs):
    x = ins[0]
    # F.pad takes (before, after) pairs from the last axis backwards
    pads = []
    for i in reversed(range(x.dim())):
        pads += [a.pads[2 * i], a.pads[2 * i + 1]]
    if a.mode is A.PadMode.CONSTANT:
        return F.pad(x, pads, "constant", a.value)
    # reflect/replicate only pad spatial axes; strip the leading zero pairs
    nz = len(pads)
    while nz > 2 and pads[nz - 1] == 0 and pads[nz - 2] == 0:
        nz -= 2
    return F.pad(x, pads[:nz], a.mode.value)


@ref(OpKind.ATTENTION)
def attention(ins, a: A.AttentionAttrs):
    q, k, v = ins[:3]
    mask = ins[3] if len(ins) > 3 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a.causal, scale=a.scale)


def rnn_hoisted_reference(ins, a: A.RNNAttrs, mode: str):
    """The hoisted form, step by step in torch: xp already holds x @ w_ih^T + b_ih."""
    xp = ins[0].transpose(0, 1) if a.batch_first else ins[0]
    nstate = 2 if mode == "LSTM" else 1
    h = ins[1][0]
    c = ins[2][0] if mode == "LSTM" else None
    w_hh = ins[1 + nstate]
    b_hh = ins[2 + nstate] if len(ins) > 2 + nstate else None
    ys = []
    for t in range(xp.shape[0]):
        gh = F.linear(h, w_hh, b_hh)
        if mode == "LSTM":
            i, f, g, o = (xp[t] + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            xr, xz, xn = xp[t].chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
        ys.append(h)
    y = torch.stack(ys, 1 if a.batch_first else 0)
    return (y, h[None], c[None]) if mode == "LSTM" else (y, h[None])


def rnn_reference(ins, a: A.RNNAttrs, mode: str):
    """LSTM/GRU through torch's own implementation (the oracle)."""
    if a.proj_hoisted:
        return rnn_hoisted_reference(ins, a, mode)
    x = ins[0]
    nstate = 2 if mode == "LSTM" else 1
    weights = list(ins[1 + nstate:])
    hx = (ins[1], ins[2]) if mode == "LSTM" else ins[1]
    fn = torch._VF.lstm if mode == "LSTM" else torch._VF.gru
    out = fn(x, hx, weights, a.has_biases, a.num_layers, 0.0, False, a.bidirectional, a.batch_first)
    return tuple(out)


@ref(OpKind.LSTM)
def lstm(ins, a: A.RNNAttrs):
    return rnn_reference(ins, a, "LSTM")


@ref(OpKind.GRU)
def gru(ins, a: A.RNNAttrs):
    return rnn_reference(ins, a, "GRU")


def _sparse_weight(ins, a):
    from .sparse import densify

    n = a.shape[0]
    return densify(a.layout, (n, a.shape[1] if len(a.shape) == 2 else a.shape[1] * a.shape[2] * a.shape[3]), ins[1], ins[2], _opt(ins, 3))


@ref(OpKind.SPARSE_LINEAR)
def sparse_linear(ins, a: A.SparseLinearAttrs):
    return epilogue(F.linear(ins[0], _sparse_weight(ins, a).to(ins[0].dtype), _opt(ins, 4)), _opt(ins, 5),
                    a.activation)


@ref(OpKind.SPARSE_CONV2D)
def sparse_conv2d(ins, a: A.SparseConv2dAttrs):
    w = _sparse_weight(ins, a).reshape(a.shape).to(ins[0].dtype)
    y = F.conv2d(ins[0], w, _opt(ins, 4), a.stride, a.padding, a.dilation)
    return epilogue(y, _opt(ins, 5), a.activation)


# ----------------------------------------------------------------------------- quantized
# Integer products are summed in float32 here (exact up to 2**24, then rounded like any
# float32 GEMM); the fast kernels sum in int32 and agree within the choice tolerance.


def _requantize(y, a):
    return y if a.out_scale is None else qformat.quantize_tensor(y, a.out_scale, a.out_zero_point)


@ref(OpKind.QUANTIZE)
def quantize(ins, a: A.QuantizeAttrs):
    return qformat.quantize_tensor(ins[0], a.scale, a.zero_point)


@ref(OpKind.DEQUANTIZE)
def dequantize(ins, a: A.QuantizeAttrs):
    return qformat.dequantize_tensor(ins[0], a.scale, a.zero_point)


@ref(OpKind.QLINEAR_DYNAMIC)
def qlinear_dynamic(ins, a: A.QLinearDynamicAttrs):
    x, wq, ws = ins[0], ins[1], ins[2]
    xq, xs, xzp = qformat.quantize_rows(x)
    acc = F.linear(xq.float() - xzp, wq.float())
    y = acc * xs * ws
    if _opt(ins, 3) is not None:
        y = y + ins[3]
    return epilogue(y, _opt(ins, 4), a.activation)


@ref(OpKind.LINEAR_WEIGHT_ONLY)
def linear_weight_only(ins, a: A.WeightOnlyAttrs):
    x, wq, s = ins[0], ins[1], ins[2]
    w = qformat.dequantize_weight_int8(wq, s) if a.bits == 8 else qformat.dequantize_weight_int4(wq, s, a.group_size)
    return epilogue(F.linear(x, w, _opt(ins, 3)), _opt(ins, 4), a.activation)


@ref(OpKind.QLINEAR)
def qlinear(ins, a: A.QLinearAttrs):
    x, wq, ws = ins[0], ins[1], ins[2]
    y = F.linear(x.float() - a.x_zero_point, wq.float()) * (a.x_scale * ws)
    if _opt(ins, 3) is not None:
        y = y + ins[3]
    return _requantize(epilogue(y, None, a.activation), a)


@ref(OpKind.QCONV2D)
def qconv2d(ins, a: A.QConv2dAttrs):
    x, wq, ws = ins[0], ins[1], ins[2]
    y = F.conv2d(x.float() - a.x_zero_point, wq.float(), None, a.stride, a.padding, a.dilation, a.groups)
    y = y * (a.x_scale * ws)[None, :, None, None]
    if _opt(ins, 3) is not None:
        y = y + ins[3][None, :, None, None]
    r = _opt(ins, 4)
    if r is not None and r.dtype == torch.uint8:
        r = qformat.dequantize_tensor(r, a.residual_scale, a.residual_zero_point)
    return _requantize(epilogue(y, r, a.activation), a)


from . import reference_library  # noqa: E402,F401  (the library ops: sorting, scatters, pooling, ...)
