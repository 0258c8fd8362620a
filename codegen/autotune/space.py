"""Search spaces: named axes, each a list of choices, plus an optional validity predicate."""
from __future__ import annotations

import itertools
import random
from dataclasses import field
from typing import Callable, Iterator

from kiln.ir.record import record


@record(slots=False)
class Space:
    axes: tuple[tuple[str, tuple], ...]
    valid: Callable[[dict], bool] | None = field(default=None, compare=False)

    @staticmethod
    def of(valid: Callable[[dict], bool] | None = None, **axes) -> "Space":
        return Space(tuple((k, tuple(v)) for k, v in axes.items()), valid)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __iter__(self) -> Iterator[dict]:
        names = [k for k, _ in self.axes]
        for combo in itertools.product(*(v for _, v in self.axes)):
            cfg = dict(zip(names, combo))
            if self.valid is None or self.valid(cfg):
                yield cfg

    def __contains__(self, cfg) -> bool:
        """``cfg`` names exactly this space's axes, each with one of its choices, and is valid."""
        if not isinstance(cfg, dict) or set(cfg) != {k for k, _ in self.axes}:
            return False
        return all(cfg[k] in v for k, v in self.axes) and (self.valid is None or bool(self.valid(cfg)))

    def default(self) -> dict:
        """The first valid configuration: what runs when tuning is off."""
        return next(iter(self))

    def sample(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` distinct configurations, the default first, the rest in a seeded random order."""
        cfgs = list(self)
        head, rest = cfgs[:1], cfgs[1:]
        random.Random(seed).shuffle(rest)
        return (head + rest)[:n]


def space(valid: Callable[[dict], bool] | None = None, **axes):
    """Declare the search space beside the kernel: sets ``fn.tune_space``."""

    def deco(fn):
        fn.tune_space = Space.of(valid, **axes)
        return fn

    return deco
