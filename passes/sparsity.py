"""Sparse weights: store a mostly-zero constant weight compressed when that runs faster.

A LINEAR (or groups-1 CONV2D) whose constant weight has at least ``MIN_ZERO_FRACTION``
zeros becomes SPARSE_LINEAR (SPARSE_CONV2D) over the weight encoded as CSR, BSR or 2:4
(``kiln.ir.sparse``). Which format, if any, is decided per layer:

- ``sparse="auto"``: by measurement on the layer's real shapes, through the pass
  context's ``Measurer`` (kernel timing lives above the passes); the dense layer and
  every candidate encoding run interleaved, and an encoding wins only if it beats dense by
  ``MARGIN``. So auto can never make a layer slower than the dense kernel it replaces,
  beyond timing noise, and a dense model pays only a zero count over its weights.
- ``sparse="csr" | "bsr" | "bsr(R,C)" | "2:4"``: that format for every weight sparse
  enough (and, for 2:4, of that pattern), unmeasured. For tests and targets that cannot be
  timed here (2:4 is the tensor-core format of the ``cuda`` target).
- ``sparse="off"``: nothing.

Every layer considered gets a ``SparseDecision`` in the context's decisions, with the times
and the reason: the compile's report holds them and ``kiln.sparsity_report`` shows them.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import field

import torch

from kiln.ir import DType, Graph, Layout, LayoutKind, Node, OpKind, TensorType, Value
from kiln.ir import attrs as A
from kiln.ir import sparse as S
from kiln.ir.record import record

from .context import PassContext
from .pattern import Const, Opt, P
from .rewrite import rewrite

MIN_ZERO_FRACTION = 0.5
MARGIN = 0.9  # a sparse format must take at most 90% of the dense time to be chosen
MAX_FILL = 2.0  # skip block formats that would store more than 2x the nonzeros (mostly padding)


@record(frozen=False, slots=False)
class SparseDecision:
    layer: str  # the module path (from the weight's parameter name), else the node's scope
    op: str
    shape: tuple  # dense weight shape
    sparsity: float  # fraction of zeros
    format: str  # "dense", "csr", "bsr[4, 4]", "2:4"
    reason: str
    dense_ms: float | None = None
    sparse_ms: dict = field(default_factory=dict)  # format -> ms
    max_error: float | None = None  # chosen kernel vs dense, on the measurement's input
    kernel: str = ""


def parse_mode(mode: str) -> tuple[str, Layout | None]:
    """("off"|"auto"|"forced", layout to force) for a sparse mode as ``kiln.options.parse_sparse``
    spells it."""
    if mode in ("off", "auto"):
        return mode, None
    if mode == "csr":
        return "forced", S.CSR
    if mode == "2:4":
        return "forced", S.SPARSE_24
    m = re.fullmatch(r"bsr\((\d+),(\d+)\)", mode)
    if m:
        return "forced", S.bsr(int(m.group(1)), int(m.group(2)))
    raise ValueError(f"not a canonical sparse mode: {mode!r} (kiln.options.parse_sparse makes one)")


def layout_name(layout: Layout | None) -> str:
    return "dense" if layout is None else repr(layout)


def _zero_fraction(w: torch.Tensor) -> float:
    # count_nonzero reads the weight once; ``(w != 0).sum()`` writes and rereads a mask of it
    return 1.0 - int(torch.count_nonzero(w)) / max(w.numel(), 1)


SAMPLE = 1 << 12  # weights larger than this are first looked at through a sample


@functools.lru_cache(maxsize=64)
def _sample_positions(n: int) -> torch.Tensor:
    # the same positions in every process (seeded by the size); sorted, so the gather walks
    # the weight front to back (transformers repeat a few weight sizes: drawn once per size)
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, n, (SAMPLE,), generator=g).sort().values


def surely_dense(w: torch.Tensor) -> bool:
    """Whether a sample of ``SAMPLE`` entries at fixed pseudo-random positions (the same in
    every process) has under half ``MIN_ZERO_FRACTION`` zeros: the weight is then taken as
    dense without counting all of it (every compile asks this of every linear's weight,
    hundreds of MB in a transformer). Random positions, not a stride or a block, so that a
    structured pattern (2:4, pruned rows or blocks) cannot hide from the sample. The
    positions are independent uniform draws, so for a weight with at least
    ``MIN_ZERO_FRACTION`` zeros the sample's zero fraction falls below half of it with
    probability at most exp(-2 * SAMPLE * (MIN_ZERO_FRACTION / 2) ** 2) = exp(-512)
    (Hoeffding); and a wrong "dense" would only leave a sparse weight dense, never change
    a result. Anything else is counted exactly."""
    n = w.numel()
    if n <= SAMPLE:
        return False
    sample = w.reshape(-1)[_sample_positions(n)]
    return 1.0 - int(torch.count_nonzero(sample)) / SAMPLE < MIN_ZERO_FRACTION / 2


def candidate_layouts(w: torch.Tensor, target: str) -> list[Layout]:
    """Encodings worth timing for a 2-D weight on ``target``."""
    if target == "cuda":
        return [S.SPARSE_24] if S.is_24(w) else []
    out = [S.CSR]
    nnz = max(int(torch.count_nonzero(w)), 1)
    for bh, bw in ((4, 4), (8, 1), (16, 1)):
        n, k = w.shape
        rows, cols = -(-n // bh), -(-k // bw)
        wp = torch.zeros(rows * bh, cols * bw, dtype=w.dtype)
        wp[:n, :k] = w
        stored = int((wp.reshape(rows, bh, cols, bw) != 0).any(3).any(1).sum()) * bh * bw
        if stored <= MAX_FILL * nnz:
            out.append(S.bsr(bh, bw))
    return out


def _sparse_node(n: Node, w2d: torch.Tensor, layout: Layout) -> tuple[Node, dict[Value, torch.Tensor]]:
    """The SPARSE_* node replacing ``n`` with its weight in ``layout`` (same output values)."""
    e = S.encode(w2d, layout)
    name = n.inputs[1].name
    consts = {}

    def const(t, suffix, lay=None):
        v = Value(TensorType(DType.from_torch(t.dtype), tuple(t.shape), lay or Layout()), f"{name}_{suffix}")
        consts[v] = t
        return v

    vals = const(e.values, "values", layout)
    idx = const(e.indices, "indices")
    ptr = None if e.indptr is None else const(e.indptr, "indptr")
    rest = list(n.inputs[2:]) + [None] * (4 - len(n.inputs))
    if n.op is OpKind.LINEAR:
        attrs = A.SparseLinearAttrs(layout, tuple(w2d.shape), n.attrs.activation)
        op = OpKind.SPARSE_LINEAR
    else:
        a: A.Conv2dAttrs = n.attrs
        attrs = A.SparseConv2dAttrs(layout, tuple(n.inputs[1].type.shape), a.stride, a.padding, a.dilation,
                                    a.activation)
        op = OpKind.SPARSE_CONV2D
    ins = [n.inputs[0], vals, idx, ptr] + rest[:2]
    while ins and ins[-1] is None:
        ins.pop()
    return Node(op, tuple(ins), attrs, n.outputs, n.scope), consts


def _layer_name(n: Node) -> str:
    """The module path: imported weights are named after their parameter (``fc1.weight``)."""
    w = n.inputs[1].name.removesuffix("_nhwc").removesuffix(".weight")
    return w if w != n.inputs[1].name or not n.scope else n.scope


class _Decider:
    def __init__(self, ctx: PassContext):
        self.mode, self.forced = parse_mode(ctx.options.sparse)
        self.measure = None if ctx.measure is None else ctx.measure.time_nodes
        self.target = ctx.target
        self.log = ctx.decisions.sparsity
        self.memo: dict[tuple, Layout | None] = {}

    def __call__(self, n: Node, w: torch.Tensor, graph_consts) -> Layout | None:
        key = (n.inputs[1], n.inputs[0].type, n.attrs)
        if key not in self.memo:
            self.memo[key] = self._decide(n, w, graph_consts)
        return self.memo[key]

    def _record(self, n, w, fmt, reason, **kw):
        zeros = _zero_fraction(w)
        self.log.append(SparseDecision(_layer_name(n), n.op.value, tuple(n.inputs[1].type.shape), round(zeros, 4),
                                       fmt, reason, **kw))

    def _decide(self, n: Node, w: torch.Tensor, consts) -> Layout | None:
        if surely_dense(w) or _zero_fraction(w) < MIN_ZERO_FRACTION:
            return None  # dense models: nothing recorded, nothing timed
        if self.forced is not None:
            if self.forced.kind is LayoutKind.SPARSE_24 and not S.is_24(w):
                self._record(n, w, "dense", "forced 2:4, but the weight is not 2:4 sparse")
                return None
            self._record(n, w, layout_name(self.forced), "forced by the sparse= option")
            return self.forced
        layouts = candidate_layouts(w, self.target)
        if not layouts:
            self._record(n, w, "dense", f"no sparse format for target {self.target}")
            return None
        if self.target != "cpu" or self.measure is None or not n.inputs[0].type.is_static:
            why = ("no Measurer given" if self.measure is None else
                   "dynamic input shape" if not n.inputs[0].type.is_static else f"target {self.target} cannot be timed here")
            if self.target == "cuda" and layouts == [S.SPARSE_24]:
                self._record(n, w, layout_name(S.SPARSE_24), "2:4 pattern: tensor-core sparse kernel (not timed: "
                             + why + ")")
                return S.SPARSE_24
            self._record(n, w, "dense", f"not measured ({why}); dense is never slower")
            return None
        options = [(n, [None if v is None else consts.get(v) for v in n.inputs])]
        for lay in layouts:
            sn, sc = _sparse_node(n, w, lay)
            options.append((sn, [None if v is None else (sc.get(v) if v in sc else consts.get(v)) for v in sn.inputs]))
        res = self.measure(options)
        dense_t = res[0][0]
        times = {layout_name(lay): r[0] * 1e3 for lay, r in zip(layouts, res[1:])}
        best = min(range(len(layouts)), key=lambda i: res[i + 1][0])
        bt, bk, be = res[best + 1]
        if not bt < MARGIN * dense_t:
            self._record(n, w, "dense", f"dense was fastest ({dense_t * 1e3:.3f} ms vs {bt * 1e3:.3f} ms "
                         f"for {layout_name(layouts[best])})", dense_ms=dense_t * 1e3, sparse_ms=times,
                         max_error=0.0, kernel=res[0][1])
            return None
        self._record(n, w, layout_name(layouts[best]), f"{dense_t / bt:.2f}x faster than dense",
                     dense_ms=dense_t * 1e3, sparse_ms=times, max_error=be, kernel=bk)
        return layouts[best]


def _weight_2d(n: Node, w: torch.Tensor) -> torch.Tensor | None:
    if w.dtype != torch.float32 or n.inputs[0].type.dtype is not DType.FLOAT32:
        return None
    if n.op is OpKind.LINEAR:
        return w if w.dim() == 2 else None
    if n.attrs.groups != 1 or w.dim() != 4:
        return None
    return w.reshape(w.shape[0], -1)


def sparsify(graph: Graph, ctx: PassContext) -> Graph:
    """The pass: LINEAR/CONV2D with sparse constant weights -> SPARSE_* where it pays."""
    decide = _Decider(ctx)
    if decide.mode == "off":
        return graph

    def rule(m, rw):
        n = m.root
        w = rw.constant(n.inputs[1])
        w2d = _weight_2d(n, w)
        if w2d is None:
            return None
        layout = decide(n, w2d, rw.constants)
        if layout is None:
            return None
        node, consts = _sparse_node(n, w2d, layout)
        rw.constants.update(consts)
        outs = tuple(Value(o.type, o.name) for o in n.outputs)
        rw.emit(dataclasses.replace(node, outputs=outs))
        return outs[0]

    rules = [(P((OpKind.LINEAR, OpKind.CONV2D), "x", Const("w"), Opt("b"), Opt("r"),
               where=lambda n: n.attrs.activation is not A.Activation.RELU6), rule)]
    return rewrite(graph, rules, name="sparsify")
