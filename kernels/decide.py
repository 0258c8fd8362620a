"""When a measurement decides: the rule kernel choice applies to interleaved timings.

This machine's speed drifts by tens of percent within minutes, so "the fastest round wins"
turns noise into decisions, and a compile cache then keeps a choice that a quieter moment
would have reversed. The rule here decides away from a *prior* only when the difference is
larger than the noise measured in the same rounds:

- each candidate's time is its best round; its noise is the relative gap between its
  median round and its best one (how much the rounds disagreed);
- candidate ``c`` *clearly beats* ``i`` when ``best(c) * (1 + tol) < best(i)``, with ``tol``
  the larger of the two candidates' noise and ``MIN_MARGIN``;
- the candidates that nothing clearly beats are *tied for first*; of those, the one the
  prior ranks highest wins.

The prior is an ordering of candidate names: the tuning database's earlier winner for the
same node first (when there is one), then the registration order (the kernel modules
register their kernels best-first where no measurement is available, the reference last).
Equal measurements thus give the same choice in every process. ``ambiguous`` says whether
more rounds could change the decision: several candidates tied for first and at least one
of them faster than the prior's pick by more than ``MIN_MARGIN``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .timing import median

# differences below this are never worth a decision (and never worth flipping a prior for)
MIN_MARGIN = 0.05


@dataclass(frozen=True)
class Decision:
    """The outcome of a measurement: the winner, and the candidates tied with it."""
    winner: int  # index into the candidates
    tied: tuple[int, ...]  # the candidates tied for first, fastest first
    ambiguous: bool


def noise(samples: list[float]) -> float:
    """Relative gap between the median round and the best one (0 for fewer than two rounds)."""
    if len(samples) < 2:
        return 0.0
    best = min(samples)
    return (median(samples) - best) / best if best > 0 else 0.0


def clearly_faster(a: list[float], b: list[float]) -> bool:
    """``a`` beats ``b`` by more than the noise of either and ``MIN_MARGIN``."""
    if not a:
        return False
    if not b:
        return True  # b failed
    tol = max(MIN_MARGIN, noise(a), noise(b))
    return min(a) * (1 + tol) < min(b)


def decide(samples: list[list[float]], prior: list[int]) -> Decision | None:
    """The candidate to keep, given each candidate's timed rounds (empty: it failed or was
    disqualified) and ``prior``, candidate indices best-first (every index should appear;
    ones left out rank after those listed, in index order). None when every candidate failed."""
    live = [i for i, s in enumerate(samples) if s]
    if not live:
        return None
    tied = [i for i in live if not any(clearly_faster(samples[j], samples[i]) for j in live if j != i)]
    tied.sort(key=lambda i: min(samples[i]))
    rank = {c: r for r, c in enumerate(prior)}
    winner = min(tied, key=lambda i: (rank.get(i, math.inf), i))
    fastest = tied[0]
    ambiguous = len(tied) > 1 and fastest != winner and \
        min(samples[fastest]) * (1 + MIN_MARGIN) < min(samples[winner])
    return Decision(winner, tuple(tied), ambiguous)


def prior_order(names: list[str], earlier: str | None) -> list[int]:
    """Candidate indices best-first: the earlier winner (by name), then the given order."""
    order = list(range(len(names)))
    if earlier in names:
        k = names.index(earlier)
        order.remove(k)
        order.insert(0, k)
    return order
