"""Tensors a kernel derives from a constant at prepare time, kept so an artifact can ship them.

Some kernels turn a weight into another tensor before they can run: Winograd's transformed
filters (``kernels.winograd``) are 16/9 to 4x the weight and cost a pass of float64
arithmetic per filter, paid again by every ``kiln.load`` in every process. Where that
derived tensor is portable — Kiln's own arithmetic, the same bits on any CPU that runs the
kernel, unlike oneDNN's or MKL's packed formats, which depend on the library's build and
the CPU — the kernel makes it through ``derive``, which

* records it against the constant and the kernel (weakly: a candidate that lost its
  measurement frees it as before), so ``kiln.save`` can store it beside the weight
  (``made``);
* takes it ready-made when ``kiln.load`` has seeded one for that constant and kernel
  (``seeded``), so the load maps it from the file instead of computing it.

``version`` names the derivation's arithmetic and layout: a kernel that changes either bumps
it, and a stored tensor of another version is recomputed, never used. A seeded tensor is
used only when ``fits`` accepts it (shape, dtype, layout); otherwise the kernel derives its
own. The same constant prepared by the same kernel at several sizes (a dynamic plan's size
buckets) shares one derived tensor.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch

__all__ = ["derive", "made", "seeded"]

# (kernel, id(constant)) -> (weakref to the constant, version, weakref to the derived tensor)
_MADE: dict[tuple[str, int], tuple] = {}
# (kernel, id(constant)) -> (constant, version, derived tensor): what a load supplies
_SEEDED: dict[tuple[str, int], tuple] = {}


def derive(kernel: str, version: int, const: torch.Tensor, make: Callable[[], torch.Tensor],
           fits: Callable[[torch.Tensor], bool]) -> torch.Tensor:
    """``make()``'s tensor derived from ``const`` for ``kernel`` — seeded, or already made for
    this constant and kernel and still alive, or made now."""
    key = (kernel, id(const))
    seed = _SEEDED.get(key)
    if seed is not None and seed[0] is const and seed[1] == version and fits(seed[2]):
        _record(key, const, version, seed[2])
        return seed[2]
    hit = _MADE.get(key)
    if hit is not None and hit[0]() is const and hit[1] == version:
        t = hit[2]()
        if t is not None:
            return t
    t = make()
    _record(key, const, version, t)
    return t


def _record(key, const, version: int, t: torch.Tensor) -> None:
    _MADE[key] = (weakref.ref(const), version, weakref.ref(t))
    if len(_MADE) > 4096:  # entries whose tensors are gone
        for k in [k for k, (c, _, d) in _MADE.items() if c() is None or d() is None]:
            del _MADE[k]


def made(kernel: str, const: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """(version, tensor) that ``kernel`` derived from ``const`` and still holds; None if none."""
    hit = _MADE.get((kernel, id(const)))
    if hit is None or hit[0]() is not const:
        return None
    t = hit[2]()
    return None if t is None else (hit[1], t)


@contextlib.contextmanager
def seeded(entries):
    """Within the block, ``derive`` takes these ready-made tensors: ``entries`` are
    (kernel, version, constant, derived tensor). Held only for the block: a kernel that is
    not prepared (chosen again elsewhere) leaves its tensor unused."""
    added = []
    for kernel, version, const, t in entries:
        key = (kernel, id(const))
        _SEEDED[key] = (const, version, t)
        added.append(key)
    try:
        yield
    finally:
        for key in added:
            _SEEDED.pop(key, None)
