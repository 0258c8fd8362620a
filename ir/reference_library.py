"""What the library ops (``kiln.ir.ops_library``) mean: torch's own kernels, called as an
exported graph calls them, so each matches eager exactly (ties, NaN, duplicate indices)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import attrs as A
from .ops import OpKind
from .reference import epilogue, ref


@ref(OpKind.SORT)
def sort(ins, a: A.SortAttrs):
    # NaN sorts above every number, as in torch; an unstable sort is torch's own (on CPU its ties
    # are not in input order for long rows), so the indices match eager's exactly
    x = ins[0]
    v, i = torch.sort(x, dim=a.axis if x.dim() else 0, descending=a.descending, stable=a.stable)
    return v, i


@ref(OpKind.TOPK)
def topk(ins, a: A.TopKAttrs):
    x = ins[0]
    v, i = torch.topk(x, a.k, dim=a.axis if x.dim() else 0, largest=a.largest, sorted=a.sorted)
    return v, i


@ref(OpKind.SCATTER)
def scatter(ins, a: A.ScatterAttrs):
    x, idx, src = ins
    if a.reduce is A.ScatterReduce.NONE:
        return torch.scatter(x, a.axis, idx, src)
    return torch.scatter_reduce(x, a.axis, idx, src, a.reduce.value, include_self=a.include_self)


@ref(OpKind.INDEX_PUT)
def index_put(ins, a: A.IndexPutAttrs):
    x, v = ins[0], ins[1]
    idx: list = [None] * x.dim()
    for ax, t in zip(a.axes, ins[2:]):
        idx[ax] = t
    while idx and idx[-1] is None:
        idx.pop()
    return torch.ops.aten.index_put.default(x, idx, v, a.accumulate)  # (the Python binding takes no None)


@ref(OpKind.MAX_POOL3D)
def max_pool3d(ins, a: A.Pool3dAttrs):
    v, i = F.max_pool3d(ins[0], a.kernel, a.stride, a.padding, a.dilation, a.ceil_mode, return_indices=True)
    return v, i


@ref(OpKind.AVG_POOL3D)
def avg_pool3d(ins, a: A.Pool3dAttrs):
    return F.avg_pool3d(ins[0], a.kernel, a.stride, a.padding, a.ceil_mode, a.count_include_pad, a.divisor_override)


@ref(OpKind.ADAPTIVE_AVG_POOL3D)
def adaptive_avg_pool3d(ins, a: A.AdaptivePool3dAttrs):
    return torch.ops.aten._adaptive_avg_pool3d(ins[0], list(a.output_size))


@ref(OpKind.CDIST)
def cdist(ins, a: A.DistAttrs):
    return torch.ops.aten._cdist_forward(ins[0], ins[1], a.p, a.compute_mode)


@ref(OpKind.PDIST)
def pdist(ins, a: A.DistAttrs):
    return torch.ops.aten._pdist_forward(ins[0], a.p)


@ref(OpKind.EMBEDDING_BAG)
def embedding_bag(ins, a: A.EmbeddingBagAttrs):
    w, idx, off = ins[:3]
    psw = ins[3] if len(ins) > 3 else None
    out = torch.ops.aten._embedding_bag(w, idx, off, False, a.mode, False, psw, a.include_last_offset, a.padding_idx)
    return out[0]


@ref(OpKind.GRID_SAMPLE)
def grid_sample(ins, a: A.GridSampleAttrs):
    return torch.grid_sampler_2d(ins[0], ins[1], a.interpolation, a.padding, a.align_corners)


@ref(OpKind.COL2IM)
def col2im(ins, a: A.Col2ImAttrs):
    return torch.ops.aten.col2im(ins[0], list(a.output_size), list(a.kernel), list(a.dilation), list(a.padding),
                                 list(a.stride))


@ref(OpKind.GROUP_NORM)
def group_norm(ins, a: A.GroupNormAttrs):
    x = ins[0]
    w = ins[1] if len(ins) > 1 else None
    b = ins[2] if len(ins) > 2 else None
    dtype = x.dtype
    if dtype != torch.float64:  # float32 math, one rounding of the result to x's dtype
        x = x.float()
        w, b = (None if t is None else t.float() for t in (w, b))
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # torch's channels-last kernel takes the variance in one pass (E[x^2] - E[x]^2), which
        # loses it where an activation's mean is large beside its spread (python -m
        # kiln.bench.group_norm measures it): its contiguous kernel on a copy, back channels-last
        y = F.group_norm(x.contiguous(), a.groups, w, b, a.eps).contiguous(memory_format=torch.channels_last)
    else:
        y = F.group_norm(x, a.groups, w, b, a.eps)
    return epilogue(y, None, a.activation).to(dtype)
