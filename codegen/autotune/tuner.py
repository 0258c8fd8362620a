"""The tuner: measure candidate configurations within a time budget, keep the fastest.

``measure(config) -> seconds`` builds and times one configuration; an exception or a
non-finite time scores infinity (a config that fails to compile or gives wrong numbers
never wins). A hit in the tuning database skips measuring entirely.
"""
from __future__ import annotations

import math
import time
from typing import Callable

from kiln.errors import KilnError
from kiln.ir.record import record

from .db import TuningDB, TuningKey, default_db
from .space import Space


@record(slots=False)
class Budget:
    """How much tuning a compile may do: ``none`` (the space's default config),
    ``fast`` (a few configs), ``max`` (the whole space), or a number of seconds per kernel."""

    max_trials: int
    seconds: float

    @staticmethod
    def parse(tune: "str | float | int | Budget") -> "Budget":
        if isinstance(tune, Budget):
            return tune
        if tune == "none":
            return Budget(0, 0.0)
        if tune == "fast":
            return Budget(8, 10.0)
        if tune == "max":
            return Budget(1 << 30, math.inf)
        if isinstance(tune, (int, float)) and not isinstance(tune, bool) and tune >= 0:
            return Budget(1 << 30, float(tune))
        raise KilnError(f"tune must be 'none', 'fast', 'max' or a number of seconds, got {tune!r}")


@record(slots=False)
class TuneResult:
    config: dict
    seconds: float  # measured time of the winner (inf when nothing was measured)
    trials: int  # configurations measured now (0 on a database hit or tune="none")
    from_db: bool


def tune(key: TuningKey, space_: Space, measure: Callable[[dict], float], budget: "Budget | str" = "fast",
         db: TuningDB | None = None) -> TuneResult:
    budget = Budget.parse(budget)
    db = db if db is not None else default_db()
    hit = db.get(key)
    if hit is not None and hit[0] in space_:  # a config from an older space is tuned again
        return TuneResult(hit[0], hit[1], 0, True)
    if budget.max_trials == 0:
        return TuneResult(space_.default(), math.inf, 0, False)
    best, best_t, trials = None, math.inf, 0
    start = time.perf_counter()
    for cfg in space_.sample(budget.max_trials):
        if trials and time.perf_counter() - start > budget.seconds:
            break
        trials += 1
        try:
            t = float(measure(cfg))
        except Exception:  # noqa: BLE001  (a failing candidate simply loses)
            t = math.inf
        if not math.isfinite(t):
            t = math.inf
        if best is None or t < best_t:
            best, best_t = cfg, t
    if best is None or not math.isfinite(best_t):
        raise KilnError(f"autotuning {key.kernel} for {key.signature}: every one of {trials} configurations failed")
    db.put(key, best, best_t, trials)
    return TuneResult(best, best_t, trials, False)
