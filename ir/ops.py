"""Op kinds and their definitions: attributes, operands, and shape/dtype inference.

Each op kind has exactly one definition here. What it computes, as a torch implementation,
is in ``kiln.ir.reference`` (constant folding evaluates with it; the runtime's reference
kernels are it).
"""
from __future__ import annotations

import enum
import math
from typing import Callable

import torch

from kiln.options import INT4_GROUP_SIZES
from .record import record

from . import attrs as A
from .dtypes import DType, QScheme, QuantSpec
from .types import Dim, Sym, TensorType


class IRTypeError(TypeError):
    """An op was given operands or attributes it cannot accept."""


class Category(enum.Enum):
    ELEMENTWISE = "elementwise"
    REDUCTION = "reduction"
    NORMALIZATION = "normalization"
    COMPUTE = "compute"  # GEMM / conv: the expensive ops epilogues attach to
    MOVEMENT = "movement"  # reshape, permute, slice, gather ...
    ATTENTION = "attention"
    RECURRENT = "recurrent"
    FALLBACK = "fallback"


class OpKind(enum.Enum):
    # unary elementwise
    NEG = "neg"; ABS = "abs"; EXP = "exp"; LOG = "log"; SQRT = "sqrt"; RSQRT = "rsqrt"  # noqa: E702
    RECIPROCAL = "reciprocal"; RELU = "relu"; SIGMOID = "sigmoid"; TANH = "tanh"; ERF = "erf"  # noqa: E702
    SILU = "silu"; GELU = "gelu"; LEAKY_RELU = "leaky_relu"; CLAMP = "clamp"; NOT = "not"  # noqa: E702
    SIN = "sin"; COS = "cos"; FLOOR = "floor"; CEIL = "ceil"; SIGN = "sign"; CAST = "cast"  # noqa: E702
    IDENTITY = "identity"; ISNAN = "isnan"; TO_LAYOUT = "to_layout"  # noqa: E702
    ACOS = "acos"; ASIN = "asin"; ATAN = "atan"; ACOSH = "acosh"; ASINH = "asinh"; ATANH = "atanh"  # noqa: E702
    ROUND = "round"  # half to even, as torch.round and ONNX Round
    # binary elementwise (numpy broadcasting, torch type promotion)
    ADD = "add"; SUB = "sub"; MUL = "mul"; DIV = "div"; POW = "pow"  # noqa: E702
    MAXIMUM = "maximum"; MINIMUM = "minimum"; ATAN2 = "atan2"  # noqa: E702
    EQ = "eq"; NE = "ne"; LT = "lt"; LE = "le"; GT = "gt"; GE = "ge"; AND = "and"; OR = "or"  # noqa: E702
    WHERE = "where"
    # reductions and normalizations
    SUM = "sum"; MEAN = "mean"; MAX = "max"; MIN = "min"; ARGMAX = "argmax"  # noqa: E702
    SOFTMAX = "softmax"; LOG_SOFTMAX = "log_softmax"; LAYER_NORM = "layer_norm"; BATCH_NORM = "batch_norm"  # noqa: E702
    # scans, and reductions without a generated kernel
    CUMSUM = "cumsum"; PROD = "prod"  # noqa: E702
    # compute
    MATMUL = "matmul"; LINEAR = "linear"; CONV2D = "conv2d"  # noqa: E702
    MAX_POOL2D = "max_pool2d"; AVG_POOL2D = "avg_pool2d"; ADAPTIVE_AVG_POOL2D = "adaptive_avg_pool2d"  # noqa: E702
    # data movement
    RESHAPE = "reshape"; PERMUTE = "permute"; EXPAND = "expand"; CONCAT = "concat"; SLICE = "slice"  # noqa: E702
    TAKE = "take"; GATHER = "gather"; INDEX = "index"; PAD = "pad"  # noqa: E702
    # structured
    ATTENTION = "attention"; LSTM = "lstm"; GRU = "gru"  # noqa: E702
    FALLBACK = "fallback"
    # library ops (ir/ops_library.py): a torch kernel each, no generated code
    SORT = "sort"; TOPK = "topk"; SCATTER = "scatter"; INDEX_PUT = "index_put"  # noqa: E702
    MAX_POOL3D = "max_pool3d"; AVG_POOL3D = "avg_pool3d"; ADAPTIVE_AVG_POOL3D = "adaptive_avg_pool3d"  # noqa: E702
    CDIST = "cdist"; PDIST = "pdist"; EMBEDDING_BAG = "embedding_bag"; GRID_SAMPLE = "grid_sample"  # noqa: E702
    COL2IM = "col2im"; GROUP_NORM = "group_norm"  # noqa: E702
    # sparse weights (compressed constant operands; see attrs.SparseLinearAttrs)
    SPARSE_LINEAR = "sparse_linear"; SPARSE_CONV2D = "sparse_conv2d"  # noqa: E702
    # quantized (passes/quantize*.py)
    QUANTIZE = "quantize"; DEQUANTIZE = "dequantize"; QLINEAR_DYNAMIC = "qlinear_dynamic"  # noqa: E702
    LINEAR_WEIGHT_ONLY = "linear_weight_only"; QLINEAR = "qlinear"; QCONV2D = "qconv2d"  # noqa: E702

    def __repr__(self) -> str:
        return self.value


@record(slots=False)
class OpDef:
    """One op kind's definition: attributes type, operand arity, shape inference, category."""
    kind: OpKind
    attrs: type
    operands: tuple[str, ...]  # "x" required, "b?" optional, "xs*" variadic (last only)
    infer: Callable[[list, object], tuple[TensorType, ...]]
    category: Category

    @property
    def min_inputs(self) -> int:
        return sum(1 for o in self.operands if not o.endswith(("?", "*")))

    @property
    def max_inputs(self) -> float:
        return math.inf if self.operands and self.operands[-1].endswith("*") else len(self.operands)


OPS: dict[OpKind, OpDef] = {}


def op(kinds, attrs=A.NoAttrs, operands=("x",), category=Category.ELEMENTWISE):
    """Register the definition (attributes, operands, type inference) of one or more op kinds."""
    kinds = kinds if isinstance(kinds, (list, tuple)) else [kinds]

    def deco(fn):
        for k in kinds:
            if k in OPS:
                raise RuntimeError(f"op {k} defined twice")
            OPS[k] = OpDef(k, attrs, tuple(operands), fn, category)
        return fn

    return deco


def opdef(kind: OpKind) -> OpDef:
    return OPS[kind]


def infer_types(kind: OpKind, inputs: list[TensorType | None], attrs) -> tuple[TensorType, ...]:
    d = OPS[kind]
    if not isinstance(attrs, d.attrs):
        raise IRTypeError(f"{kind.value}: attrs must be {d.attrs.__name__}, got {type(attrs).__name__}")
    n = len(inputs)
    if n < d.min_inputs or n > d.max_inputs:
        raise IRTypeError(f"{kind.value}: expected {d.min_inputs}..{d.max_inputs} operands, got {n}")
    for i, (name, t) in enumerate(zip(d.operands, inputs)):
        if t is None and not name.endswith(("?",)):
            raise IRTypeError(f"{kind.value}: operand {name} is required")
    return tuple(d.infer(inputs, attrs))


# ----------------------------------------------------------------------------- helpers
def _err(kind: str, msg: str):
    raise IRTypeError(f"{kind}: {msg}")


def broadcast_shapes(*shapes) -> tuple[Dim, ...]:
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        d: Dim = 1
        for x in dims:
            if x == 1:
                continue
            if d == 1:
                d = x
            elif d != x:
                if isinstance(d, Sym) or isinstance(x, Sym):
                    d = x if isinstance(d, Sym) else d  # prefer the concrete size
                else:
                    raise IRTypeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
        out.append(d)
    return tuple(out)


def promote_types(*types: TensorType) -> DType:
    """The result dtype torch gives for an elementwise op over ``types``."""
    ts = [torch.empty(() if t.rank == 0 else (1,), dtype=t.dtype.to_torch()) for t in types]
    r = ts[0]
    for t in ts[1:]:
        dt = torch.result_type(r, t)
        # keep "0-d-ness" only if both were 0-d, as torch does when folding pairwise
        r = torch.empty(() if (r.dim() == 0 and t.dim() == 0) else (1,), dtype=dt)
    return DType.from_torch(r.dtype)


def norm_axis(axis: int, rank: int, kind: str = "op") -> int:
    if not -max(rank, 1) <= axis < max(rank, 1):
        _err(kind, f"axis {axis} out of range for rank {rank}")
    return axis % max(rank, 1)


def _t(x: TensorType, dtype=None, shape=None) -> TensorType:
    return TensorType(dtype or x.dtype, tuple(x.shape if shape is None else shape))


# ----------------------------------------------------------------------------- elementwise
_FLOAT_UNARY = [OpKind.EXP, OpKind.LOG, OpKind.SQRT, OpKind.RSQRT, OpKind.RECIPROCAL, OpKind.SIGMOID,
                OpKind.TANH, OpKind.ERF, OpKind.SILU, OpKind.SIN, OpKind.COS, OpKind.ACOS, OpKind.ASIN,
                OpKind.ATAN, OpKind.ACOSH, OpKind.ASINH, OpKind.ATANH]


@op(_FLOAT_UNARY)
def _float_unary(ins, a):
    x = ins[0]
    # integer inputs promote to the default float type, as torch does
    return (_t(x, dtype=x.dtype if x.dtype.is_float else DType.FLOAT32),)


@op([OpKind.NEG, OpKind.ABS, OpKind.RELU, OpKind.FLOOR, OpKind.CEIL, OpKind.SIGN, OpKind.IDENTITY, OpKind.ROUND])
def _same_unary(ins, a):
    return (_t(ins[0]),)


@op([OpKind.NOT, OpKind.ISNAN])
def _not(ins, a):
    return (_t(ins[0], dtype=DType.BOOL),)


@op(OpKind.TO_LAYOUT, A.LayoutAttrs, category=Category.MOVEMENT)
def _to_layout(ins, a):
    x = ins[0]
    return (TensorType(x.dtype, x.shape, a.layout, x.quant),)


@op(OpKind.GELU, A.GeluAttrs)
def _gelu(ins, a):
    return (_t(ins[0]),)


@op(OpKind.LEAKY_RELU, A.LeakyReluAttrs)
def _leaky(ins, a):
    return (_t(ins[0]),)


@op(OpKind.CLAMP, A.ClampAttrs)
def _clamp(ins, a):
    return (_t(ins[0]),)


@op(OpKind.CAST, A.CastAttrs)
def _cast(ins, a):
    return (_t(ins[0], dtype=a.dtype),)


@op([OpKind.ADD, OpKind.SUB, OpKind.MUL, OpKind.MAXIMUM, OpKind.MINIMUM, OpKind.POW], operands=("a", "b"))
def _binary(ins, a):
    return (TensorType(promote_types(*ins), broadcast_shapes(ins[0].shape, ins[1].shape)),)


@op(OpKind.DIV, A.DivAttrs, operands=("a", "b"))
def _div(ins, a):
    dt = promote_types(*ins)
    if a.rounding is A.Rounding.NONE and not dt.is_float:
        dt = DType.FLOAT32  # true division of integers is a float, as in torch
    return (TensorType(dt, broadcast_shapes(ins[0].shape, ins[1].shape)),)


@op(OpKind.ATAN2, operands=("a", "b"))
def _atan2(ins, a):
    dt = promote_types(*ins)
    # integer operands give the default float type, as in torch
    return (TensorType(dt if dt.is_float else DType.FLOAT32, broadcast_shapes(ins[0].shape, ins[1].shape)),)


@op([OpKind.EQ, OpKind.NE, OpKind.LT, OpKind.LE, OpKind.GT, OpKind.GE, OpKind.AND, OpKind.OR], operands=("a", "b"))
def _compare(ins, a):
    return (TensorType(DType.BOOL, broadcast_shapes(ins[0].shape, ins[1].shape)),)


@op(OpKind.WHERE, operands=("cond", "a", "b"))
def _where(ins, a):
    if ins[0].dtype is not DType.BOOL:
        _err("where", f"condition must be bool, got {ins[0].dtype.value}")
    return (TensorType(promote_types(ins[1], ins[2]), broadcast_shapes(*(t.shape for t in ins))),)


# ----------------------------------------------------------------------------- reductions
def _reduced_shape(shape, axes, keepdim):
    return tuple((1 if i in axes else d) for i, d in enumerate(shape) if keepdim or i not in axes)


@op([OpKind.SUM, OpKind.MEAN, OpKind.MAX, OpKind.MIN], A.ReduceAttrs, category=Category.REDUCTION)
def _reduce(ins, a):
    x = ins[0]
    if any(not 0 <= ax < max(x.rank, 1) for ax in a.axes) or list(a.axes) != sorted(set(a.axes)):
        _err("reduce", f"axes {a.axes} must be sorted, unique and within rank {x.rank}")
    return (_t(x, shape=_reduced_shape(x.shape, a.axes, a.keepdim)),)


@op(OpKind.PROD, A.ReduceAttrs, category=Category.REDUCTION)
def _prod(ins, a):
    return _reduce(ins, a)  # the same shape rule; the dtype is the operand's (integers arrive as int64)


@op(OpKind.ARGMAX, A.ArgReduceAttrs, category=Category.REDUCTION)
def _argmax(ins, a):
    x = ins[0]
    norm_axis(a.axis, x.rank, "argmax")
    return (TensorType(DType.INT64, _reduced_shape(x.shape, (a.axis,), a.keepdim)),)


@op(OpKind.CUMSUM, A.AxisAttrs, category=Category.REDUCTION)
def _cumsum(ins, a):
    x = ins[0]
    if not 0 <= a.axis < max(x.rank, 1):
        _err("cumsum", f"axis {a.axis} out of range for rank {x.rank}")
    # torch accumulates integers and booleans in int64
    return (_t(x, dtype=x.dtype if x.dtype.is_float else DType.INT64),)


@op([OpKind.SOFTMAX, OpKind.LOG_SOFTMAX], A.AxisAttrs, category=Category.NORMALIZATION)
def _softmax(ins, a):
    x = ins[0]
    if not x.dtype.is_float:
        _err("softmax", "input must be floating point")
    norm_axis(a.axis, x.rank, "softmax")
    return (_t(x),)


@op(OpKind.LAYER_NORM, A.LayerNormAttrs, operands=("x", "weight?", "bias?"), category=Category.NORMALIZATION)
def _layer_norm(ins, a):
    x = ins[0]
    norm = x.shape[x.rank - a.normalized_ndim:]
    if not 1 <= a.normalized_ndim <= x.rank:
        _err("layer_norm", f"normalized_ndim {a.normalized_ndim} vs rank {x.rank}")
    for p in ins[1:]:
        if p is not None and tuple(p.shape) != tuple(norm):
            _err("layer_norm", f"affine parameter shape {p.shape} != normalized shape {norm}")
    return (_t(x),)


@op(OpKind.BATCH_NORM, A.BatchNormAttrs, operands=("x", "mean", "var", "weight?", "bias?"),
    category=Category.NORMALIZATION)
def _batch_norm(ins, a):
    x = ins[0]
    if x.rank < 2:
        _err("batch_norm", "input needs a channel axis")
    for p in ins[1:]:
        if p is not None and tuple(p.shape) != (x.shape[1],):
            _err("batch_norm", f"parameter shape {p.shape} != ({x.shape[1]},)")
    return (_t(x),)


# ----------------------------------------------------------------------------- compute
@op(OpKind.MATMUL, operands=("a", "b"), category=Category.COMPUTE)
def _matmul(ins, a):
    x, y = ins
    if x.rank == 0 or y.rank == 0:
        _err("matmul", "operands must be at least 1-D")
    xs = (1,) + x.shape if x.rank == 1 else x.shape
    ys = y.shape + (1,) if y.rank == 1 else y.shape
    if xs[-1] != ys[-2] and not (isinstance(xs[-1], Sym) or isinstance(ys[-2], Sym)):
        _err("matmul", f"contraction mismatch {x.shape} @ {y.shape}")
    batch = broadcast_shapes(xs[:-2], ys[:-2])
    out = batch + ((xs[-2],) if x.rank > 1 else ()) + ((ys[-1],) if y.rank > 1 else ())
    return (TensorType(promote_types(x, y), out),)


def _check_residual(kind, r, out: TensorType):
    if r is not None and (tuple(r.shape) != tuple(out.shape) or r.dtype != out.dtype):
        _err(kind, f"residual {r!r} must match the output {out!r}")
    return (out,)


@op(OpKind.LINEAR, A.LinearAttrs, operands=("x", "weight", "bias?", "residual?"), category=Category.COMPUTE)
def _linear(ins, a):
    x, w, b, r = (list(ins) + [None, None])[:4]
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        _err("linear", f"x {x.shape} and weight {w.shape} (out, in) do not match")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        _err("linear", f"bias shape {b.shape} != ({w.shape[0]},)")
    return _check_residual("linear", r, TensorType(promote_types(x, w), x.shape[:-1] + (w.shape[0],)))


def conv_out(size, k, s, p, d, ceil=False):
    eff = d * (k - 1) + 1
    if not isinstance(size, int):  # the same formula on a symbolic size
        num = size + 2 * p - eff
        if ceil:
            raise IRTypeError("a ceil-mode pooling window over a symbolic size is not supported")
        return num // s + 1
    num = size + 2 * p - eff
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + p:  # last window must start inside the input
        out -= 1
    return out


@op(OpKind.CONV2D, A.Conv2dAttrs, operands=("x", "weight", "bias?", "residual?"), category=Category.COMPUTE)
def _conv2d(ins, a):
    x, w, b, r = (list(ins) + [None, None])[:4]
    if x.rank != 4 or w.rank != 4:
        _err("conv2d", f"expected 4-D input and weight, got {x.shape} and {w.shape}")
    n, c, h, wd = x.shape
    co, ci, kh, kw = w.shape
    if isinstance(c, int) and c != ci * a.groups:
        _err("conv2d", f"input channels {c} != weight in-channels {ci} x groups {a.groups}")
    if co % a.groups:
        _err("conv2d", f"out channels {co} not divisible by groups {a.groups}")
    if b is not None and tuple(b.shape) != (co,):
        _err("conv2d", f"bias shape {b.shape} != ({co},)")
    oh = conv_out(h, kh, a.stride[0], a.padding[0], a.dilation[0])
    ow = conv_out(wd, kw, a.stride[1], a.padding[1], a.dilation[1])
    if (isinstance(oh, int) and oh <= 0) or (isinstance(ow, int) and ow <= 0):
        _err("conv2d", f"input {x.shape} too small for kernel {(kh, kw)}")
    return _check_residual("conv2d", r, TensorType(promote_types(x, w), (n, co, oh, ow)))


@op([OpKind.MAX_POOL2D, OpKind.AVG_POOL2D], A.Pool2dAttrs, category=Category.COMPUTE)
def _pool(ins, a):
    x = ins[0]
    if x.rank != 4:
        _err("pool2d", f"expected a 4-D input, got {x.shape}")
    n, c, h, w = x.shape
    oh = conv_out(h, a.kernel[0], a.stride[0], a.padding[0], a.dilation[0], a.ceil_mode)
    ow = conv_out(w, a.kernel[1], a.stride[1], a.padding[1], a.dilation[1], a.ceil_mode)
    out = _t(x, shape=(n, c, oh, ow))
    # the max of quantized values is a quantized value with the same parameters
    return (TensorType(out.dtype, out.shape, out.layout, x.quant) if x.quant is not None else out,)


@op(OpKind.ADAPTIVE_AVG_POOL2D, A.AdaptivePoolAttrs, category=Category.COMPUTE)
def _adaptive(ins, a):
    x = ins[0]
    if x.rank != 4:
        _err("adaptive_avg_pool2d", f"expected a 4-D input, got {x.shape}")
    return (_t(x, shape=x.shape[:2] + tuple(a.output_size)),)


# ----------------------------------------------------------------------------- data movement
def _numel(shape):
    n = 1
    for d in shape:
        if not isinstance(d, int):
            return None
        n *= d
    return n


@op(OpKind.RESHAPE, A.ShapeAttrs, category=Category.MOVEMENT)
def _reshape(ins, a):
    x = ins[0]
    n = _numel(x.shape)
    if any(isinstance(d, int) and d < 0 for d in a.shape):
        _err("reshape", f"target shape {a.shape} must be resolved (no -1)")
    if n is not None and n != _numel(a.shape):
        _err("reshape", f"cannot reshape {x.shape} to {a.shape}")
    return (_t(x, shape=a.shape),)


@op(OpKind.PERMUTE, A.PermuteAttrs, category=Category.MOVEMENT)
def _permute(ins, a):
    x = ins[0]
    if sorted(a.perm) != list(range(x.rank)):
        _err("permute", f"perm {a.perm} is not a permutation of rank {x.rank}")
    return (_t(x, shape=tuple(x.shape[p] for p in a.perm)),)


@op(OpKind.EXPAND, A.ShapeAttrs, category=Category.MOVEMENT)
def _expand(ins, a):
    x = ins[0]
    if len(a.shape) < x.rank:
        _err("expand", f"cannot expand {x.shape} to fewer dims {a.shape}")
    if broadcast_shapes(x.shape, a.shape) != tuple(a.shape):
        _err("expand", f"cannot expand {x.shape} to {a.shape}")
    return (_t(x, shape=a.shape),)


@op(OpKind.CONCAT, A.AxisAttrs, operands=("xs*",), category=Category.MOVEMENT)
def _concat(ins, a):
    if not ins:
        _err("concat", "needs at least one input")
    r = ins[0].rank
    ax = a.axis
    if not 0 <= ax < r:
        _err("concat", f"axis {ax} out of range for rank {r}")
    total: Dim = 0
    for t in ins:
        if t.rank != r or any(t.shape[i] != ins[0].shape[i] for i in range(r) if i != ax):
            _err("concat", f"shapes {[t.shape for t in ins]} do not match off axis {ax}")
        total = total + t.shape[ax]
    shape = list(ins[0].shape)
    shape[ax] = total
    return (TensorType(promote_types(*ins), tuple(shape)),)


@op(OpKind.SLICE, A.SliceAttrs, category=Category.MOVEMENT)
def _slice(ins, a):
    x = ins[0]
    if not 0 <= a.axis < x.rank:
        _err("slice", f"axis {a.axis} out of range for rank {x.rank}")
    size = x.shape[a.axis]
    known = all(isinstance(v, int) for v in (a.start, a.end, size))  # symbolic bounds: checked at run time
    if a.step < 1 or (isinstance(a.start, int) and a.start < 0) or \
            (known and (a.end < a.start or a.end > size)):
        _err("slice", f"bad range {a.start}:{a.end}:{a.step} for size {size}")
    shape = list(x.shape)
    shape[a.axis] = -(-(a.end - a.start) // a.step)
    return (_t(x, shape=shape),)


@op(OpKind.TAKE, A.AxisAttrs, operands=("data", "indices"), category=Category.MOVEMENT)
def _take(ins, a):
    x, idx = ins
    if idx.dtype not in (DType.INT64, DType.INT32):
        _err("take", f"indices must be int32/int64, got {idx.dtype.value}")
    if not 0 <= a.axis < x.rank:
        _err("take", f"axis {a.axis} out of range for rank {x.rank}")
    return (_t(x, shape=x.shape[:a.axis] + idx.shape + x.shape[a.axis + 1:]),)


@op(OpKind.GATHER, A.AxisAttrs, operands=("data", "indices"), category=Category.MOVEMENT)
def _gather(ins, a):
    x, idx = ins
    if idx.dtype not in (DType.INT64, DType.INT32) or idx.rank != x.rank:
        _err("gather", f"indices must be int and of rank {x.rank}, got {idx}")
    return (_t(x, shape=idx.shape),)


@op(OpKind.INDEX, operands=("data", "indices*"), category=Category.MOVEMENT)
def _index(ins, a):
    x, idx = ins[0], ins[1:]
    if not idx or len(idx) > x.rank:
        _err("index", f"{len(idx)} index tensors for rank {x.rank}")
    for t in idx:
        if t.dtype not in (DType.INT64, DType.INT32):
            _err("index", f"index tensors must be int32/int64, got {t.dtype.value}")
    return (_t(x, shape=broadcast_shapes(*(t.shape for t in idx)) + x.shape[len(idx):]),)


@op(OpKind.PAD, A.PadAttrs, category=Category.MOVEMENT)
def _pad(ins, a):
    x = ins[0]
    if len(a.pads) != 2 * x.rank:
        _err("pad", f"need {2 * x.rank} pad amounts, got {len(a.pads)}")
    shape = []
    for i, d in enumerate(x.shape):
        shape.append(d + a.pads[2 * i] + a.pads[2 * i + 1])
    if any(isinstance(d, int) and d < 0 for d in shape):
        _err("pad", f"negative size after padding {x.shape} by {a.pads}")
    return (_t(x, shape=shape),)


# ----------------------------------------------------------------------------- structured
@op(OpKind.ATTENTION, A.AttentionAttrs, operands=("q", "k", "v", "mask?"), category=Category.ATTENTION)
def _attention(ins, a):
    q, k, v = ins[:3]
    mask = ins[3] if len(ins) > 3 else None
    if q.rank < 2 or k.rank != q.rank or v.rank != q.rank:
        _err("attention", f"q/k/v ranks differ: {q.shape} {k.shape} {v.shape}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        _err("attention", f"q {q.shape}, k {k.shape}, v {v.shape} do not line up")
    out = broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (q.shape[-2], v.shape[-1])
    if mask is not None:
        if mask.dtype is not DType.BOOL and mask.dtype != q.dtype:
            _err("attention", f"mask must be bool or {q.dtype.value}, got {mask.dtype.value}")
        broadcast_shapes(mask.shape, out[:-1] + (k.shape[-2],))
    return (TensorType(q.dtype, out),)


def _rnn_infer(ins, a, gates, with_c):
    x = ins[0]
    nd = 2 if a.bidirectional else 1
    if x.rank != 3:
        _err("rnn", f"input must be 3-D, got {x.shape}")
    b, t = (x.shape[0], x.shape[1]) if a.batch_first else (x.shape[1], x.shape[0])
    nstate = 2 if with_c else 1
    feat = x.shape[2]
    if a.proj_hoisted:
        if a.num_layers != 1 or a.bidirectional:
            _err("rnn", "a hoisted recurrence is one unidirectional layer")
        if len(ins) not in (nstate + 2, nstate + 3):
            _err("rnn", f"hoisted form takes (xp, states, w_hh, [b_hh]); got {len(ins)} operands")
        if feat != gates * a.hidden_size:
            _err("rnn", f"hoisted input width {feat} != {gates * a.hidden_size}")
        if tuple(ins[1 + nstate].shape) != (gates * a.hidden_size, a.hidden_size):
            _err("rnn", f"w_hh shape {ins[1 + nstate].shape} != {(gates * a.hidden_size, a.hidden_size)}")
    else:
        per = 4 if a.has_biases else 2
        want = 1 + nstate + per * a.num_layers * nd
        if len(ins) != want:
            _err("rnn", f"expected {want} operands, got {len(ins)}")
        w_ih0 = ins[1 + nstate]
        if tuple(w_ih0.shape) != (gates * a.hidden_size, feat):
            _err("rnn", f"layer-0 w_ih shape {w_ih0.shape} != {(gates * a.hidden_size, feat)}")
    state = TensorType(x.dtype, (a.num_layers * nd, b, a.hidden_size))
    for s in ins[1:1 + nstate]:
        if tuple(s.shape) != state.shape:
            _err("rnn", f"state shape {s.shape} != {state.shape}")
    y = (b, t, nd * a.hidden_size) if a.batch_first else (t, b, nd * a.hidden_size)
    return (TensorType(x.dtype, y), state) + ((state,) if with_c else ())


@op(OpKind.LSTM, A.RNNAttrs, operands=("x", "h0", "c0", "weights*"), category=Category.RECURRENT)
def _lstm(ins, a):
    return _rnn_infer(ins, a, 4, True)


@op(OpKind.GRU, A.RNNAttrs, operands=("x", "h0", "weights*"), category=Category.RECURRENT)
def _gru(ins, a):
    return _rnn_infer(ins, a, 3, False)


@op(OpKind.FALLBACK, A.FallbackAttrs, operands=("xs*",), category=Category.FALLBACK)
def _fallback(ins, a):
    return a.out_types


# ----------------------------------------------------------------------------- sparse weights
def _check_sparse_weight(kind: str, ins, layout, n: int, k: int):
    """values/indices/indptr must match the layout and the dense (n, k) weight they encode."""
    from .types import LayoutKind

    values, indices, indptr = ins[1], ins[2], ins[3]
    if values.layout != layout:
        _err(kind, f"values layout {values.layout!r} != {layout!r}")
    if layout.kind is LayoutKind.SPARSE_24:
        if k % 4 or tuple(values.shape) != (n, k // 2) or tuple(indices.shape) != (n, k // 2):
            _err(kind, f"2:4 values/indices must be ({n}, {k // 2}) with in-features % 4 == 0")
        if indices.dtype is not DType.INT8 or indptr is not None:
            _err(kind, "2:4 indices are int8 positions within each group of four, and there is no indptr")
        return
    if layout.kind not in (LayoutKind.SPARSE_CSR, LayoutKind.SPARSE_BSR):
        _err(kind, f"unsupported sparse layout {layout!r}")
    bh, bw = layout.block if layout.kind is LayoutKind.SPARSE_BSR else (1, 1)
    if indptr is None or indices.dtype is not DType.INT32 or indptr.dtype is not DType.INT32:
        _err(kind, "CSR/BSR need int32 indices and indptr")
    nnzb = indices.shape[0]
    if tuple(indptr.shape) != (-(-n // bh) + 1,) or indices.rank != 1:
        _err(kind, f"indptr must have {-(-n // bh) + 1} entries and indices be 1-D")
    want = (nnzb, bh, bw) if layout.kind is LayoutKind.SPARSE_BSR else (nnzb,)
    if tuple(values.shape) != want:
        _err(kind, f"values shape {values.shape} != {want}")


@op(OpKind.SPARSE_LINEAR, A.SparseLinearAttrs, operands=("x", "values", "indices", "indptr?", "bias?", "residual?"),
    category=Category.COMPUTE)
def _sparse_linear(ins, a):
    x, b, r = ins[0], (list(ins) + [None] * 6)[4], (list(ins) + [None] * 6)[5]
    n, k = a.shape
    if x.rank < 1 or x.shape[-1] != k:
        _err("sparse_linear", f"x {x.shape} does not match weight {a.shape} (out, in)")
    _check_sparse_weight("sparse_linear", (list(ins) + [None] * 4)[:4], a.layout, n, k)
    if b is not None and tuple(b.shape) != (n,):
        _err("sparse_linear", f"bias shape {b.shape} != ({n},)")
    return _check_residual("sparse_linear", r, TensorType(promote_types(x, ins[1]), x.shape[:-1] + (n,)))


@op(OpKind.SPARSE_CONV2D, A.SparseConv2dAttrs, operands=("x", "values", "indices", "indptr?", "bias?", "residual?"),
    category=Category.COMPUTE)
def _sparse_conv2d(ins, a):
    x, b, r = ins[0], (list(ins) + [None] * 6)[4], (list(ins) + [None] * 6)[5]
    co, ci, kh, kw = a.shape
    if x.rank != 4 or (isinstance(x.shape[1], int) and x.shape[1] != ci):
        _err("sparse_conv2d", f"input {x.shape} does not match weight {a.shape}")
    _check_sparse_weight("sparse_conv2d", (list(ins) + [None] * 4)[:4], a.layout, co, ci * kh * kw)
    if b is not None and tuple(b.shape) != (co,):
        _err("sparse_conv2d", f"bias shape {b.shape} != ({co},)")
    oh = conv_out(x.shape[2], kh, a.stride[0], a.padding[0], a.dilation[0])
    ow = conv_out(x.shape[3], kw, a.stride[1], a.padding[1], a.dilation[1])
    if (isinstance(oh, int) and oh <= 0) or (isinstance(ow, int) and ow <= 0):
        _err("sparse_conv2d", f"input {x.shape} too small for kernel {(kh, kw)}")
    out = TensorType(promote_types(x, ins[1]), (x.shape[0], co, oh, ow))
    return _check_residual("sparse_conv2d", r, out)


# ----------------------------------------------------------------------------- quantized
def _u8(shape, scale: float, zero_point: int) -> TensorType:
    return TensorType(DType.UINT8, tuple(shape), quant=QuantSpec(QScheme.PER_TENSOR, scale, zero_point))


def _check_int8_weight(kind, w, s, b):
    if w.dtype is not DType.INT8 or s.dtype is not DType.FLOAT32 or tuple(s.shape) != (w.shape[0],):
        _err(kind, f"weight must be int8 with one float32 scale per output channel, got {w!r}, {s!r}")
    if b is not None and (tuple(b.shape) != (w.shape[0],) or b.dtype is not DType.FLOAT32):
        _err(kind, f"bias {b!r} must be float32 ({w.shape[0]},)")


def _qout(kind, shape, a, r, r_scale=None):
    out = TensorType(DType.FLOAT32, tuple(shape)) if a.out_scale is None else _u8(shape, a.out_scale,
                                                                                   a.out_zero_point)
    if r is not None:
        if tuple(r.shape) != tuple(out.shape) or r.dtype is not out.dtype:
            _err(kind, f"residual {r!r} must match the output {out!r}")
        if out.dtype is DType.UINT8 and r_scale is None:
            _err(kind, "a uint8 residual needs residual_scale")
    return (out,)


@op(OpKind.QUANTIZE, A.QuantizeAttrs)
def _quantize(ins, a):
    x = ins[0]
    if x.dtype is not DType.FLOAT32 or not a.scale > 0 or not 0 <= a.zero_point <= 255:
        _err("quantize", f"needs float32 input, scale > 0 and zero point in [0, 255]; got {x!r}, {a}")
    return (TensorType(DType.UINT8, x.shape, x.layout, QuantSpec(QScheme.PER_TENSOR, a.scale, a.zero_point)),)


@op(OpKind.DEQUANTIZE, A.QuantizeAttrs)
def _dequantize(ins, a):
    x = ins[0]
    if x.dtype is not DType.UINT8:
        _err("dequantize", f"needs a uint8 input, got {x!r}")
    return (TensorType(DType.FLOAT32, x.shape, x.layout),)


@op(OpKind.QLINEAR_DYNAMIC, A.QLinearDynamicAttrs, operands=("x", "weight", "w_scale", "bias?", "residual?"),
    category=Category.COMPUTE)
def _qlinear_dynamic(ins, a):
    x, w, s, b, r = (list(ins) + [None, None])[:5]
    if x.dtype is not DType.FLOAT32 or w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        _err("qlinear_dynamic", f"x {x!r} and weight {w!r} (out, in) do not match")
    _check_int8_weight("qlinear_dynamic", w, s, b)
    return _check_residual("qlinear_dynamic", r, TensorType(DType.FLOAT32, x.shape[:-1] + (w.shape[0],)))


@op(OpKind.LINEAR_WEIGHT_ONLY, A.WeightOnlyAttrs, operands=("x", "weight", "scales", "bias?", "residual?"),
    category=Category.COMPUTE)
def _linear_weight_only(ins, a):
    x, w, s, b, r = (list(ins) + [None, None])[:5]
    if x.dtype is not DType.FLOAT32 or w.rank != 2 or x.rank < 1:
        _err("linear_weight_only", f"bad operands {x!r}, {w!r}")
    n = w.shape[0]
    if a.bits == 8:
        if x.shape[-1] != w.shape[1]:
            _err("linear_weight_only", f"x {x.shape} and weight {w.shape} do not match")
        _check_int8_weight("linear_weight_only", w, s, b)
    elif a.bits == 4:
        k = x.shape[-1]
        if a.group_size not in INT4_GROUP_SIZES or not isinstance(k, int) or k % a.group_size:
            _err("linear_weight_only", f"int4 needs group size 32/64/128 dividing K={k}, got {a.group_size}")
        if w.dtype is not DType.UINT8 or w.shape[1] * 2 != k or tuple(s.shape) != (n, k // a.group_size):
            _err("linear_weight_only", f"int4 weight must be uint8 [{n}, {k // 2}] with scales "
                                       f"[{n}, {k // a.group_size}], got {w!r}, {s!r}")
        if b is not None and tuple(b.shape) != (n,):
            _err("linear_weight_only", f"bias shape {b.shape} != ({n},)")
    else:
        _err("linear_weight_only", f"bits must be 8 or 4, got {a.bits}")
    return _check_residual("linear_weight_only", r, TensorType(DType.FLOAT32, x.shape[:-1] + (n,)))


@op(OpKind.QLINEAR, A.QLinearAttrs, operands=("x", "weight", "w_scale", "bias?"), category=Category.COMPUTE)
def _qlinear(ins, a):
    x, w, s, b = (list(ins) + [None])[:4]
    if x.dtype is not DType.UINT8 or w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        _err("qlinear", f"x {x!r} must be uint8 and match weight {w!r}")
    _check_int8_weight("qlinear", w, s, b)
    return _qout("qlinear", x.shape[:-1] + (w.shape[0],), a, None)


@op(OpKind.QCONV2D, A.QConv2dAttrs, operands=("x", "weight", "w_scale", "bias?", "residual?"),
    category=Category.COMPUTE)
def _qconv2d(ins, a):
    x, w, s, b, r = (list(ins) + [None, None])[:5]
    if x.dtype is not DType.UINT8 or x.rank != 4 or w.rank != 4:
        _err("qconv2d", f"expected a 4-D uint8 input and 4-D weight, got {x!r}, {w!r}")
    _check_int8_weight("qconv2d", w, s, b)
    n, c, h, wd = x.shape
    co, ci, kh, kw = w.shape
    if isinstance(c, int) and c != ci * a.groups:
        _err("qconv2d", f"input channels {c} != weight in-channels {ci} x groups {a.groups}")
    oh = conv_out(h, kh, a.stride[0], a.padding[0], a.dilation[0])
    ow = conv_out(wd, kw, a.stride[1], a.padding[1], a.dilation[1])
    return _qout("qconv2d", (n, co, oh, ow), a, r, a.residual_scale)


from . import ops_library  # noqa: E402,F401  (defines the library ops)

_missing = [k for k in OpKind if k not in OPS]
if _missing:  # every op kind has exactly one definition
    raise RuntimeError(f"op kinds without a definition: {_missing}")
