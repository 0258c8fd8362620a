"""The structure every GPU renderer shares: a fused kernel group as index expressions.

A generated kernel computes each of its outputs at a *coordinate*: one index expression
per logical axis. ``Renderer.value_at(v, coords)`` walks back from a value to the group's
inputs: an elementwise node renders its operands at the same coordinates (broadcast axes
pinned to 0) and combines them through the renderer's per-op table; a movement node
(reshape, permute, expand, slice, concat, pad, take) only rewrites the coordinates; a
group input is a load at the offset its layout gives those coordinates. Reductions and
normalizations render their operand at coordinates where the reduced axes run over a
second index ``r`` and reduce along it. Results are memoized per (value, coordinates), so
a value used twice is computed once.

Subclasses (codegen.triton, codegen.cuda) supply the per-op table (``OPS``, keyed by
OpKind) and the few syntax hooks below; they never walk the graph themselves.
A group is cut into *kernels*: outputs computed before the group's reduction form an
injective kernel per output shape, outputs after it a reduction kernel per output shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from kiln.ir import Category, LayoutKind, Node, OpKind, Value, opdef
from kiln.ir import attrs as A
from kiln.passes.partition import KernelGroup

REDUCE_OPS = {OpKind.SUM, OpKind.MEAN, OpKind.MAX, OpKind.MIN}
ROW_OPS = {OpKind.SOFTMAX, OpKind.LOG_SOFTMAX, OpKind.LAYER_NORM}
MAX_REDUCTION = 16384  # the reduced extent must fit in one program's registers


# Operators every C-like renderer spells the same (Triton's Python and CUDA C alike): the
# per-language tables add only what differs.
INFIX_OPS = {
    OpKind.IDENTITY: lambda r, n, x: x,
    OpKind.ADD: lambda r, n, a, b: f"({a} + {b})",
    OpKind.SUB: lambda r, n, a, b: f"({a} - {b})",
    OpKind.MUL: lambda r, n, a, b: f"({a} * {b})",
    OpKind.EQ: lambda r, n, a, b: f"({a} == {b})",
    OpKind.NE: lambda r, n, a, b: f"({a} != {b})",
    OpKind.LT: lambda r, n, a, b: f"({a} < {b})",
    OpKind.LE: lambda r, n, a, b: f"({a} <= {b})",
    OpKind.GT: lambda r, n, a, b: f"({a} > {b})",
    OpKind.GE: lambda r, n, a, b: f"({a} >= {b})",
}



class Unsupported(Exception):
    """This renderer cannot express the group; the plan runs its nodes another way."""


@dataclass(frozen=True)
class E:
    """An expression: source text, and whether it varies along the reduction index."""

    code: str
    r: bool = False


def static_shape(v: Value) -> tuple[int, ...]:
    if not v.type.is_static:
        raise Unsupported(f"{v} has a symbolic shape")
    return tuple(int(d) for d in v.type.shape)


def row_strides(shape) -> tuple[int, ...]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= d
    return tuple(reversed(out))


def physical_strides(v: Value) -> tuple[int, ...]:
    """Element strides of the logical axes in ``v``'s storage layout."""
    shape = static_shape(v)
    kind = v.type.layout.kind
    if kind is LayoutKind.ROW_MAJOR:
        return row_strides(shape)
    if kind is LayoutKind.CHANNELS_LAST and len(shape) == 4:
        n, c, h, w = shape
        return (h * w * c, 1, w * c, c)
    raise Unsupported(f"layout {v.type.layout!r}")


def numel(shape) -> int:
    return math.prod(shape)


@dataclass
class KernelSpec:
    """One kernel cut from a group: which outputs it writes, over which index space."""

    group: KernelGroup
    outputs: list[Value]
    anchor: Node | None  # the reduction/normalization it computes, None for injective
    shape: tuple[int, ...]  # the outputs' common logical shape


@dataclass
class Rendered:
    name: str
    source: str
    inputs: list[Value]  # kernel pointer arguments, in order
    outputs: list[Value]
    numel: int
    reduce_extent: int  # 0 for an injective kernel
    language: str
    params: dict = field(default_factory=dict)


def split_group(group: KernelGroup) -> list[KernelSpec]:
    anchors = [n for n in group.nodes if opdef(n.op).category in (Category.REDUCTION, Category.NORMALIZATION)
               and n.op is not OpKind.BATCH_NORM]
    if len(anchors) > 1:
        raise Unsupported("more than one reduction in a group")
    anchor = anchors[0] if anchors else None
    after: set[Value] = set()
    if anchor is not None:
        after.update(anchor.outputs)
        for n in group.nodes:
            if any(v in after for v in n.inputs if v is not None):
                after.update(n.outputs)
    specs: dict[tuple, KernelSpec] = {}
    for v in group.outputs:
        post = v in after
        key = (post, static_shape(v))
        if key not in specs:
            specs[key] = KernelSpec(group, [], anchor if post else None, key[1])
        specs[key].outputs.append(v)
    return list(specs.values())


class Renderer:
    """Walks one KernelSpec; subclasses give the syntax. ``OPS[kind](node, *operand_codes)``
    returns an expression's source for an elementwise op."""

    OPS: dict[OpKind, Callable] = {}
    language = ""

    def __init__(self, spec: KernelSpec):
        self.spec = spec
        self.lines: list[str] = []
        self.memo: dict[tuple, E] = {}
        self.inputs: list[Value] = []
        self.producer = {o: n for n in spec.group.nodes for o in n.outputs}
        self.counter = 0

    # -- syntax hooks -----------------------------------------------------------------
    def floordiv(self, a: str, b: int) -> str: ...
    def mod(self, a: str, b: int) -> str: ...
    def imin(self, a: str, b: str) -> str: ...
    def imax(self, a: str, b: str) -> str: ...
    def select(self, c: str, a: str, b: str) -> str: ...
    def load(self, arg: int, offset: E, v: Value) -> str: ...
    def reduce(self, kind: OpKind, e: E, dtype) -> E: ...
    def cast(self, code: str, dtype) -> str: ...
    def literal(self, x: float, dtype) -> str: ...

    # -- shared walk ------------------------------------------------------------------
    def tmp(self, code: str, r: bool) -> E:
        name = f"t{self.counter}"
        self.counter += 1
        self.lines.append(self.assign(name, code))
        return E(name, r)

    def assign(self, name: str, code: str) -> str:
        return f"{name} = {code}"

    def decompose(self, lin: E, shape) -> list[E]:
        """Coordinates of a row-major linear index (lanes past the end are masked)."""
        strides = row_strides(shape)
        first = next((d for d, size in enumerate(shape) if size != 1), None)
        out = []
        for d, (size, st) in enumerate(zip(shape, strides)):
            if size == 1:
                out.append(E("0"))
                continue
            c = lin.code if st == 1 else self.floordiv(lin.code, st)
            if d != first:
                c = self.mod(c, size)
            out.append(E(f"({c})", lin.r))
        return out

    def linearize(self, coords: list[E], shape) -> E:
        terms = [c.code if st == 1 else f"{c.code} * {st}" for c, st, n in zip(coords, row_strides(shape), shape)
                 if n != 1 and c.code != "0"]
        return E("(" + (" + ".join(terms) or "0") + ")", any(c.r for c in coords))

    def offset(self, v: Value, coords: list[E]) -> E:
        shape = static_shape(v)
        terms = [c.code if st == 1 else f"{c.code} * {st}" for c, st, n in zip(coords, physical_strides(v), shape)
                 if n != 1 and c.code != "0"]
        return E(" + ".join(terms) or "0", any(c.r for c in coords))

    def value_at(self, v: Value, coords: list[E]) -> E:
        key = (v, tuple(coords))
        hit = self.memo.get(key)
        if hit is None:
            hit = self._render(v, coords)
            self.memo[key] = hit
        return hit

    def _render(self, v: Value, coords: list[E]) -> E:
        n = self.producer.get(v)
        if n is None:  # a group input: load it
            if v not in self.inputs:
                self.inputs.append(v)
            return self.tmp(self.load(self.inputs.index(v), self.offset(v, coords), v), any(c.r for c in coords))
        if n is self.spec.anchor:
            return self.render_anchor(n, coords)
        cat = opdef(n.op).category
        if n.op is OpKind.BATCH_NORM:
            return self.batch_norm(n, coords)
        if cat is Category.ELEMENTWISE and n.op is not OpKind.TO_LAYOUT:
            fn = self.OPS.get(n.op)
            if fn is None:
                raise Unsupported(f"{self.language} has no template for {n.op.value}")
            ops = [None if x is None else self.value_at(x, self.broadcast(coords, v, x)) for x in n.inputs]
            code = fn(self, n, *[None if o is None else o.code for o in ops])
            return self.tmp(code, any(o.r for o in ops if o is not None))
        if cat is Category.MOVEMENT:
            return self.movement(n, coords)
        raise Unsupported(f"{n.op.value} inside a generated kernel")

    def broadcast(self, coords: list[E], out: Value, x: Value) -> list[E]:
        xs, os_ = static_shape(x), static_shape(out)
        tail = coords[len(coords) - len(xs):] if xs else []
        return [E("0") if d == 1 and o != 1 else c for c, d, o in zip(tail, xs, os_[len(os_) - len(xs):])]

    # -- movement: rewrite coordinates ------------------------------------------------
    def movement(self, n: Node, c: list[E]) -> E:
        x = n.inputs[0]
        a = n.attrs
        if n.op in (OpKind.TO_LAYOUT, OpKind.IDENTITY):
            return self.value_at(x, c)
        if n.op is OpKind.PERMUTE:
            inner = [E("0")] * len(a.perm)
            for j, p in enumerate(a.perm):
                inner[p] = c[j]
            return self.value_at(x, inner)
        if n.op is OpKind.EXPAND:
            return self.value_at(x, self.broadcast(c, n.outputs[0], x))
        if n.op is OpKind.RESHAPE:
            return self.value_at(x, self.reshape_coords(c, static_shape(n.outputs[0]), static_shape(x)))
        if n.op is OpKind.SLICE:
            inner = list(c)
            k = c[a.axis]
            inner[a.axis] = E(f"({a.start} + {k.code} * {a.step})" if a.step != 1 else f"({a.start} + {k.code})", k.r)
            return self.value_at(x, inner)
        if n.op is OpKind.CONCAT:
            return self.concat(n, c)
        if n.op is OpKind.PAD:
            return self.pad(n, c)
        if n.op is OpKind.TAKE:
            return self.take(n, c)
        raise Unsupported(f"{n.op.value} inside a generated kernel")

    def reshape_coords(self, c: list[E], out_shape, in_shape) -> list[E]:
        # keep the axes the two shapes share at either end; relinearize only the middle
        lo = 0
        while lo < min(len(out_shape), len(in_shape)) and out_shape[lo] == in_shape[lo]:
            lo += 1
        hi = 0
        while (hi < min(len(out_shape), len(in_shape)) - lo
               and out_shape[len(out_shape) - 1 - hi] == in_shape[len(in_shape) - 1 - hi]):
            hi += 1
        mid_out = out_shape[lo:len(out_shape) - hi]
        mid_in = in_shape[lo:len(in_shape) - hi]
        mid = self.decompose(self.linearize(c[lo:len(c) - hi], mid_out), mid_in) if mid_in else []
        return list(c[:lo]) + mid + list(c[len(c) - hi:])

    def clamp(self, k: E, lo: int, hi: int) -> E:
        return E(self.imin(self.imax(k.code, str(lo)), str(hi)), k.r)

    def concat(self, n: Node, c: list[E]) -> E:
        axis = n.attrs.axis
        k = c[axis]
        sizes = [static_shape(x)[axis] for x in n.inputs]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        acc: E | None = None
        for x, st, sz in reversed(list(zip(n.inputs, starts, sizes))):
            inner = list(c)
            inner[axis] = self.clamp(E(f"({k.code} - {st})", k.r), 0, sz - 1)  # in bounds on every lane
            val = self.value_at(x, inner)
            if acc is None:
                acc = val
            else:
                acc = self.tmp(self.select(f"({k.code} < {st + sz})", val.code, acc.code), val.r or acc.r or k.r)
        return acc

    def pad(self, n: Node, c: list[E]) -> E:
        a = n.attrs
        if a.mode not in (A.PadMode.CONSTANT, A.PadMode.REPLICATE):
            raise Unsupported(f"pad mode {a.mode.value}")
        x = n.inputs[0]
        shape = static_shape(x)
        inner, conds = [], []
        for d, size in enumerate(shape):
            before = a.pads[2 * d] if 2 * d < len(a.pads) else 0
            k = E(f"({c[d].code} - {before})", c[d].r) if before else c[d]
            if before or (2 * d + 1 < len(a.pads) and a.pads[2 * d + 1]):
                conds.append(f"({k.code} >= 0) {self.AND} ({k.code} < {size})")
                k = self.clamp(k, 0, size - 1)
            inner.append(k)
        val = self.value_at(x, inner)
        if a.mode is A.PadMode.REPLICATE or not conds:
            return val
        cond = f" {self.AND} ".join(f"({t})" for t in conds)
        fill = self.literal(a.value, x.type.dtype)
        return self.tmp(self.select(cond, val.code, fill), True if val.r else any(k.r for k in c))

    AND = "&"

    def take(self, n: Node, c: list[E]) -> E:
        data, idx = n.inputs
        axis = n.attrs.axis
        ir = len(static_shape(idx))
        size = static_shape(data)[axis]
        i = self.value_at(idx, list(c[axis:axis + ir]))
        i = self.tmp(self.select(f"{i.code} < 0", f"{i.code} + {size}", i.code), i.r)
        return self.value_at(data, list(c[:axis]) + [i] + list(c[axis + ir:]))

    def batch_norm(self, n: Node, c: list[E]) -> E:
        x, mean, var, w, b = (list(n.inputs) + [None, None])[:5]
        ch = [c[1]]
        xv = self.value_at(x, c)
        mv, vv = self.value_at(mean, ch), self.value_at(var, ch)
        y = f"({xv.code} - {mv.code}) / {self.sqrt(f'{vv.code} + {n.attrs.eps!r}')}"
        if w is not None:
            y = f"({y}) * {self.value_at(w, ch).code}"
        if b is not None:
            y = f"({y}) + {self.value_at(b, ch).code}"
        return self.tmp(y, xv.r)

    def sqrt(self, code: str) -> str: ...

    # -- reductions: the anchor ------------------------------------------------------
    def render_anchor(self, n: Node, c: list[E]) -> E:
        x = n.inputs[0]
        xs = static_shape(x)
        if n.op in REDUCE_OPS:
            axes = n.attrs.axes
            if not x.type.dtype.is_float:
                raise Unsupported("integer reduction")
            rshape = [xs[d] for d in axes]
            rc = iter(self.decompose(self.r_index(), rshape))
            inner, j = [], 0
            for d in range(len(xs)):
                if d in axes:
                    inner.append(next(rc))
                    if n.attrs.keepdim:
                        j += 1
                else:
                    inner.append(c[j])
                    j += 1
            val = self.value_at(x, inner)
            kind = OpKind.SUM if n.op is OpKind.MEAN else n.op
            red = self.reduce(kind, val, x.type.dtype)
            if n.op is OpKind.MEAN:
                red = self.tmp(f"{red.code} / {numel(rshape)}.0", False)
            return red
        if n.op in ROW_OPS:
            axes = (n.attrs.axis,) if n.op is not OpKind.LAYER_NORM else \
                tuple(range(len(xs) - n.attrs.normalized_ndim, len(xs)))
            rshape = [xs[d] for d in axes]
            rc = iter(self.decompose(self.r_index(), rshape))
            row = [next(rc) if d in axes else c[d] for d in range(len(xs))]
            rowv = self.value_at(x, row)
            elem = self.value_at(x, c)
            count = numel(rshape)
            if n.op is OpKind.LAYER_NORM:
                mean = self.tmp(f"{self.reduce(OpKind.SUM, rowv, x.type.dtype).code} / {count}.0", False)
                d = self.tmp(f"{rowv.code} - {mean.code}", True)
                var = self.tmp(f"{self.reduce(OpKind.SUM, E(f'{d.code} * {d.code}', True), x.type.dtype).code}"
                               f" / {count}.0", False)
                y = f"({elem.code} - {mean.code}) / {self.sqrt(f'{var.code} + {n.attrs.eps!r}')}"
                inner = c[len(xs) - len(axes):]
                if len(n.inputs) > 1 and n.inputs[1] is not None:
                    y = f"({y}) * {self.value_at(n.inputs[1], list(inner)).code}"
                if len(n.inputs) > 2 and n.inputs[2] is not None:
                    y = f"({y}) + {self.value_at(n.inputs[2], list(inner)).code}"
                return self.tmp(y, elem.r)
            mx = self.reduce(OpKind.MAX, rowv, x.type.dtype)
            s = self.reduce(OpKind.SUM, E(self.exp(f"{rowv.code} - {mx.code}"), True), x.type.dtype)
            if n.op is OpKind.SOFTMAX:
                return self.tmp(f"{self.exp(f'{elem.code} - {mx.code}')} / {s.code}", elem.r)
            return self.tmp(f"{elem.code} - {mx.code} - {self.log(s.code)}", elem.r)
        raise Unsupported(f"{n.op.value} reduction")

    def r_index(self) -> E: ...
    def exp(self, code: str) -> str: ...
    def log(self, code: str) -> str: ...


def reduce_extent(spec: KernelSpec) -> int:
    n = spec.anchor
    if n is None:
        return 0
    xs = static_shape(n.inputs[0])
    if n.op in REDUCE_OPS:
        axes = n.attrs.axes
    elif n.op is OpKind.LAYER_NORM:
        axes = tuple(range(len(xs) - n.attrs.normalized_ndim, len(xs)))
    else:
        axes = (n.attrs.axis,)
    r = numel([xs[d] for d in axes])
    if r > MAX_REDUCTION:
        raise Unsupported(f"reduction over {r} elements (at most {MAX_REDUCTION} in one program)")
    return r
