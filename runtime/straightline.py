"""A plan as one generated Python function: the kernels called directly, in order.

Interpreting a plan means, per step, a loop iteration, a list of operands gathered from a
slot list by index, and the results stored back by index. Here the plan is written out once
as straight-line source instead, one line per step::

    def forward(inputs, c):
        v0, v1 = inputs
        v4 = k[0]([v0, c[2]], a[0])
        _r = k[1]([v4], a[1]); v5 = _r[0]; v6 = _r[1]; del _r; del v4
        ...
        return [v6]

Each slot is a local variable; the kernel functions and their attributes sit in two closure
cells (tuples indexed by literals: one cell per step made CPython's compile time grow
superlinearly with the steps), and the constants come in as ``c``, a dict indexed by literal slots
(the host's tensors, or a device's copies of them: one function serves both). The hot path
holds no dispatch: a step is a call, a few constant-index loads and local stores. A buffer
is dropped (``del``) right after its last use, as the interpreting loop did. The line a
kernel raised on names its step: ``step_at`` maps a traceback back to it, so failures
still name the node, at no cost to a call that succeeds. ``python -m
kiln.bench.executor_overhead`` measures what remains per step.
"""
from __future__ import annotations

import itertools
import types

from kiln.ir.types import has_symbols, resolve_symbols

_COUNTER = itertools.count()
FIRST_STEP_LINE = 4  # line 1 _make, 2 forward, 3 the inputs' unpacking


def _operand(i, consts: dict) -> str:
    if i is None:
        return "None"
    return f"c[{i}]" if i in consts else f"v{i}"


def generate(steps, input_slots, output_slots, const_slots, sizes=()):
    """forward(inputs, consts) -> list of outputs, ``consts`` a dict holding a tensor for each
    slot of ``const_slots``; step k runs on line FIRST_STEP_LINE + k.

    ``sizes``: (name, input slot, axis) of each symbolic size the steps' attributes use (a
    reshape to ``[batch, seq, 12, 64]``): the sizes are read off the inputs once per call
    and those attributes resolved with them."""
    consts = dict(const_slots)
    body = []
    ins = ", ".join(f"v{i}" for i in input_slots)
    head = f"    {ins}{',' if len(input_slots) == 1 else ''} = inputs" if input_slots else "    pass"
    if sizes:  # on the same line: step k stays on line FIRST_STEP_LINE + k
        head += "; sz = {" + ", ".join(f"{name!r}: v{slot}.shape[{axis}]" for name, slot, axis in sizes) + "}"
    body.append(head)
    attrs = []
    for n, s in enumerate(steps):
        symbolic = has_symbols(s.attrs)
        attrs.append(ResolvedAttrs(s.attrs) if symbolic else s.attrs)
        call = f"k[{n}]([{', '.join(_operand(i, consts) for i in s.ins)}], {f'a[{n}](sz)' if symbolic else f'a[{n}]'})"
        if len(s.outs) == 1:
            line = f"v{s.outs[0]} = {call}"
        else:  # a kernel of several results returns a sequence (it may hold more than used)
            line = f"_r = {call}; " + "; ".join(f"v{o} = _r[{j}]" for j, o in enumerate(s.outs)) + "; del _r"
        dead = [f"v{i}" for i in s.free if i not in consts]
        if dead:
            line += f"; del {', '.join(dead)}"
        body.append("    " + line)
    body.append(f"    return [{', '.join(_operand(i, consts) for i in output_slots)}]")
    src = "def _make(k, a):\n  def forward(inputs, c):\n" + "\n".join("  " + b for b in body) + "\n  return forward\n"
    filename = f"<kiln plan {next(_COUNTER)}>"
    scope: dict = {}
    exec(compile(src, filename, "exec"), scope)  # noqa: S102 - the source is generated above
    return scope["_make"](tuple(s.fn for s in steps), tuple(attrs))


MAX_SIZES = 64  # size tuples remembered per step


class ResolvedAttrs:
    """A step's symbolic attributes, resolved for a call's sizes: evaluated once per tuple
    of sizes and remembered (a stream of requests repeats a few lengths), in a bounded dict
    that starts over when full. The sizes dict is built in one order for every call, so its
    values are the key."""

    __slots__ = ("attrs", "memo")

    def __init__(self, attrs):
        self.attrs = attrs
        self.memo: dict = {}

    def __call__(self, sizes: dict):
        key = tuple(sizes.values())
        hit = self.memo.get(key)
        if hit is None:
            if len(self.memo) >= MAX_SIZES:
                self.memo.clear()
            hit = self.memo[key] = resolve_symbols(self.attrs, sizes)
        return hit


def step_at(tb: types.TracebackType | None, forward) -> int | None:
    """The index of the step whose line in ``forward`` the traceback passes through, if any
    (unchecked: a line outside the steps gives an index outside them)."""
    while tb is not None:
        if tb.tb_frame.f_code is forward.__code__:
            return tb.tb_lineno - FIRST_STEP_LINE
        tb = tb.tb_next
    return None
