"""Kernel choice by measurement: when several kernels accept a node, time each on the
node's real shapes (constants as they are, random run-time inputs) and keep the fastest.

Failures score infinity. Results are memoized per (kernel names, op, attrs, input types)
for the life of the process; the persistent tuning database arrives with autotuning.
"""
from __future__ import annotations

import math
import os
import time

import torch

from kiln.ir import Node

from .registry import Kernel

_MEMO: dict[tuple, str] = {}
REPEATS = 3


def _random_like(v) -> torch.Tensor:
    t = v.type
    dt = t.dtype.to_torch()
    if dt == torch.bool:
        return torch.rand(t.shape) > 0.5
    if dt.is_floating_point:
        return torch.randn(t.shape, dtype=dt)
    return torch.zeros(t.shape, dtype=dt)


def _time(fn, ins, attrs) -> float:
    try:
        with torch.no_grad():
            fn(ins, attrs)  # warm-up (and the first-call costs)
            best = math.inf
            for _ in range(REPEATS):
                t = time.perf_counter()
                fn(ins, attrs)
                best = min(best, time.perf_counter() - t)
        return best
    except Exception:
        return math.inf


def choose(node: Node, kernels: list[Kernel], constants: list) -> tuple[Kernel, object]:
    """Return (kernel, bound function) of the fastest candidate for ``node``."""
    bound = [(k, k.bind(node, constants)) for k in kernels]
    if len(bound) == 1 or os.environ.get("KILN_KERNEL_CHOICE") == "first" or not all(
            v is None or v.type.is_static for v in node.inputs):
        return bound[0]
    key = (tuple(k.name for k in kernels), node.op, node.attrs,
           tuple(None if v is None else repr(v.type) for v in node.inputs))
    name = _MEMO.get(key)
    if name is None:
        ins = [None if v is None else (c if c is not None else _random_like(v)) for v, c in zip(node.inputs, constants)]
        times = [_time(fn, ins, node.attrs) for _, fn in bound]
        name = bound[min(range(len(bound)), key=times.__getitem__)][0].name
        _MEMO[key] = name
    return next(b for b in bound if b[0].name == name)
