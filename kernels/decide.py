"""When a measurement decides: the rule kernel choice applies to interleaved timings.

This machine's speed drifts by tens of percent within minutes, so "the fastest round wins"
turns noise into decisions, and a compile cache then keeps a choice that a quieter moment
would have reversed. The rule here decides away from a *prior* only when the difference is
larger than the noise measured in the same rounds:

- candidates timed in the same rounds are compared round by round (the rounds are
  interleaved, so a drift of the machine's speed hits both alike): ``c`` *clearly beats*
  ``i`` when, over their common rounds (at least ``PAIRED_ROUNDS``), the median of
  ``time(c) / time(i)`` is below ``1 / (1 + MIN_MARGIN)`` and ``c`` was the faster in
  clearly more than half of them (a sign test: at least ``n / 2 + sqrt(n) / 2`` of ``n``,
  one standard deviation above a coin's count: 3 of 3, 4 of 5, 7 of 10). Comparing each
  candidate's best round instead (below) lets a drift between rounds pass for noise, and a
  candidate 25% behind in every round stand tied;
- with fewer common rounds (a candidate raced out after two), each candidate's time is its
  best round and its noise the relative gap between its median round and its best one:
  ``c`` clearly beats ``i`` when ``best(c) * (1 + tol) < best(i)``, with ``tol`` the larger
  of the two candidates' noise and ``MIN_MARGIN``;
- the candidates that nothing clearly beats are *tied for first*; of those, the one the
  prior ranks highest wins.

A candidate's rounds are a list in round order; ``None`` marks a round it did not run (so
that two batches of rounds joined stay aligned, round for round, across candidates).

The prior is an ordering of candidate names: the tuning database's earlier winner for the
same node first (when there is one), then the registration order (the kernel modules
register their kernels best-first where no measurement is available, the reference last).
Equal measurements thus give the same choice in every process. ``ambiguous`` says whether
more rounds could change the decision: several candidates tied for first and at least one
of them faster than the prior's pick by more than ``MIN_MARGIN``.
"""
from __future__ import annotations

import math

from kiln.ir.record import record

from .timing import median

# differences below this are never worth a decision (and never worth flipping a prior for)
MIN_MARGIN = 0.05


@record(slots=False)
class Decision:
    """The outcome of a measurement: the winner, and the candidates tied with it."""
    winner: int  # index into the candidates
    tied: tuple[int, ...]  # the candidates tied for first, fastest first
    ambiguous: bool


# round-by-round comparison needs this many common rounds
PAIRED_ROUNDS = 3


def rounds(samples: list) -> list[float]:
    """The rounds a candidate ran (``None`` entries dropped)."""
    return [x for x in samples if x is not None]


def best(samples: list) -> float:
    """A candidate's best round (``math.inf`` when it ran none)."""
    return min(rounds(samples), default=math.inf)


def noise(samples: list) -> float:
    """Relative gap between the median round and the best one (0 for fewer than two rounds)."""
    ran = rounds(samples)
    if len(ran) < 2:
        return 0.0
    low = min(ran)
    return (median(ran) - low) / low if low > 0 else 0.0


def clearly_faster(a: list, b: list) -> bool:
    """``a`` beats ``b`` by more than the noise and ``MIN_MARGIN``: round by round where they
    share ``PAIRED_ROUNDS`` rounds, else best round against best round."""
    if not rounds(a):
        return False
    if not rounds(b):
        return True  # b failed
    common = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and y > 0]
    if len(common) >= PAIRED_ROUNDS:
        ratios = [x / y for x, y in common]
        won = sum(r < 1 for r in ratios)
        n = len(ratios)
        return median(ratios) * (1 + MIN_MARGIN) < 1 and won >= n / 2 + math.sqrt(n) / 2
    tol = max(MIN_MARGIN, noise(a), noise(b))
    return best(a) * (1 + tol) < best(b)


def decide(samples: list[list[float]], prior: list[int]) -> Decision | None:
    """The candidate to keep, given each candidate's timed rounds (empty, or only ``None``: it
    failed or was disqualified) and ``prior``, candidate indices best-first (every index
    should appear; ones left out rank after those listed, in index order). None when every
    candidate failed."""
    live = [i for i, s in enumerate(samples) if rounds(s)]
    if not live:
        return None
    tied = [i for i in live if not any(clearly_faster(samples[j], samples[i]) for j in live if j != i)]
    if not tied:  # (round-by-round wins can form a cycle) the fastest best round stands alone
        tied = [min(live, key=lambda i: best(samples[i]))]
    tied.sort(key=lambda i: best(samples[i]))
    rank = {c: r for r, c in enumerate(prior)}
    winner = min(tied, key=lambda i: (rank.get(i, math.inf), i))
    fastest = tied[0]
    ambiguous = len(tied) > 1 and fastest != winner and \
        best(samples[fastest]) * (1 + MIN_MARGIN) < best(samples[winner])
    return Decision(winner, tuple(tied), ambiguous)


def prior_order(names: list[str], earlier: str | None) -> list[int]:
    """Candidate indices best-first: the earlier winner (by name), then the given order."""
    order = list(range(len(names)))
    if earlier in names:
        k = names.index(earlier)
        order.remove(k)
        order.insert(0, k)
    return order
