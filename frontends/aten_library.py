"""ATen -> Kiln IR converters for the library ops (ir/ops_library.py: sorting, scatters,
3-D pooling, distances, sampling, bags of embeddings), and two exact decompositions into
converted ops: ``masked_scatter`` (a prefix count and a gather) and ``as_strided`` of a
contiguous tensor (a gather at positions computed at import). Each converter declines
(returns None, a named FALLBACK) where its op would not be exactly torch's.
"""
from __future__ import annotations

import math
import operator

import torch

from kiln.ir import DType, OpKind, Value
from kiln.ir import attrs as A
from kiln.ir.ops import broadcast_shapes

from .aten_converters import CONVERTERS

aten = torch.ops.aten
conv = CONVERTERS.register
_MAX_LITERAL_INDICES = 1 << 24  # as_strided's position table is a literal: keep it modest


def _ax(d: int, rank: int) -> int:
    return d % max(rank, 1)


def _arg(args, kw, i, name, default=None):
    return args[i] if len(args) > i else kw.get(name, default)


def _static(*vals: Value) -> bool:
    return all(v.type.is_static for v in vals)


# ----------------------------------------------------------------------------- sorting
@conv(aten.sort.default, aten.sort.stable)
def _sort(cx, args, kw, n):
    x = args[0]
    if n.target._overloadname == "stable":
        stable, dim, desc = bool(kw.get("stable") or False), kw.get("dim", -1), kw.get("descending", False)
    else:
        stable, dim, desc = False, _arg(args, kw, 1, "dim", -1), _arg(args, kw, 2, "descending", False)
    return cx.add(OpKind.SORT, x, attrs=A.SortAttrs(_ax(dim, x.type.rank), bool(desc), stable))


@conv(aten.topk.default)
def _topk(cx, args, kw, n):
    x, k = args[0], _arg(args, kw, 1, "k")
    if not isinstance(k, int):
        return None  # a k known only at run time
    dim, largest, srt = _arg(args, kw, 2, "dim", -1), _arg(args, kw, 3, "largest", True), _arg(args, kw, 4, "sorted", True)
    return cx.add(OpKind.TOPK, x, attrs=A.TopKAttrs(k, _ax(dim, x.type.rank), bool(largest), bool(srt)))


# ----------------------------------------------------------------------------- scatters
def _scatter(cx, x, dim, idx, src, reduce=A.ScatterReduce.NONE, include_self=True):
    if src.dtype is not x.dtype:
        return None  # torch refuses mixed dtypes: let it say so
    return cx.add(OpKind.SCATTER, x, idx, src, attrs=A.ScatterAttrs(_ax(dim, x.type.rank), reduce, bool(include_self)))


@conv(aten.scatter.src)
def _scatter_src(cx, args, kw, n):
    x, dim, idx, src = args[:4]
    return _scatter(cx, x, dim, idx, src)


@conv(aten.scatter.value)
def _scatter_value(cx, args, kw, n):
    x, dim, idx, value = args[:4]
    if isinstance(value, Value):
        return None
    # the value, in the data's dtype, at every index position: scatter.src of a broadcast source
    v = cx.cast(cx.scalar(value, x), x.dtype)
    src = v if idx.type.rank == 0 else cx.add(OpKind.EXPAND, v, attrs=A.ShapeAttrs(tuple(idx.shape)))
    return _scatter(cx, x, dim, idx, src)


@conv(aten.scatter_add.default)
def _scatter_add(cx, args, kw, n):
    x, dim, idx, src = args[:4]
    return _scatter(cx, x, dim, idx, src, A.ScatterReduce.SUM)


@conv(aten.scatter_reduce.two)
def _scatter_reduce(cx, args, kw, n):
    x, dim, idx, src, reduce = args[:5]
    include_self = _arg(args, kw, 5, "include_self", True)
    return _scatter(cx, x, dim, idx, src, A.ScatterReduce(reduce), include_self)


def _bool_mask_put(cx, x, mask, values, accumulate):
    """``x[mask] = v`` (or ``+=``) with one value: a select, each position chosen at most once."""
    if not (_static(values) and values.type.numel() == 1) or mask.type.rank > x.type.rank or \
            tuple(mask.shape) != tuple(x.shape[:mask.type.rank]) or values.dtype is not x.dtype:
        return None
    m = cx.reshape(mask, list(mask.shape) + [1] * (x.type.rank - mask.type.rank))
    v = cx.reshape(values, [])
    if accumulate:
        zero = cx.cast(cx.scalar(0, x), x.dtype)
        return cx.add(OpKind.ADD, x, cx.add(OpKind.WHERE, m, v, zero))
    return cx.add(OpKind.WHERE, m, v, x)


@conv(aten.index_put.default)
def _index_put(cx, args, kw, n):
    x, indices, values = args[:3]
    accumulate = bool(_arg(args, kw, 3, "accumulate", False))
    indices = list(indices)
    while indices and indices[-1] is None:
        indices.pop()
    if not indices or values.dtype is not x.dtype:
        return None
    if any(t is not None and t.dtype is DType.BOOL for t in indices):
        if len(indices) == 1:
            return _bool_mask_put(cx, x, indices[0], values, accumulate)
        return None  # masks beside other indices: a data-dependent number of positions
    axes = tuple(i for i, t in enumerate(indices) if t is not None)
    tensors = [t for t in indices if t is not None]
    return cx.add(OpKind.INDEX_PUT, x, values, *tensors, attrs=A.IndexPutAttrs(axes, accumulate))


@conv(aten.masked_scatter.default)
def _masked_scatter(cx, args, kw, n):
    """Position p (row-major over the broadcast shape) with mask[p] takes source's element
    number (count of set mask positions before p): a prefix sum and a gather, then a select."""
    x, mask, source = args[:3]
    if source.dtype is not x.dtype or mask.dtype is not DType.BOOL or not _static(x, mask, source) or \
            source.type.numel() == 0:
        return None
    shape = broadcast_shapes(x.shape, mask.shape)
    expand = lambda v: v if tuple(v.shape) == tuple(shape) else cx.add(  # noqa: E731
        OpKind.EXPAND, v, attrs=A.ShapeAttrs(tuple(shape)))
    xb, mb = expand(x), expand(mask)
    flat = cx.reshape(mb, [-1])
    count = cx.add(OpKind.CUMSUM, cx.cast(flat, DType.INT64), attrs=A.AxisAttrs(0))
    one, zero = cx.scalar(1), cx.scalar(0)
    pos = cx.add(OpKind.MAXIMUM, cx.add(OpKind.SUB, count, one), zero)  # unset positions read element 0, unused
    taken = cx.add(OpKind.TAKE, cx.reshape(source, [-1]), pos, attrs=A.AxisAttrs(0))
    return cx.add(OpKind.WHERE, mb, cx.reshape(taken, list(shape)), xb)


@conv(aten.as_strided.default)
def _as_strided(cx, args, kw, n):
    """A view of a contiguous tensor's own elements: a gather at positions computed once."""
    x, size, stride = args[0], list(args[1]), list(args[2])
    offset = _arg(args, kw, 3, "storage_offset")
    src = n.args[0].meta.get("val") if hasattr(n.args[0], "meta") else None
    if not isinstance(src, torch.Tensor) or not _static(x) or not src.is_contiguous() or \
            not all(isinstance(s, int) for s in size + stride) or math.prod(size) > _MAX_LITERAL_INDICES:
        return None
    base = int(src.storage_offset())
    rel = 0 if offset is None else int(offset) - base  # positions counted from the tensor's first element
    try:  # torch itself checks every position lies within the tensor's numel elements
        pos = torch.arange(max(x.type.numel(), 1) if x.type.numel() else 0).as_strided(size, stride, rel)
    except RuntimeError:
        return None  # it reads beyond the tensor (or before it): storage Kiln's values do not have
    if x.type.numel() == 0 and pos.numel():
        return None
    return cx.add(OpKind.TAKE, cx.reshape(x, [-1]), cx.literal(pos.clone()), attrs=A.AxisAttrs(0))


# ----------------------------------------------------------------------------- 3-D pooling
def _triple(v, default=None):
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return default
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(int(e) for e in (v * 3 if len(v) == 1 else v))


@conv(aten.max_pool3d_with_indices.default)
def _max_pool3d(cx, args, kw, n):
    x, k = args[0], _triple(args[1])
    a = A.Pool3dAttrs(k, _triple(_arg(args, kw, 2, "stride"), k), _triple(_arg(args, kw, 3, "padding", 0)),
                      _triple(_arg(args, kw, 4, "dilation", 1)), bool(_arg(args, kw, 5, "ceil_mode", False)))
    return cx.add(OpKind.MAX_POOL3D, x, attrs=a)


@conv(aten.avg_pool3d.default)
def _avg_pool3d(cx, args, kw, n):
    x, k = args[0], _triple(args[1])
    div = _arg(args, kw, 6, "divisor_override")
    a = A.Pool3dAttrs(k, _triple(_arg(args, kw, 2, "stride"), k), _triple(_arg(args, kw, 3, "padding", 0)),
                      (1, 1, 1), bool(_arg(args, kw, 4, "ceil_mode", False)),
                      bool(_arg(args, kw, 5, "count_include_pad", True)), None if div is None else int(div))
    return cx.add(OpKind.AVG_POOL3D, x, attrs=a)


@conv(aten._adaptive_avg_pool3d.default)
def _adaptive_avg_pool3d(cx, args, kw, n):
    x, out = args[0], _triple(args[1])
    if out is None or any(not isinstance(d, int) for d in out):
        return None
    return cx.add(OpKind.ADAPTIVE_AVG_POOL3D, x, attrs=A.AdaptivePool3dAttrs(out))


# ----------------------------------------------------------------------------- distances, sampling, bags
@conv(aten._cdist_forward.default)
def _cdist(cx, args, kw, n):
    x1, x2, p, mode = args[:4]
    return cx.add(OpKind.CDIST, x1, x2, attrs=A.DistAttrs(float(p), None if mode is None else int(mode)))


@conv(aten._pdist_forward.default)
def _pdist(cx, args, kw, n):
    x = args[0]
    if not _static(x):
        return None
    return cx.add(OpKind.PDIST, x, attrs=A.DistAttrs(float(_arg(args, kw, 1, "p", 2.0))))


@conv(aten._embedding_bag.default, aten._embedding_bag_forward_only.default, aten.embedding_bag.default,
      aten.embedding_bag.padding_idx)
def _embedding_bag(cx, args, kw, n):
    w, idx, off = args[:3]
    scale_grad, mode, sparse, psw = [_arg(args, kw, i, k, d) for i, k, d in
                                     ((3, "scale_grad_by_freq", False), (4, "mode", 0), (5, "sparse", False),
                                      (6, "per_sample_weights", None))]
    last, pad = _arg(args, kw, 7, "include_last_offset", False), _arg(args, kw, 8, "padding_idx", -1)
    if n.target.overloadpacket is aten.embedding_bag:
        # embedding_bag counts a negative padding index from the end, None is none;
        # _embedding_bag (the op's own attribute) takes -1 as none
        pad = -1 if pad is None else (pad + w.shape[0] if pad < 0 else pad)
    if off is None:
        return None
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in n.users):
        return None  # offset2bag / bag sizes / max indices are read (training): torch computes them
    ins = [w, idx, off] + ([psw] if psw is not None else [])
    out = cx.add(OpKind.EMBEDDING_BAG, *ins, attrs=A.EmbeddingBagAttrs(int(mode), bool(last), int(pad)))
    return out, None, None, None


@conv(aten.grid_sampler_2d.default)
def _grid_sampler_2d(cx, args, kw, n):
    x, grid, interp, pad, align = args[:5]
    return cx.add(OpKind.GRID_SAMPLE, x, grid, attrs=A.GridSampleAttrs(int(interp), int(pad), bool(align)))


@conv(aten.col2im.default)
def _col2im(cx, args, kw, n):
    x, out, k, dil, pad, stride = args[:6]
    pair = lambda v: (int(v[0]), int(v[-1])) if isinstance(v, (list, tuple)) else (int(v), int(v))  # noqa: E731
    if not all(isinstance(e, int) for e in list(out)):
        return None
    return cx.add(OpKind.COL2IM, x, attrs=A.Col2ImAttrs(pair(out), pair(k), pair(dil), pair(pad), pair(stride)))
