"""The one walk over a kernel group that every code-generation target shares.

A generated kernel computes each of its outputs at a *coordinate*: one index expression per
logical axis. ``Walker.value_at(v, coords)`` walks back from a value to the group's inputs:

- a group input (or a value the target has already stored) is a load at those coordinates
  (``Emitter.load``; the target maps logical coordinates to its storage layout);
- an elementwise node renders its operands at the same coordinates (broadcast axes pinned
  to 0) and combines them through the target's per-op table (``Emitter.combine``);
- a movement node (reshape, permute, expand, slice, concat, pad, take, to_layout) only
  rewrites the coordinates; that arithmetic is written here once, through the emitter's
  index operations;
- a reduction or normalization reduces its operand over the reduced axes
  (``Emitter.reduce``: inside the program on a GPU, a TensorIR reduction stage on the CPU);
  the formulas of mean, softmax, log-softmax, layer norm and batch norm are written here
  once, with each target's numerics in a few hooks (``mean``, ``normalize``, ...).

Results are memoized per (value, coordinates): a value used twice at the same coordinates
is computed once. The emitters: ``codegen.render.TextEmitter`` (C-like source text, with
``codegen.triton`` and ``codegen.cuda`` as its languages) and ``codegen.tvm.TirEmitter``
(TVM TensorIR expressions). An emitter's coordinates and values are whatever it computes
with (strings, TIR expressions); the walk only passes them back to it.
"""
from __future__ import annotations

import math
from typing import Callable

from kiln.ir import Category, LayoutKind, Node, OpKind, Value, opdef
from kiln.ir import attrs as A

REDUCE_OPS = frozenset({OpKind.SUM, OpKind.MEAN, OpKind.MAX, OpKind.MIN})
ROW_OPS = frozenset({OpKind.SOFTMAX, OpKind.LOG_SOFTMAX, OpKind.LAYER_NORM})
# the ops the walk renders by rewriting coordinates
MOVEMENT_OPS = frozenset({OpKind.RESHAPE, OpKind.PERMUTE, OpKind.EXPAND, OpKind.SLICE, OpKind.CONCAT,
                          OpKind.PAD, OpKind.TAKE, OpKind.TO_LAYOUT})


class Unsupported(Exception):
    """A renderer cannot express the group (an op, dtype, layout or shape); the plan runs its
    nodes another way."""


# ----------------------------------------------------------------------------- shapes
def static_shape(v: Value) -> tuple[int, ...]:
    if not v.type.is_static:
        raise Unsupported(f"{v} has a symbolic shape")
    return tuple(int(d) for d in v.type.shape)


def shape_of(v: Value) -> tuple:
    """``v``'s dims: ints, and named symbolic sizes (``Sym("seq")``) as they are. The walk
    decides on these (broadcast, which axes a reshape keeps) and passes them to its emitter,
    which maps a named size to its own size variable (``Emitter.dim``). A size that is an
    expression of names (``2*seq``) is not supported: no emitter can bind it from a tensor."""
    out = []
    for d in v.type.shape:
        if isinstance(d, int):
            out.append(int(d))
        elif d.name.isidentifier():
            out.append(d)
        else:
            raise Unsupported(f"{v} has a size expression {d}")
    return tuple(out)


def static_dims(dims, what: str) -> tuple[int, ...]:
    """``dims`` when all are ints, else Unsupported (the walk needs their values)."""
    if not all(isinstance(d, int) for d in dims):
        raise Unsupported(f"{what} over a symbolic size")
    return tuple(dims)


def numel(shape) -> int:
    return math.prod(shape)


def row_strides(shape) -> tuple[int, ...]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return tuple(reversed(out))


def physical_order(v: Value) -> tuple[int, ...]:
    """The logical axes of ``v`` in the order its storage layout lays them out."""
    rank = len(v.type.shape)
    kind = v.type.layout.kind
    if kind is LayoutKind.ROW_MAJOR:
        return tuple(range(rank))
    if kind is LayoutKind.CHANNELS_LAST and rank == 4:
        return (0, 2, 3, 1)  # (n, c, h, w) stored as (n, h, w, c)
    raise Unsupported(f"layout {v.type.layout!r}")


def physical_strides(v: Value) -> tuple[int, ...]:
    """Element strides of the logical axes in ``v``'s storage layout."""
    shape, order = static_shape(v), physical_order(v)
    phys = row_strides([shape[d] for d in order])
    out = [0] * len(shape)
    for s, d in zip(phys, order):
        out[d] = s
    return tuple(out)


def reduced_axes(n: Node) -> tuple[int, ...]:
    """The input axes a reduction or row normalization reduces over."""
    if n.op in REDUCE_OPS:
        return tuple(sorted(n.attrs.axes))
    if n.op is OpKind.LAYER_NORM:
        rank = len(n.inputs[0].type.shape)
        return tuple(range(rank - n.attrs.normalized_ndim, rank))
    if n.op in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
        return (n.attrs.axis,)
    raise Unsupported(f"{n.op.value} reduction")


# ----------------------------------------------------------------------------- the emitter
class Emitter:
    """What a target supplies to the walk. ``OPS[kind](emitter, node, *operands)`` renders an
    elementwise op from its operands' values (None for an absent optional operand). The
    methods without a body here are the target's to write."""

    target = ""  # named in messages
    OPS: dict[OpKind, Callable] = {}

    # -- coordinates: integer index expressions; ``k``, ``lo``, ``hi`` are Python ints -----
    def index(self, k): raise NotImplementedError  # the constant coordinate k
    def is_zero(self, c) -> bool: raise NotImplementedError
    def affine(self, terms, offset=0): raise NotImplementedError  # sum(c * k for c, k in terms) + offset
    def floordiv(self, c, k): raise NotImplementedError
    def mod(self, c, k): raise NotImplementedError
    def clamp(self, c, lo, hi): raise NotImplementedError
    def less(self, c, k): raise NotImplementedError  # the condition c < k
    def at_least(self, c, k): raise NotImplementedError  # the condition c >= k
    def all_of(self, conds): raise NotImplementedError

    def coord_key(self, c):
        """A hashable stand-in for a coordinate, for memoization."""
        return c

    # -- values ------------------------------------------------------------------------------
    def load(self, v: Value, coords: list):
        """``v``, a group input or a value stored earlier, at logical ``coords``."""
        raise NotImplementedError

    def combine(self, n: Node, operands: list):
        """An elementwise node's value from its operands' (the per-op table)."""
        fn = self.OPS.get(n.op)
        if fn is None:
            raise Unsupported(f"{self.target} has no template for {n.op.value}")
        return fn(self, n, *operands)

    def node_value(self, n: Node, value):
        """The value a node produces, as its consumers see it (named, rounded to its dtype)."""
        return value

    def retype(self, value, src: Value, dst: Value):
        """``src``'s value used where ``dst``'s dtype is expected (concat pieces, norm weights)."""
        return value

    def bind(self, value):
        """``value``, named where the target names values that are used more than once."""
        return value

    def select(self, cond, a, b): raise NotImplementedError

    def choose(self, cond, a, b):
        """``a`` where ``cond`` holds, else ``b``, where a branch not chosen may read out of
        bounds (the concat piece or padded border a lane does not take). The walk clamps
        those reads, but a target whose simplifier drops the clamps under the select's
        condition while still evaluating both branches (TensorIR's ``Select``) must branch."""
        return self.select(cond, a, b)

    def constant(self, x, dtype): raise NotImplementedError  # x as a value of IR dtype ``dtype``

    # -- reductions and the normalization formulas -----------------------------------------
    def reduce(self, key, kind: OpKind, body: Callable, shape, axes, row: list):
        """The ``kind`` (SUM, MAX, MIN) reduction over ``axes`` of ``body(coords)`` (coordinates
        over ``shape``), for the row at ``row`` (its ``axes`` entries are 0). ``key`` names
        the reduction: the same key is the same reduction at another row."""
        raise NotImplementedError

    def add(self, a, b): raise NotImplementedError
    def sub(self, a, b): raise NotImplementedError
    def mul(self, a, b): raise NotImplementedError
    def div(self, a, b): raise NotImplementedError
    def exp(self, a): raise NotImplementedError
    def log(self, a): raise NotImplementedError
    def mean(self, total, count: int): raise NotImplementedError  # total / count
    def normalize(self, centered, var, eps: float): raise NotImplementedError  # centered / sqrt(var + eps)

    def guard_overflow(self, squared, y):
        """A layer norm's result ``y`` given its sum of squared deviations ``squared`` (NaN
        where that overflowed, as torch gives)."""
        return y

    def row_terms(self, key, body: Callable, shape, coords: list, row_length: int):
        """``body(coords)``: a softmax's ``exp(x - max)``, which its row sum and its output
        both read. A target may compute it once per element into a stage of ``shape`` and
        read that at ``coords``; the default computes it inline at each use."""
        return body(coords)

    def inverse_std(self, key, squared: Callable, count: int, eps: float, shape, axes, row: list):
        """A layer norm's ``1 / sqrt(var + eps)`` computed once per row and read at ``row``
        (NaN where the row's sum of squared deviations ``squared(row)`` overflowed), for a
        target that then scales each element by it; None (the default): the target
        normalizes each element itself (``normalize``, ``guard_overflow``)."""
        return None


# ----------------------------------------------------------------------------- coordinates
def unflatten(em: Emitter, lin, shape) -> list:
    """Coordinates of a row-major linear index below numel(shape) (lanes past the end of a
    GPU program get coordinates out of range, and are masked)."""
    strides = row_strides(shape)
    first = next((d for d, size in enumerate(shape) if size != 1), None)
    out = []
    for d, (size, st) in enumerate(zip(shape, strides)):
        if size == 1:
            out.append(em.index(0))
            continue
        c = lin if st == 1 else em.floordiv(lin, st)
        out.append(c if d == first else em.mod(c, size))
    return out


def flatten(em: Emitter, coords: list, shape):
    """The row-major linear index of ``coords``."""
    return em.affine([(c, st) for c, st, size in zip(coords, row_strides(shape), shape) if size != 1])


def storage_offset(em: Emitter, v: Value, coords: list):
    """The element offset of logical ``coords`` in ``v``'s storage."""
    shape = static_shape(v)
    return em.affine([(c, st) for c, st, size in zip(coords, physical_strides(v), shape) if size != 1])


def broadcast(em: Emitter, coords: list, out: Value, x: Value) -> list:
    """Coordinates into ``x`` for ``coords`` of ``out``, the (right-aligned) broadcast shape."""
    xs, os_ = shape_of(x), shape_of(out)
    tail = coords[len(coords) - len(xs):] if xs else []
    return [em.index(0) if d == 1 and o != 1 else c for c, d, o in zip(tail, xs, os_[len(os_) - len(xs):])]


def reshape_coords(em: Emitter, c: list, out_shape, in_shape) -> list:
    """Coordinates into a reshape's input: the axes the two shapes share at either end are
    kept; only the middle is relinearized."""
    lo = 0
    while lo < min(len(out_shape), len(in_shape)) and out_shape[lo] == in_shape[lo]:
        lo += 1
    hi = 0
    while (hi < min(len(out_shape), len(in_shape)) - lo
           and out_shape[len(out_shape) - 1 - hi] == in_shape[len(in_shape) - 1 - hi]):
        hi += 1
    mid_out = static_dims(out_shape[lo:len(out_shape) - hi], "a reshape")
    mid_in = static_dims(in_shape[lo:len(in_shape) - hi], "a reshape")
    mid = unflatten(em, flatten(em, c[lo:len(c) - hi], mid_out), mid_in) if mid_in else []
    return list(c[:lo]) + mid + list(c[len(c) - hi:])


# ----------------------------------------------------------------------------- the walk
class Walker:
    """Renders values of a group's nodes through an emitter (see the module docstring)."""

    def __init__(self, nodes: list[Node], em: Emitter):
        self.em = em
        self.producer = {o: n for n in nodes for o in n.outputs}
        self.memo: dict[tuple, tuple] = {}

    def materialize(self, v: Value) -> None:
        """From now on ``v`` is loaded (the target stored it), not recomputed."""
        self.producer.pop(v, None)
        self.memo.clear()

    def value_at(self, v: Value, coords: list):
        key = (v, tuple(self.em.coord_key(c) for c in coords))
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = (coords, self._render(v, list(coords)))  # coords kept alive with their keys
        return hit[1]

    def _render(self, v: Value, c: list):
        n = self.producer.get(v)
        if n is None:
            return self.em.load(v, c)
        if len(n.outputs) != 1:
            raise Unsupported(f"{n.op.value} with {len(n.outputs)} outputs")
        if n.op in MOVEMENT_OPS:
            return self.movement(n, c)
        if n.op is OpKind.BATCH_NORM:
            return self.em.node_value(n, self.batch_norm(n, c))
        cat = opdef(n.op).category
        if cat is Category.ELEMENTWISE:
            ops = [None if x is None else self.value_at(x, broadcast(self.em, c, v, x)) for x in n.inputs]
            return self.em.node_value(n, self.em.combine(n, ops))
        if cat in (Category.REDUCTION, Category.NORMALIZATION):
            return self.em.node_value(n, self.anchor(n, c))
        raise Unsupported(f"{n.op.value} inside a generated kernel")

    # -- movement: rewrite coordinates ------------------------------------------------
    def movement(self, n: Node, c: list):
        em, x, a = self.em, n.inputs[0], n.attrs
        if n.op is OpKind.TO_LAYOUT:  # values do not change; a layout matters where stored
            return self.value_at(x, c)
        if n.op is OpKind.PERMUTE:
            inner = [None] * len(a.perm)
            for j, p in enumerate(a.perm):
                inner[p] = c[j]
            return self.value_at(x, inner)
        if n.op is OpKind.EXPAND:
            return self.value_at(x, broadcast(em, c, n.outputs[0], x))
        if n.op is OpKind.RESHAPE:
            return self.value_at(x, reshape_coords(em, c, shape_of(n.outputs[0]), shape_of(x)))
        if n.op is OpKind.SLICE:
            inner = list(c)
            inner[a.axis] = em.affine([(c[a.axis], a.step)], a.start)
            return self.value_at(x, inner)
        if n.op is OpKind.CONCAT:
            return self.concat(n, c)
        if n.op is OpKind.PAD:
            return self.pad(n, c)
        return self.take(n, c)

    def concat(self, n: Node, c: list):
        em, axis, out = self.em, n.attrs.axis, n.outputs[0]
        k = c[axis]
        sizes = static_dims([shape_of(x)[axis] for x in n.inputs], "a concat")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        acc = None
        for x, st, sz in reversed(list(zip(n.inputs, starts, sizes))):
            inner = list(c)
            # clamped, so the pieces a lane does not select still read in bounds
            inner[axis] = em.clamp(em.affine([(k, 1)], -st), 0, sz - 1)
            val = em.retype(self.value_at(x, inner), x, out)
            acc = val if acc is None else em.choose(em.less(k, st + sz), val, acc)
        return acc

    def pad(self, n: Node, c: list):
        em, a, x = self.em, n.attrs, n.inputs[0]
        if a.mode not in (A.PadMode.CONSTANT, A.PadMode.REPLICATE):
            raise Unsupported(f"pad mode {a.mode.value}")
        inner, conds = [], []
        for d, size in enumerate(shape_of(x)):
            before = a.pads[2 * d] if 2 * d < len(a.pads) else 0
            after = a.pads[2 * d + 1] if 2 * d + 1 < len(a.pads) else 0
            k = em.affine([(c[d], 1)], -before) if before else c[d]
            if before or after:
                static_dims([size], "a pad")
                conds += [em.at_least(k, 0), em.less(k, size)]
                k = em.clamp(k, 0, size - 1)  # the unselected branch still reads in bounds
            inner.append(k)
        val = self.value_at(x, inner)
        if a.mode is A.PadMode.REPLICATE or not conds:
            return val
        return em.choose(em.all_of(conds), val, em.constant(a.value, x.type.dtype))

    def take(self, n: Node, c: list):
        em = self.em
        data, idx = n.inputs
        axis = n.attrs.axis
        ir = len(shape_of(idx))
        (size,) = static_dims([shape_of(data)[axis]], "a take")
        i = self.value_at(idx, list(c[axis:axis + ir]))
        i = em.select(em.less(i, 0), em.affine([(i, 1)], size), i)  # negative indices count from the end
        return self.value_at(data, list(c[:axis]) + [i] + list(c[axis + ir:]))

    # -- reductions and normalizations ---------------------------------------------------
    def per_row(self, key, axes, coords: list, make: Callable):
        """``make(row)``, memoized per row: ``row`` is ``coords`` with ``axes`` at 0."""
        row = [self.em.index(0) if d in axes else k for d, k in enumerate(coords)]
        mk = ("row", key, tuple(self.em.coord_key(k) for k in row))
        hit = self.memo.get(mk)
        if hit is None:
            hit = self.memo[mk] = (row, make(row))
        return hit[1]

    def reduced(self, key, kind: OpKind, body: Callable, shape, axes, coords: list):
        """The ``kind`` reduction over ``axes`` of ``body`` in the row of ``coords``."""
        return self.per_row((key, kind), axes, coords,
                            lambda row: self.em.reduce((key, kind), kind, body, shape, axes, row))

    def anchor(self, n: Node, c: list):
        em, x = self.em, n.inputs[0]
        xs = shape_of(x)
        axes = reduced_axes(n)
        static_dims([xs[d] for d in axes], "a reduction")
        if not x.type.dtype.is_float:
            raise Unsupported("integer reduction")
        if any(xs[d] == 0 for d in axes):
            raise Unsupported("reduction over an empty axis")
        count = numel([xs[d] for d in axes])

        def xv(i):
            return self.value_at(x, i)

        if n.op in REDUCE_OPS:
            if not axes:
                return xv(c)
            it = iter(c)  # the output coordinates, with the reduced axes re-inserted
            row = [em.index(0) if d in axes and not n.attrs.keepdim else next(it) for d in range(len(xs))]
            kind = OpKind.SUM if n.op is OpKind.MEAN else n.op
            red = self.reduced(n, kind, xv, xs, axes, row)
            return em.mean(red, count) if n.op is OpKind.MEAN else red
        if n.op in (OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
            def mx(i):
                return self.reduced(n, OpKind.MAX, xv, xs, axes, i)

            def terms(i):
                return em.exp(em.sub(xv(i), mx(i)))

            if n.op is OpKind.SOFTMAX:
                def exps(i):
                    return em.row_terms((n, "exp"), terms, xs, i, count)
            else:
                exps = terms
            s = self.reduced(n, OpKind.SUM, exps, xs, axes, c)
            if n.op is OpKind.SOFTMAX:
                return em.div(exps(c), s)
            return em.sub(em.sub(xv(c), mx(c)), em.log(s))
        if n.op is OpKind.LAYER_NORM:
            return self.layer_norm(n, c, xv, xs, axes, count)
        raise Unsupported(f"{n.op.value} reduction")

    def layer_norm(self, n: Node, c: list, xv: Callable, xs, axes, count: int):
        em = self.em

        def mean(i):
            return self.per_row((n, "mean"), axes, i,
                                lambda row: em.mean(self.reduced(n, OpKind.SUM, xv, xs, axes, row), count))

        def centered(i):
            return em.bind(em.sub(xv(i), mean(i)))

        def squares(i):
            d = centered(i)
            return em.mul(d, d)

        def squared_at(row):
            return self.reduced((n, "var"), OpKind.SUM, squares, xs, axes, row)

        inv = self.per_row((n, "inv"), axes, c,
                           lambda row: em.inverse_std((n, "inv"), squared_at, count, n.attrs.eps, xs, axes, row))
        if inv is None:
            squared = squared_at(c)
            y = em.normalize(centered(c), em.mean(squared, count), n.attrs.eps)
        else:
            y = em.mul(centered(c), inv)
        trailing = c[len(xs) - len(axes):]
        x = n.inputs[0]
        if len(n.inputs) > 1 and n.inputs[1] is not None:
            y = em.mul(y, em.retype(self.value_at(n.inputs[1], list(trailing)), n.inputs[1], x))
        if len(n.inputs) > 2 and n.inputs[2] is not None:
            y = em.add(y, em.retype(self.value_at(n.inputs[2], list(trailing)), n.inputs[2], x))
        return y if inv is not None else em.guard_overflow(squared, y)

    def batch_norm(self, n: Node, c: list):
        em = self.em
        x, mean, var, w, b = (list(n.inputs) + [None, None])[:5]
        if not x.type.dtype.is_float:
            raise Unsupported("integer batch norm")
        ch = [c[1]]

        def stat(s):
            return em.retype(self.value_at(s, ch), s, x)

        y = em.normalize(em.sub(self.value_at(x, c), stat(mean)), stat(var), n.attrs.eps)
        if w is not None:
            y = em.mul(y, stat(w))
        if b is not None:
            y = em.add(y, stat(b))
        return y
