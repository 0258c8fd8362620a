"""Calibration observers: the value range a static int8 tensor is quantized to.

An observer sees every calibration batch of one value and then names a range [lo, hi]:

- ``minmax``: the extremes seen (nothing clipped; outliers widen the step);
- ``percentile``: the 0.01st and 99.99th percentiles (clips rare outliers);
- ``entropy``: the clipping threshold whose 8-bit histogram is closest in KL divergence to
  the float one (the TensorRT method, applied to |x|).

The graph is executed by the caller (``run_all``: a function graph, inputs -> every value),
so this pass stays below the runtime in the layering.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from kiln.ir import Graph, Value
from kiln.options import OBSERVERS

SAMPLE = 1 << 18  # values kept per observer (a uniform subsample beyond that)


class Observer:
    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        self.lo, self.hi = math.inf, -math.inf
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.percentile = percentile
        self.bins = bins

    def observe(self, t: torch.Tensor) -> None:
        x = t.detach().float().reshape(-1)
        if not x.numel():
            return
        lo, hi = torch.aminmax(x)
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        if x.numel() > SAMPLE // 4:
            x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLE // 4]]
        if self.kept < SAMPLE:
            self.samples.append(x.clone())
            self.kept += x.numel()

    def _all(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)

    def range(self, kind: str) -> tuple[float, float]:
        if self.lo > self.hi:
            return 0.0, 0.0
        if kind == "minmax":
            return self.lo, self.hi
        if kind == "percentile":
            x = self._all()
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
            lo, hi = torch.quantile(x.double(), q.double()).tolist()
            return min(lo, 0.0), max(hi, 0.0)
        if kind == "entropy":
            t = entropy_threshold(self._all().abs(), self.bins)
            return max(self.lo, -t), min(self.hi, t)
        raise ValueError(f"unknown observer {kind!r}; choose one of {', '.join(OBSERVERS)}")


def entropy_threshold(x: torch.Tensor, bins: int = 2048, levels: int = 128) -> float:
    """The threshold T minimizing KL(P || Q): P the histogram of |x| clipped to [0, T]
    (outliers folded into the last bin), Q the bins below T merged into ``levels`` bins and
    expanded back over the nonzero bins."""
    amax = float(x.max()) if x.numel() else 0.0
    if amax == 0.0:
        return 0.0
    hist = torch.histc(x.double(), bins=bins, min=0.0, max=amax)
    width = amax / bins
    best, best_i = math.inf, bins
    for i in range(levels, bins + 1, 16):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()  # clipped outliers land in the last bin
        idx = torch.arange(i) * levels // i  # which of the `levels` merged bins each bin joins
        used = (hist[:i] > 0).double()
        # Q: the unclipped bins merged to `levels` values (what 8 bits can hold), spread back
        # evenly over the nonzero bins; the clipped mass is missing from Q, not from P
        merged = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, hist[:i])
        counts = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, used)
        q = (merged / counts.clamp(min=1))[idx] * used
        nz = p > 0
        ps, qs = p[nz] / p.sum(), q[nz]
        if bool((qs <= 0).any()):
            continue
        qs = qs / qs.sum()
        kl = float((ps * torch.log(ps / qs)).sum())
        if kl < best:
            best, best_i = kl, i
    return (best_i + 0.5) * width


def calibrate(graph: Graph, batches: Iterable[list[torch.Tensor]], values: set[Value],
              run_all: Callable[[Graph, list], dict]) -> tuple[dict[Value, Observer], dict[Value, torch.Tensor]]:
    """Run the float graph on every calibration batch and observe ``values``; also return
    the first batch's tensors of those values (the layers' sample inputs)."""
    obs = {v: Observer() for v in values}
    first: dict[Value, torch.Tensor] = {}
    n = 0
    for inputs in batches:
        env = run_all(graph, list(inputs))
        for v, o in obs.items():
            if v in env:
                o.observe(env[v])
                if n == 0:
                    first[v] = env[v]
        n += 1
    if n == 0:
        raise ValueError("calibration data is empty")
    return obs, first
