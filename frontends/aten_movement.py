"""More ATen -> Kiln IR converters (convolutions, pooling, indexing, data movement): what the
model suite and PyTorch's Core ATen opset need beyond ``aten_converters.py``.

Each is an exact rewrite into Kiln ops or declines (None: a named FALLBACK):

* 1-D convolutions and pools run as their 2-D ops over a height-1 image; ``padding="same"``
  becomes explicit (asymmetric) padding;
* ``x[:, idx]`` (index with None entries) permutes the indexed axes to the front, ``roll``
  and ``slice_scatter`` are slices and a concat, ``unfold``/``im2col`` slices and a concat;
* ``upsample_*`` (nearest, bilinear, bicubic) are gathers of the source rows/columns each
  output reads, weighted: the indices and weights come from running torch's own upsample
  kernel on an identity basis, so they are torch's, border handling included;
* ``einsum`` contracts operands pairwise as permute + reshape + batched matmul.
"""
from __future__ import annotations

import math
import operator
import string

import torch

from kiln.ir import DType, OpKind, Value
from kiln.ir import attrs as A

from .aten_converters import CONVERTERS

aten = torch.ops.aten
conv = CONVERTERS.register


def _ax(d: int, rank: int) -> int:
    return d % max(rank, 1)


def _ints(v, n: int) -> tuple[int, ...] | None:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(v) == 1:
        v = v * n
    return tuple(int(x) for x in v) if len(v) == n else None


def _slice(cx, x: Value, axis: int, start: int, end: int, step: int = 1) -> Value:
    size = x.shape[axis]
    end = min(end, size)
    if (start, end, step) == (0, size, 1):
        return x
    return cx.add(OpKind.SLICE, x, attrs=A.SliceAttrs(axis, start, end, step))


def _concat(cx, xs: list[Value], axis: int) -> Value:
    xs = [x for x in xs if x.shape[axis] != 0] or xs[:1]
    return xs[0] if len(xs) == 1 else cx.add(OpKind.CONCAT, *xs, attrs=A.AxisAttrs(axis))


def _permute(cx, x: Value, perm) -> Value:
    perm = tuple(perm)
    if perm == tuple(range(x.type.rank)):
        return x
    return cx.add(OpKind.PERMUTE, x, attrs=A.PermuteAttrs(perm))


def _pad_amounts(x: Value, pairs: dict[int, tuple[int, int]]) -> tuple[int, ...]:
    pads = [0] * (2 * x.type.rank)
    for axis, (lo, hi) in pairs.items():
        pads[2 * axis], pads[2 * axis + 1] = lo, hi
    return tuple(pads)


def _zero_pad(cx, x: Value, pairs: dict[int, tuple[int, int]]) -> Value:
    if not any(lo or hi for lo, hi in pairs.values()):
        return x
    return cx.add(OpKind.PAD, x, attrs=A.PadAttrs(_pad_amounts(x, pairs), A.PadMode.CONSTANT, 0.0))


# ----------------------------------------------------------------------------- convolutions
def _conv_nd(cx, x, w, b, stride, padding, dilation, groups, nd: int):
    """conv1d/conv2d (padding ints or "same"/"valid") as Kiln's CONV2D."""
    if x.type.rank not in (nd + 1, nd + 2) or w.type.rank != nd + 2 or not x.dtype.is_float:
        return None
    unbatched = x.type.rank == nd + 1
    if unbatched:
        x = cx.reshape(x, [1] + list(x.shape))
    if nd == 1:  # (N, C, L) -> (N, C, 1, L); weight (O, C/g, K) -> (O, C/g, 1, K)
        x = cx.reshape(x, [x.shape[0], x.shape[1], 1, x.shape[2]])
        w = cx.reshape(w, [w.shape[0], w.shape[1], 1, w.shape[2]])
    k = tuple(w.shape[2:])
    stride, dilation = _ints(stride, nd), _ints(dilation, nd)
    if stride is None or dilation is None:
        return None
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0,) * nd
        elif padding == "same":
            totals = [d * (kk - 1) for d, kk in zip(dilation, k[-nd:])]
            lo = [t // 2 for t in totals]
            hi = [t - t // 2 for t in totals]
            if lo != hi:  # torch puts the odd element on the high side: pad explicitly
                off = 4 - nd
                x = _zero_pad(cx, x, {off + i: (lo[i], hi[i]) for i in range(nd)})
                pad = (0,) * nd
            else:
                pad = tuple(lo)
        else:
            return None
    else:
        pad = _ints(padding, nd)
        if pad is None:
            return None
    if nd == 1:
        stride, pad, dilation = (1,) + stride, (0,) + pad, (1,) + dilation
    ins = [x, w] + ([b] if b is not None else [])
    y = cx.add(OpKind.CONV2D, *ins, attrs=A.Conv2dAttrs(stride, pad, dilation, int(groups)))
    if nd == 1:
        y = cx.reshape(y, [y.shape[0], y.shape[1], y.shape[3]])
    if unbatched:
        y = cx.reshape(y, list(y.shape[1:]))
    return y


def _conv_args(args, kw):
    get = lambda i, name, default: args[i] if len(args) > i else kw.get(name, default)  # noqa: E731
    return (args[0], args[1], get(2, "bias", None), get(3, "stride", 1), get(4, "padding", 0),
            get(5, "dilation", 1), get(6, "groups", 1))


@conv(aten.conv1d)
def _conv1d(cx, args, kw, n):
    x, w, b, s, p, d, g = _conv_args(args, kw)
    return _conv_nd(cx, x, w, b, s, p, d, g, 1)


@conv(aten.conv2d.padding)
def _conv2d_padding(cx, args, kw, n):
    x, w, b, s, p, d, g = _conv_args(args, kw)
    return _conv_nd(cx, x, w, b, s, p, d, g, 2)


_convolution_2d = CONVERTERS.table.get(aten.convolution)


@conv(aten.convolution.default)
def _convolution(cx, args, kw, n):
    x, w, b, stride, padding, dilation, transposed, _out_pad, groups = args
    if not transposed and w.type.rank == 3:
        return _conv_nd(cx, x, w, b, stride, padding, dilation, groups, 1)
    return _convolution_2d(cx, args, kw, n) if _convolution_2d is not None else None


# ----------------------------------------------------------------------------- 1-D pooling
def _as_2d(cx, x, fn):
    """Run a 2-D op on (N, C, 1, L) and return (N, C, L') (unbatched (C, L) too)."""
    unbatched = x.type.rank == 2
    if unbatched:
        x = cx.reshape(x, [1] + list(x.shape))
    y = fn(cx.reshape(x, [x.shape[0], x.shape[1], 1, x.shape[2]]))
    if y is None:
        return None
    y = cx.reshape(y, [y.shape[0], y.shape[1], y.shape[3]])
    return cx.reshape(y, list(y.shape[1:])) if unbatched else y


@conv(aten.adaptive_avg_pool1d)
def _adaptive_avg_pool1d(cx, args, kw, n):
    x, out = args[0], _ints(args[1], 1)[0]
    if x.type.rank not in (2, 3) or not x.dtype.is_float:
        return None
    if out == 1:
        return cx.add(OpKind.MEAN, x, attrs=A.ReduceAttrs((x.type.rank - 1,), True))
    return _as_2d(cx, x, lambda y: cx.add(OpKind.ADAPTIVE_AVG_POOL2D, y, attrs=A.AdaptivePoolAttrs((1, out))))


@conv(aten.avg_pool1d)
def _avg_pool1d(cx, args, kw, n):
    x, k = args[0], _ints(args[1], 1)[0]
    s = _ints(args[2], 1)[0] if len(args) > 2 and args[2] else k
    p = _ints(args[3], 1)[0] if len(args) > 3 else 0
    ceil = bool(args[4]) if len(args) > 4 else False
    include = bool(args[5]) if len(args) > 5 else True
    if x.type.rank not in (2, 3) or not x.dtype.is_float:
        return None
    a = A.Pool2dAttrs((1, k), (1, s), (0, p), (1, 1), ceil, include)
    return _as_2d(cx, x, lambda y: cx.add(OpKind.AVG_POOL2D, y, attrs=a))


@conv(aten.max_pool1d)
def _max_pool1d(cx, args, kw, n):
    x, k = args[0], _ints(args[1], 1)[0]
    s = _ints(args[2], 1)[0] if len(args) > 2 and args[2] else k
    p = _ints(args[3], 1)[0] if len(args) > 3 else 0
    d = _ints(args[4], 1)[0] if len(args) > 4 else 1
    ceil = bool(args[5]) if len(args) > 5 else False
    if x.type.rank not in (2, 3) or not x.dtype.is_float:
        return None
    a = A.Pool2dAttrs((1, k), (1, s), (0, p), (1, d), ceil)
    return _as_2d(cx, x, lambda y: cx.add(OpKind.MAX_POOL2D, y, attrs=a))


_max_pool_values = CONVERTERS.table.get(aten.max_pool2d_with_indices)


@conv(aten.max_pool2d_with_indices.default)
def _max_pool2d_with_indices(cx, args, kw, n):
    # Kiln computes the values only: convert when nothing reads the indices (the decomposed
    # spelling of F.max_pool2d), decline when something does (never answer None for them)
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in n.users):
        return None
    return _max_pool_values(cx, args, kw, n) if _max_pool_values is not None else None


# ----------------------------------------------------------------------------- indexing
@conv(aten.index.Tensor)
def _index(cx, args, kw, n):
    x, idx = args[0], list(args[1])
    if any(i is not None and (i.dtype is DType.BOOL or i.dtype is DType.UINT8) for i in idx):
        return None  # a boolean mask selects a data-dependent number of elements
    pos = [k for k, i in enumerate(idx) if i is not None]
    if not pos:
        return x
    if len(pos) == 1:  # one index tensor: a take along its axis, index dims in its place
        return cx.add(OpKind.TAKE, x, idx[pos[0]], attrs=A.AxisAttrs(pos[0]))
    rest = [d for d in range(x.type.rank) if d not in pos]
    y = cx.add(OpKind.INDEX, _permute(cx, x, pos + rest), *[idx[k] for k in pos])
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    if adjacent and pos[0] > 0:  # adjacent index tensors: their broadcast dims stay in place
        nb = y.type.rank - len(rest)
        order = list(range(nb, nb + pos[0])) + list(range(nb)) + list(range(nb + pos[0], y.type.rank))
        y = _permute(cx, y, order)
    return y


_index_select_any = CONVERTERS.table.get(aten.index_select)


@conv(aten.index_select.default)
def _index_select(cx, args, kw, n):
    if args[0].type.rank == 0 or _index_select_any is None:
        return None  # torch selects from a 0-d tensor as if it had one element; not a take
    return _index_select_any(cx, args, kw, n)


@conv(aten.roll)
def _roll(cx, args, kw, n):
    x = args[0]
    shifts = args[1] if len(args) > 1 else kw["shifts"]
    dims = args[2] if len(args) > 2 else kw.get("dims", [])
    shifts = list(shifts) if isinstance(shifts, (list, tuple)) else [shifts]
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if not dims:
        flat = cx.reshape(x, (-1,))
        return cx.reshape(_roll_axis(cx, flat, shifts[0], 0), x.shape)
    for s, d in zip(shifts, dims):
        x = _roll_axis(cx, x, int(s), _ax(d, x.type.rank))
    return x


def _roll_axis(cx, x, shift: int, axis: int) -> Value:
    size = x.shape[axis]
    if size == 0 or shift % size == 0:
        return x
    s = shift % size
    return _concat(cx, [_slice(cx, x, axis, size - s, size), _slice(cx, x, axis, 0, size - s)], axis)


@conv(aten.flip)
def _flip(cx, args, kw, n):
    x, dims = args[0], args[1]
    for d in dims:
        a = _ax(d, x.type.rank)
        x = cx.add(OpKind.TAKE, x, cx.literal(torch.arange(x.shape[a] - 1, -1, -1)), attrs=A.AxisAttrs(a))
    return x


@conv(aten.narrow)
def _narrow(cx, args, kw, n):
    x, dim, start, length = args
    if isinstance(start, Value):
        return None
    a = _ax(dim, x.type.rank)
    start = start + x.shape[a] if start < 0 else start
    return _slice(cx, x, a, start, start + length)


@conv(aten.unfold)
def _unfold(cx, args, kw, n):
    x, dim, size, step = args
    a = _ax(dim, x.type.rank)
    if x.type.rank == 0:
        return None
    count = (x.shape[a] - size) // step + 1
    # window element j of every window is the strided slice j, j + step, ...
    pieces = [cx.reshape(_slice(cx, x, a, j, j + step * (count - 1) + 1, step), list(_shape_with(x, a, count)) + [1])
              for j in range(size)]
    return _concat(cx, pieces, x.type.rank)


def _shape_with(x: Value, axis: int, size: int):
    s = list(x.shape)
    s[axis] = size
    return s


@conv(aten.im2col)
def _im2col(cx, args, kw, n):
    x, k, d, p, s = args[0], _ints(args[1], 2), _ints(args[2], 2), _ints(args[3], 2), _ints(args[4], 2)
    if None in (k, d, p, s) or x.type.rank not in (3, 4):
        return None
    unbatched = x.type.rank == 3
    if unbatched:
        x = cx.reshape(x, [1] + list(x.shape))
    x = _zero_pad(cx, x, {2: (p[0], p[0]), 3: (p[1], p[1])})
    nb, c, h, w = x.shape
    oh, ow = (h - d[0] * (k[0] - 1) - 1) // s[0] + 1, (w - d[1] * (k[1] - 1) - 1) // s[1] + 1
    pieces = []
    for i in range(k[0]):
        for j in range(k[1]):
            t = _slice(cx, x, 2, i * d[0], i * d[0] + s[0] * (oh - 1) + 1, s[0])
            t = _slice(cx, t, 3, j * d[1], j * d[1] + s[1] * (ow - 1) + 1, s[1])
            pieces.append(cx.reshape(t, [nb, c, 1, oh * ow]))
    y = cx.reshape(_concat(cx, pieces, 2), [nb, c * k[0] * k[1], oh * ow])  # channel-major, as torch
    return cx.reshape(y, list(y.shape[1:])) if unbatched else y


_PAD_MODES = {aten.reflection_pad1d: A.PadMode.REFLECT, aten.reflection_pad2d: A.PadMode.REFLECT,
              aten.reflection_pad3d: A.PadMode.REFLECT, aten.replication_pad1d: A.PadMode.REPLICATE,
              aten.replication_pad2d: A.PadMode.REPLICATE, aten.replication_pad3d: A.PadMode.REPLICATE}


@conv(*_PAD_MODES)
def _pad_mode(cx, args, kw, n):
    x, pad = args[0], [int(p) for p in args[1]]
    if any(p < 0 for p in pad) or not x.dtype.is_float:
        return None
    r = x.type.rank
    pairs = {r - 1 - i: (pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)}  # from the last axis
    return cx.add(OpKind.PAD, x, attrs=A.PadAttrs(_pad_amounts(x, pairs), _PAD_MODES[n.target.overloadpacket], 0.0))


@conv(aten.diagonal)
def _diagonal(cx, args, kw, n):
    x = args[0]
    get = lambda i, name, default: args[i] if len(args) > i else kw.get(name, default)  # noqa: E731
    off, d1, d2 = get(1, "offset", 0), _ax(get(2, "dim1", 0), x.type.rank), _ax(get(3, "dim2", 1), x.type.rank)
    if d1 == d2:
        return None
    rest = [d for d in range(x.type.rank) if d not in (d1, d2)]
    y = _permute(cx, x, rest + [d1, d2])
    rows, cols = x.shape[d1], x.shape[d2]
    count = max(0, min(rows, cols - off) if off >= 0 else min(rows + off, cols))
    flat = cx.reshape(y, [x.shape[d] for d in rest] + [rows * cols])
    start = off if off >= 0 else -off * cols
    if count == 0:
        return None
    # the diagonal of a row-major (rows, cols) block is every (cols + 1)-th element from its start
    return _slice(cx, flat, len(rest), start, start + (cols + 1) * (count - 1) + 1, cols + 1)


@conv(aten.slice_scatter)
def _slice_scatter(cx, args, kw, n):
    x, src = args[0], args[1]
    get = lambda i, name, default: args[i] if len(args) > i else kw.get(name, default)  # noqa: E731
    dim, start, end, step = get(2, "dim", 0), get(3, "start", None), get(4, "end", None), get(5, "step", 1)
    a = _ax(dim, x.type.rank)
    size = x.shape[a]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    start, end = max(0, min(size, start)), max(0, min(size, end))
    if step != 1:
        return None
    src = cx.cast(src, x.dtype)
    return _concat(cx, [_slice(cx, x, a, 0, start), src, _slice(cx, x, a, end, size)], a)


@conv(aten.select_scatter)
def _select_scatter(cx, args, kw, n):
    x, src, dim, index = args
    a = _ax(dim, x.type.rank)
    index = index + x.shape[a] if index < 0 else index
    src = cx.reshape(src, list(src.shape[:a]) + [1] + list(src.shape[a:]))
    return _slice_scatter(cx, [x, src, a, index, index + 1, 1], {}, n)


@conv(aten.copy)
def _copy(cx, args, kw, n):
    x, src = args[0], args[1]
    src = cx.cast(src, x.dtype)
    if tuple(src.shape) != tuple(x.shape):
        src = cx.add(OpKind.EXPAND, cx.reshape(src, [1] * (x.type.rank - src.type.rank) + list(src.shape)),
                     attrs=A.ShapeAttrs(tuple(x.shape)))
    return src


@conv(aten.fill)
def _fill(cx, args, kw, n):
    x, value = args[0], args[1]
    if not isinstance(value, Value):
        return cx.literal(torch.full(tuple(x.shape), value, dtype=x.dtype.to_torch()))
    v = cx.cast(value, x.dtype)
    if x.type.rank == 0:
        return v
    return cx.add(OpKind.EXPAND, cx.reshape(v, [1] * x.type.rank), attrs=A.ShapeAttrs(tuple(x.shape)))


@conv(aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided)
def _empty(cx, args, kw, n):
    val = n.meta.get("val")  # contents are unspecified: zeros, the same on every run
    if not isinstance(val, torch.Tensor):
        return None
    return cx.literal(torch.zeros(tuple(val.shape), dtype=val.dtype))


@conv(aten.meshgrid)
def _meshgrid(cx, args, kw, n):
    xs = list(args[0])
    indexing = kw.get("indexing", args[1] if len(args) > 1 else "ij")
    if any(x.type.rank > 1 for x in xs):
        return None
    sizes = [x.shape[0] if x.type.rank else 1 for x in xs]
    order = list(range(len(xs)))
    if indexing == "xy" and len(xs) >= 2:
        order[0], order[1] = 1, 0
    full = [sizes[order[i]] for i in range(len(xs))]
    outs = []
    for i, x in enumerate(xs):
        pos = order.index(i)
        shape = [1] * len(xs)
        shape[pos] = sizes[i]
        outs.append(cx.add(OpKind.EXPAND, cx.reshape(x, shape), attrs=A.ShapeAttrs(tuple(full)))
                    if tuple(shape) != tuple(full) else cx.reshape(x, shape))
    return tuple(outs)


@conv(aten.repeat)
def _repeat(cx, args, kw, n):
    x, reps = args[0], [int(r) for r in args[1]]
    x = cx.reshape(x, [1] * (len(reps) - x.type.rank) + list(x.shape))
    inter, big, final = [], [], []
    for r, s in zip(reps, x.shape):
        inter += [1, s]
        big += [r, s]
        final.append(r * s)
    y = cx.reshape(x, inter)
    if tuple(big) != tuple(inter):
        y = cx.add(OpKind.EXPAND, y, attrs=A.ShapeAttrs(tuple(big)))
    return cx.reshape(y, final)


@conv(aten.tile)
def _tile(cx, args, kw, n):
    x, reps = args[0], [int(r) for r in args[1]]
    return _repeat(cx, [x, [1] * (x.type.rank - len(reps)) + reps], {}, n)


@conv(aten.repeat_interleave.self_int)
def _repeat_interleave(cx, args, kw, n):
    x, r = args[0], int(args[1])
    dim = args[2] if len(args) > 2 else kw.get("dim")
    if dim is None:
        x, dim = cx.reshape(x, (-1,)), 0
    a = _ax(dim, x.type.rank)
    shape = list(x.shape)
    y = cx.reshape(x, shape[:a + 1] + [1] + shape[a + 1:])
    y = cx.add(OpKind.EXPAND, y, attrs=A.ShapeAttrs(tuple(shape[:a + 1] + [r] + shape[a + 1:])))
    return cx.reshape(y, shape[:a] + [shape[a] * r] + shape[a + 1:])


@conv(aten.tril, aten.triu)
def _tri(cx, args, kw, n):
    x = args[0]
    k = args[1] if len(args) > 1 else kw.get("diagonal", 0)
    if x.type.rank < 2:
        return None
    h, w = x.shape[-2:]
    ones = torch.ones(h, w, dtype=torch.bool)
    mask = cx.literal(ones.tril(k) if n.target.overloadpacket is aten.tril else ones.triu(k))
    zero = cx.literal(torch.zeros((), dtype=x.dtype.to_torch()))
    return cx.add(OpKind.WHERE, mask, x, zero)


@conv(aten.pixel_shuffle, aten.pixel_unshuffle)
def _pixel_shuffle(cx, args, kw, n):
    x, r = args[0], int(args[1])
    if x.type.rank != 4:
        return None
    b, c, h, w = x.shape
    if n.target.overloadpacket is aten.pixel_shuffle:
        y = cx.reshape(x, [b, c // (r * r), r, r, h, w])
        return cx.reshape(_permute(cx, y, (0, 1, 4, 2, 5, 3)), [b, c // (r * r), h * r, w * r])
    y = cx.reshape(x, [b, c, h // r, r, w // r, r])
    return cx.reshape(_permute(cx, y, (0, 1, 3, 5, 2, 4)), [b, c * r * r, h // r, w // r])


# ----------------------------------------------------------------------------- upsampling
def _axis_weights(op, in_size: int, out_size: int, extra: tuple):
    """(indices, weights), each (taps, out_size): what torch's ``op`` reads along one axis.

    The op runs on an identity basis (in_size images of in_size x 1 pixels, one hot each):
    output pixel o of image i is the weight input i gets in output o."""
    basis = torch.eye(in_size, dtype=torch.float64).reshape(in_size, 1, in_size, 1)
    m = op(basis, [out_size, 1], *extra).reshape(in_size, out_size)  # m[i, o]
    taps = int((m != 0).sum(0).max())
    idx = torch.zeros(taps, out_size, dtype=torch.int64)
    wts = torch.zeros(taps, out_size, dtype=torch.float64)
    for o in range(out_size):
        nz = torch.nonzero(m[:, o]).flatten()
        idx[:len(nz), o], wts[:len(nz), o] = nz, m[nz, o]
        idx[len(nz):, o] = nz[0] if len(nz) else 0
    return idx, wts


def _interpolate_axis(cx, x: Value, axis: int, out_size: int, op, extra: tuple) -> Value:
    idx, wts = _axis_weights(op, x.shape[axis], out_size, extra)
    if idx.shape[0] == 1 and bool((wts == 1).all()):  # one source per output: a gather (or nothing)
        if torch.equal(idx[0], torch.arange(x.shape[axis])):
            return x
        return cx.add(OpKind.TAKE, x, cx.literal(idx[0]), attrs=A.AxisAttrs(axis))
    shape = [1] * x.type.rank
    shape[axis] = out_size
    acc = None
    for j in range(idx.shape[0]):
        t = cx.add(OpKind.TAKE, x, cx.literal(idx[j]), attrs=A.AxisAttrs(axis))
        w = cx.literal(wts[j].to(x.dtype.to_torch()).reshape(shape))
        t = cx.add(OpKind.MUL, t, w)
        acc = t if acc is None else cx.add(OpKind.ADD, acc, t)
    return acc


_UPSAMPLE = {  # packet -> (2-D torch op for the basis, align_corners in the signature, spatial dims)
    aten.upsample_nearest2d: (aten.upsample_nearest2d.default, False, 2),
    aten._upsample_nearest_exact2d: (aten._upsample_nearest_exact2d.default, False, 2),
    aten.upsample_bilinear2d: (aten.upsample_bilinear2d.default, True, 2),
    aten.upsample_bicubic2d: (aten.upsample_bicubic2d.default, True, 2),
    aten.upsample_nearest1d: (aten.upsample_nearest2d.default, False, 1),
    aten.upsample_linear1d: (aten.upsample_bilinear2d.default, True, 1),
}


@conv(*_UPSAMPLE)
def _upsample(cx, args, kw, n):
    op, has_align, nd = _UPSAMPLE[n.target.overloadpacket]
    x = args[0]
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or x.type.rank != nd + 2 or not x.dtype.is_float:
        return None
    out = [int(s) for s in val.shape[-nd:]]
    align = bool(args[2]) if has_align else None
    if n.target._overloadname == "vec":
        scales = args[-1] if args[-1] is not None else [None] * nd
    else:
        first = 3 if has_align else 2
        scales = [args[first + i] if len(args) > first + i else None for i in range(nd)]
    for i in range(nd):
        axis = x.type.rank - nd + i
        extra = (align, scales[i], None) if has_align else (scales[i], None)
        x = _interpolate_axis(cx, x, axis, out[i], op, extra)
    return x


# ----------------------------------------------------------------------------- einsum
@conv(aten.einsum)
def _einsum(cx, args, kw, n):
    eq, ops = args[0].replace(" ", ""), list(args[1])
    if "..." in eq or not ops or not all(isinstance(o, Value) for o in ops):
        return None
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return None
    if "->" not in eq:
        counts = {c: lhs.count(c) for c in set(lhs) if c in string.ascii_letters}
        out = "".join(sorted(c for c, k in counts.items() if k == 1))
    sizes: dict[str, int] = {}
    for t, o in zip(terms, ops):
        if len(t) != o.type.rank or len(set(t)) != len(t):
            return None  # a repeated index (a diagonal) is not a contraction
        for c, s in zip(t, o.shape):
            if sizes.setdefault(c, s) != s:
                return None  # size-1 broadcasting between operands
    cur, letters = ops[0], terms[0]
    for i in range(1, len(ops)):
        later = set(out).union(*terms[i + 1:])
        cur, letters = _contract(cx, cur, letters, ops[i], terms[i], later, sizes)
    cur, letters = _sum_out(cx, cur, letters, set(out))
    return _permute(cx, cur, [letters.index(c) for c in out])


def _sum_out(cx, x, letters: str, keep: set) -> tuple[Value, str]:
    drop = [i for i, c in enumerate(letters) if c not in keep]
    if not drop:
        return x, letters
    return cx.add(OpKind.SUM, x, attrs=A.ReduceAttrs(tuple(drop), False)), "".join(
        c for c in letters if c in keep)


def _contract(cx, a, la: str, b, lb: str, later: set, sizes: dict) -> tuple[Value, str]:
    a, la = _sum_out(cx, a, la, later | set(lb))
    b, lb = _sum_out(cx, b, lb, later | set(la))
    batch = [c for c in la if c in lb and c in later]
    inner = [c for c in la if c in lb and c not in later]
    left = [c for c in la if c not in lb]
    right = [c for c in lb if c not in la]
    size = lambda cs: math.prod(sizes[c] for c in cs)  # noqa: E731
    a3 = cx.reshape(_permute(cx, a, [la.index(c) for c in batch + left + inner]),
                    [size(batch), size(left), size(inner)])
    b3 = cx.reshape(_permute(cx, b, [lb.index(c) for c in batch + inner + right]),
                    [size(batch), size(inner), size(right)])
    y = cx.add(OpKind.MATMUL, a3, b3)
    return cx.reshape(y, [sizes[c] for c in batch + left + right]), "".join(batch + left + right)
