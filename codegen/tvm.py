"""TensorIR code generation for fused kernel groups on the CPU (TVM, lowered through LLVM).

A kernel group (``kiln.passes.partition.KernelGroup``) of injective ops, optionally around
reductions or normalizations, becomes one TensorIR function. The walk is codegen.walk's,
with ``TirEmitter`` building TIR expressions: each group output is one ``te.compute``
stage whose body is the walk's expression at the stage's index variables, each reduction
a stage of its own (``te.sum``/``max``/``min`` over reduction axes); elementwise ops come
from the per-op table (``codegen.tvm_ops``). ``te.create_prim_func`` turns the stages into
blocks and the schedule template ``schedule_group`` (``kiln.codegen.schedules_cpu``)
parallelizes/vectorizes/unrolls them. The template's knobs are the search space declared
beside it; ``build`` lowers one configuration to machine code for ``Target.arch`` (LLVM
``mcpu``).

Layouts: a channels-last operand or result is addressed in its physical NHWC order, so
the kernel reads and writes the tensors the plan holds without a relayout copy.
Numerics: bf16/fp16 values are computed in fp32 and rounded back at every node's output,
as torch does op by op; reductions accumulate in fp32 for them. An output that later
nodes of the group read is read back from its stage, not recomputed.

Only the structure lives here (rendering, scheduling, building); caching, tuning and
running the compiled modules are in ``kiln.kernels.generated``. Nothing in this module
imports TVM at import time: a warm compile loads exported modules without it.
"""
from __future__ import annotations

import hashlib

from kiln.ir import OpKind, Value
from kiln.ir import attrs as A
from kiln.ir.types import has_symbols

from .tvm_expr_size import KEPT, kept_stages, past_bounds
from .tvm_ops import LOW_PRECISION, TIR_OPS, cast, compute_dtype, const, tvm_dtype
from .walk import MOVEMENT_OPS, REDUCE_OPS, ROW_OPS, Emitter, Unsupported, Walker, physical_order, shape_of

# The row length whose softmax sums the schedule vectorizes (``rvector``'s default lanes)
VECTOR_ROWS = 16

# Part of every compiled module's cache key: bump it when rendering or scheduling changes
# the code generated for the same group and configuration.
CODEGEN_VERSION = 15

# what the TensorIR renderer covers: its per-op table, and what the walk renders itself
# (take is not enabled here: a data-dependent index inside a TIR load is untested)
COVERED = frozenset(TIR_OPS) | (MOVEMENT_OPS - {OpKind.TAKE}) | REDUCE_OPS | ROW_OPS | {OpKind.BATCH_NORM}


def unsupported_reason(group) -> str | None:
    """Why the TensorIR renderer cannot emit ``group``, or None when it can."""
    for n in group.nodes:
        if n.op not in COVERED:
            return f"no TensorIR template for {n.op.value}"
        if n.op is OpKind.PAD and n.attrs.mode is not A.PadMode.CONSTANT:
            return f"pad mode {n.attrs.mode.value}"
        if n.op is OpKind.RESHAPE and n.inputs[0].type.is_static and n.inputs[0].type.numel() >= 2 ** 31:
            return "reshape of a tensor with 2**31 or more elements"  # its linear index is int32
        if has_symbols(n.attrs) and not _symbolic_attrs_ok(n):
            return f"symbolic attributes of {n.op.value}"
    for v in list(group.inputs) + [o for n in group.nodes for o in n.outputs]:
        if v is None:
            continue
        if not v.type.is_static:
            try:
                shape_of(v)
            except Unsupported as e:
                return str(e)
        elif v.type.numel() == 0:
            return "empty tensor"
        try:
            tvm_dtype(v.type)
            physical_order(v)
        except Unsupported as e:
            return str(e)
    if not group.outputs:
        return "no outputs"
    named = {d.name for v in group.inputs for d in v.type.shape if not isinstance(d, int)}
    if any(not isinstance(d, int) and d.name not in named for v in group.outputs for d in v.type.shape):
        return "an output size that is no input's dim"  # the outputs are allocated from the inputs' sizes
    return None


def _symbolic_attrs_ok(n) -> bool:
    """Symbolic sizes in attributes the walk never reads (a reshape's or expand's target
    shape: it works from the output's type), or a slice's end (it reads start and step)."""
    if n.op in (OpKind.RESHAPE, OpKind.EXPAND):
        return True
    return n.op is OpKind.SLICE and not has_symbols((n.attrs.start, n.attrs.step))


def size_names(group) -> tuple[str, ...]:
    """The named symbolic sizes in ``group``'s values, sorted: each becomes a size variable
    of the generated function, bound from its arguments' shapes at every call."""
    names = set()
    for v in list(group.inputs) + [o for n in group.nodes for o in n.outputs]:
        if v is not None:
            names |= {d.name for d in v.type.shape if not isinstance(d, int)}
    return tuple(sorted(names))


def signature(group) -> str:
    """A canonical string of the group's ops, attributes, wiring, shapes, dtypes and layouts:
    equal signatures render to the same code."""
    names = {v: f"in{i}" for i, v in enumerate(group.inputs)}
    lines = [f"in{i}:{v.type!r}" for i, v in enumerate(group.inputs)]
    for j, n in enumerate(group.nodes):
        for k, o in enumerate(n.outputs):
            names[o] = f"n{j}.{k}"
        args = ",".join("-" if v is None else names[v] for v in n.inputs)
        lines.append(f"{n.op.value}({args}){n.attrs!r}->{[repr(o.type) for o in n.outputs]}")
    lines.append("out:" + ",".join(names[v] for v in group.outputs))
    return "\n".join(lines)


def signature_hash(group) -> str:
    return hashlib.sha256(signature(group).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------- vector math
# ops rendered with tvm_math's forms (exp, tanh, erf, sigmoid inside)
_TRANSCENDENTAL = frozenset({OpKind.EXP, OpKind.TANH, OpKind.ERF, OpKind.SIGMOID, OpKind.SILU, OpKind.GELU,
                             OpKind.SOFTMAX, OpKind.LOG_SOFTMAX})
MAX_VECTOR_MATH_DEPTH = 2


def _vector_math_ok(group) -> str:
    """How ``group`` renders exp/tanh/erf/sigmoid: in tvm_math's vectorizable forms with
    their operand bound by a Let ("let"), written out at each use ("inline"), or as TVM's
    scalar functions ("").

    With 16-bit floats the forms cannot hold Lets (TVM's vectorizer rejects them in loops
    that store bf16/fp16), so they are inlined, and only one deep: each form reads its
    operand some sixty times, and nested inline forms would multiply that. Otherwise not
    past ``MAX_VECTOR_MATH_DEPTH`` of them nested in one expression: compile time grows
    steeply with the nesting depth."""
    values = list(group.inputs) + [o for n in group.nodes for o in n.outputs]
    low = any(tvm_dtype(v.type) in LOW_PRECISION for v in values)
    depth: dict = {}
    for n in group.nodes:
        d = max((depth.get(v, 0) for v in n.inputs if v is not None), default=0) + (n.op in _TRANSCENDENTAL)
        if d > (1 if low else MAX_VECTOR_MATH_DEPTH):
            return ""
        for o in n.outputs:
            depth[o] = d
    return "inline" if low else "let"


# ----------------------------------------------------------------------------- the emitter
class TirEmitter(Emitter):
    """The walk's emitter for TensorIR: coordinates are TIR index expressions (or Python
    ints), values TIR expressions in their compute dtype."""

    OPS = TIR_OPS
    target = "TensorIR"

    def __init__(self, vector_math: str, sizes: dict | None = None):
        self.vector_math = vector_math
        self.sizes = sizes or {}  # symbolic size name -> its TIR variable
        self.tensors: dict[Value, object] = {}  # group inputs and stored outputs: te tensors
        self.stages: dict = {}  # reduction key -> its te stage
        self.count = 0

    def math(self, name: str, v, dtype: str):
        """``tirx.<name>(v)``, or its vectorizable form (``tvm_math``) in float32 arithmetic."""
        from tvm import tirx

        from . import tvm_math

        fast = tvm_math.FLOAT32.get(name) if dtype == "float32" and self.vector_math else None
        return fast(v, self.vector_math == "let") if fast is not None else getattr(tirx, name)(v)

    # -- coordinates --------------------------------------------------------------------
    def index(self, k):
        return k

    def dim(self, d):
        """A dim of the walk's shapes (an int or a named ``Sym``) as a TIR extent."""
        return d if isinstance(d, int) else self.sizes[d.name]

    def dims(self, shape) -> tuple:
        return tuple(self.dim(d) for d in shape)

    def is_zero(self, c):
        return isinstance(c, int) and c == 0

    def affine(self, terms, offset=0):
        acc = None
        for c, k in terms:
            if self.is_zero(c):
                continue
            t = c if k == 1 else c * k
            acc = t if acc is None else acc + t
        if acc is None:
            return offset
        return acc + offset if offset else acc

    def floordiv(self, c, k):
        from tvm import tirx

        return c // k if isinstance(c, int) else tirx.floordiv(c, k)

    def mod(self, c, k):
        from tvm import tirx

        return c % k if isinstance(c, int) else tirx.floormod(c, k)

    def clamp(self, c, lo, hi):
        from tvm import tirx

        return min(max(c, lo), hi) if isinstance(c, int) else tirx.max(tirx.min(c, hi), lo)

    def less(self, c, k):
        return const(c < k, "bool") if isinstance(c, int) else c < k

    def at_least(self, c, k):
        return const(c >= k, "bool") if isinstance(c, int) else c >= k

    def all_of(self, conds):
        from tvm import tirx

        return tirx.all(*conds)

    def coord_key(self, c):
        # TIR expressions compare by building expressions: memoize by identity (the walk
        # keeps the coordinates alive beside their keys)
        return c if isinstance(c, int) else ("expr", id(c))

    # -- values -----------------------------------------------------------------------------
    def load(self, v, coords):
        order = physical_order(v)
        x = self.tensors[v](*(coords[d] for d in order))
        return cast(x, compute_dtype(str(x.ty)))

    def node_value(self, n, value):
        # rounded to the node's dtype, as a stage storing it would
        dt = tvm_dtype(n.outputs[0].type)
        v = cast(value, dt)
        return cast(v, compute_dtype(dt))

    def retype(self, value, src, dst):
        return cast(value, compute_dtype(tvm_dtype(dst.type)))

    def select(self, cond, a, b):
        from tvm import tirx

        return tirx.Select(cond, a, b)

    def choose(self, cond, a, b):
        # Select evaluates both operands, and the simplifier removes the walk's clamps on the
        # untaken piece's indices under the select's condition: a real out-of-bounds read.
        # if_then_else evaluates only the branch taken.
        from tvm import tirx

        return tirx.if_then_else(cond, a, b)

    def constant(self, x, dtype):
        from kiln.ir import TensorType

        return const(x, compute_dtype(tvm_dtype(TensorType(dtype, ()))))

    # -- reductions ---------------------------------------------------------------------
    def reduce(self, key, kind, body, shape, axes, row):
        """A reduction stage (made once per ``key``) with the reduced axes kept as size 1,
        read at ``row``."""
        from tvm import te

        def stage(*i):
            rv = {d: te.reduce_axis((0, shape[d]), name=f"k{d}") for d in axes}
            combiner = {OpKind.SUM: te.sum, OpKind.MAX: te.max, OpKind.MIN: te.min}[kind]
            return combiner(body([rv[d].var if d in rv else i[d] for d in range(len(shape))]),
                            axis=[rv[d] for d in axes])

        return self._stage(key, self._row_shape(shape, axes), stage, f"t_{kind.value}")(*row)

    def _row_shape(self, shape, axes) -> tuple:
        return tuple(1 if d in axes else self.dim(s) for d, s in enumerate(shape))

    def _stage(self, key, shape: tuple, body, name: str):
        """The stage ``key``, made on first use: ``body`` over ``shape``, named ``name`` and a
        number (reductions, and the kept stages of ``row_terms`` and ``inverse_std``)."""
        from tvm import te

        t = self.stages.get(key)
        if t is None:
            self.count += 1
            t = self.stages[key] = te.compute(shape, body, name=f"{name}{self.count}")
        return t

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def div(self, a, b):
        return a / b

    def exp(self, a):
        return self.math("exp", a, str(a.ty))

    def log(self, a):
        from tvm import tirx

        return tirx.log(a)

    def mean(self, total, count):
        return total * const(1.0 / count, str(total.ty))

    def normalize(self, centered, var, eps):
        from tvm import tirx

        return centered * tirx.rsqrt(var + const(eps, str(var.ty)))

    def guard_overflow(self, squared, y):
        from tvm import tirx

        # a variance that overflows (inputs near 1e30) gives NaN in torch, not zeros
        return tirx.Select(tirx.isinf(squared), const(float("nan"), str(y.ty)), y)

    def row_terms(self, key, body, shape, coords, row_length):
        """Inline where the schedule's vectorized row sums take the row (a multiple of
        ``VECTOR_ROWS`` long: BERT's 128); else a kept stage, computed once per element in a
        loop nest LLVM vectorizes, so neither the row's scalar sum nor the output computes
        the exponential again (ViT's rows of 197, PatchTSMixer's of 63)."""
        if row_length % VECTOR_ROWS == 0 or row_length < VECTOR_ROWS:  # short rows: little to gain
            return body(coords)
        return self._stage(key, tuple(self.dim(s) for s in shape), lambda *i: body(list(i)), f"{KEPT}_exp")(*coords)

    def inverse_std(self, key, squared, count, eps, shape, axes, row):
        """A stage of one value per row, kept (not inlined into the elementwise tail, which
        would compute the square root again for every element of the row: most of a norm over
        short rows, PatchTSMixer's rows of 8): the expressions of ``normalize`` and
        ``guard_overflow``, the overflow's NaN carried to the row's elements by the product."""
        from tvm import tirx

        def stage(*i):
            sq = squared([self.index(0) if d in axes else i[d] for d in range(len(shape))])
            inv = tirx.rsqrt(self.mean(sq, count) + const(eps, str(sq.ty)))
            return tirx.Select(tirx.isinf(sq), const(float("nan"), str(sq.ty)), inv)

        return self._stage(key, self._row_shape(shape, axes), stage, f"{KEPT}_inv_std")(*row)

    # -- stages -----------------------------------------------------------------------------
    def store(self, walker: Walker, v: Value, name: str):
        """A stage computing ``v`` in its layout's physical order."""
        from tvm import te

        shape = self.dims(shape_of(v))
        order = physical_order(v)
        dt = tvm_dtype(v.type)

        def body(*phys):
            logical = [None] * len(shape)
            for p, d in zip(phys, order):
                logical[d] = p
            return cast(walker.value_at(v, logical), dt)

        return te.compute(tuple(shape[d] for d in order), body, name=name)


# ----------------------------------------------------------------------------- rendering
def render(group):
    """The group as TE: (placeholders in group-input order, output tensors in group-output order)."""
    from tvm import te

    why = unsupported_reason(group)
    if why:
        raise Unsupported(why)
    from tvm import tirx

    # one variable per named size: the compiled function takes any value of it, bound from
    # the shape of the first argument that has it (TVM checks the others agree)
    em = TirEmitter(_vector_math_ok(group), {name: tirx.Var(name, "int64") for name in size_names(group)})
    walker = Walker(group.nodes, em)
    placeholders = []
    for i, v in enumerate(group.inputs):
        order = physical_order(v)
        shape = em.dims(shape_of(v))
        placeholders.append(te.placeholder(tuple(shape[d] for d in order), tvm_dtype(v.type), name=f"in{i}"))
        em.tensors[v] = placeholders[-1]
    stored: dict = {}
    for k, v in enumerate(dict.fromkeys(v for v in group.outputs if v not in walker.producer)):
        stored[v] = em.store(walker, v, f"copy{k}")  # an input returned as it is: copied
    coords: dict = {}  # one set of index variables per rank: renders at them share the memo
    # in node order, so that an output read by later nodes is stored before them
    for j, n in enumerate(group.nodes):
        for v in n.outputs:
            if v in walker.producer and _too_big(walker, v, coords):
                # past tvm_expr_size's bounds: its operands (within them, having passed this
                # check) are stored, and the value is its own form over their loads
                operands = [x for x in n.inputs if x is not None and x in walker.producer]
                for k, x in enumerate(dict.fromkeys(operands)):
                    em.tensors[x] = em.store(walker, x, f"{KEPT}{j}_{k}")
                    walker.materialize(x)
            if v in group.outputs and v not in stored:
                stored[v] = em.tensors[v] = em.store(walker, v, f"n{j}")
                walker.materialize(v)
    return placeholders, [stored[v] for v in group.outputs]


def _too_big(walker, v: Value, coords: dict) -> bool:
    """Whether ``v``'s expression is past the bounds of ``tvm_expr_size``."""
    from tvm import tirx

    rank = len(shape_of(v))
    if rank not in coords:
        coords[rank] = [tirx.Var(f"c{d}", "int64") for d in range(rank)]
    try:
        expr = walker.value_at(v, list(coords[rank]))
    except Unsupported:  # its readers will say so, where it matters
        return False
    return past_bounds(expr)


# ----------------------------------------------------------------------------- building
def llvm_target(target) -> dict:
    """The TVM target for a ``kiln.target.Target``: LLVM for its CPU, with its core count."""
    spec = {"kind": "llvm", "num-cores": max(1, int(target.cores))}
    if target.arch and target.arch not in ("generic",):
        spec["mcpu"] = target.arch
    return spec


def build(group, config: dict, target, threads: int):
    """Render, schedule with ``config`` and compile ``group`` for ``target``: returns the
    TVM executable (call ``export_library`` to keep it)."""
    import tvm
    from tvm import te
    import tvm.s_tir as s_tir

    from .schedules_cpu import schedule_group

    placeholders, outs = render(group)
    func = te.create_prim_func(placeholders + outs).with_attr("global_symbol", "main")
    # a value used twice is one expression in two places: a tvm_math form's Let then binds
    # its variable twice, which TIR forbids; SSA form gives each its own variable
    mod = tvm.tirx.transform.ConvertSSA()(tvm.IRModule({"main": func}))
    sch = s_tir.Schedule(mod)
    schedule_group(sch, [t.op.name for t in outs] + kept_stages(outs), config, threads)
    return tvm.compile(sch.mod, target=tvm.target.Target(llvm_target(target)))
