"""GPU kernels as source text: the emitter that Triton (codegen.triton) and CUDA C
(codegen.cuda) share, and how a group is cut into GPU kernels.

The walk is codegen.walk's. Here coordinates and values are ``E``: source text, and
whether it varies along the reduction index ``r`` (a load that does is masked along the
row). Every node's value is assigned to a temporary (``t0 = ...``), so the walk's
memoization means a value used twice is computed once. The languages supply the per-op
table (``OPS``, keyed by OpKind) and a few syntax hooks below.

A group is cut into *kernels*: outputs computed before the group's reduction form an
injective kernel per output shape, outputs after it a reduction kernel per output shape
(the reduced extent in one program: at most ``MAX_REDUCTION`` elements).
"""
from __future__ import annotations

import re
from dataclasses import field

from kiln.ir import Category, Node, OpKind, Value, opdef
from kiln.passes.partition import KernelGroup
from kiln.ir.record import record

from .walk import Emitter, Walker, numel, reduced_axes, static_shape, storage_offset, unflatten
from .walk import Unsupported, physical_strides  # noqa: F401  (the cuda plan builder imports them from here)

MAX_REDUCTION = 16384  # the reduced extent must fit in one program's registers


# Operators every C-like language spells the same (Triton's Python and CUDA C alike): the
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


@record(slots=False)
class E:
    """An expression: source text, and whether it varies along the reduction index."""

    code: str
    r: bool = False


def _r(*es: E) -> bool:
    return any(e.r for e in es)


_NAME = re.compile(r"[A-Za-z_]\w*")


@record(frozen=False, slots=False)
class KernelSpec:
    """One kernel cut from a group: which outputs it writes, over which index space."""

    group: KernelGroup
    outputs: list[Value]
    anchor: Node | None  # the reduction/normalization it computes, None for injective
    shape: tuple[int, ...]  # the outputs' common logical shape


@record(frozen=False, slots=False)
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


def reduce_extent(spec: KernelSpec) -> int:
    if spec.anchor is None:
        return 0
    xs = static_shape(spec.anchor.inputs[0])
    r = numel([xs[d] for d in reduced_axes(spec.anchor)])
    if r > MAX_REDUCTION:
        raise Unsupported(f"reduction over {r} elements (at most {MAX_REDUCTION} in one program)")
    return r


class TextEmitter(Emitter):
    """The walk's emitter for one GPU kernel (``spec``) as C-like source lines; a language
    subclass gives ``OPS``, ``target`` and the syntax hooks."""

    AND = "&"  # the conjunction of conditions

    def __init__(self, spec: KernelSpec):
        self.spec = spec
        self.lines: list[str] = []
        self.inputs: list[Value] = []  # group inputs in first-use order: the kernel's arguments
        self.counter = 0
        self.walker = Walker(spec.group.nodes, self)

    # -- syntax hooks -----------------------------------------------------------------
    def assign(self, name: str, code: str) -> str:
        return f"{name} = {code}"

    def floordiv_code(self, a: str, b: int) -> str: ...
    def mod_code(self, a: str, b: int) -> str: ...
    def imin(self, a: str, b: str) -> str: ...
    def imax(self, a: str, b: str) -> str: ...
    def select_code(self, c: str, a: str, b: str) -> str: ...
    def load_code(self, arg: int, offset: E, v: Value) -> str: ...
    def reduce_code(self, kind: OpKind, e: E) -> str: ...
    def cast(self, code: str, dtype) -> str: ...
    def literal(self, x: float, dtype) -> str: ...
    def sqrt(self, code: str) -> str: ...
    def exp_code(self, code: str) -> str: ...
    def log_code(self, code: str) -> str: ...
    def r_index(self) -> E: ...

    def tmp(self, code: str, r: bool) -> E:
        name = f"t{self.counter}"
        self.counter += 1
        self.lines.append(self.assign(name, code))
        return E(name, r)

    # -- coordinates --------------------------------------------------------------------
    def index(self, k):
        return E(str(k))

    def is_zero(self, c):
        return c.code == "0"

    def affine(self, terms, offset=0):
        live = [(c, k) for c, k in terms if not self.is_zero(c)]
        if not live:
            return E(str(offset))
        if len(live) == 1 and live[0][1] == 1 and not offset:
            return live[0][0]
        code = " + ".join(c.code if k == 1 else f"{c.code} * {k}" for c, k in live)
        if offset:
            code += f" + {offset}" if offset > 0 else f" - {-offset}"
        return E(f"({code})", _r(*(c for c, _ in live)))

    def floordiv(self, c, k):
        return E(f"({self.floordiv_code(c.code, k)})", c.r)

    def mod(self, c, k):
        return E(f"({self.mod_code(c.code, k)})", c.r)

    def clamp(self, c, lo, hi):
        return E(self.imin(self.imax(c.code, str(lo)), str(hi)), c.r)

    def less(self, c, k):
        return E(f"({c.code} < {k})", c.r)

    def at_least(self, c, k):
        return E(f"({c.code} >= {k})", c.r)

    def all_of(self, conds):
        return E(f" {self.AND} ".join(c.code for c in conds), _r(*conds))

    # -- values -----------------------------------------------------------------------------
    def load(self, v, coords):
        if v not in self.inputs:
            self.inputs.append(v)
        off = storage_offset(self, v, coords)
        return self.tmp(self.load_code(self.inputs.index(v), off, v), _r(*coords))

    def combine(self, n, operands):
        code = super().combine(n, [None if o is None else o.code for o in operands])
        return E(code, _r(*(o for o in operands if o is not None)))

    def bind(self, value):
        return value if _NAME.fullmatch(value.code) else self.tmp(value.code, value.r)

    def node_value(self, n, value):
        return self.bind(value)

    def select(self, cond, a, b):
        return self.tmp(self.select_code(cond.code, a.code, b.code), _r(cond, a, b))

    def constant(self, x, dtype):
        return E(self.literal(x, dtype))

    # -- reductions ---------------------------------------------------------------------
    def reduce(self, key, kind, body, shape, axes, row):
        # the reduced axes run over the program's reduction index
        rc = iter(unflatten(self, self.r_index(), [shape[d] for d in axes]))
        inner = [next(rc) if d in axes else k for d, k in enumerate(row)]
        return self.tmp(self.reduce_code(kind, body(inner)), False)

    def add(self, a, b):
        return E(f"({a.code} + {b.code})", _r(a, b))

    def sub(self, a, b):
        return E(f"({a.code} - {b.code})", _r(a, b))

    def mul(self, a, b):
        return E(f"({a.code} * {b.code})", _r(a, b))

    def div(self, a, b):
        return E(f"({a.code} / {b.code})", _r(a, b))

    def exp(self, a):
        return E(self.exp_code(a.code), a.r)

    def log(self, a):
        return E(self.log_code(a.code), a.r)

    def mean(self, total, count):
        return self.tmp(f"{total.code} / {count}.0", total.r)

    def normalize(self, centered, var, eps):
        return E(f"{centered.code} / {self.sqrt(f'{var.code} + {eps!r}')}", _r(centered, var))
