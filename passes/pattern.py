"""A small pattern language over SSA values.

    P(OpKind.ADD, P(OpKind.LINEAR, "x", Const("w"), name="lin"), Const("b"))

matches a value produced by an ADD whose first operand is produced by a LINEAR of any
value (captured as ``x``) and a constant ``w``, and whose second operand is a constant
``b``. ``name=`` captures the matched node. ``where=`` takes a predicate on the node.
``commutative=True`` also tries the two operands swapped. Strings capture any value.
"""
from __future__ import annotations

from dataclasses import field
from typing import Callable

import torch

from kiln.ir import Node, OpKind, Value
from kiln.ir.record import record


@record(frozen=False, slots=False)
class Match:
    values: dict[str, Value] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    root: Node | None = None

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def get(self, name: str):
        return self.values.get(name)


class Pattern:
    def match(self, v: Value | None, ctx, m: Match) -> bool:
        raise NotImplementedError


def _as_pattern(p) -> Pattern:
    if isinstance(p, Pattern):
        return p
    if isinstance(p, str):
        return AnyValue(p)
    if p is None:
        return AnyValue(None)
    raise TypeError(f"not a pattern: {p!r}")


class AnyValue(Pattern):
    def __init__(self, name: str | None = None):
        self.name = name

    def match(self, v, ctx, m) -> bool:
        if v is None:
            return False
        if self.name:
            if self.name in m.values and m.values[self.name] is not v:
                return False  # the same name must bind the same value
            m.values[self.name] = v
        return True


class Const(Pattern):
    """A graph constant, optionally checked by ``where(tensor) -> bool``."""

    def __init__(self, name: str | None = None, where: Callable[[torch.Tensor], bool] | None = None):
        self.name, self.where = name, where

    def match(self, v, ctx, m) -> bool:
        if v is None:
            return False
        t = ctx.constant(v)
        if t is None or (self.where is not None and not self.where(t)):
            return False
        if self.name:
            m.values[self.name] = v
        return True


class Opt(Pattern):
    """An optional operand: absent (None) or matching ``inner``."""

    def __init__(self, inner):
        self.inner = _as_pattern(inner)

    def match(self, v, ctx, m) -> bool:
        return v is None or self.inner.match(v, ctx, m)


class P(Pattern):
    def __init__(self, op: OpKind | tuple[OpKind, ...], *operands, name: str | None = None,
                 where: Callable[[Node], bool] | None = None, commutative: bool = False,
                 single_use: bool = False):
        self.ops = op if isinstance(op, tuple) else (op,)
        self.operands = [_as_pattern(o) for o in operands]
        self.name, self.where, self.commutative, self.single_use = name, where, commutative, single_use

    def match(self, v, ctx, m) -> bool:
        if v is None:
            return False
        n = ctx.producer(v)
        if n is None or n.op not in self.ops:
            return False
        if self.single_use and ctx.uses(v) != 1:
            return False
        if self.where is not None and not self.where(n):
            return False
        orders = [list(n.inputs)]
        if self.commutative and len(n.inputs) == 2:
            orders.append(list(reversed(n.inputs)))
        for ins in orders:
            trial = Match(dict(m.values), dict(m.nodes), m.root)
            if self.operands and len(self.operands) > len(ins):
                ins = ins + [None] * (len(self.operands) - len(ins))
            if self.operands and len(ins) > len(self.operands):
                continue  # more operands than the pattern names
            if all(p.match(x, ctx, trial) for p, x in zip(self.operands, ins)):
                if self.name:
                    trial.nodes[self.name] = n
                    trial.values[self.name] = v
                m.values, m.nodes = trial.values, trial.nodes
                return True
        return False

    def root_ops(self) -> tuple[OpKind, ...]:
        return self.ops


def is_scalar_const(value: float, tol: float = 0.0):
    """Predicate for a constant whose every element equals ``value`` (within ``tol``)."""
    def check(t: torch.Tensor) -> bool:
        if t.numel() == 0 or t.numel() > 4096:
            return False
        tf = t.double()
        return bool(((tf - value).abs() <= tol).all())
    return check


def scalar_of(t: torch.Tensor) -> float | None:
    """The single value of a constant whose elements are all equal, else None."""
    if t.numel() == 0 or t.numel() > 4096:
        return None
    flat = t.reshape(-1)
    return float(flat[0]) if bool((flat == flat[0]).all()) else None


def true_div(n) -> bool:
    """A DIV node that divides exactly (no integer-style rounding)."""
    from kiln.ir.attrs import Rounding

    return n.attrs.rounding is Rounding.NONE
