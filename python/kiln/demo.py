"""``make demo`` / ``kiln demo``: compile the example models and compare with eager PyTorch."""
from __future__ import annotations

import sys
import time

import torch

from kiln.kernels.timing import median_ms


def _median_ms(fn, args, repeat: int) -> float:
    return median_ms([lambda: fn(*args)], repeat, warmup=1)[0]


def first_tensor(x) -> torch.Tensor:
    """The tensor a model's output leads with (logits of a Hugging Face output, first of a tuple)."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "logits"):
        return x.logits
    if isinstance(x, (tuple, list)):
        return first_tensor(x[0])
    import numpy as np

    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"no tensor in a {type(x).__name__}")


def run_demo(names, threads: int | None = None, repeat: int = 10) -> int:
    import kiln
    from kiln import models

    if threads:
        torch.set_num_threads(threads)
    rows, ok = [], True
    for name in names:
        print(f"compiling {name} ...", file=sys.stderr, flush=True)
        model, inputs = models.get(name)
        t = time.perf_counter()
        fast = kiln.compile(model, inputs)
        compile_s = time.perf_counter() - t
        with torch.no_grad():
            ref = first_tensor(model(*inputs))
            out = first_tensor(fast(*inputs))
            err = (out - ref).abs().max().item()
            tol = 1e-4 * max(1.0, ref.abs().max().item())
            eager_ms = _median_ms(model, inputs, repeat)
        kiln_ms = _median_ms(fast, inputs, repeat)
        ok &= err <= tol
        rows.append((name, err, tol, eager_ms, kiln_ms, compile_s))
    print(f"\n{'model':<10} {'max abs err':>12} {'tolerance':>10} {'eager ms':>9} {'kiln ms':>9} {'speedup':>8} {'compile s':>10}")
    for name, err, tol, e, k, c in rows:
        print(f"{name:<10} {err:>12.2e} {tol:>10.1e} {e:>9.2f} {k:>9.2f} {e / k:>7.2f}x {c:>10.1f}")
    print(f"\n{torch.get_num_threads()} thread(s); median of {repeat} runs; "
          + ("all errors within tolerance" if ok else "ERROR ABOVE TOLERANCE"))
    return 0 if ok else 1
