"""What one pass (or one kernel) buys: a model compiled with and without it, timed interleaved
in one process.

    python -m kiln.bench.pass_ab demanded_rows [--models bert hf_bert] [--threads 1 2]
        [--precision fp32 bf16] [--repeats 30]
    python -m kiln.bench.pass_ab --kernel cpu.amx_linear --precision bf16
    python -m kiln.bench.pass_ab --kernel cpu.winograd2_conv_bf16 --precision bf16 --models package.module:factory

Both plans come from the same ``kiln.compile`` call but for ``passes=["-<pass>"]`` (or
``exclude_kernels=[<kernel>]``: the kernel is not a candidate, the others are chosen as
usual); rounds alternate which runs first, and the figure is the median of each (the
machine is shared, so only the ratio within one run means much). Both plans' outputs are
checked against eager.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _tensor(y):
    """The output compared: a classifier's logits, else a Hugging Face output's first field."""
    if hasattr(y, "logits"):
        return y.logits
    return y.to_tuple()[0] if hasattr(y, "to_tuple") else y


def measure(name: str, pass_name: str | None, threads: int, precision: str, repeats: int,
            kernel: str | None = None) -> dict:
    import kiln
    from kiln.modelref import load_model

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, inputs = load_model(name)  # an example's name or package.module:factory
        opts = {"precision": "bf16"} if precision == "bf16" else {}
        without = {"exclude_kernels": [kernel]} if kernel else {"passes": [f"-{pass_name}"]}
        plans = {"without": kiln.compile(model, inputs, **without, **opts),
                 "with": kiln.compile(model, inputs, **opts)}
        times: dict[str, list[float]] = {k: [] for k in plans}
        with torch.no_grad():
            ref = _tensor(model(*inputs))
            err = {k: float((_tensor(f(*inputs)) - ref).abs().max()) for k, f in plans.items()}
            for f in plans.values():
                f(*inputs)
            order = list(plans.items())
            for i in range(repeats):
                for k, f in order if i % 2 == 0 else order[::-1]:
                    t = time.perf_counter()
                    f(*inputs)
                    times[k].append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"model": name, "threads": threads, "precision": precision, "median_ms": med, "max_abs_err": err,
            "speedup": med["without"] / med["with"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pass_name", nargs="?", help="a pass or phase name of passes/pipeline.py (an unknown name lists them)")
    ap.add_argument("--kernel", help="compare with and without this kernel (a name as plan.kernel_names gives it)")
    ap.add_argument("--models", nargs="+", default=["bert"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args(argv)
    if (a.pass_name is None) == (a.kernel is None):
        ap.error("give a pass name or --kernel NAME (one of them)")
    print(f"| model | precision | threads | without {a.pass_name or a.kernel} (ms) | with (ms) | speedup | max abs err (without / with) |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models:
        for prec in a.precision:
            for th in a.threads:
                r = measure(name, a.pass_name, th, prec, a.repeats, a.kernel)
                m, e = r["median_ms"], r["max_abs_err"]
                print(f"| {name} | {prec} | {th} | {m['without']:.2f} | {m['with']:.2f} | {r['speedup']:.3f}x | "
                      f"{e['without']:.1e} / {e['with']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
