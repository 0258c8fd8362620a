"""ONNX frontend: opsets 13 to 21 of the default domain into Kiln IR (newer opsets too,
for ops whose definition has not changed since 21 other than in element types).

Nodes whose inputs are all literals (``Constant``, ``Shape`` arithmetic, integer
initializers) are evaluated at import with ONNX's own reference evaluator, so shape
plumbing never reaches the graph. Float initializers become weights.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from kiln.errors import KilnError
from kiln.ir import DType, Graph, OpKind, Value
from kiln.ir import attrs as A
from kiln.ir.types import Sym

from .common import FrontendBuilder, resolve_shape
from .onnx_shapes import SymValue, product, shape_value
from . import onnx_shapes

MIN_OPSET, VALIDATED_OPSET = 13, 21
MAX_OPSET = onnx.defs.onnx_opset_version()
# Schema versions newer than opset 21 that were reviewed: each only adds element types
# (bfloat16, float8, int2/4, float4) to an op whose semantics are otherwise unchanged.
TYPE_ONLY_CHANGES = {
    ("AveragePool", 22), ("Conv", 22), ("Cos", 22), ("Sin", 22), ("Dropout", 22), ("GRU", 22), ("LSTM", 22),
    ("MaxPool", 22), ("GlobalAveragePool", 22), ("EyeLike", 22), ("Cast", 23), ("Cast", 24), ("Cast", 25),
    ("Cast", 28), ("CastLike", 23), ("CastLike", 24), ("CastLike", 25), ("Constant", 23), ("Constant", 24),
    ("Constant", 25), ("ConstantOfShape", 23), ("ConstantOfShape", 24), ("ConstantOfShape", 25), ("Flatten", 23),
    ("Flatten", 24), ("Flatten", 25), ("Identity", 23), ("Identity", 24), ("Identity", 25), ("Pad", 23),
    ("Pad", 24), ("Pad", 25), ("Reshape", 23), ("Reshape", 24), ("Reshape", 25), ("Shape", 23), ("Shape", 24),
    ("Shape", 25), ("Size", 23), ("Size", 24), ("Size", 25), ("Squeeze", 23), ("Squeeze", 24), ("Squeeze", 25),
    ("Transpose", 23), ("Transpose", 24), ("Transpose", 25), ("Unsqueeze", 23), ("Unsqueeze", 24),
    ("Unsqueeze", 25), ("Acos", 22), ("Asin", 22), ("Atan", 22), ("Acosh", 22), ("Asinh", 22), ("Atanh", 22),
    ("Round", 22),
}


def _check_schema_versions(proto: onnx.ModelProto, opset: int) -> None:
    """Refuse an op whose definition changed after the opsets Kiln was validated against."""
    bad = set()
    for n in proto.graph.node:
        try:
            now = onnx.defs.get_schema(n.op_type, opset).since_version
            then = onnx.defs.get_schema(n.op_type, VALIDATED_OPSET).since_version
        except Exception:
            continue  # unknown ops are reported by the caller
        if now > then and (n.op_type, now) not in TYPE_ONLY_CHANGES:
            bad.add(f"{n.op_type} (version {now})")
    if bad:
        raise KilnError(f"unsupported ONNX operator version(s): {', '.join(sorted(bad))}; Kiln implements these "
                        f"ops as of opset {VALIDATED_OPSET}")
_MAX_BYTES = 2 ** 31  # protobuf's own limit for a single model file


def load_onnx(model) -> onnx.ModelProto:
    """Load and validate an ONNX model; every problem is a ``KilnError`` naming it."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = os.fspath(model)
        if not os.path.exists(path):
            raise KilnError(f"ONNX file {path!r} does not exist")
        try:
            proto = onnx.load(path)
        except Exception as e:
            raise KilnError(f"{path!r} is not a readable ONNX model ({type(e).__name__}: {e})") from None
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"malformed ONNX model: {msg}") from None
    if not proto.graph.node and not proto.graph.output:
        raise KilnError("malformed ONNX model: the graph is empty")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise KilnError(f"unsupported ONNX opset {opset}: Kiln imports opsets {MIN_OPSET} to {MAX_OPSET} "
                        f"(onnx.version_converter can convert the model)")
    _check_schema_versions(proto, opset)
    other = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if other:
        raise KilnError(f"unsupported ONNX operator domain(s): {', '.join(other)}")
    unknown = sorted({n.op_type for n in proto.graph.node} - set(CONVERTERS) - _LITERAL_ONLY)
    if unknown:
        raise KilnError(f"unsupported ONNX operator(s): {', '.join(unknown)}")
    return proto


def _torch_dtype(elem_type: int) -> torch.dtype:
    try:
        np_dt = helper.tensor_dtype_to_np_dtype(elem_type)
        dt = torch.from_numpy(np.zeros(0, dtype=np_dt)).dtype
        DType.from_torch(dt)
        return dt
    except (TypeError, KeyError, ValueError):
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else elem_type
        raise KilnError(f"ONNX element type {name} is not supported") from None


# Operands that Kiln needs as constants (shapes, axes, bounds). When a model feeds one
# from a graph input, the compiled plan is specialized to the input's value and the
# value is part of the plan's cache key (a new value compiles a new plan).
VALUE_OPERANDS = {"Reshape": {1}, "Slice": {1, 2, 3, 4}, "Squeeze": {1}, "Unsqueeze": {1}, "Split": {1},
                  "Expand": {1}, "Pad": {1, 2, 3}, "Clip": {1, 2}, "ReduceSum": {1}, "ReduceMean": {1},
                  "ReduceMax": {1}, "ReduceMin": {1}, "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Trilu": {1},
                  "Dropout": {1, 2}}
MAX_VALUE_ELEMENTS = 64


def value_inputs(proto: onnx.ModelProto) -> set[int]:
    """Positions of graph inputs that feed an operand Kiln needs as a constant."""
    names = [s[0] for s in input_signature(proto)]
    used = {n.input[i] for n in proto.graph.node for i in VALUE_OPERANDS.get(n.op_type, ()) if i < len(n.input)}
    return {i for i, name in enumerate(names) if name in used}


def input_signature(proto: onnx.ModelProto) -> list[tuple[str, torch.dtype, tuple]]:
    """(name, dtype, shape) of each real input; symbolic dims are their names (str)."""
    inits = {i.name for i in proto.graph.initializer}
    out = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        out.append((vi.name, _torch_dtype(tt.elem_type), dims))
    return out


class _Ctx:
    def __init__(self, proto: onnx.ModelProto, b: FrontendBuilder):
        self.proto = proto
        self.b = b
        self.opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        self.env: dict[str, Value | None] = {"": None}  # or a SymValue: sizes known per call
        self.limits: dict[str, int] = {}  # size name -> the largest value the model serves

    def lit(self, name: str) -> np.ndarray | None:
        v = self.env.get(name)
        if v is None or v not in self.b.literals:
            return None
        return self.b.literals[v].numpy()

    def need_lit(self, name: str, what: str) -> np.ndarray:
        a = self.lit(name)
        if a is None:
            raise KilnError(f"Kiln needs {what} to be a constant")
        return a


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


CONVERTERS: dict[str, Callable] = {}
# ops that only ever appear on literal operands (evaluated by ONNX's reference evaluator)
_LITERAL_ONLY = {"Constant", "Shape", "Size", "ConstantOfShape", "Range", "NonZero", "ScatterND",
                 "Trilu", "CumSum", "OneHot", "EyeLike"}


def onnx_op(*names):
    def deco(fn):
        for n in names:
            CONVERTERS[n] = fn
        return fn
    return deco


_UNARY = {"Relu": OpKind.RELU, "Sigmoid": OpKind.SIGMOID, "Tanh": OpKind.TANH, "Exp": OpKind.EXP,
          "Log": OpKind.LOG, "Sqrt": OpKind.SQRT, "Reciprocal": OpKind.RECIPROCAL, "Neg": OpKind.NEG,
          "Abs": OpKind.ABS, "Erf": OpKind.ERF, "Not": OpKind.NOT, "Sin": OpKind.SIN, "Cos": OpKind.COS,
          "Floor": OpKind.FLOOR, "Ceil": OpKind.CEIL, "Sign": OpKind.SIGN, "IsNaN": OpKind.ISNAN,
          "Acos": OpKind.ACOS, "Asin": OpKind.ASIN, "Atan": OpKind.ATAN, "Acosh": OpKind.ACOSH,
          "Asinh": OpKind.ASINH, "Atanh": OpKind.ATANH, "Round": OpKind.ROUND}
for _n, _k in _UNARY.items():
    onnx_op(_n)(lambda c, ins, at, n, k=_k: [c.b.add(k, ins[0])])

_BINARY = {"Add": OpKind.ADD, "Sub": OpKind.SUB, "Mul": OpKind.MUL, "Equal": OpKind.EQ,
           "Less": OpKind.LT, "LessOrEqual": OpKind.LE, "Greater": OpKind.GT, "GreaterOrEqual": OpKind.GE,
           "And": OpKind.AND, "Or": OpKind.OR}
for _n, _k in _BINARY.items():
    onnx_op(_n)(lambda c, ins, at, n, k=_k: [c.b.add(k, ins[0], ins[1])])


@onnx_op("Pow")
def _pow(c, ins, at, n):
    x, y = ins
    if x.dtype is y.dtype:
        return [c.b.add(OpKind.POW, x, y)]
    # ONNX's result has the base's type: compute in the wider float type, then cast back
    wide = y.dtype if y.dtype.is_float else x.dtype if x.dtype.is_float else DType.FLOAT64
    r = c.b.add(OpKind.POW, c.b.cast(x, wide), c.b.cast(y, wide))
    return [c.b.cast(r, x.dtype)]


@onnx_op("Div")
def _div(c, ins, at, n):
    rounding = A.Rounding.NONE if ins[0].dtype.is_float else A.Rounding.TRUNC  # ONNX integer Div truncates
    return [c.b.add(OpKind.DIV, ins[0], ins[1], attrs=A.DivAttrs(rounding))]


@onnx_op("Max", "Min")
def _maxmin(c, ins, at, n):
    k = OpKind.MAXIMUM if n.op_type == "Max" else OpKind.MINIMUM
    y = ins[0]
    for x in ins[1:]:
        y = c.b.add(k, y, x)
    return [y]


@onnx_op("Where")
def _where(c, ins, at, n):
    return [c.b.add(OpKind.WHERE, *ins)]


@onnx_op("Identity")
def _identity(c, ins, at, n):
    return [ins[0]]


@onnx_op("Dropout")
def _dropout(c, ins, at, n):
    """Inference: the identity. Training-mode dropout (random) is not something to compile."""
    if len(n.input) > 2 and n.input[2]:
        training = c.lit(n.input[2])
        ratio = c.lit(n.input[1]) if len(n.input) > 1 and n.input[1] else np.array(0.5)
        if training is None or ratio is None or (bool(training) and float(ratio) > 0):
            raise KilnError("Dropout in training mode is not supported (inference only)")
    if len(n.output) > 1 and n.output[1]:
        return [ins[0], c.b.literal(torch.ones(tuple(ins[0].shape), dtype=torch.bool))]  # mask: all kept
    return [ins[0]]


@onnx_op("Gelu")
def _gelu(c, ins, at, n):
    return [c.b.add(OpKind.GELU, ins[0], attrs=A.GeluAttrs(A.GeluApprox(at.get("approximate", b"none").decode()
                                                                       if isinstance(at.get("approximate"), bytes)
                                                                       else at.get("approximate", "none"))))]


@onnx_op("LeakyRelu")
def _leaky(c, ins, at, n):
    return [c.b.add(OpKind.LEAKY_RELU, ins[0], attrs=A.LeakyReluAttrs(float(at.get("alpha", 0.01))))]


@onnx_op("Clip")
def _clip(c, ins, at, n):
    lo = c.need_lit(n.input[1], "Clip min").item() if len(n.input) > 1 and n.input[1] else None
    hi = c.need_lit(n.input[2], "Clip max").item() if len(n.input) > 2 and n.input[2] else None
    if lo is None and hi is None:
        return [ins[0]]
    return [c.b.add(OpKind.CLAMP, ins[0], attrs=A.ClampAttrs(lo, hi))]


@onnx_op("Cast")
def _cast(c, ins, at, n):
    return [c.b.cast(ins[0], DType.from_torch(_torch_dtype(at["to"])))]


@onnx_op("CastLike")
def _cast_like(c, ins, at, n):
    return [c.b.cast(ins[0], ins[1].dtype)]


def _reduce_axes(c, n, at, rank):
    axes = at.get("axes")
    if axes is None and len(n.input) > 1 and n.input[1]:
        axes = c.need_lit(n.input[1], f"{n.op_type} axes").tolist()
    if not axes:
        if at.get("noop_with_empty_axes", 0):
            return None
        axes = list(range(rank))
    return tuple(sorted({a % max(rank, 1) for a in axes}))


@onnx_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(c, ins, at, n):
    k = {"ReduceMean": OpKind.MEAN, "ReduceSum": OpKind.SUM, "ReduceMax": OpKind.MAX, "ReduceMin": OpKind.MIN}
    axes = _reduce_axes(c, n, at, ins[0].type.rank)
    if axes is None:
        return [ins[0]]
    return [c.b.add(k[n.op_type], ins[0], attrs=A.ReduceAttrs(axes, bool(at.get("keepdims", 1))))]


@onnx_op("ArgMax")
def _argmax(c, ins, at, n):
    if at.get("select_last_index", 0):
        raise KilnError("ArgMax with select_last_index=1 is not supported")
    r = ins[0].type.rank
    return [c.b.add(OpKind.ARGMAX, ins[0], attrs=A.ArgReduceAttrs(at.get("axis", 0) % r, bool(at.get("keepdims", 1))))]


@onnx_op("Softmax", "LogSoftmax")
def _softmax(c, ins, at, n):
    k = OpKind.SOFTMAX if n.op_type == "Softmax" else OpKind.LOG_SOFTMAX
    return [c.b.add(k, ins[0], attrs=A.AxisAttrs(at.get("axis", -1) % ins[0].type.rank))]


@onnx_op("LayerNormalization")
def _layer_norm(c, ins, at, n):
    x = ins[0]
    axis = at.get("axis", -1) % x.type.rank
    return [c.b.add(OpKind.LAYER_NORM, *ins[:3], attrs=A.LayerNormAttrs(x.type.rank - axis,
                                                                         float(at.get("epsilon", 1e-5))))]


@onnx_op("BatchNormalization")
def _batch_norm(c, ins, at, n):
    x, scale, bias, mean, var = ins[:5]
    return [c.b.add(OpKind.BATCH_NORM, x, mean, var, scale, bias, attrs=A.BatchNormAttrs(float(at.get("epsilon", 1e-5))))]


@onnx_op("MatMul")
def _matmul(c, ins, at, n):
    return [c.b.add(OpKind.MATMUL, ins[0], ins[1])]


@onnx_op("Gemm")
def _gemm(c, ins, at, n):
    a, w = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    if at.get("transA", 0):
        a = c.b.add(OpKind.PERMUTE, a, attrs=A.PermuteAttrs((1, 0)))
    if not at.get("transB", 0):
        w = c.b.add(OpKind.PERMUTE, w, attrs=A.PermuteAttrs((1, 0)))
    if alpha != 1.0:
        a = c.b.add(OpKind.MUL, a, c.b.scalar(alpha, a))
    if bias is not None and beta != 1.0:
        bias = c.b.add(OpKind.MUL, bias, c.b.scalar(beta, bias))
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        return [c.b.add(OpKind.ADD, c.b.add(OpKind.LINEAR, a, w), bias)]
    return [c.b.add(OpKind.LINEAR, a, w, *([bias] if bias is not None else []))]


def _spatial_pads(at, in_hw, kernel, strides, dilations):
    auto = at.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(in_hw, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return [p[0] for p in pads] + [p[1] for p in pads]
    if auto == "VALID":
        return [0] * 4
    return list(at.get("pads", [0] * 4))


def _pad_if_asymmetric(c, x, pads, value=0.0):
    """ONNX pads are (top, left, bottom, right); Kiln's conv takes symmetric padding."""
    t, left, bottom, right = pads
    if t == bottom and left == right:
        return x, (t, left)
    p = A.PadAttrs((0, 0, 0, 0, t, bottom, left, right), A.PadMode.CONSTANT, value)
    return c.b.add(OpKind.PAD, x, attrs=p), (0, 0)


@onnx_op("Conv")
def _conv(c, ins, at, n):
    x, w = ins[0], ins[1]
    if x.type.rank != 4:
        raise KilnError(f"Conv on rank-{x.type.rank} input is not supported (2-D only)")
    kernel = tuple(at.get("kernel_shape", w.shape[2:]))
    strides = tuple(at.get("strides", (1, 1)))
    dil = tuple(at.get("dilations", (1, 1)))
    x, pad = _pad_if_asymmetric(c, x, _spatial_pads(at, x.shape[2:], kernel, strides, dil))
    a = A.Conv2dAttrs(strides, pad, dil, int(at.get("group", 1)))
    return [c.b.add(OpKind.CONV2D, x, w, *ins[2:3], attrs=a)]


@onnx_op("MaxPool", "AveragePool")
def _pool(c, ins, at, n):
    x = ins[0]
    if x.type.rank != 4 or (len(n.output) > 1 and n.output[1]):
        raise KilnError(f"{n.op_type}: only 2-D pooling without indices is supported")
    kernel = tuple(at["kernel_shape"])
    strides = tuple(at.get("strides", (1, 1)))
    dil = tuple(at.get("dilations", (1, 1)))
    pads = _spatial_pads(at, x.shape[2:], kernel, strides, dil)
    # torch pools take at most half the (dilated) kernel as padding: pad wider explicitly
    wide = any(p > ((k - 1) * d + 1) // 2 for p, k, d in zip(pads[:2] + pads[2:], kernel * 2, dil * 2))
    ceil = bool(at.get("ceil_mode", 0))
    if n.op_type == "MaxPool":
        if wide:
            if ceil:
                raise KilnError("MaxPool with ceil_mode and padding wider than half the kernel is not supported")
            p = A.PadAttrs((0, 0, 0, 0, pads[0], pads[2], pads[1], pads[3]), A.PadMode.CONSTANT, float("-inf"))
            x, pad = c.b.add(OpKind.PAD, x, attrs=p), (0, 0)
        else:
            x, pad = _pad_if_asymmetric(c, x, pads, float("-inf"))
        a = A.Pool2dAttrs(kernel, strides, pad, dil, ceil)
        return [c.b.add(OpKind.MAX_POOL2D, x, attrs=a)]
    if dil != (1, 1):
        raise KilnError("AveragePool with dilations is not supported")
    include = bool(at.get("count_include_pad", 0))
    if pads[0] != pads[2] or pads[1] != pads[3] or wide:
        if not include or ceil:
            raise KilnError("AveragePool with asymmetric or wide padding is supported only with "
                            "count_include_pad=1 and ceil_mode=0")
        p = A.PadAttrs((0, 0, 0, 0, pads[0], pads[2], pads[1], pads[3]), A.PadMode.CONSTANT, 0.0)
        x, pads = c.b.add(OpKind.PAD, x, attrs=p), [0, 0, 0, 0]
    a = A.Pool2dAttrs(kernel, strides, (pads[0], pads[1]), (1, 1), ceil, include)
    return [c.b.add(OpKind.AVG_POOL2D, x, attrs=a)]


@onnx_op("GlobalAveragePool")
def _gap(c, ins, at, n):
    x = ins[0]
    return [c.b.add(OpKind.MEAN, x, attrs=A.ReduceAttrs(tuple(range(2, x.type.rank)), True))]


@onnx_op("Reshape")
def _reshape(c, ins, at, n):
    x = ins[0]
    shape = [int(s) for s in c.need_lit(n.input[1], "Reshape's shape")]
    if not at.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [c.b.reshape(x, resolve_shape(x.shape, shape))]


@onnx_op("Flatten")
def _flatten(c, ins, at, n):
    x = ins[0]
    axis = at.get("axis", 1)
    axis = axis + x.type.rank if axis < 0 else axis
    lead = product(x.shape[:axis])
    return [c.b.reshape(x, (lead, -1))]


@onnx_op("Squeeze")
def _squeeze(c, ins, at, n):
    x = ins[0]
    axes = c.need_lit(n.input[1], "Squeeze axes").tolist() if len(n.input) > 1 and n.input[1] else None
    r = x.type.rank
    if axes is None and not x.type.is_static:  # which dims are 1 is known only per call
        raise KilnError(f"Squeeze without axes on a tensor of symbolic shape {list(x.shape)}: its rank would "
                        f"depend on the call's sizes")
    drop = {a % r for a in axes} if axes is not None else {i for i, d in enumerate(x.shape) if d == 1}
    return [c.b.reshape(x, [d for i, d in enumerate(x.shape) if i not in drop])]


@onnx_op("Unsqueeze")
def _unsqueeze(c, ins, at, n):
    x = ins[0]
    axes = c.need_lit(n.input[1], "Unsqueeze axes").tolist()
    r = x.type.rank + len(axes)
    axes = sorted(a % r for a in axes)
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return [c.b.reshape(x, shape)]


@onnx_op("Transpose")
def _transpose(c, ins, at, n):
    x = ins[0]
    perm = tuple(at.get("perm", range(x.type.rank - 1, -1, -1)))
    if perm == tuple(range(x.type.rank)):
        return [x]
    return [c.b.add(OpKind.PERMUTE, x, attrs=A.PermuteAttrs(perm))]


@onnx_op("Expand")
def _expand(c, ins, at, n):
    from kiln.ir import broadcast_shapes

    x = ins[0]
    shape = broadcast_shapes(x.shape, tuple(int(s) for s in c.need_lit(n.input[1], "Expand's shape")))
    if tuple(shape) == tuple(x.shape):
        return [x]
    return [c.b.add(OpKind.EXPAND, x, attrs=A.ShapeAttrs(tuple(shape)))]


@onnx_op("Concat")
def _concat(c, ins, at, n):
    xs = [x for x in ins if x is not None]
    if len(xs) == 1:
        return [xs[0]]
    return [c.b.add(OpKind.CONCAT, *xs, attrs=A.AxisAttrs(at["axis"] % xs[0].type.rank))]


@onnx_op("Slice")
def _slice(c, ins, at, n):
    x = ins[0]
    starts = c.need_lit(n.input[1], "Slice starts").tolist()
    ends = c.need_lit(n.input[2], "Slice ends").tolist()
    axes = c.need_lit(n.input[3], "Slice axes").tolist() if len(n.input) > 3 and n.input[3] else range(len(starts))
    steps = c.need_lit(n.input[4], "Slice steps").tolist() if len(n.input) > 4 and n.input[4] else [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = ax % x.type.rank
        size = x.shape[ax]
        if st <= 0:
            raise KilnError("Slice with a non-positive step is not supported")
        if not isinstance(size, int):
            s, e = onnx_shapes.clamp(c, n, s, size, ax), onnx_shapes.clamp(c, n, e, size, ax)
        else:
            s = max(0, min(size, s + size if s < 0 else s))
            e = max(s, min(size, e + size if e < 0 else e))
        if (s, e, st) != (0, size, 1):
            x = c.b.add(OpKind.SLICE, x, attrs=A.SliceAttrs(ax, s, e, st))
    return [x]


@onnx_op("Split")
def _split(c, ins, at, n):
    x = ins[0]
    ax = at.get("axis", 0) % x.type.rank
    size = x.shape[ax]
    if len(n.input) > 1 and n.input[1]:
        sizes = c.need_lit(n.input[1], "Split sizes").tolist()
    elif "split" in at:
        sizes = list(at["split"])
    else:
        k = at.get("num_outputs", len(n.output))
        step = -(-size // k)
        sizes = [min(step, size - i) for i in range(0, size, step)]
    outs, start = [], 0
    for s in sizes:
        outs.append(c.b.add(OpKind.SLICE, x, attrs=A.SliceAttrs(ax, start, start + s)) if s != size else x)
        start += s
    return outs


@onnx_op("Gather")
def _gather(c, ins, at, n):
    x, idx = ins
    return [c.b.add(OpKind.TAKE, x, idx, attrs=A.AxisAttrs(at.get("axis", 0) % x.type.rank))]


@onnx_op("GatherElements")
def _gather_elements(c, ins, at, n):
    x, idx = ins
    return [c.b.add(OpKind.GATHER, x, idx, attrs=A.AxisAttrs(at.get("axis", 0) % x.type.rank))]


@onnx_op("GatherND")
def _gather_nd(c, ins, at, n):
    x, idx = ins
    if at.get("batch_dims", 0):
        raise KilnError("GatherND with batch_dims > 0 is not supported")
    r = idx.type.rank
    parts = []  # indices[..., j] indexes axis j: the same as x[idx0, idx1, ...]
    for j in range(idx.shape[-1]):
        s = c.b.add(OpKind.SLICE, idx, attrs=A.SliceAttrs(r - 1, j, j + 1))
        parts.append(c.b.reshape(s, idx.shape[:-1]))
    return [c.b.add(OpKind.INDEX, x, *parts)]


@onnx_op("Pad")
def _pad(c, ins, at, n):
    x = ins[0]
    pads = c.need_lit(n.input[1], "Pad's pads").tolist()
    value = float(c.need_lit(n.input[2], "Pad's value").item()) if len(n.input) > 2 and n.input[2] else 0.0
    r = x.type.rank
    if len(n.input) > 3 and n.input[3]:
        axes = [a % r for a in c.need_lit(n.input[3], "Pad axes").tolist()]
    else:
        axes = list(range(r))
    full = [0] * (2 * r)
    k = len(axes)
    for i, ax in enumerate(axes):  # ONNX: all befores, then all afters
        full[2 * ax], full[2 * ax + 1] = pads[i], pads[k + i]
    mode = at.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "reflect", "edge") or any(p < 0 for p in full):
        raise KilnError(f"Pad mode {mode!r} / negative pads are not supported")
    m = {"constant": A.PadMode.CONSTANT, "reflect": A.PadMode.REFLECT, "edge": A.PadMode.REPLICATE}[mode]
    return [c.b.add(OpKind.PAD, x, attrs=A.PadAttrs(tuple(full), m, value))]


def _rnn_weights(c, n, ins, gates, order, hidden):
    """ONNX (W, R, B) per direction -> torch (w_ih, w_hh, b_ih, b_hh) with torch's gate order."""
    W, R = c.b.evaluate(ins[1]), c.b.evaluate(ins[2])
    B = c.b.evaluate(ins[3]) if len(ins) > 3 and ins[3] is not None else None
    if W is None or R is None or (B is None and len(ins) > 3 and ins[3] is not None):
        raise KilnError(f"{n.op_type}: weights and biases must be computable from initializers")
    idx = torch.cat([torch.arange(g * hidden, (g + 1) * hidden) for g in order])
    out = []
    for d in range(W.shape[0]):
        w_ih, w_hh = W[d][idx], R[d][idx]
        b = B[d] if B is not None else torch.zeros(2 * gates * hidden, dtype=W.dtype)
        b_ih, b_hh = b[:gates * hidden][idx], b[gates * hidden:][idx]
        out += [c.b.weight(t.contiguous(), f"{n.name or n.op_type}.{k}{d}")
                for k, t in (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh))]
    return out


def _rnn(c, ins, at, n, kind):
    x = ins[0]
    hidden = int(at["hidden_size"])
    direction = at.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    if direction == "reverse" or at.get("layout", 0) or "clip" in at or at.get("input_forget", 0):
        raise KilnError(f"{n.op_type}: direction={direction}, layout, clip and input_forget are not supported")
    if kind is OpKind.LSTM and len(ins) > 7 and ins[7] is not None:
        raise KilnError("LSTM peephole weights are not supported")
    if kind is OpKind.GRU and not at.get("linear_before_reset", 0):
        raise KilnError("GRU with linear_before_reset=0 is not supported")
    if len(ins) > 4 and ins[4] is not None:
        lens = c.lit(n.input[4])
        if lens is None or not (lens == x.shape[0]).all():
            raise KilnError(f"{n.op_type}: variable sequence_lens is not supported")
    nd = 2 if direction == "bidirectional" else 1
    T, B = x.shape[0], x.shape[1]
    order = [0, 2, 3, 1] if kind is OpKind.LSTM else [1, 0, 2]
    gates = 4 if kind is OpKind.LSTM else 3
    ws = _rnn_weights(c, n, ins, gates, order, hidden)
    zeros = lambda: c.b.add(OpKind.EXPAND, c.b.literal(torch.zeros((), dtype=x.dtype.to_torch())),  # noqa: E731
                            attrs=A.ShapeAttrs((nd, B, hidden)))
    h0 = ins[5] if len(ins) > 5 and ins[5] is not None else zeros()
    states = [h0]
    if kind is OpKind.LSTM:
        states.append(ins[6] if len(ins) > 6 and ins[6] is not None else zeros())
    a = A.RNNAttrs(hidden, 1, nd == 2, False, True)
    outs = c.b.add(kind, x, *states, *ws, attrs=a)
    y = c.b.reshape(outs[0], (T, B, nd, hidden))
    y = c.b.add(OpKind.PERMUTE, y, attrs=A.PermuteAttrs((0, 2, 1, 3))) if nd > 1 else c.b.reshape(outs[0], (T, 1, B, hidden))
    return [y, *outs[1:]]


onnx_op("LSTM")(lambda c, ins, at, n: _rnn(c, ins, at, n, OpKind.LSTM))
onnx_op("GRU")(lambda c, ins, at, n: _rnn(c, ins, at, n, OpKind.GRU))


def numpy_to_torch(a) -> torch.Tensor:
    """np.ndarray -> torch, including ml_dtypes' bfloat16 (which torch.from_numpy rejects)."""
    a = np.array(a, copy=True, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(a)
    except TypeError:
        raise KilnError(f"numpy dtype {a.dtype} is not supported") from None


def _eval_literal(c: _Ctx, node) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    feeds = {i: c.lit(i) for i in node.input if i}
    ev = ReferenceEvaluator(node)
    return ev.run(None, feeds)


def from_onnx(proto: onnx.ModelProto, example_inputs: list[torch.Tensor] | None = None,
              name: str | None = None, dims: dict | None = None, size_max: dict | None = None,
              limits: dict | None = None) -> Graph:
    """Import ``proto``; ``example_inputs`` fix the input shapes (else symbolic dims become 1).
    ``dims``: (input position, axis) -> the name of a size that varies per call (a symbolic
    dim in the graph); ``size_max``: each such size's largest value (None: unbounded).
    ``limits`` (filled in): sizes the model itself bounds (a position table it slices)."""
    g = proto.graph
    b = FrontendBuilder(name or g.name or "onnx_model")
    b.size_max = dict(size_max or {})
    c = _Ctx(proto, b)
    dims = dims or {}
    sig = input_signature(proto)
    if example_inputs is not None and len(example_inputs) != len(sig):
        raise KilnError(f"the ONNX model takes {len(sig)} input(s) ({', '.join(s[0] for s in sig)}); "
                        f"got {len(example_inputs)}")
    specialize = value_inputs(proto) if example_inputs is not None else set()
    for i, (iname, dt, idims) in enumerate(sig):
        if example_inputs is not None:
            t = example_inputs[i]
            if t.dtype != dt:
                raise KilnError(f"input {iname!r}: expected dtype {dt}, got {t.dtype}")
            if t.dim() != len(idims) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(idims, t.shape)):
                raise KilnError(f"input {iname!r}: expected shape {list(idims)}, got {list(t.shape)}")
            shape = tuple(Sym(dims[(i, a)]) if (i, a) in dims else s for a, s in enumerate(t.shape))
        else:
            shape = tuple(d if isinstance(d, int) else 1 for d in idims)
        v = b.input(iname, shape, DType.from_torch(dt))
        c.env[iname] = v
        if i in specialize and example_inputs[i].numel() <= MAX_VALUE_ELEMENTS:
            if any((i, a) in dims for a in range(len(shape))):
                raise KilnError(f"input {iname!r} feeds a shape operand (its values are compiled in): its dims "
                                f"cannot vary per call")
            c.env[iname] = b.literal(example_inputs[i].clone(), iname)  # the plan is specialized to this value
    for init in g.initializer:
        t = numpy_to_torch(numpy_helper.to_array(init))
        c.env[init.name] = b.weight(t, init.name) if t.is_floating_point() else b.literal(t, init.name)
    for node in g.node:
        b.scope = node.name
        ins = [c.env[i] if i else None for i in node.input]
        missing = [i for i, v in zip(node.input, ins) if i and i not in c.env]
        if missing:
            raise KilnError(f"ONNX node {node.name or node.op_type}: undefined input(s) {missing}")
        if node.op_type in ("Shape", "Size") and ins and isinstance(ins[0], Value):
            shape = list(ins[0].shape)  # static dims: Shape is a literal; symbolic ones: a SymValue
            at = _attrs(node)
            if node.op_type == "Size":
                outs = [onnx_shapes.wrap(c, np.array(product(shape), dtype=object))]
            else:
                outs = [onnx_shapes.wrap(c, shape_value(shape, at.get("start", 0), at.get("end")))]
        elif any(isinstance(v, SymValue) for v in ins):
            outs = onnx_shapes.convert(c, node, ins, _attrs(node))
        elif node.op_type in CONVERTERS:  # all-literal operands fold inside the builder
            try:
                outs = CONVERTERS[node.op_type](c, ins, _attrs(node), node)
            except KilnError:
                raise
            except Exception as e:
                raise KilnError(f"ONNX node {node.name or node.op_type} ({node.op_type}): {e}") from e
        elif all(v is None or v in b.literals for v in ins):
            outs = [b.literal(numpy_to_torch(a), o or "lit") for a, o in zip(_eval_literal(c, node), node.output)]
        elif node.op_type in ("ConstantOfShape", "Range"):
            raise KilnError(f"ONNX node {node.name or node.op_type} ({node.op_type}): its shape operands are "
                            f"computed from tensor data; Kiln needs them constant or computed from input shapes")
        else:
            raise KilnError(f"unsupported ONNX operator {node.op_type} (node {node.name!r}) on non-constant inputs")
        for oname, v in zip(node.output, outs):
            if oname:
                c.env[oname] = v
    outputs = []
    for o in g.output:
        if o.name not in c.env:
            raise KilnError(f"ONNX output {o.name!r} is never produced")
        if isinstance(c.env[o.name], SymValue):
            raise KilnError(f"ONNX output {o.name!r} is a tensor of sizes that vary per call "
                            f"({', '.join(c.env[o.name].symbols)}); Kiln compiles it only with static shapes "
                            f"(dynamic=False)")
        outputs.append(c.env[o.name])
    if limits is not None:
        for n, m in list(c.limits.items()) + list(b.implied_max.items()):
            limits[n] = min(limits.get(n, m), m)
    return b.finish(outputs)
