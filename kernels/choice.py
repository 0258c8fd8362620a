"""Kernel choice by measurement: when several kernels accept a node, time each on the
node's real shapes (constants as they are, random run-time inputs) and keep the fastest.

A candidate must first agree with the reference kernel on those inputs (within the
dtype's tolerance); failures and disagreements score infinity. Results are memoized per
(kernel names, op, attrs, input types) for the life of the process, and recorded in the
compile cache.
"""
from __future__ import annotations

import math
import os
import time

import torch

from kiln.ir import LayoutKind, Node

from .registry import Kernel

_MEMO: dict[tuple, str] = {}
REPEATS = 5


def _random_like(v) -> torch.Tensor:
    """A random run-time value of ``v``'s type, stored as the plan stores it (a channels-last
    value in channels-last memory), so kernels are timed on the layout they will get."""
    t = v.type
    dt = t.dtype.to_torch()
    if dt == torch.bool:
        x = torch.rand(t.shape) > 0.5
    elif dt.is_floating_point:
        x = torch.randn(t.shape, dtype=dt)
    elif dt == torch.uint8 and t.quant is not None:  # quantized activations: the whole range
        x = torch.randint(0, 256, t.shape, dtype=dt)
    else:
        x = torch.zeros(t.shape, dtype=dt)
    if t.rank == 4 and t.layout.kind is LayoutKind.CHANNELS_LAST:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _agrees(out, ref, lsb: bool = False) -> bool:
    """``lsb``: integer outputs are quantized values and may differ by one step (rounding
    ties after a float32 requantization scale land either way)."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    if len(outs) != len(refs):
        return False
    for o, r in zip(outs, refs):
        if not isinstance(o, torch.Tensor) or o.shape != r.shape or o.dtype != r.dtype:
            return False
        if o.is_floating_point():
            rel = 1e-4 if o.dtype in (torch.float32, torch.float64) else 3e-2
            scale = max(1.0, float(r.abs().nan_to_num(0, 0, 0).max())) if r.numel() else 1.0
            d = (o.double() - r.double()).abs()
            if d.numel() and not bool((d.nan_to_num(0, 0, 0) <= rel * scale).all()):
                return False
            if not torch.equal(torch.isnan(o), torch.isnan(r)):
                return False
        elif lsb and o.dtype == torch.uint8:
            if o.numel() and int((o.int() - r.int()).abs().max()) > 1:
                return False
        elif not torch.equal(o, r):
            return False
    return True


def _warm(fn, ins, attrs, ref=None, lsb: bool = False) -> bool:
    """One untimed call (first-call costs), checked against the reference when given."""
    try:
        with torch.no_grad():
            out = fn(ins, attrs)
        return ref is None or _agrees(out, ref, lsb)  # a kernel that disagrees is never chosen
    except Exception:
        return False


def _timed(fns: list, ins, attrs, repeats: int = REPEATS) -> list[float]:
    """Best time of each function over ``repeats`` rounds that take the candidates in turn, so
    a burst of machine noise (these machines are shared) hits them alike rather than
    deciding for whichever candidate ran in a quiet moment."""
    best = [math.inf] * len(fns)
    with torch.no_grad():
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                if fn is None:
                    continue
                try:
                    t = time.perf_counter()
                    fn(ins, attrs)
                    best[i] = min(best[i], time.perf_counter() - t)
                except Exception:
                    fns[i], best[i] = None, math.inf
    return best


def choose(node: Node, kernels: list[Kernel], constants: list) -> tuple[Kernel, object]:
    """Return (kernel, bound function) of the fastest candidate for ``node``."""
    if len(kernels) == 1 or os.environ.get("KILN_KERNEL_CHOICE") == "first" or not all(
            v is None or v.type.is_static for v in node.inputs):
        return kernels[0], kernels[0].bind(node, constants)
    key = (torch.get_num_threads(), tuple(k.name for k in kernels), node.op, node.attrs,
           tuple(None if v is None else repr(v.type) for v in node.inputs))
    name = _MEMO.get(key)
    if name is not None:  # known: prepare (pack weights for) the winner only
        k = next(k for k in kernels if k.name == name)
        return k, k.bind(node, constants)
    bound = [(k, k.bind(node, constants)) for k in kernels]
    ins = [None if v is None else (c if c is not None else _random_like(v)) for v, c in zip(node.inputs, constants)]
    ref = None
    ref_k = next((k for k, _ in bound if k.target == "reference"), None)
    if ref_k is not None:
        try:
            with torch.no_grad():
                ref = ref_k.fn(ins, node.attrs)
        except Exception:
            ref = None
    lsb = node.outputs[0].type.quant is not None
    fns = [fn if _warm(fn, ins, node.attrs, None if k.target == "reference" else ref, lsb) else None for k, fn in bound]
    times = _timed(fns, ins, node.attrs)
    if all(t == math.inf for t in times):
        return next(b for b in bound if b[0].target == "reference") if ref_k is not None else bound[0]
    best = bound[min(range(len(bound)), key=times.__getitem__)]
    _MEMO[key] = best[0].name
    return best
