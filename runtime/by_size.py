"""Kernel choice per size bucket: a dynamic plan's node may run a different kernel at
different sizes.

Which kernel is fastest for a node can change with its size: a Winograd convolution wins
at a large batch and loses to oneDNN's direct one at batch 1; a GEMM's best blocking
depends on its row count. A dynamic plan measures its kernels at the compile's example
sizes, so one choice per node leaves time on the table at the other end of the range. Here
a node is measured at a few representative sizes (``representative_sizes``: the example's,
a quarter of it, and with ``size_buckets=3`` four times it, capped at the range's end); where they
disagree, its step is a ``BySize`` that reads the call's size off an operand's shape and
calls the kernel chosen nearest to it (bucket bounds at the geometric means of neighbouring
representative sizes). Nodes whose choice agrees at every size keep one kernel, so the
common case pays nothing at run time. In a graph with an LSTM or GRU whose batch is
symbolic, the batch is the size that varies (down to 1), and those nodes are dispatched on
it alone (``varied_size``): a recurrence's rows decide between its fused and hoisted
kernels, its number of time steps does not.

A dispatched node's choice is recorded (compile cache, artifacts) as one string naming
each bucket's sizes and kernel (``encode``/``decode``), so a warm compile or a loaded
artifact rebuilds the same dispatch without measuring. Each distinct kernel is prepared
once, at the smallest representative size that chose it, both when choosing and when
restoring: the two plans are the same, to the bit.
"""
from __future__ import annotations

import math

from kiln.ir import Node, OpKind
from kiln.ir.types import Sym

PREFIX = "by-size["
SMALL = 4  # the small representative size is the example's size over this
LARGE = 4  # the large one the example's size times this (within the range)


def representative_sizes(hints: dict, limits: dict, buckets: int, vary: tuple[str, int] | None = None) -> list[dict]:
    """The sizes a dynamic plan's kernels are chosen at, the example's first.

    Only one named size varies between them: the size with the largest example value (batch
    for a vision model, the sequence length for a text model at batch 1), at a quarter of it
    when that is at least 2 and inside the range -- or, given ``vary = (name, small)``
    (``varied_size``'s pick), that size at ``small`` or the range's lower end where that is
    below the example's; and with ``buckets >= 3`` at four times the example (an open range,
    or a range whose upper end is at least three times the example; capped at that end).
    The default is 2: a large size costs four times the example's measuring time."""
    out = [dict(hints)]
    if buckets <= 1 or not hints:
        return out

    def low(n):
        return (limits.get(n, (None, None))[0] if limits else None) or 1

    # the given size at its small value raised to the range's lower end, where that is below
    # the example; else the default
    named = vary is not None and vary[0] in hints and max(vary[1], low(vary[0])) < hints[vary[0]]
    name = vary[0] if named else max(sorted(hints), key=lambda n: hints[n])
    h = hints[name]
    hi = limits.get(name, (None, None))[1] if limits else None
    if named:
        out.append({**hints, name: max(vary[1], low(name))})
    elif h // SMALL >= 2 and h // SMALL >= low(name):
        out.append({**hints, name: h // SMALL})
    if buckets >= 3 and (hi is None or hi >= 3 * h):
        out.append({**hints, name: LARGE * h if hi is None else min(hi, LARGE * h)})
    return out


def _rnn_batch(node: Node) -> tuple[int, tuple[int, ...]] | None:
    """(operand, axes) of an LSTM or GRU's batch dim when it is symbolic: the rows of its
    recurrence, which decide between its fused and hoisted kernels (its time steps run one
    after another, however many there are)."""
    if node.op not in (OpKind.LSTM, OpKind.GRU) or not node.inputs or node.inputs[0] is None:
        return None
    axis = 0 if node.attrs.batch_first else 1
    shape = node.inputs[0].type.shape
    return (0, (axis,)) if len(shape) > axis and isinstance(shape[axis], Sym) else None


def varied_size(graph, hints: dict) -> tuple[str, int] | None:
    """(name, small size) for ``representative_sizes`` when a graph's sizes should not vary
    as by default: an LSTM's or GRU's symbolic batch (``_rnn_batch``), at 1 -- a single
    series, the range's lower end, where a recurrence's few rows per step favour other
    kernels than a wide batch's; a forecaster's series are longer than its batch is wide, so
    the default would vary the time steps, whose number changes no choice. None otherwise."""
    for node in graph.nodes:
        where = _rnn_batch(node)
        if where is not None:
            dim = node.inputs[where[0]].type.shape[where[1][0]]
            if dim.name in hints:
                return dim.name, 1
    return None


# ----------------------------------------------------------------------------- records
def encode(entries: list[tuple[dict, str]]) -> str:
    """One recorded choice for a node dispatched by size: ``(sizes, kernel name)`` per bucket."""
    parts = [",".join(f"{k}={v}" for k, v in sorted(s.items())) + ":" + name for s, name in entries]
    return PREFIX + ";".join(parts) + "]"


def decode(recorded: str) -> list[tuple[dict, str]] | None:
    """``encode``'s entries; None when ``recorded`` is a plain kernel name. A malformed record
    raises ValueError."""
    if not recorded.startswith(PREFIX):
        return None
    if not recorded.endswith("]"):
        raise ValueError(f"malformed size-bucket record {recorded!r}")
    out = []
    for part in recorded[len(PREFIX):-1].split(";"):
        sizes_text, sep, name = part.rpartition(":")
        if not sep or not name:
            raise ValueError(f"malformed size-bucket record {recorded!r}")
        sizes = {}
        for item in sizes_text.split(",") if sizes_text else ():
            k, eq, v = item.partition("=")
            if not eq or not k.isidentifier() or not v.isdigit():
                raise ValueError(f"malformed size-bucket record {recorded!r}")
            sizes[k] = int(v)
        out.append((sizes, name))
    if len(out) < 2:
        raise ValueError(f"a size-bucket record needs two buckets: {recorded!r}")
    return out


def member_kernels(recorded: str) -> list[str]:
    """The plain kernel names a recorded choice runs (itself when it is not dispatched)."""
    entries = decode(recorded)
    return [recorded] if entries is None else list(dict.fromkeys(name for _, name in entries))


# ----------------------------------------------------------------------------- dispatch
def probe(node: Node) -> tuple[int, tuple[int, ...]] | None:
    """(operand, axes): the first operand with symbolic dims and those axes; their product is
    the size a call is dispatched on (an LSTM's or GRU's: its batch alone, ``_rnn_batch``).
    None when no operand has one."""
    if node.op in (OpKind.LSTM, OpKind.GRU):
        return _rnn_batch(node)
    for i, v in enumerate(node.inputs):
        if v is None:
            continue
        axes = tuple(a for a, d in enumerate(v.type.shape) if isinstance(d, Sym))
        if axes:
            return i, axes
    return None


def work(node: Node, where: tuple[int, tuple[int, ...]], sizes: dict) -> int:
    """The probed size of ``node`` at ``sizes``."""
    i, axes = where
    shape = node.inputs[i].type.concrete(sizes).shape
    return math.prod(int(shape[a]) for a in axes)


class BySize:
    """A step that calls the kernel of the bucket its call's size falls in."""

    __slots__ = ("fns", "bounds", "operand", "axes", "names")

    def __init__(self, fns: list, bounds: list[int], operand: int, axes: tuple, names: list[str]):
        self.fns, self.bounds, self.operand, self.axes, self.names = tuple(fns), tuple(bounds), operand, axes, names

    def pick(self, inputs) -> int:
        shape = inputs[self.operand].shape
        w = 1
        for a in self.axes:
            w *= shape[a]
        for j, b in enumerate(self.bounds):
            if w <= b:
                return j
        return len(self.bounds)

    def __call__(self, inputs, attrs):
        return self.fns[self.pick(inputs)](inputs, attrs)

    def __repr__(self) -> str:
        return f"BySize({', '.join(self.names)}; bounds {list(self.bounds)})"


def dispatch(node: Node, entries: list[tuple[dict, str]], bind) -> tuple[str, object]:
    """(recorded choice, step function) for ``node`` chosen per bucket: ``entries`` are
    (sizes, kernel name) per representative size; ``bind(name, sizes)`` prepares a kernel at
    sizes. One kernel everywhere: that kernel alone (prepared at the first entry's sizes, the
    example's)."""
    where = probe(node)
    names = [name for _, name in entries]
    if len(set(names)) == 1 or where is None:
        return names[0], bind(names[0], entries[0][0])
    ordered = sorted(entries, key=lambda e: work(node, where, e[0]))
    works = [work(node, where, s) for s, _ in ordered]
    fns: dict = {}
    for s, name in ordered:  # each kernel prepared once, at the smallest size that chose it
        if name not in fns:
            fns[name] = bind(name, s)
    bounds = [int(math.sqrt(a * b)) for a, b in zip(works, works[1:])]
    names = [name for _, name in ordered]
    return encode(ordered), BySize([fns[n] for n in names], bounds, where[0], where[1], names)
