"""Where a plan's time goes: each step timed on its own, for ``kiln explain``.

The plan runs step by step through ``Plan.interpret`` (the same kernels, attributes and
operands as its generated function) with a clock around every kernel call; the median over
a few runs is each step's time. Timing steps apart adds the interpreter's per-step cost and
loses overlap between steps, so the figures are shares of the model's time, for finding
what costs most (a fallback on the hot path), not a latency to quote.

Beside the wall time, each step's CPU time on the calling thread and on the process's other
threads (torch's OpenMP workers, which Kiln's kernels share): whether a step's work is split
between threads, which wall time cannot show where other processes share the cores (a
worker waiting for a core looks like a step that does not scale). Idle OpenMP workers spin
for a while after each parallel region unless ``OMP_WAIT_POLICY=PASSIVE``, and that spinning
counts as their CPU time too.
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import torch

from kiln.errors import KilnError
from kiln.ir import OpKind
from kiln.ir.types import resolve_symbols
from kiln.ir.record import record


@record(slots=False)
class StepTime:
    index: int  # the step's position in the plan
    kernel: str
    op: str  # the node's op kind, or a fallback's torch op (``aten.roll.default``)
    scope: str  # the module path the node came from ("" when unknown)
    seconds: float  # median over the runs
    fallback: bool  # the step runs an op Kiln does not compile (eager PyTorch)
    # CPU seconds (medians) spent during the step by the thread that ran the plan and by the
    # process's other threads; None where per-thread clocks are not available (not Linux)
    cpu_caller: float | None = None
    cpu_others: float | None = None


class ThreadClocks:
    """CPU time of the calling thread and of every other thread of this process (Linux: each
    thread's CPU-time clock, read by id; elsewhere ``read`` returns None)."""

    def __init__(self):
        self.me = threading.get_native_id()
        self.others: list[int] = []
        self.available = sys.platform.startswith("linux") and hasattr(time, "clock_gettime_ns")

    def refresh(self) -> None:
        """Re-list the process's threads (after the plan's first run has started its workers)."""
        if self.available:
            self.others = [int(t) for t in os.listdir("/proc/self/task") if int(t) != self.me]

    def read(self) -> tuple[int, int] | None:
        """(caller ns, others ns) so far; a thread that has exited since ``refresh`` counts 0."""
        if not self.available:
            return None
        mine = time.clock_gettime_ns(_thread_clock(self.me))
        rest = 0
        for tid in self.others:
            try:
                rest += time.clock_gettime_ns(_thread_clock(tid))
            except OSError:
                pass
        return mine, rest


def _thread_clock(tid: int) -> int:
    # Linux's clock id for a thread's CPU time, as glibc's pthread_getcpuclockid makes it:
    # (~tid << 3) | CPUCLOCK_PERTHREAD_MASK (4) | CPUCLOCK_SCHED (2)
    return (~tid << 3) | 6


def profile_plan(plan, inputs: list[torch.Tensor], runs: int = 5) -> list[StepTime]:
    """Median time of each step of ``plan`` over ``runs`` runs on ``inputs`` (after one
    untimed run: first-call initialisation is not a step's cost)."""
    if plan.runner is not None:
        raise KilnError("profiling steps is for CPU plans (a cuda plan runs as captured CUDA graphs)")
    if runs < 1:
        raise KilnError(f"runs must be at least 1, got {runs}")
    times: list[list[float]] = [[] for _ in plan.steps]
    cpu: list[list[tuple[int, int]]] = [[] for _ in plan.steps]
    index = {id(s): i for i, s in enumerate(plan.steps)}
    sizes = plan.size_values(inputs)
    clocks = ThreadClocks()

    def timed(step, operands):
        attrs = resolve_symbols(step.attrs, sizes)
        c0 = clocks.read()
        t = time.perf_counter()
        r = step.fn(operands, attrs)
        times[index[id(step)]].append(time.perf_counter() - t)
        c1 = clocks.read()
        if c0 is not None:
            cpu[index[id(step)]].append((c1[0] - c0[0], c1[1] - c0[1]))
        return r

    with torch.no_grad():
        plan.interpret(list(inputs))
        clocks.refresh()
        for _ in range(runs):
            plan.interpret(list(inputs), call=timed)
    out = []
    for i, s in enumerate(plan.steps):
        fallback = s.node.op is OpKind.FALLBACK
        op = s.node.attrs.target if fallback else s.node.op.value
        mine = statistics.median(c for c, _ in cpu[i]) / 1e9 if cpu[i] else None
        rest = statistics.median(c for _, c in cpu[i]) / 1e9 if cpu[i] else None
        out.append(StepTime(i, s.kernel, op, s.node.scope or "", statistics.median(times[i]), fallback, mine, rest))
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


def kernel_time(steps: list[StepTime]) -> dict[str, tuple[int, float]]:
    """kernel -> (steps, seconds), costliest first."""
    by_kernel: dict[str, tuple[int, float]] = {}
    for s in steps:
        n, t = by_kernel.get(s.kernel, (0, 0.0))
        by_kernel[s.kernel] = (n + 1, t + s.seconds)
    return dict(sorted(by_kernel.items(), key=lambda kv: -kv[1][1]))


def thread_split(steps: list[StepTime]) -> dict[str, tuple[int, float, float]]:
    """kernel -> (steps, CPU seconds on the calling thread, CPU seconds on other threads),
    largest total first; empty where the CPU times were not measured."""
    by_kernel: dict[str, tuple[int, float, float]] = {}
    for s in steps:
        if s.cpu_caller is None:
            continue
        n, mine, rest = by_kernel.get(s.kernel, (0, 0.0, 0.0))
        by_kernel[s.kernel] = (n + 1, mine + s.cpu_caller, rest + s.cpu_others)
    return dict(sorted(by_kernel.items(), key=lambda kv: -(kv[1][1] + kv[1][2])))
