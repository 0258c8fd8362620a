"""The op table: every op kind x dtype, run through a compiled plan, against torch.

Each case builds a one-node graph with the IR builder (so type inference is checked too),
runs it through ``build_plan`` for the ``cpu`` target (the kernel the runtime really
picks), and compares with an independent torch expression.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from kiln.ir import DType, GraphBuilder, Layout, LayoutKind, OpKind, verify
from kiln.ir import attrs as A
from kiln.runtime.plan import build_plan

F32, F16, BF16, I64, BOOL = torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool
FLOATS = (F32, F16, BF16)
TOL = {F32: (1e-5, 1e-5), F16: (2e-3, 2e-3), BF16: (2e-2, 2e-2), torch.float64: (1e-9, 1e-9)}


@dataclass
class Case:
    op: OpKind
    shapes: tuple  # input shapes
    expect: Callable  # torch expression over the inputs
    attrs: object = None
    dtypes: tuple = FLOATS
    gen: str = "randn"  # randn | positive | int | bool | index:N
    in_dtypes: tuple | None = None  # per-input dtypes overriding the case dtype (None = case dtype)
    id: str = ""
    tol: float | None = None
    extra: dict = field(default_factory=dict)


def _group_norm(x, groups, w=None, b=None, eps=1e-5):
    """Each group of channels normalized over its channels and positions (biased variance),
    in float64, then the per-channel affine."""
    g = x.double().reshape(x.shape[0], groups, -1)
    y = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt()).reshape(x.shape)
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.double().reshape(per_channel)
    if b is not None:
        y = y + b.double().reshape(per_channel)
    return y.to(x.dtype)


def _make(shape, dtype, gen):
    if gen.startswith("index:"):
        return torch.randint(0, int(gen.split(":")[1]), shape, dtype=torch.int64)
    if dtype == BOOL or gen == "bool":
        return torch.rand(shape) > 0.5
    if dtype == torch.uint8:  # quantized activations, packed int4 weights: the whole byte range
        return torch.randint(0, 256, shape, dtype=dtype)
    if not dtype.is_floating_point:
        return torch.randint(-5, 6, shape, dtype=dtype)
    t = torch.randn(shape)
    if gen == "positive":
        t = t.abs() + 0.1
    elif gen == "unit":  # inside (-1, 1): the domain of asin, acos, atanh
        t = torch.rand(shape) * 1.9 - 0.95
    elif gen == "above1":  # acosh's domain
        t = t.abs() + 1.0
    elif gen == "halves":  # ties for rounding: half to even
        t = torch.randint(-8, 9, shape) / 2
    return t.to(dtype)


def _lstm_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    h, c, ys = h0[0], c0[0], []
    for t in range(x.shape[1]):
        g = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, gg, o = g.chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys, 1), h[None], c[None]


def _gru_ref(x, h0, w_ih, w_hh, b_ih, b_hh):
    h, ys = h0[0], []
    for t in range(x.shape[1]):
        xr, xz, xn = (x[:, t] @ w_ih.T + b_ih).chunk(3, -1)
        hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys, 1), h[None]


def _unary(op, fn, dtypes=FLOATS, gen="randn"):
    return Case(op, ((3, 5),), fn, dtypes=dtypes, gen=gen)


def _binary(op, fn, dtypes=FLOATS + (I64,)):
    return Case(op, ((3, 5), (1, 5)), fn, dtypes=dtypes)


def _cmp(op, fn):
    return Case(op, ((3, 5), (3, 1)), fn, dtypes=FLOATS + (I64,))


H = 6
CASES = [
    _unary(OpKind.NEG, torch.neg, FLOATS + (I64,)), _unary(OpKind.ABS, torch.abs, FLOATS + (I64,)),
    _unary(OpKind.EXP, torch.exp), _unary(OpKind.LOG, torch.log, gen="positive"),
    _unary(OpKind.SQRT, torch.sqrt, gen="positive"), _unary(OpKind.RSQRT, torch.rsqrt, gen="positive"),
    _unary(OpKind.RECIPROCAL, torch.reciprocal, gen="positive"), _unary(OpKind.RELU, torch.relu, FLOATS + (I64,)),
    _unary(OpKind.SIGMOID, torch.sigmoid), _unary(OpKind.TANH, torch.tanh), _unary(OpKind.ERF, torch.erf),
    _unary(OpKind.SILU, F.silu), _unary(OpKind.SIN, torch.sin), _unary(OpKind.COS, torch.cos),
    _unary(OpKind.FLOOR, torch.floor), _unary(OpKind.CEIL, torch.ceil), _unary(OpKind.SIGN, torch.sign, FLOATS + (I64,)),
    _unary(OpKind.IDENTITY, lambda x: x, FLOATS + (I64, BOOL)), _unary(OpKind.NOT, torch.logical_not, (BOOL,)),
    _unary(OpKind.ISNAN, lambda x: torch.isnan(x)),
    _unary(OpKind.ACOS, torch.acos, gen="unit"), _unary(OpKind.ASIN, torch.asin, gen="unit"),
    _unary(OpKind.ATAN, torch.atan), _unary(OpKind.ACOSH, torch.acosh, gen="above1"),
    _unary(OpKind.ASINH, torch.asinh), _unary(OpKind.ATANH, torch.atanh, gen="unit"),
    _unary(OpKind.ROUND, torch.round, FLOATS + (I64,), gen="halves"),
    Case(OpKind.ROUND, ((3, 5),), torch.round, id="randn", dtypes=(F32,)),
    Case(OpKind.GELU, ((3, 5),), F.gelu, A.GeluAttrs()),
    Case(OpKind.GELU, ((3, 5),), lambda x: F.gelu(x, approximate="tanh"), A.GeluAttrs(A.GeluApprox.TANH), id="tanh"),
    Case(OpKind.LEAKY_RELU, ((3, 5),), lambda x: F.leaky_relu(x, 0.2), A.LeakyReluAttrs(0.2)),
    Case(OpKind.CLAMP, ((3, 5),), lambda x: x.clamp(-0.5, 0.5), A.ClampAttrs(-0.5, 0.5)),
    Case(OpKind.CLAMP, ((3, 5),), lambda x: x.clamp(min=0.0), A.ClampAttrs(0.0, None), id="min_only"),
    Case(OpKind.CAST, ((3, 5),), lambda x: x.to(torch.int64), A.CastAttrs(DType.INT64), dtypes=(F32,)),
    Case(OpKind.CAST, ((3, 5),), lambda x: x.to(torch.float32), A.CastAttrs(DType.FLOAT32), dtypes=(I64, BOOL, F16, BF16),
         id="to_f32"),
    _binary(OpKind.ADD, torch.add), _binary(OpKind.SUB, torch.sub), _binary(OpKind.MUL, torch.mul),
    _binary(OpKind.DIV, torch.div), _binary(OpKind.MAXIMUM, torch.maximum), _binary(OpKind.MINIMUM, torch.minimum),
    _binary(OpKind.ATAN2, torch.atan2, FLOATS),
    Case(OpKind.ATAN2, ((3, 5), (3, 5)), torch.atan2, in_dtypes=(I64, None), dtypes=(I64,), id="int_to_float"),
    Case(OpKind.POW, ((3, 5), (1, 5)), torch.pow, gen="positive"),
    Case(OpKind.ADD, ((3, 5), ()), torch.add, id="scalar_operand"),
    Case(OpKind.ADD, ((3, 5), (3, 5)), torch.add, in_dtypes=(None, I64), id="promote_int"),
    _cmp(OpKind.EQ, torch.eq), _cmp(OpKind.NE, torch.ne), _cmp(OpKind.LT, torch.lt), _cmp(OpKind.LE, torch.le),
    _cmp(OpKind.GT, torch.gt), _cmp(OpKind.GE, torch.ge),
    Case(OpKind.AND, ((3, 5), (3, 5)), torch.logical_and, dtypes=(BOOL,)),
    Case(OpKind.OR, ((3, 5), (3, 5)), torch.logical_or, dtypes=(BOOL,)),
    Case(OpKind.WHERE, ((3, 5), (3, 5), (1, 5)), torch.where, in_dtypes=(BOOL, None, None), dtypes=FLOATS + (I64,)),
    Case(OpKind.SUM, ((3, 4, 5),), lambda x: x.sum((0, 2)), A.ReduceAttrs((0, 2)), dtypes=FLOATS + (I64,)),
    Case(OpKind.MEAN, ((3, 4, 5),), lambda x: x.mean(-1, keepdim=True), A.ReduceAttrs((2,), True)),
    Case(OpKind.MAX, ((3, 4, 5),), lambda x: x.amax(1), A.ReduceAttrs((1,)), dtypes=FLOATS + (I64,)),
    Case(OpKind.MIN, ((3, 4, 5),), lambda x: x.amin((1, 2)), A.ReduceAttrs((1, 2)), dtypes=FLOATS + (I64,)),
    Case(OpKind.ARGMAX, ((3, 4, 5),), lambda x: x.argmax(1), A.ArgReduceAttrs(1), dtypes=(F32, I64)),
    Case(OpKind.SOFTMAX, ((3, 4, 5),), lambda x: x.softmax(-1), A.AxisAttrs(2)),
    Case(OpKind.LOG_SOFTMAX, ((3, 4, 5),), lambda x: x.log_softmax(1), A.AxisAttrs(1)),
    Case(OpKind.CUMSUM, ((3, 4, 5),), lambda x: x.cumsum(1), A.AxisAttrs(1), dtypes=FLOATS + (I64,)),
    Case(OpKind.CUMSUM, ((2, 6),), lambda x: x.cumsum(1), A.AxisAttrs(1), dtypes=(BOOL,), id="bool_to_int64"),
    Case(OpKind.PROD, ((3, 4, 5),), lambda x: x.prod(1), A.ReduceAttrs((1,)), dtypes=(F32, I64)),
    Case(OpKind.PROD, ((3, 4, 2),), lambda x: x.prod(2, keepdim=True).prod(0, keepdim=True), A.ReduceAttrs((0, 2), True),
         dtypes=(F32,), id="two_axes"),
    Case(OpKind.LAYER_NORM, ((2, 3, 8), (8,), (8,)), lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-5),
         A.LayerNormAttrs(1, 1e-5)),
    Case(OpKind.LAYER_NORM, ((2, 3, 8),), lambda x: F.layer_norm(x, (3, 8)), A.LayerNormAttrs(2, 1e-5), id="no_affine"),
    Case(OpKind.BATCH_NORM, ((2, 4, 3, 3), (4,), (4,), (4,), (4,)),
         lambda x, m, v, w, b: F.batch_norm(x, m, v, w, b, False, 0.0, 1e-5), A.BatchNormAttrs(1e-5), gen="positive"),
    Case(OpKind.MATMUL, ((2, 3, 4, 5), (5, 6)), torch.matmul, dtypes=FLOATS + (I64,)),
    Case(OpKind.MATMUL, ((2, 1, 4, 5), (3, 5, 6)), torch.matmul, id="batched_broadcast"),
    Case(OpKind.MATMUL, ((5,), (2, 5, 3)), torch.matmul, id="vector_lhs"),
    Case(OpKind.LINEAR, ((2, 3, 8), (5, 8), (5,)), F.linear),
    Case(OpKind.LINEAR, ((4, 8), (5, 8)), F.linear, id="no_bias"),
    Case(OpKind.LINEAR, ((2, 3, 8), (5, 8), (5,), (2, 3, 5)), lambda x, w, b, r: F.gelu(F.linear(x, w, b) + r),
         A.LinearAttrs(A.Activation.GELU), id="epilogue_residual_gelu"),
    Case(OpKind.CONV2D, ((1, 4, 6, 6), (4, 4, 3, 3), (4,), (1, 4, 6, 6)),
         lambda x, w, b, r: torch.relu(F.conv2d(x, w, b, 1, 1) + r),
         A.Conv2dAttrs(padding=(1, 1), activation=A.Activation.RELU), id="epilogue_residual_relu"),
    Case(OpKind.TO_LAYOUT, ((2, 3, 4, 5),), lambda x: x, A.LayoutAttrs(Layout(LayoutKind.CHANNELS_LAST)),
         dtypes=FLOATS + (I64,)),
    Case(OpKind.CONV2D, ((1, 4, 9, 9), (6, 4, 3, 3), (6,)), lambda x, w, b: F.conv2d(x, w, b, 2, 1),
         A.Conv2dAttrs((2, 2), (1, 1))),
    Case(OpKind.CONV2D, ((2, 4, 8, 8), (4, 2, 3, 3)), lambda x, w: F.conv2d(x, w, None, 1, 2, 2, 2),
         A.Conv2dAttrs((1, 1), (2, 2), (2, 2), 2), id="grouped_dilated"),
    Case(OpKind.MAX_POOL2D, ((1, 3, 9, 9),), lambda x: F.max_pool2d(x, 3, 2, 1), A.Pool2dAttrs((3, 3), (2, 2), (1, 1))),
    Case(OpKind.MAX_POOL2D, ((1, 3, 8, 8),), lambda x: F.max_pool2d(x, 3, 2, 0, ceil_mode=True),
         A.Pool2dAttrs((3, 3), (2, 2), ceil_mode=True), id="ceil"),
    Case(OpKind.AVG_POOL2D, ((1, 3, 9, 9),), lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
         A.Pool2dAttrs((3, 3), (2, 2), (1, 1), count_include_pad=False)),
    Case(OpKind.ADAPTIVE_AVG_POOL2D, ((2, 3, 7, 7),), lambda x: F.adaptive_avg_pool2d(x, 1), A.AdaptivePoolAttrs((1, 1))),
    Case(OpKind.RESHAPE, ((2, 3, 4),), lambda x: x.reshape(6, 4), A.ShapeAttrs((6, 4)), dtypes=FLOATS + (I64, BOOL)),
    Case(OpKind.PERMUTE, ((2, 3, 4),), lambda x: x.permute(2, 0, 1), A.PermuteAttrs((2, 0, 1)), dtypes=FLOATS + (I64,)),
    Case(OpKind.EXPAND, ((3, 1),), lambda x: x.expand(2, 3, 4), A.ShapeAttrs((2, 3, 4)), dtypes=FLOATS + (I64, BOOL)),
    Case(OpKind.CONCAT, ((2, 3), (2, 5), (2, 1)), lambda *xs: torch.cat(xs, 1), A.AxisAttrs(1), dtypes=FLOATS + (I64,)),
    Case(OpKind.SLICE, ((4, 9),), lambda x: x[:, 1:8:3], A.SliceAttrs(1, 1, 8, 3), dtypes=FLOATS + (I64, BOOL)),
    Case(OpKind.TAKE, ((10, 4), (2, 3)), lambda w, i: F.embedding(i, w), A.AxisAttrs(0), in_dtypes=(None, I64),
         gen="index:10", dtypes=FLOATS + (I64,)),
    Case(OpKind.TAKE, ((3, 10, 2), (4,)), lambda x, i: x.index_select(1, i), A.AxisAttrs(1), in_dtypes=(None, I64),
         gen="index:10", id="inner_axis"),
    Case(OpKind.GATHER, ((3, 10), (3, 4)), lambda x, i: x.gather(1, i), A.AxisAttrs(1), in_dtypes=(None, I64),
         gen="index:3", dtypes=FLOATS + (I64,)),
    Case(OpKind.INDEX, ((4, 5, 2), (3, 1), (1, 2)), lambda x, i, j: x[i, j], in_dtypes=(None, I64, I64), gen="index:4"),
    Case(OpKind.PAD, ((1, 2, 3, 3),), lambda x: F.pad(x, (1, 2, 0, 1), value=0.5),
         A.PadAttrs((0, 0, 0, 0, 0, 1, 1, 2), A.PadMode.CONSTANT, 0.5), dtypes=FLOATS + (I64,)),
    Case(OpKind.PAD, ((1, 2, 4, 4),), lambda x: F.pad(x, (1, 1, 2, 2), mode="reflect"),
         A.PadAttrs((0, 0, 0, 0, 2, 2, 1, 1), A.PadMode.REFLECT), dtypes=(F32,), id="reflect"),
    Case(OpKind.ATTENTION, ((2, 3, 7, 8), (2, 3, 7, 8), (2, 3, 7, 8)),
         lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v, A.AttentionAttrs(), tol=1e-2),
    Case(OpKind.ATTENTION, ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4), (1, 1, 1, 5)),
         lambda q, k, v, m: torch.softmax(q @ k.transpose(-1, -2) * 0.3 + m, -1) @ v, A.AttentionAttrs(0.3),
         id="additive_mask", dtypes=(F32,)),
    Case(OpKind.ATTENTION, ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4), (1, 1, 5, 5)),
         lambda q, k, v, m: torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~m, float("-inf")), -1) @ v,
         A.AttentionAttrs(), in_dtypes=(None, None, None, BOOL), id="bool_mask", dtypes=(F32,),
         extra={"mask_diag": True}),
    Case(OpKind.ATTENTION, ((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4)),
         lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(
             torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf")), -1) @ v,
         A.AttentionAttrs(causal=True), id="causal", dtypes=(F32,)),
    Case(OpKind.LSTM, ((2, 5, 3), (1, 2, H), (1, 2, H), (4 * H, 3), (4 * H, H), (4 * H,), (4 * H,)), _lstm_ref,
         A.RNNAttrs(H, 1, batch_first=True), dtypes=(F32,), tol=1e-5),
    Case(OpKind.GRU, ((2, 5, 3), (1, 2, H), (3 * H, 3), (3 * H, H), (3 * H,), (3 * H,)), _gru_ref,
         A.RNNAttrs(H, 1, batch_first=True), dtypes=(F32,), tol=1e-5),
    Case(OpKind.LSTM, ((2, 5, 4 * H), (1, 2, H), (1, 2, H), (4 * H, H)),
         lambda xp, h0, c0, w_hh: _lstm_ref(xp, h0, c0, torch.eye(4 * H), w_hh, torch.zeros(4 * H), torch.zeros(4 * H)),
         A.RNNAttrs(H, 1, batch_first=True, proj_hoisted=True), dtypes=(F32,), tol=1e-5, id="hoisted"),
    Case(OpKind.GRU, ((5, 2, 3 * H), (1, 2, H), (3 * H, H), (3 * H,)),
         lambda xp, h0, w_hh, b_hh: tuple(t.transpose(0, 1) if i == 0 else t for i, t in enumerate(
             _gru_ref(xp.transpose(0, 1), h0, torch.eye(3 * H), w_hh, torch.zeros(3 * H), b_hh))),
         A.RNNAttrs(H, 1, proj_hoisted=True), dtypes=(F32,), tol=1e-5, id="hoisted_time_major"),
]

# library ops (ir/ops_library.py): ties, duplicate indices and NaN as torch has them
SR = A.ScatterReduce
CASES += [
    Case(OpKind.SORT, ((3, 7),), lambda x: tuple(torch.sort(x, dim=1, stable=True)), A.SortAttrs(1), dtypes=FLOATS + (I64,)),
    Case(OpKind.SORT, ((9, 2),), lambda x: tuple(torch.sort(x, dim=0, descending=True, stable=True)), A.SortAttrs(0, True),
         dtypes=(I64,), id="descending_ties"),
    Case(OpKind.SORT, ((2, 6),), lambda x: tuple(torch.sort(x, dim=1, stable=True)), A.SortAttrs(1), dtypes=(F32,),
         id="nan_last", extra={"fixed": {0: torch.tensor([[1.0, float("nan"), -2.0, 1.0, float("nan"), 0.0]] * 2)}}),
    Case(OpKind.TOPK, ((4, 9),), lambda x: tuple(torch.topk(x, 3, 1)), A.TopKAttrs(3, 1), dtypes=FLOATS + (I64,)),
    Case(OpKind.TOPK, ((2, 6),), lambda x: tuple(torch.topk(x, 3, 1)), A.TopKAttrs(3, 1), dtypes=(F32,),
         id="nan_largest", extra={"fixed": {0: torch.tensor([[1.0, float("nan"), -2.0, 1.0, float("nan"), 0.0]] * 2)}}),
    Case(OpKind.TOPK, ((7, 3),), lambda x: tuple(torch.topk(x, 2, 0, largest=False)), A.TopKAttrs(2, 0, False),
         dtypes=(I64,), id="smallest_ties"),
    Case(OpKind.SCATTER, ((4, 5), (3, 5), (3, 5)), lambda x, i, s: x.scatter_add(0, i, s), A.ScatterAttrs(0, SR.SUM),
         in_dtypes=(None, I64, None), gen="index:4", dtypes=FLOATS + (I64,), id="add_duplicates"),
    Case(OpKind.SCATTER, ((3, 6), (3, 4), (3, 5)), lambda x, i, s: x.scatter(1, i, s), A.ScatterAttrs(1),
         in_dtypes=(None, I64, None), gen="index:6", dtypes=(F32, I64)),
    Case(OpKind.SCATTER, ((3, 6), (3, 8), (3, 8)),
         lambda x, i, s: x.scatter_reduce(1, i, s, "amax", include_self=False), A.ScatterAttrs(1, SR.AMAX, False),
         in_dtypes=(None, I64, None), gen="index:6", dtypes=(F32,), id="amax_without_self"),
    Case(OpKind.SCATTER, ((3, 6), (3, 8), (3, 8)), lambda x, i, s: x.scatter_reduce(1, i, s, "mean"),
         A.ScatterAttrs(1, SR.MEAN), in_dtypes=(None, I64, None), gen="index:6", dtypes=(F32, I64), id="mean"),
    Case(OpKind.INDEX_PUT, ((5, 3), (6, 3), (6,)), lambda x, v, i: x.index_put((i,), v, accumulate=True),
         A.IndexPutAttrs((0,), True), in_dtypes=(None, None, I64), gen="index:5", dtypes=FLOATS + (I64,),
         id="accumulate_duplicates"),
    Case(OpKind.INDEX_PUT, ((3, 4, 5), (2, 4), (2,), (2,)), lambda x, v, i, j: torch.ops.aten.index_put(x, [i, None, j], v),
         A.IndexPutAttrs((0, 2)), in_dtypes=(None, None, I64, I64), gen="index:3", dtypes=(F32,), id="apart"),
    Case(OpKind.INDEX_PUT, ((2, 6, 4), (1, 4), (3,)), lambda x, v, i: torch.ops.aten.index_put(x, [None, i], v),
         A.IndexPutAttrs((1,)), in_dtypes=(None, None, I64), gen="index:6", dtypes=(F32,), id="inner_broadcast"),
    Case(OpKind.MAX_POOL3D, ((1, 2, 5, 6, 7),), lambda x: F.max_pool3d(x, 3, 2, 1, return_indices=True),
         A.Pool3dAttrs((3, 3, 3), (2, 2, 2), (1, 1, 1)), dtypes=(F32, BF16)),
    Case(OpKind.MAX_POOL3D, ((2, 4, 5, 6),), lambda x: F.max_pool3d(x, 2, (1, 2, 2), 0, 2, True, True),
         A.Pool3dAttrs((2, 2, 2), (1, 2, 2), dilation=(2, 2, 2), ceil_mode=True), dtypes=(F32,), id="unbatched_dilated"),
    Case(OpKind.AVG_POOL3D, ((1, 2, 5, 6, 7),), lambda x: F.avg_pool3d(x, 3, 2, 1, True, False),
         A.Pool3dAttrs((3, 3, 3), (2, 2, 2), (1, 1, 1), ceil_mode=True, count_include_pad=False),
         dtypes=(F32,)),  # torch's CPU avg_pool3d has no 16-bit kernels
    Case(OpKind.AVG_POOL3D, ((1, 2, 4, 4, 4),), lambda x: F.avg_pool3d(x, 2, divisor_override=3),
         A.Pool3dAttrs((2, 2, 2), (2, 2, 2), divisor_override=3), dtypes=(F32,), id="divisor"),
    Case(OpKind.ADAPTIVE_AVG_POOL3D, ((2, 3, 5, 6, 7),), lambda x: F.adaptive_avg_pool3d(x, (2, 3, 4)),
         A.AdaptivePool3dAttrs((2, 3, 4))),
    Case(OpKind.CDIST, ((2, 5, 4), (2, 6, 4)), torch.cdist, A.DistAttrs(2.0), dtypes=(F32,)),
    Case(OpKind.CDIST, ((5, 3), (30, 3)), lambda a, b: torch.cdist(a, b, 1.0), A.DistAttrs(1.0), dtypes=(F32,),
         id="p1"),
    Case(OpKind.PDIST, ((6, 4),), F.pdist, A.DistAttrs(2.0), dtypes=(F32,)),
    Case(OpKind.EMBEDDING_BAG, ((10, 4), (7,), (3,)),
         lambda w, i, o: F.embedding_bag(i, w, o, mode="mean"), A.EmbeddingBagAttrs(1),
         in_dtypes=(None, I64, I64), gen="index:10", dtypes=(F32,), extra={"fixed": {2: torch.tensor([0, 2, 2])}}),
    Case(OpKind.EMBEDDING_BAG, ((10, 4), (7,), (4,), (7,)),
         lambda w, i, o, p: F.embedding_bag(i, w, o, mode="sum", per_sample_weights=p, include_last_offset=True),
         A.EmbeddingBagAttrs(0, True), in_dtypes=(None, I64, I64, None), gen="index:10", dtypes=(F32,),
         id="weighted_last_offset", extra={"fixed": {2: torch.tensor([0, 3, 3, 7])}}),
    Case(OpKind.GRID_SAMPLE, ((1, 2, 5, 6), (1, 3, 4, 2)), lambda x, g: F.grid_sample(x, g, align_corners=False),
         A.GridSampleAttrs(), dtypes=(F32,)),
    Case(OpKind.GRID_SAMPLE, ((2, 2, 5, 6), (2, 3, 4, 2)),
         lambda x, g: F.grid_sample(x, g, "nearest", "reflection", align_corners=True), A.GridSampleAttrs(1, 2, True),
         dtypes=(F32,), id="nearest_reflection"),
    Case(OpKind.COL2IM, ((2, 12, 12),), lambda x: F.fold(x, (5, 4), (2, 2)), A.Col2ImAttrs((5, 4), (2, 2)),
         dtypes=(F32,)),
    Case(OpKind.COL2IM, ((8, 9),), lambda x: F.fold(x, (4, 5), 2, 1, 1, 2),
         A.Col2ImAttrs((4, 5), (2, 2), (1, 1), (1, 1), (2, 2)), dtypes=(F32,), id="unbatched_strided"),
    Case(OpKind.GROUP_NORM, ((2, 6, 4, 5), (6,), (6,)), lambda x, w, b: _group_norm(x, 3, w, b),
         A.GroupNormAttrs(3)),
    Case(OpKind.GROUP_NORM, ((2, 4, 7),), lambda x: _group_norm(x, 2, eps=1e-3), A.GroupNormAttrs(2, 1e-3),
         id="no_affine"),
]

# quantized ops: independent torch expressions (torch's own quantizer, dequantized math)
I8, U8 = torch.int8, torch.uint8


def _deq_w(w, s):
    return w.float() * s.reshape((-1,) + (1,) * (w.dim() - 1))


def _int4(w, s, g):
    lo, hi = (w & 15).to(torch.int16), (w >> 4).to(torch.int16)
    q = torch.stack([lo, hi], 2).reshape(w.shape[0], -1)
    return (torch.where(q > 7, q - 16, q).float()) * s.repeat_interleave(g, 1)


def _torch_quantize(x):
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        return torch.quantize_per_tensor(x, 0.05, 7, torch.quint8).int_repr()


CASES += [
    Case(OpKind.QUANTIZE, ((3, 5),), _torch_quantize, A.QuantizeAttrs(0.05, 7), dtypes=(F32,)),
    Case(OpKind.DEQUANTIZE, ((3, 5),), lambda x: (x.float() - 7) * 0.05, A.QuantizeAttrs(0.05, 7), dtypes=(U8,)),
    Case(OpKind.QLINEAR_DYNAMIC, ((4, 32), (6, 32), (6,), (6,)),  # within per-row 8-bit rounding of x
         lambda x, w, s, b: F.linear(x, _deq_w(w, s), b), A.QLinearDynamicAttrs(), dtypes=(F32,),
         in_dtypes=(F32, I8, F32, F32), gen="positive", tol=0.1),
    Case(OpKind.LINEAR_WEIGHT_ONLY, ((4, 8), (6, 8), (6,), (6,)),
         lambda x, w, s, b: F.linear(x, _deq_w(w, s), b), A.WeightOnlyAttrs(8), dtypes=(F32,),
         in_dtypes=(F32, I8, F32, F32), id="int8"),
    Case(OpKind.LINEAR_WEIGHT_ONLY, ((4, 64), (6, 32), (6, 2)),
         lambda x, w, s: F.linear(x, _int4(w, s, 32)), A.WeightOnlyAttrs(4, 32), dtypes=(F32,),
         in_dtypes=(F32, U8, F32), id="int4", tol=1e-4),
    Case(OpKind.QLINEAR, ((4, 8), (6, 8), (6,), (6,)),
         lambda x, w, s, b: F.linear((x.float() - 3) * 0.1, _deq_w(w, s), b), A.QLinearAttrs(0.1, 3),
         dtypes=(U8,), in_dtypes=(U8, I8, F32, F32), tol=1e-4),
    Case(OpKind.QCONV2D, ((1, 4, 5, 5), (6, 4, 3, 3), (6,), (6,), (1, 6, 5, 5)),
         lambda x, w, s, b, r: torch.relu(F.conv2d((x.float() - 3) * 0.1, _deq_w(w, s), b, padding=1) + r),
         A.QConv2dAttrs(0.1, 3, padding=(1, 1), activation=A.Activation.RELU), dtypes=(U8,),
         in_dtypes=(U8, I8, F32, F32, F32), tol=1e-4),
]


# (op, case id, dtype) -> why it is expected to fail
EXPECTED_FAILURES: dict[tuple, str] = {}


def _params():
    out = []
    for c in CASES:
        for dt in c.dtypes:
            tag = f"{c.op.value}{'-' + c.id if c.id else ''}-{str(dt).removeprefix('torch.')}"
            marks = []
            why = EXPECTED_FAILURES.get((c.op, c.id, dt))
            if why:
                marks.append(pytest.mark.xfail(reason=why, strict=True))
            out.append(pytest.param(c, dt, id=tag, marks=marks))
    return out


def test_every_op_kind_has_a_case():
    covered = {c.op for c in CASES}
    elsewhere = {OpKind.SPARSE_LINEAR, OpKind.SPARSE_CONV2D}  # constant sparse operands: tests/sparse/
    missing = [k.value for k in OpKind if k not in covered and k is not OpKind.FALLBACK and k not in elsewhere]
    assert not missing, f"op kinds without an op-table case: {missing}"


@pytest.mark.parametrize("case,dtype", _params())
def test_op_against_torch(case: Case, dtype):
    in_dtypes = case.in_dtypes or (None,) * len(case.shapes)
    inputs = []
    for shape, idt in zip(case.shapes, in_dtypes):
        d = idt or dtype
        gen = case.gen if (idt is None or case.gen.startswith("index")) else "randn"
        if case.gen.startswith("index") and idt is None:
            gen = "randn"
        inputs.append(_make(shape, d, gen))
    for i, t in case.extra.get("fixed", {}).items():  # inputs that must hold particular values
        inputs[i] = t.to(inputs[i].dtype)
    if case.extra.get("mask_diag"):
        inputs[-1] = inputs[-1] | torch.eye(inputs[-1].shape[-1], dtype=torch.bool)  # no fully-masked rows
    b = GraphBuilder(case.op.value)
    vals = [b.input(f"x{i}", tuple(t.shape), DType.from_torch(t.dtype)) for i, t in enumerate(inputs)]
    out = b.add(case.op, *vals, attrs=case.attrs)
    outs = out if isinstance(out, tuple) else (out,)
    g = verify(b.build(outs))
    got = build_plan(g, "cpu").run(inputs)
    want = case.expect(*inputs)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for v, x, y in zip(outs, got, want):
        assert x.dtype == v.type.dtype.to_torch(), f"runtime dtype {x.dtype} != inferred {v.type}"
        assert tuple(x.shape) == tuple(v.type.shape), f"runtime shape {tuple(x.shape)} != inferred {v.type}"
        assert y.dtype == x.dtype and x.shape == y.shape, f"torch gives {y.dtype}{tuple(y.shape)}"
        if x.dtype.is_floating_point:
            atol, rtol = TOL[x.dtype]
            if case.tol and x.dtype == F32:
                atol = rtol = case.tol
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol, equal_nan=True)
        else:
            assert torch.equal(x, y)
