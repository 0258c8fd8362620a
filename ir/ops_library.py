"""Library ops: sorting, scatters, 3-D pooling, distances, sampling, bags of embeddings, group norms.

Each runs one torch kernel (its reference, ``kiln.ir.reference_library``; a group norm
over a channels-last image also has Kiln's own, ``kernels/norm_cpu.py``) and has no
generated code, so each is a group of its own (category COMPUTE: the partitioner gives it
no injective producers, and its elementwise consumers form the group's generated tail).
Shapes are inferred here like every op's; the meaning is torch's, exactly.
"""
from __future__ import annotations

from . import attrs as A
from .dtypes import DType
from .ops import Category, IRTypeError, OpKind, broadcast_shapes, conv_out, op
from .types import TensorType

_INDEX = (DType.INT64, DType.INT32)


def _err(kind: str, msg: str):
    raise IRTypeError(f"{kind}: {msg}")


def _t(x: TensorType, dtype=None, shape=None) -> TensorType:
    return TensorType(dtype or x.dtype, tuple(x.shape if shape is None else shape))


def _axis_ok(kind: str, axis: int, rank: int):
    if not 0 <= axis < max(rank, 1):
        _err(kind, f"axis {axis} out of range for rank {rank} (normalized axes only)")


@op(OpKind.SORT, A.SortAttrs, category=Category.COMPUTE)
def _sort(ins, a):
    x = ins[0]
    _axis_ok("sort", a.axis, x.rank)
    return (_t(x), TensorType(DType.INT64, x.shape))


@op(OpKind.TOPK, A.TopKAttrs, category=Category.COMPUTE)
def _topk(ins, a):
    x = ins[0]
    _axis_ok("topk", a.axis, x.rank)
    size = x.shape[a.axis] if x.rank else 1
    if a.k < 0 or (isinstance(size, int) and a.k > size):
        _err("topk", f"k {a.k} out of range for size {size}")
    shape = list(x.shape)
    if x.rank:
        shape[a.axis] = a.k
    return (_t(x, shape=shape), TensorType(DType.INT64, tuple(shape)))


@op(OpKind.SCATTER, A.ScatterAttrs, operands=("data", "indices", "src"), category=Category.COMPUTE)
def _scatter(ins, a):
    x, idx, src = ins
    if idx.dtype not in _INDEX:
        _err("scatter", f"indices must be int64/int32, got {idx.dtype.value}")
    if not (x.rank == idx.rank == src.rank or (x.rank == 0 and idx.rank <= 1 and src.rank <= 1)):
        _err("scatter", f"data {x.shape}, indices {idx.shape} and src {src.shape} must have one rank")
    _axis_ok("scatter", a.axis, x.rank)
    for i in range(idx.rank):
        d, s = idx.shape[i], src.shape[i]
        if isinstance(d, int) and isinstance(s, int) and d > s:
            _err("scatter", f"indices {idx.shape} larger than src {src.shape}")
        if i != a.axis and isinstance(d, int) and isinstance(x.shape[i], int) and d > x.shape[i]:
            _err("scatter", f"indices {idx.shape} larger than data {x.shape} off the axis")
    if src.dtype != x.dtype:
        _err("scatter", f"src dtype {src.dtype.value} != data dtype {x.dtype.value}")
    if a.reduce is A.ScatterReduce.MEAN and x.dtype is DType.BOOL:
        _err("scatter", "a mean of booleans")
    return (_t(x),)


def index_put_shape(x: TensorType, idx: list, axes: tuple[int, ...]):
    """The shape ``data[idx...]`` has (torch's advanced indexing): the broadcast index shape
    where the indexed dims were when they are adjacent, else in front."""
    b = broadcast_shapes(*(t.shape for t in idx))
    rest = [d for i, d in enumerate(x.shape) if i not in axes]
    if list(axes) == list(range(axes[0], axes[0] + len(axes))):
        return tuple(rest[:axes[0]]) + b + tuple(rest[axes[0]:])
    return b + tuple(rest)


@op(OpKind.INDEX_PUT, A.IndexPutAttrs, operands=("data", "values", "indices*"), category=Category.COMPUTE)
def _index_put(ins, a):
    x, v, idx = ins[0], ins[1], list(ins[2:])
    if not idx or len(idx) != len(a.axes) or list(a.axes) != sorted(set(a.axes)) or \
            any(not 0 <= ax < x.rank for ax in a.axes):
        _err("index_put", f"axes {a.axes} must be sorted, unique, within rank {x.rank}, one per index tensor")
    if any(t.dtype not in _INDEX for t in idx):
        _err("index_put", "index tensors must be int32/int64")
    if v.dtype != x.dtype:
        _err("index_put", f"values dtype {v.dtype.value} != data dtype {x.dtype.value}")
    try:
        target = index_put_shape(x, idx, a.axes)
        ok = broadcast_shapes(v.shape, target) == tuple(target)
    except IRTypeError as e:
        _err("index_put", str(e))
    if not ok:
        _err("index_put", f"values {v.shape} do not broadcast to the indexed shape {target}")
    return (_t(x),)


def _pool3d_out(kind, x, kernel, stride, padding, dilation, ceil):
    if x.rank not in (4, 5):
        _err(kind, f"expected a 4-D or 5-D input, got {x.shape}")
    out = [conv_out(x.shape[x.rank - 3 + i], kernel[i], stride[i], padding[i], dilation[i], ceil) for i in range(3)]
    if any(isinstance(o, int) and o <= 0 for o in out):
        _err(kind, f"input {x.shape} too small for kernel {kernel}")
    return x.shape[:x.rank - 3] + tuple(out)


@op(OpKind.MAX_POOL3D, A.Pool3dAttrs, category=Category.COMPUTE)
def _max_pool3d(ins, a):
    x = ins[0]
    shape = _pool3d_out("max_pool3d", x, a.kernel, a.stride, a.padding, a.dilation, a.ceil_mode)
    return (_t(x, shape=shape), TensorType(DType.INT64, shape))


@op(OpKind.AVG_POOL3D, A.Pool3dAttrs, category=Category.COMPUTE)
def _avg_pool3d(ins, a):
    x = ins[0]
    if not x.dtype.is_float:
        _err("avg_pool3d", "input must be floating point")
    return (_t(x, shape=_pool3d_out("avg_pool3d", x, a.kernel, a.stride, a.padding, (1, 1, 1), a.ceil_mode)),)


@op(OpKind.ADAPTIVE_AVG_POOL3D, A.AdaptivePool3dAttrs, category=Category.COMPUTE)
def _adaptive_avg_pool3d(ins, a):
    x = ins[0]
    if x.rank not in (4, 5) or not x.dtype.is_float:
        _err("adaptive_avg_pool3d", f"expected a 4-D or 5-D float input, got {x!r}")
    return (_t(x, shape=x.shape[:x.rank - 3] + tuple(a.output_size)),)


@op(OpKind.CDIST, A.DistAttrs, operands=("x1", "x2"), category=Category.COMPUTE)
def _cdist(ins, a):
    x1, x2 = ins
    if x1.rank < 2 or x2.rank < 2 or x1.shape[-1] != x2.shape[-1] or not x1.dtype.is_float or x1.dtype != x2.dtype:
        _err("cdist", f"x1 {x1!r} and x2 {x2!r} must be float, of one dtype, with one feature size")
    if a.p < 0:
        _err("cdist", f"p must be non-negative, got {a.p}")
    batch = broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    return (TensorType(x1.dtype, batch + (x1.shape[-2], x2.shape[-2])),)


@op(OpKind.PDIST, A.DistAttrs, category=Category.COMPUTE)
def _pdist(ins, a):
    x = ins[0]
    if x.rank != 2 or not x.dtype.is_float or not isinstance(x.shape[0], int):
        _err("pdist", f"expected a static 2-D float input, got {x!r}")
    if a.p < 0:
        _err("pdist", f"p must be non-negative, got {a.p}")
    n = x.shape[0]
    return (TensorType(x.dtype, (n * (n - 1) // 2,)),)


@op(OpKind.EMBEDDING_BAG, A.EmbeddingBagAttrs, operands=("weight", "indices", "offsets", "per_sample_weights?"),
    category=Category.COMPUTE)
def _embedding_bag(ins, a):
    w, idx, off = ins[:3]
    psw = ins[3] if len(ins) > 3 else None
    if w.rank != 2 or idx.rank != 1 or off.rank != 1 or idx.dtype not in _INDEX or off.dtype not in _INDEX:
        _err("embedding_bag", f"weight {w!r}, indices {idx!r}, offsets {off!r}: need 2-D, 1-D int, 1-D int")
    if a.mode not in (0, 1, 2):
        _err("embedding_bag", f"mode {a.mode} is not 0 (sum), 1 (mean) or 2 (max)")
    if psw is not None and (a.mode != 0 or tuple(psw.shape) != tuple(idx.shape)):
        _err("embedding_bag", "per-sample weights go with mode sum, one per index")
    bags = off.shape[0] - (1 if a.include_last_offset else 0)
    return (TensorType(w.dtype, (bags, w.shape[1])),)


@op(OpKind.GRID_SAMPLE, A.GridSampleAttrs, operands=("x", "grid"), category=Category.COMPUTE)
def _grid_sample(ins, a):
    x, g = ins
    if x.rank != 4 or g.rank != 4 or g.shape[3] != 2 or g.shape[0] != x.shape[0] or x.dtype != g.dtype or \
            not x.dtype.is_float:
        _err("grid_sample", f"input {x!r} and grid {g!r}: need (N, C, H, W) and (N, H', W', 2) of one float dtype")
    if a.interpolation not in (0, 1, 2) or a.padding not in (0, 1, 2):
        _err("grid_sample", f"interpolation {a.interpolation} / padding {a.padding} out of range")
    return (TensorType(x.dtype, (x.shape[0], x.shape[1], g.shape[1], g.shape[2])),)


@op(OpKind.COL2IM, A.Col2ImAttrs, category=Category.COMPUTE)
def _col2im(ins, a):
    x = ins[0]
    if x.rank not in (2, 3) or not x.dtype.is_float:
        _err("col2im", f"expected (N, C*kh*kw, L) or (C*kh*kw, L) float columns, got {x!r}")
    k = a.kernel[0] * a.kernel[1]
    ck, length = x.shape[-2], x.shape[-1]
    blocks = [conv_out(a.output_size[i], a.kernel[i], a.stride[i], a.padding[i], a.dilation[i]) for i in range(2)]
    if not isinstance(ck, int) or ck % k or (isinstance(length, int) and length != blocks[0] * blocks[1]):
        _err("col2im", f"columns {x.shape} do not match kernel {a.kernel} over output {a.output_size}")
    return (_t(x, shape=x.shape[:-2] + (ck // k,) + tuple(a.output_size)),)


@op(OpKind.GROUP_NORM, A.GroupNormAttrs, operands=("x", "weight?", "bias?"), category=Category.COMPUTE)
def _group_norm(ins, a):
    x = ins[0]
    c = x.shape[1] if x.rank >= 2 else None
    if x.rank < 2 or not x.dtype.is_float or not isinstance(c, int):
        _err("group_norm", f"expected a float (N, C, ...) input with a static C, got {x!r}")
    if a.groups < 1 or c % a.groups:
        _err("group_norm", f"{c} channels do not split into {a.groups} groups")
    for p in ins[1:]:
        if p is not None and tuple(p.shape) != (c,):
            _err("group_norm", f"affine parameter shape {p.shape} != ({c},)")
    return (_t(x),)
