"""Where a plan's time goes: each step timed on its own, for ``kiln explain``.

The plan runs step by step through ``Plan.interpret`` (the same kernels, attributes and
operands as its generated function) with a clock around every kernel call; the median over
a few runs is each step's time. Timing steps apart adds the interpreter's per-step cost and
loses overlap between steps, so the figures are shares of the model's time, for finding
what costs most (a fallback on the hot path), not a latency to quote.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.ir import OpKind
from kiln.ir.types import resolve_symbols


@dataclass(frozen=True)
class StepTime:
    index: int  # the step's position in the plan
    kernel: str
    op: str  # the node's op kind, or a fallback's torch op (``aten.roll.default``)
    scope: str  # the module path the node came from ("" when unknown)
    seconds: float  # median over the runs
    fallback: bool  # the step runs an op Kiln does not compile (eager PyTorch)


def profile_plan(plan, inputs: list[torch.Tensor], runs: int = 5) -> list[StepTime]:
    """Median time of each step of ``plan`` over ``runs`` runs on ``inputs`` (after one
    untimed run: first-call initialisation is not a step's cost)."""
    if plan.runner is not None:
        raise KilnError("profiling steps is for CPU plans (a cuda plan runs as captured CUDA graphs)")
    if runs < 1:
        raise KilnError(f"runs must be at least 1, got {runs}")
    times: list[list[float]] = [[] for _ in plan.steps]
    index = {id(s): i for i, s in enumerate(plan.steps)}
    sizes = plan.size_values(inputs)

    def timed(step, operands):
        attrs = resolve_symbols(step.attrs, sizes)
        t = time.perf_counter()
        r = step.fn(operands, attrs)
        times[index[id(step)]].append(time.perf_counter() - t)
        return r

    with torch.no_grad():
        plan.interpret(list(inputs))
        for _ in range(runs):
            plan.interpret(list(inputs), call=timed)
    out = []
    for i, s in enumerate(plan.steps):
        fallback = s.node.op is OpKind.FALLBACK
        op = s.node.attrs.target if fallback else s.node.op.value
        out.append(StepTime(i, s.kernel, op, s.node.scope or "", statistics.median(times[i]), fallback))
    return out


def fallback_shares(steps: list[StepTime]) -> tuple[float, dict[str, tuple[int, float]]]:
    """(total seconds, fallback op -> (steps, seconds)), costliest first."""
    total = sum(s.seconds for s in steps)
    by_op: dict[str, tuple[int, float]] = {}
    for s in steps:
        if s.fallback:
            n, t = by_op.get(s.op, (0, 0.0))
            by_op[s.op] = (n + 1, t + s.seconds)
    return total, dict(sorted(by_op.items(), key=lambda kv: -kv[1][1]))
