"""ATen -> Kiln IR converters: one function per ATen op (overload packet), registered in
``CONVERTERS``. ``frontends/torch_export.py`` walks an exported program and calls these;
a converter returns the Kiln value(s) for a node, or ``None`` to decline (the node then
runs in PyTorch as a FALLBACK, reported by name).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from kiln.ir import DType, OpKind, Value
from kiln.ir import attrs as A
from kiln.ir.types import Sym

from . import torch_rnn  # noqa: F401  (defines torch.ops.kiln.lstm / gru, converted below)
from .common import FrontendBuilder

aten = torch.ops.aten


class Converters:
    """Registry of ATen converters keyed by op overload packet (``aten.add``)."""

    def __init__(self):
        self.table: dict[Any, Callable] = {}

    def register(self, *targets):
        def deco(fn):
            for t in targets:
                self.table[t] = fn
            return fn
        return deco

    def lookup(self, target):
        if target in self.table:
            return self.table[target]
        packet = getattr(target, "overloadpacket", None)
        return self.table.get(packet)


CONVERTERS = Converters()
conv = CONVERTERS.register


def _norm(axis: int, rank: int) -> int:
    return axis % max(rank, 1)


def _operand(cx: FrontendBuilder, v, like: Value | None = None) -> Value:
    return v if isinstance(v, Value) else cx.scalar(v, like)


# ----------------------------------------------------------------------------- elementwise
_UNARY = {aten.relu: OpKind.RELU, aten.relu_: OpKind.RELU, aten.neg: OpKind.NEG, aten.abs: OpKind.ABS,
          aten.exp: OpKind.EXP, aten.log: OpKind.LOG, aten.sqrt: OpKind.SQRT, aten.rsqrt: OpKind.RSQRT,
          aten.reciprocal: OpKind.RECIPROCAL, aten.sigmoid: OpKind.SIGMOID, aten.tanh: OpKind.TANH,
          aten.erf: OpKind.ERF, aten.silu: OpKind.SILU, aten.logical_not: OpKind.NOT, aten.sin: OpKind.SIN,
          aten.cos: OpKind.COS, aten.isnan: OpKind.ISNAN, aten.floor: OpKind.FLOOR, aten.ceil: OpKind.CEIL, aten.sign: OpKind.SIGN,
          aten.acos: OpKind.ACOS, aten.asin: OpKind.ASIN, aten.atan: OpKind.ATAN, aten.acosh: OpKind.ACOSH,
          aten.asinh: OpKind.ASINH, aten.atanh: OpKind.ATANH,
          aten.round.default: OpKind.ROUND}  # round.decimals: aten_extended.py
for _t, _k in _UNARY.items():
    conv(_t)(lambda cx, args, kw, n, k=_k: cx.add(k, args[0]))


@conv(aten.bitwise_not)
def _bitwise_not(cx, args, kw, n):
    if args[0].dtype is not DType.BOOL:
        return None
    return cx.add(OpKind.NOT, args[0])


_BINARY = {aten.mul: OpKind.MUL, aten.pow: OpKind.POW, aten.maximum: OpKind.MAXIMUM,
           aten.minimum: OpKind.MINIMUM, aten.eq: OpKind.EQ, aten.ne: OpKind.NE, aten.lt: OpKind.LT,
           aten.le: OpKind.LE, aten.gt: OpKind.GT, aten.ge: OpKind.GE, aten.logical_and: OpKind.AND,
           aten.logical_or: OpKind.OR, aten.atan2: OpKind.ATAN2}


def _binary(cx, k, a, b):
    if not isinstance(a, Value):
        a = cx.scalar(a, b)
    return cx.add(k, a, _operand(cx, b, a))


for _t, _k in _BINARY.items():
    conv(_t)(lambda cx, args, kw, n, k=_k: None if kw.get("rounding_mode") or kw.get("out") is not None
             else _binary(cx, k, args[0], args[1]))


@conv(aten.div)
def _div(cx, args, kw, n):
    mode = kw.get("rounding_mode", args[2] if len(args) > 2 else None)
    a, b = args[0], args[1]
    if not isinstance(a, Value):
        a = cx.scalar(a, b)
    b = _operand(cx, b, a)
    return cx.add(OpKind.DIV, a, b, attrs=A.DivAttrs(A.Rounding(mode) if mode else A.Rounding.NONE))


@conv(aten.floor_divide)
def _floordiv(cx, args, kw, n):
    a, b = args[0], args[1]
    if not isinstance(a, Value):
        a = cx.scalar(a, b)
    return cx.add(OpKind.DIV, a, _operand(cx, b, a), attrs=A.DivAttrs(A.Rounding.FLOOR))


@conv(aten.__and__, aten.bitwise_and, aten.__or__, aten.bitwise_or)
def _bool_binary(cx, args, kw, n):
    a, b = args
    if any(isinstance(v, Value) and v.dtype is not DType.BOOL for v in (a, b)):
        return None  # integer bitwise ops are not Kiln ops
    k = OpKind.AND if "and" in str(n.target) else OpKind.OR
    return _binary(cx, k, a, b)


@conv(aten.add, aten.sub)
def _add_sub(cx, args, kw, n):
    a, b = args[0], args[1]
    alpha = kw.get("alpha", args[2] if len(args) > 2 else 1)
    if not isinstance(b, Value):
        b = b * alpha
    elif alpha != 1:
        b = cx.add(OpKind.MUL, b, cx.scalar(alpha, b))
    return _binary(cx, OpKind.ADD if n.target.overloadpacket is aten.add else OpKind.SUB, a, b)


@conv(aten.rsub)
def _rsub(cx, args, kw, n):
    x, other = args[0], args[1]
    alpha = kw.get("alpha", args[2] if len(args) > 2 else 1)
    if alpha != 1:
        x = cx.add(OpKind.MUL, x, cx.scalar(alpha, x))
    return _binary(cx, OpKind.SUB, other, x)


@conv(aten.gelu)
def _gelu(cx, args, kw, n):
    approx = kw.get("approximate", args[1] if len(args) > 1 else "none")
    return cx.add(OpKind.GELU, args[0], attrs=A.GeluAttrs(A.GeluApprox(approx)))


@conv(aten.leaky_relu)
def _leaky(cx, args, kw, n):
    return cx.add(OpKind.LEAKY_RELU, args[0], attrs=A.LeakyReluAttrs(float(args[1]) if len(args) > 1 else 0.01))


@conv(aten.hardtanh, aten.clamp)
def _clamp(cx, args, kw, n):
    lo = args[1] if len(args) > 1 else kw.get("min", -1.0 if n.target.overloadpacket is aten.hardtanh else None)
    hi = args[2] if len(args) > 2 else kw.get("max", 1.0 if n.target.overloadpacket is aten.hardtanh else None)
    if isinstance(lo, Value) or isinstance(hi, Value):
        return None
    if not args[0].dtype.is_float and any(b is not None and float(b) != int(b) for b in (lo, hi)):
        return None  # a fractional bound promotes an integer tensor to float: not a Kiln CLAMP
    return cx.add(OpKind.CLAMP, args[0], attrs=A.ClampAttrs(None if lo is None else float(lo),
                                                            None if hi is None else float(hi)))


@conv(aten.where)
def _where(cx, args, kw, n):
    if len(args) != 3:
        return None
    c, a, b = args
    if not isinstance(a, Value):
        a = cx.scalar(a, b if isinstance(b, Value) else None)
    return cx.add(OpKind.WHERE, c, a, _operand(cx, b, a))


@conv(aten.masked_fill)
def _masked_fill(cx, args, kw, n):
    x, mask, value = args
    v = value if isinstance(value, Value) else cx.scalar(value, x)
    return cx.add(OpKind.WHERE, mask, cx.cast(v, x.dtype), x)


@conv(aten._to_copy, aten.to)
def _to_copy(cx, args, kw, n):
    dtype = kw.get("dtype")
    if dtype is None:
        for a in args[1:]:
            if isinstance(a, torch.dtype):
                dtype = a
    dev = kw.get("device")
    if dev is not None and torch.device(dev).type != "cpu":
        return None
    if dtype is None:
        return args[0]
    return cx.cast(args[0], DType.from_torch(dtype))


@conv(aten.type_as)
def _type_as(cx, args, kw, n):
    return cx.cast(args[0], args[1].dtype)


# identities: functional IR has no aliasing, so copies and views of the same data are one value
for _t in (aten.clone, aten.contiguous, aten.alias, aten.detach, aten.lift_fresh_copy, aten.lift_fresh):
    conv(_t)(lambda cx, args, kw, n: args[0])


@conv(aten.dropout, aten.feature_dropout, aten.alpha_dropout)
def _dropout(cx, args, kw, n):
    """An identity in eval mode (or with p = 0). In training mode it draws random numbers:
    not an identity, so it falls back to torch's op (random, as eager is)."""
    p = args[1] if len(args) > 1 else kw.get("p", 0.5)
    train = args[2] if len(args) > 2 else kw.get("train", True)
    return args[0] if not train or not p else None


@conv(aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
      aten._assert_async)
def _assert(cx, args, kw, n):
    return ()  # checks that hold by construction in a specialized graph


# ----------------------------------------------------------------------------- reductions
def _axes(dims, rank):
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return tuple(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted({_norm(d, rank) for d in dims}))


def _reduce(k):
    def f(cx, args, kw, n):
        x = args[0]
        dims = args[1] if len(args) > 1 else kw.get("dim")
        keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
        if kw.get("dtype") is not None:
            x = cx.cast(x, DType.from_torch(kw["dtype"]))
        if k is OpKind.SUM and x.dtype in (DType.BOOL, DType.INT8, DType.UINT8, DType.INT16, DType.INT32):
            x = cx.cast(x, DType.INT64)  # torch sums small ints into int64
        return cx.add(k, x, attrs=A.ReduceAttrs(_axes(dims, x.type.rank), bool(keep)))
    return f


conv(aten.sum)(_reduce(OpKind.SUM))
conv(aten.mean)(_reduce(OpKind.MEAN))
conv(aten.amax)(_reduce(OpKind.MAX))
conv(aten.amin)(_reduce(OpKind.MIN))


@conv(aten.argmax)
def _argmax(cx, args, kw, n):
    x = args[0]
    dim = args[1] if len(args) > 1 else kw.get("dim")
    keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
    if dim is None:
        x, dim = cx.reshape(x, (-1,)), 0
    return cx.add(OpKind.ARGMAX, x, attrs=A.ArgReduceAttrs(_norm(dim, x.type.rank), bool(keep)))


@conv(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def _softmax(cx, args, kw, n):
    x, dim = args[0], args[1]
    if len(args) > 2 and isinstance(args[2], torch.dtype):
        x = cx.cast(x, DType.from_torch(args[2]))
    if kw.get("dtype") is not None:
        x = cx.cast(x, DType.from_torch(kw["dtype"]))
    k = OpKind.LOG_SOFTMAX if "log" in str(n.target) else OpKind.SOFTMAX
    return cx.add(k, x, attrs=A.AxisAttrs(_norm(dim, x.type.rank)))


@conv(aten.layer_norm)
def _layer_norm(cx, args, kw, n):
    x, shape = args[0], args[1]
    w = args[2] if len(args) > 2 else kw.get("weight")
    b = args[3] if len(args) > 3 else kw.get("bias")
    eps = args[4] if len(args) > 4 else kw.get("eps", 1e-5)
    ins = [x, w, b]
    while ins and ins[-1] is None:
        ins.pop()
    return cx.add(OpKind.LAYER_NORM, *ins, attrs=A.LayerNormAttrs(len(shape), float(eps)))


@conv(aten._native_batch_norm_legit_no_training)
def _bn_no_training(cx, args, kw, n):
    x, w, b, mean, var, _momentum, eps = args
    return (cx.add(OpKind.BATCH_NORM, x, mean, var, w, b, attrs=A.BatchNormAttrs(float(eps))), None, None)


@conv(aten.batch_norm)
def _bn(cx, args, kw, n):
    x, w, b, mean, var, training, _m, eps = args[:8]
    if training or mean is None:
        return None
    return cx.add(OpKind.BATCH_NORM, x, mean, var, w, b, attrs=A.BatchNormAttrs(float(eps)))


# ----------------------------------------------------------------------------- compute
@conv(aten.linear)
def _linear(cx, args, kw, n):
    ins = [args[0], args[1]] + ([args[2]] if len(args) > 2 and args[2] is not None else [])
    return cx.add(OpKind.LINEAR, *ins)


@conv(aten.matmul, aten.mm, aten.bmm)
def _matmul(cx, args, kw, n):
    return cx.add(OpKind.MATMUL, args[0], args[1])


@conv(aten.addmm)
def _addmm(cx, args, kw, n):
    bias, x, w = args[:3]
    if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
        return None
    return cx.add(OpKind.ADD, cx.add(OpKind.MATMUL, x, w), bias)


def _pair(v):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1])) if len(v) in (1, 2) else None


@conv(aten.conv2d)
def _conv2d(cx, args, kw, n):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else kw.get("bias")
    stride = _pair(args[3] if len(args) > 3 else kw.get("stride", 1))
    padding = args[4] if len(args) > 4 else kw.get("padding", 0)
    dilation = _pair(args[5] if len(args) > 5 else kw.get("dilation", 1))
    groups = args[6] if len(args) > 6 else kw.get("groups", 1)
    if isinstance(padding, str) or x.type.rank != 4:
        return None
    ins = [x, w] + ([b] if b is not None else [])
    return cx.add(OpKind.CONV2D, *ins, attrs=A.Conv2dAttrs(stride, _pair(padding), dilation, int(groups)))


@conv(aten.convolution)
def _convolution(cx, args, kw, n):
    x, w, b, stride, padding, dilation, transposed, _out_pad, groups = args
    if transposed or x.type.rank != 4:
        return None
    ins = [x, w] + ([b] if b is not None else [])
    return cx.add(OpKind.CONV2D, *ins, attrs=A.Conv2dAttrs(_pair(stride), _pair(padding), _pair(dilation),
                                                           int(groups)))


@conv(aten.max_pool2d, aten.max_pool2d_with_indices)
def _max_pool(cx, args, kw, n):
    x, k = args[0], _pair(args[1])
    stride = args[2] if len(args) > 2 and args[2] else k
    padding = args[3] if len(args) > 3 else 0
    dilation = args[4] if len(args) > 4 else 1
    ceil = bool(args[5]) if len(args) > 5 else False
    y = cx.add(OpKind.MAX_POOL2D, x, attrs=A.Pool2dAttrs(k, _pair(stride), _pair(padding), _pair(dilation), ceil))
    return (y, None) if n.target.overloadpacket is aten.max_pool2d_with_indices else y


@conv(aten.avg_pool2d)
def _avg_pool(cx, args, kw, n):
    x, k = args[0], _pair(args[1])
    stride = args[2] if len(args) > 2 and args[2] else k
    padding = args[3] if len(args) > 3 else 0
    ceil = bool(args[4]) if len(args) > 4 else False
    include = bool(args[5]) if len(args) > 5 else True
    if len(args) > 6 and args[6] is not None:
        return None  # divisor_override
    return cx.add(OpKind.AVG_POOL2D, x, attrs=A.Pool2dAttrs(k, _pair(stride), _pair(padding), (1, 1), ceil, include))


@conv(aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d)
def _adaptive(cx, args, kw, n):
    out = _pair(args[1])
    x = args[0]
    if x.type.rank != 4:
        return None
    if out == (1, 1):  # global average pooling: one spelling for every frontend (ONNX's is a mean)
        return cx.add(OpKind.MEAN, x, attrs=A.ReduceAttrs((2, 3), True))
    return cx.add(OpKind.ADAPTIVE_AVG_POOL2D, x, attrs=A.AdaptivePoolAttrs(out))


@conv(aten.scaled_dot_product_attention)
def _sdpa(cx, args, kw, n):
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else kw.get("attn_mask")
    dropout = args[4] if len(args) > 4 else kw.get("dropout_p", 0.0)
    causal = args[5] if len(args) > 5 else kw.get("is_causal", False)
    scale = args[6] if len(args) > 6 else kw.get("scale")
    if dropout:
        return None
    if kw.get("enable_gqa") or (len(args) > 7 and args[7]):
        k, v = _repeat_heads(cx, k, q), _repeat_heads(cx, v, q)
        if k is None or v is None:
            return None
    ins = [q, k, v] + ([mask] if mask is not None else [])
    return cx.add(OpKind.ATTENTION, *ins, attrs=A.AttentionAttrs(None if scale is None else float(scale),
                                                                 bool(causal)))


def _repeat_heads(cx, kv, q):
    """Grouped-query attention (``enable_gqa``): each of ``kv``'s heads repeated for the group
    of query heads it serves (as ``repeat_interleave`` on the head dim; torch's own rule),
    so the attention op sees as many key/value heads as query heads. None when the head
    counts are symbolic or do not divide."""
    hq, hk = q.shape[-3], kv.shape[-3]
    if not (isinstance(hq, int) and isinstance(hk, int)) or hk == 0 or hq % hk:
        return None
    if hq == hk:
        return kv
    lead, (s, d) = list(kv.shape[:-3]), kv.shape[-2:]
    x = cx.reshape(kv, lead + [hk, 1, s, d])
    x = cx.add(OpKind.EXPAND, x, attrs=A.ShapeAttrs(tuple(lead + [hk, hq // hk, s, d])))
    return cx.reshape(x, lead + [hq, s, d])


def _rnn(kind):
    def f(cx, args, kw, n):
        x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
        if train and dropout:
            return None
        per_layer = (4 if has_biases else 2) * (2 if bidirectional else 1)
        if len(params) != per_layer * num_layers:  # LSTM proj_size adds W_hr: not an op Kiln has
            return None
        hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        a = A.RNNAttrs(hidden_size=hx[0].shape[-1], num_layers=int(num_layers), bidirectional=bool(bidirectional),
                       batch_first=bool(batch_first), has_biases=bool(has_biases))
        return cx.add(kind, x, *hx, *params, attrs=a)
    return f


conv(aten.lstm)(_rnn(OpKind.LSTM))
conv(aten.gru)(_rnn(OpKind.GRU))
# nn.LSTM / nn.GRU export as these leaf ops (frontends/torch_rnn.py); same signatures as aten's
conv(torch.ops.kiln.lstm)(_rnn(OpKind.LSTM))
conv(torch.ops.kiln.gru)(_rnn(OpKind.GRU))


# ----------------------------------------------------------------------------- data movement
@conv(aten.view, aten.reshape, aten._unsafe_view)
def _view(cx, args, kw, n):
    return cx.reshape(args[0], args[1])


@conv(aten.flatten)
def _flatten(cx, args, kw, n):
    x = args[0]
    r = x.type.rank
    s = _norm(args[1] if len(args) > 1 else 0, r)
    e = _norm(args[2] if len(args) > 2 else -1, r)
    if r == 0:
        return cx.reshape(x, (1,))
    return cx.reshape(x, list(x.shape[:s]) + [-1] + list(x.shape[e + 1:]))


@conv(aten.unsqueeze)
def _unsqueeze(cx, args, kw, n):
    x, d = args
    d = d % (x.type.rank + 1)
    return cx.reshape(x, list(x.shape[:d]) + [1] + list(x.shape[d:]))


@conv(aten.squeeze)
def _squeeze(cx, args, kw, n):
    x = args[0]
    dims = args[1] if len(args) > 1 else None
    r = x.type.rank
    dims = range(r) if dims is None else ([dims] if isinstance(dims, int) else dims)
    drop = {_norm(d, r) for d in dims if x.shape[_norm(d, r)] == 1}
    return cx.reshape(x, [s for i, s in enumerate(x.shape) if i not in drop])


@conv(aten.permute)
def _permute(cx, args, kw, n):
    x = args[0]
    perm = tuple(_norm(p, x.type.rank) for p in args[1])
    if perm == tuple(range(x.type.rank)):
        return x
    return cx.add(OpKind.PERMUTE, x, attrs=A.PermuteAttrs(perm))


@conv(aten.transpose)
def _transpose(cx, args, kw, n):
    x, a, b = args
    r = x.type.rank
    perm = list(range(r))
    a, b = _norm(a, r), _norm(b, r)
    perm[a], perm[b] = perm[b], perm[a]
    if a == b:
        return x
    return cx.add(OpKind.PERMUTE, x, attrs=A.PermuteAttrs(tuple(perm)))


@conv(aten.t)
def _t(cx, args, kw, n):
    x = args[0]
    if x.type.rank < 2:
        return x
    return cx.add(OpKind.PERMUTE, x, attrs=A.PermuteAttrs((1, 0)))


@conv(aten.expand)
def _expand(cx, args, kw, n):
    x, shape = args[0], list(args[1])
    off = len(shape) - x.type.rank
    shape = [x.shape[i - off] if s == -1 else s for i, s in enumerate(shape)]
    if tuple(shape) == tuple(x.shape):
        return x
    return cx.add(OpKind.EXPAND, x, attrs=A.ShapeAttrs(tuple(shape)))


@conv(aten.cat, aten.concat)
def _cat(cx, args, kw, n):
    xs = [x for x in args[0] if not (x.type.rank == 1 and x.shape[0] == 0)]
    dim = args[1] if len(args) > 1 else kw.get("dim", 0)
    if len(xs) == 1:
        return xs[0]
    return cx.add(OpKind.CONCAT, *xs, attrs=A.AxisAttrs(_norm(dim, xs[0].type.rank)))


@conv(aten.stack)
def _stack(cx, args, kw, n):
    xs = args[0]
    dim = args[1] if len(args) > 1 else kw.get("dim", 0)
    d = dim % (xs[0].type.rank + 1)
    xs = [cx.reshape(x, list(x.shape[:d]) + [1] + list(x.shape[d:])) for x in xs]
    return xs[0] if len(xs) == 1 else cx.add(OpKind.CONCAT, *xs, attrs=A.AxisAttrs(d))


def _slice_value(cx, x, dim, start, end, step=1, length=None):
    """``x[start:end:step]`` along ``dim``. With symbolic sizes, ``length`` (the result's
    size along ``dim``, as torch.export recorded it) gives the end exactly."""
    size = x.shape[dim]
    start = 0 if start is None else start
    end = size if end is None else end
    if all(isinstance(v, int) for v in (size, start, end)):
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(start, min(size, end + size if end < 0 else end))
    else:
        if isinstance(start, int) and start < 0:
            start = start + size
        if length is not None:
            end = start + length * step  # torch clamps an end past the size: exactly ``length`` taken
        elif isinstance(end, int) and (end < 0 or end >= 2 ** 62):
            end = end + size if end < 0 else size
    if (start, end, step) == (0, size, 1):
        return x
    return cx.add(OpKind.SLICE, x, attrs=A.SliceAttrs(dim, start, end, step))


@conv(aten.slice)
def _slice(cx, args, kw, n):
    x = args[0]
    dim = _norm(args[1] if len(args) > 1 else 0, x.type.rank)
    start = args[2] if len(args) > 2 else None
    end = args[3] if len(args) > 3 else None
    step = args[4] if len(args) > 4 else 1
    val = n.meta.get("val")
    length = None
    if cx.symbols is not None and isinstance(val, torch.Tensor):
        d = val.shape[dim]
        length = cx.symbols.dim(d) if isinstance(d, torch.SymInt) else int(d)
    return _slice_value(cx, x, dim, start, end, step, length)


@conv(aten.select)
def _select(cx, args, kw, n):
    x, dim, i = args
    dim = _norm(dim, x.type.rank)
    i = i + x.shape[dim] if i < 0 else i
    y = _slice_value(cx, x, dim, i, i + 1)
    return cx.reshape(y, [s for j, s in enumerate(x.shape) if j != dim])


@conv(aten.split, aten.split_with_sizes)
def _split(cx, args, kw, n):
    x, sizes = args[0], args[1]
    dim = _norm(args[2] if len(args) > 2 else kw.get("dim", 0), x.type.rank)
    total = x.shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, total - s) for s in range(0, total, sizes)]
    outs, start = [], 0
    for s in sizes:
        outs.append(_slice_value(cx, x, dim, start, start + s))
        start += s
    return tuple(outs)


@conv(aten.chunk)
def _chunk(cx, args, kw, n):
    x, chunks = args[0], args[1]
    dim = _norm(args[2] if len(args) > 2 else 0, x.type.rank)
    size = -(-x.shape[dim] // chunks)
    return _split(cx, [x, size, dim], {}, n)


@conv(aten.unbind)
def _unbind(cx, args, kw, n):
    x = args[0]
    dim = _norm(args[1] if len(args) > 1 else 0, x.type.rank)
    return tuple(_select(cx, [x, dim, i], {}, n) for i in range(x.shape[dim]))


@conv(aten.embedding)
def _embedding(cx, args, kw, n):
    return cx.add(OpKind.TAKE, args[0], args[1], attrs=A.AxisAttrs(0))


@conv(aten.index_select)
def _index_select(cx, args, kw, n):
    x, dim, idx = args
    return cx.add(OpKind.TAKE, x, idx, attrs=A.AxisAttrs(_norm(dim, x.type.rank)))


@conv(aten.gather)
def _gather(cx, args, kw, n):
    x, dim, idx = args[:3]
    return cx.add(OpKind.GATHER, x, idx, attrs=A.AxisAttrs(_norm(dim, x.type.rank)))


@conv(aten.index)
def _index(cx, args, kw, n):
    x, idx = args[0], list(args[1])
    if any(i is None or i.dtype is DType.BOOL for i in idx):
        return None
    return cx.add(OpKind.INDEX, x, *idx)


@conv(aten.pad)
def _pad_any(cx, args, kw, n):
    x, pad = args[0], list(args[1])
    mode = args[2] if len(args) > 2 else kw.get("mode", "constant")
    value = args[3] if len(args) > 3 else kw.get("value")
    if mode == "constant":
        return _pad(cx, [x, pad, 0.0 if value is None else value], {}, n)
    modes = {"reflect": A.PadMode.REFLECT, "replicate": A.PadMode.REPLICATE}
    if mode not in modes:
        return None
    r = x.type.rank
    pads = [0] * (2 * r)
    for i in range(len(pad) // 2):
        ax = r - 1 - i
        pads[2 * ax], pads[2 * ax + 1] = pad[2 * i], pad[2 * i + 1]
    if any(p < 0 for p in pads):
        return None
    return cx.add(OpKind.PAD, x, attrs=A.PadAttrs(tuple(pads), modes[mode], 0.0))


@conv(aten.constant_pad_nd)
def _pad(cx, args, kw, n):
    x, pad = args[0], list(args[1])
    value = float(args[2]) if len(args) > 2 else 0.0
    r = x.type.rank
    pads = [0] * (2 * r)
    for i in range(len(pad) // 2):  # torch pads start from the last axis
        ax = r - 1 - i
        pads[2 * ax], pads[2 * ax + 1] = pad[2 * i], pad[2 * i + 1]
    if any(p < 0 for p in pads):
        return None
    return cx.add(OpKind.PAD, x, attrs=A.PadAttrs(tuple(pads), A.PadMode.CONSTANT, value))


# ----------------------------------------------------------------------------- creation (literals)
def _symbolic_creation(cx, args, kw, n):
    """A created tensor whose size is known only per call: a filled one is its fill value
    expanded to the shape (exact, no memory); ``arange`` is a literal range as long as the
    size can be, sliced to the call's length."""
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    op = n.target.overloadpacket
    shape = tuple(cx.symbols.dim(d) if isinstance(d, torch.SymInt) else int(d) for d in val.shape)
    if op is aten.arange:
        nums = [a for a in args if not isinstance(a, Value)]
        start, end, step = (0, nums[0], 1) if len(nums) == 1 else (nums + [1])[:3]
        if any(isinstance(x, Sym) for x in (start, step)) or not isinstance(step, int) or step < 1:
            return None
        full = cx.literal(torch.arange(start, cx.bound(end), step, dtype=val.dtype))
        return cx.add(OpKind.SLICE, full, attrs=A.SliceAttrs(0, 0, shape[0]))
    fills = {aten.zeros: 0, aten.zeros_like: 0, aten.new_zeros: 0, aten.empty: 0, aten.ones: 1,
             aten.ones_like: 1, aten.new_ones: 1}
    if op in fills:
        fill = fills[op]
    elif op is aten.full:
        fill = args[1] if len(args) > 1 else kw.get("fill_value")
    elif op in (aten.full_like, aten.new_full):
        fill = args[1] if op is aten.full_like else args[2]
    else:
        return None
    if not isinstance(fill, (int, float, bool)):
        return None
    return cx.add(OpKind.EXPAND, cx.literal(torch.tensor(fill, dtype=val.dtype)), attrs=A.ShapeAttrs(shape))


def _creation(cx, args, kw, n):
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape):
        return _symbolic_creation(cx, args, kw, n)
    if any(isinstance(a, Value) for a in list(args) + list(kw.values())):
        # *_like / new_* ops read only the shape of their tensor operand
        if not isinstance(val, torch.Tensor):
            return None
        fill = {aten.zeros_like: 0, aten.new_zeros: 0, aten.ones_like: 1, aten.new_ones: 1}.get(
            n.target.overloadpacket)
        if fill is None:
            if n.target.overloadpacket in (aten.full_like, aten.new_full):
                fill = args[1] if n.target.overloadpacket is aten.full_like else args[2]
            else:
                return None
        return cx.literal(torch.full(tuple(val.shape), fill, dtype=val.dtype))
    kw = {k: v for k, v in kw.items() if k not in ("device", "pin_memory", "layout")}
    return cx.literal(n.target(*args, **kw))


for _t in (aten.arange, aten.zeros, aten.ones, aten.full, aten.scalar_tensor, aten.zeros_like, aten.ones_like,
           aten.full_like, aten.new_ones, aten.new_zeros, aten.new_full, aten.empty):
    conv(_t)(_creation)


# converters added for the model suite and the Core ATen opset live beside this file; they
# register into CONVERTERS (overload-specific entries take precedence over a packet's)
from . import aten_extended, aten_library, aten_movement  # noqa: E402,F401
