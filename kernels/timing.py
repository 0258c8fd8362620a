"""The one way Kiln times things: candidates run in turn, round after round.

These machines are shared and their speed drifts within seconds, so a candidate timed in
a block of its own can win or lose by the moment it ran in. Interleaving puts every
candidate in every round: a burst of noise hits them alike. Kernel choice keeps the best
round of each (the least disturbed); end-to-end comparisons report medians.

A candidate that raises is dropped from later rounds and scores infinity. Timing runs
under ``torch.no_grad()``.
"""
from __future__ import annotations

import math
import time
from dataclasses import field
from typing import Callable, Sequence

import torch

from kiln.ir.record import record


def median(xs) -> float:
    """``statistics.median``, without importing ``statistics`` (with ``fractions`` and
    ``decimal``) into every process that loads a plan: this module is on the load path."""
    s = sorted(xs)
    n = len(s)
    if n == 0:
        raise ValueError("median of no samples")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# the fewest rounds after which ``interleaved(settled=...)`` may stop: two would leave the
# noise rule (the spread between a candidate's median and best round) nothing to measure
MIN_SETTLED_ROUNDS = 3


@record(frozen=False, slots=False)
class Timing:
    """Seconds per round of one candidate; empty when it failed."""

    samples: list = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else math.inf

    @property
    def median(self) -> float:
        return median(self.samples) if self.samples else math.inf


def interleaved(fns: Sequence[Callable[[], object] | None], rounds: int, warmup: int = 0,
                rotate: bool = False, race: float | None = None,
                settled: Callable[[list[list[float]]], bool] | None = None) -> list[Timing]:
    """Time each zero-argument function once per round, the functions in turn, after
    ``warmup`` untimed calls each. ``None`` entries (and functions that raise) get an empty
    ``Timing``. ``rotate`` starts each round one function later, so no function always runs
    right after the same other one (whose cache or thread state it would inherit).

    ``race``: from the second round on, a function whose best round is more than ``race``
    times the best of all is timed no more (its ``Timing`` keeps the rounds it ran, fewer
    than ``rounds``): a candidate that far behind cannot be a winner, and timing it again
    is most of what a choice between a fast kernel and a slow one costs.

    ``settled``: asked with every function's rounds so far after the third round and each
    later one; True ends the timing there (the caller's decision cannot change any more)."""
    live = list(fns)
    out = [Timing() for _ in live]
    with torch.no_grad():
        for _ in range(warmup):
            for i, fn in enumerate(live):
                if fn is not None and not _call(fn):
                    live[i] = None
        for r in range(rounds):
            order = range(len(live))
            if rotate and live:
                k = r % len(live)
                order = [*range(k, len(live)), *range(k)]
            for i in order:
                fn = live[i]
                if fn is None:
                    continue
                t = time.perf_counter()
                if not _call(fn):
                    live[i], out[i].samples = None, []
                    continue
                out[i].samples.append(time.perf_counter() - t)
            if race is not None and r >= 1:
                best = min((t.best for t, fn in zip(out, live) if fn is not None), default=math.inf)
                for i, fn in enumerate(live):
                    if fn is not None and out[i].best > race * best:
                        live[i] = None
            if settled is not None and r >= MIN_SETTLED_ROUNDS - 1 and r < rounds - 1 \
                    and settled([t.samples for t in out]):
                break
    return out


def _call(fn) -> bool:
    try:
        fn()
        return True
    except Exception:  # noqa: BLE001  (a failing candidate loses; it never breaks the compile)
        return False


def best_seconds(fns: Sequence[Callable[[], object] | None], rounds: int, warmup: int = 0) -> list[float]:
    """Best round of each function (infinity for a failure)."""
    return [t.best for t in interleaved(fns, rounds, warmup)]


def median_ms(fns: Sequence[Callable[[], object]], rounds: int, warmup: int = 1) -> list[float]:
    """Median milliseconds of each function."""
    return [t.median * 1e3 for t in interleaved(fns, rounds, warmup)]
