"""Which configuration a Triton kernel launches with.

Without a GPU (building ahead, or the interpreter) a kernel uses its space's default
configuration. On a GPU the configurations are timed on the device with
``triton.testing.do_bench`` through the shared tuner, and the winner lands in the shared
tuning database keyed by the CUDA target's key (GPU name and SM), so the next compile of
the same shapes does not measure again. The budget (``none``/``fast``/``max``/seconds) is
the compile's ``tune`` option: a cuda plan runs its kernels inside ``tuning_budget(tune)``;
outside any, kernels tune with ``fast``.
"""
from __future__ import annotations

import contextvars
import functools

import torch

from kiln.codegen.autotune import Space, TuningKey, tune

from .launch import interpreting, is_recording


def signature_of(*parts) -> str:
    """A canonical string for tensors (shape, dtype, strides) and plain values."""
    out = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            out.append(f"{str(p.dtype).removeprefix('torch.')}{list(p.shape)}s{list(p.stride())}")
        else:
            out.append(repr(p))
    return ";".join(out)


@functools.lru_cache(maxsize=1)
def target_key() -> str:
    from kiln.target import cuda

    return cuda().key()


def on_device(*tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


_CHOSEN: dict[tuple, dict] = {}  # this process's decisions: no database query per launch
_BUDGET: contextvars.ContextVar = contextvars.ContextVar("kiln_gpu_tuning_budget", default="fast")


class tuning_budget:
    """``with tuning_budget(tune):`` kernels launched inside tune within ``tune`` ("none" |
    "fast" | "max" | seconds per kernel)."""

    __slots__ = ("budget", "_token")

    def __init__(self, budget):
        self.budget = budget

    def __enter__(self):
        self._token = _BUDGET.set(self.budget)
        return self

    def __exit__(self, *exc):
        _BUDGET.reset(self._token)
        return False


def choose_config(kernel: str, space_: Space, signature: str, run, *tensors) -> dict:
    """``run(config)`` launches the kernel once with ``config`` (used only for measuring)."""
    if is_recording() or interpreting() or not on_device(*tensors):
        return space_.default()
    budget = _BUDGET.get()
    hit = _CHOSEN.get((kernel, signature, budget))
    if hit is not None:
        return hit
    from triton.testing import do_bench

    def measure(cfg: dict) -> float:
        return do_bench(lambda: run(cfg), warmup=5, rep=20) * 1e-3

    cfg = tune(TuningKey(kernel, signature, target_key()), space_, measure, budget).config
    _CHOSEN[(kernel, signature, budget)] = cfg
    return cfg


def launch_params(cfg: dict) -> tuple[dict, int, int]:
    """Split a config into the kernel's constexprs and the launch's warps and stages."""
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    return meta, cfg.get("num_warps", 4), cfg.get("num_stages", 2)
