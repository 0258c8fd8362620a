"""PyTorch's OpInfo database as a differential sweep of Kiln.

Every entry of ``torch.testing._internal.common_methods_invocations.op_db`` with float32
CPU samples: each sample's call is compiled with ``kiln.compile`` (the sample's tensors as
inputs, everything else fixed) and its outputs compared with eager's. Outcomes:

* ``pass``: compiled and matched (max abs error within ``1e-4`` of the output's scale);
  ``fallbacks`` counts the samples that matched only because ops ran in PyTorch;
* ``kiln_error``: Kiln refused with a ``KilnError`` (torch.export could not trace it, a
  data-dependent shape, ...): allowed, a refusal is not a wrong answer;
* ``skip``: eager itself raises on the sample, the op draws random numbers (two eager
  runs with different seeds differ), or the sample has no tensor;
* ``wrong``: compiled and gave a different answer — a bug;
* ``crash``: an exception other than ``KilnError`` — a bug.

    python tests/conformance/opinfo_sweep.py [-v] [--samples N] [--no-codegen] [name-substring ...]
"""
from __future__ import annotations

import math
import sys
import time
import traceback
import warnings

import torch
import torch.utils._pytree as pytree

BAD = ("wrong", "crash")


def op_infos(names=None):
    from torch.testing._internal.common_methods_invocations import op_db

    out = []
    for op in op_db:
        if torch.float32 not in op.supported_dtypes("cpu"):
            continue
        full = op.name + ("." + op.variant_test_name if op.variant_test_name else "")
        if names and not any(n in full for n in names):
            continue
        out.append((full, op))
    return out


def _close(got, want) -> str | None:
    """None when ``got`` matches ``want``; else what differs."""
    g, gs = pytree.tree_flatten(got)
    w, ws = pytree.tree_flatten(want)
    if len(g) != len(w):
        return f"{len(g)} outputs, eager has {len(w)}"
    for a, b in zip(g, w):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor):
                return f"got {type(a).__name__} where eager returns a tensor"
            if a.dtype != b.dtype or a.shape != b.shape:
                return f"got {a.dtype}{list(a.shape)}, eager {b.dtype}{list(b.shape)}"
            if b.is_complex() or not b.is_floating_point():
                if not torch.equal(a, b) and not (b.is_complex() and torch.allclose(a, b, 1e-4, 1e-5, True)):
                    return "values differ"
                continue
            if b.numel() == 0:
                continue
            finite = b[torch.isfinite(b)]
            scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
            try:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)
            except AssertionError as e:
                return str(e).strip().splitlines()[-1][:200] if str(e).strip() else "values differ"
        elif isinstance(b, float) and isinstance(a, float):
            if not (math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) or (math.isnan(a) and math.isnan(b))):
                return f"{a} != {b}"
        elif a != b:
            return f"{a!r} != {b!r}"
    return None


def _draws_random(name: str) -> bool:
    obj = torch.ops
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return isinstance(obj, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in obj.tags


def run_sample(op, sample, options: dict | None = None) -> tuple[str, str, int]:
    """(outcome, detail, fallback count) of one sample."""
    import kiln
    from kiln import KilnError

    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    where = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    if not where:
        return "skip", "no tensor", 0

    def fn(*tensors):
        ls = list(leaves)
        for i, t in zip(where, tensors):
            ls[i] = t
        x, args, kwargs = pytree.tree_unflatten(ls, spec)
        return op.op(x, *args, **kwargs)

    def fresh():
        return [leaves[i].detach().clone() for i in where]

    try:
        with torch.no_grad():
            torch.manual_seed(0)
            want = fn(*fresh())
            torch.manual_seed(1)
            again = fn(*fresh())
    except Exception as e:  # noqa: BLE001
        return "skip", f"eager raises {type(e).__name__}", 0
    if _close(again, want) is not None:
        return "skip", "random", 0
    if "empty" in getattr(op, "name", ""):
        return "skip", "uninitialized values", 0
    try:
        torch.manual_seed(0)
        fast = kiln.compile(fn, fresh(), **(options or {}))
        with torch.no_grad():
            got = fast(*fresh())
    except KilnError as e:
        return "kiln_error", str(e).strip().splitlines()[0][:200] if str(e).strip() else "", 0
    except Exception as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)
        where_ = f" at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else ""
        return "crash", f"{type(e).__name__}: {str(e).strip()[:200]}{where_}", 0
    fallbacks = len(fast.report.fallbacks) if fast.report is not None else 0
    if fast.report is not None and any(_draws_random(op_) for op_, _, _ in fast.report.fallbacks):
        # OpInfo seeds random ops inside the call (wrapper_set_seed); the compiled graph keeps
        # the random op, not the seeding: its draws are not eager's
        return "skip", "random (the op runs in PyTorch with the global generator)", fallbacks
    why = _close(got, want)
    return ("wrong", why, fallbacks) if why is not None else ("pass", "", fallbacks)


def run(names=None, samples: int = 2, verbose: bool = False, log=print, options: dict | None = None) -> dict:
    """{op: [(outcome, detail, fallbacks), ...]} over the first ``samples`` samples of each op."""
    warnings.filterwarnings("ignore")
    res = {}
    for full, op in op_infos(names):
        outs = []
        try:
            it = op.sample_inputs("cpu", torch.float32, requires_grad=False)
            for k, s in enumerate(it):
                if k >= samples:
                    break
                outs.append(run_sample(op, s, options))
        except Exception as e:  # noqa: BLE001  (the sample generator itself failed: not Kiln's)
            outs.append(("skip", f"samples: {type(e).__name__}", 0))
        res[full] = outs
        if verbose or any(o[0] in BAD for o in outs):
            log(f"{full}: " + "; ".join(f"{o}{' (' + d + ')' if d else ''}" for o, d, _ in outs))
    return res


def summary(res: dict) -> str:
    counts: dict[str, int] = {}
    for outs in res.values():
        for o, _, _ in outs:
            counts[o] = counts.get(o, 0) + 1
    fb = sum(1 for outs in res.values() for o, _, f in outs if o == "pass" and f)
    bad = sorted(k for k, outs in res.items() if any(o in BAD for o, _, _ in outs))
    return (f"{len(res)} ops, {sum(counts.values())} samples: " +
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
            f" ({fb} passing samples used fallbacks)" + (f"\nops with wrong answers or crashes: {bad}" if bad else ""))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv
    samples = 2
    if "--samples" in argv:
        i = argv.index("--samples")
        samples = int(argv[i + 1])
        del argv[i:i + 2]
    names = [a for a in argv if not a.startswith("-")]
    t = time.time()
    res = run(names or None, samples, verbose, options={"codegen": False} if "--no-codegen" in argv else None)
    print(summary(res))
    print(f"({time.time() - t:.0f} s)")
    return 1 if any(o in BAD for outs in res.values() for o, _, _ in outs) else 0


if __name__ == "__main__":
    sys.exit(main())
