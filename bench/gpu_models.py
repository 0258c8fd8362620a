"""GPU benchmark: the example models with Kiln (target cuda) vs eager PyTorch vs
torch.compile (Inductor), on one CUDA device, printed as one table.

    python bench/gpu_models.py [--small] [--repeats N] [--tune SECONDS|none|fast] [--budget SECONDS]
    python bench/gpu_models.py --dry-run [--small]   # no GPU needed: everything up to the device step

Engines run interleaved (one call each, in turn, per repeat) so clock and thermal drift
hit all alike; each call is synchronized and timed with CUDA events; medians are reported
with Kiln's ratio against eager and Inductor. Every engine's output is checked against
eager (max abs error). A global time budget (default 300 s) skips what no longer fits,
and says so. ``--dry-run`` builds Kiln's plans ahead of time for the target SM (all
kernels to cubin) and stops before touching a device.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback

import torch

MODELS = {  # name -> (full-size kwargs, small kwargs)
    "resnet18": (dict(batch=1, image=224), dict(batch=1, image=32)),
    "bert": (dict(batch=1, seq=128), dict(batch=1, seq=16, layers=2, hidden=64, heads=2, ffn=128, vocab=100)),
    "lstm": (dict(batch=32, seq=96), dict(batch=4, seq=6, hidden=32)),
}


def first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        return first_tensor(x[0])
    if isinstance(x, dict):
        return first_tensor(next(iter(x.values())))
    return x


def log(msg: str) -> None:
    print(msg, flush=True)


def build_engines(model, inputs, dry_run: bool, arch: str | None, tune="fast"):
    import kiln

    engines: dict = {}
    t = time.perf_counter()
    target = f"cuda:{arch}" if arch else "cuda"
    try:
        cm = kiln.compile(model, inputs, target=target, tune=tune)
        plan = cm.compiled[0].plan
        ahead = plan.runner.ahead
        counts = {f"sm_{sm}": ahead.counts(sm) for sm in ahead.sms} if ahead else {}
        log(f"  kiln: compiled in {time.perf_counter() - t:.1f} s; steps {plan.kernel_names}; "
            f"torch fallbacks {plan.torch_ops or 'none'}; built ahead {counts}")
        if ahead and ahead.failures:
            log("  kiln: BUILD FAILURES: " + "; ".join(ahead.failures))
        engines["kiln"] = cm
    except Exception as e:  # noqa: BLE001  (reported in the table)
        engines["kiln"] = e
        log(f"  kiln: compile failed: {type(e).__name__}: {e}")
        traceback.print_exc()
    if dry_run:
        return engines
    engines["eager"] = model
    try:
        torch._dynamo.reset()
        fn = torch.compile(model)
        with torch.no_grad():
            fn(*inputs)
            torch.cuda.synchronize()
        engines["inductor"] = fn
    except Exception as e:  # noqa: BLE001
        engines["inductor"] = e
        log(f"  inductor: failed: {type(e).__name__}: {str(e)[:200]}")
    return engines


def time_engines(engines: dict, inputs, repeats: int, deadline: float) -> dict:
    ref = None
    with torch.no_grad():
        ref = first_tensor(engines["eager"](*inputs)).float()
    res = {}
    live = {k: v for k, v in engines.items() if not isinstance(v, Exception)}
    for name, fn in list(live.items()):
        try:
            with torch.no_grad():
                out = first_tensor(fn(*inputs)).float()
                torch.cuda.synchronize()
            res[name] = {"err": (out - ref).abs().max().item(), "ms": []}
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:150]}"}
            live.pop(name)
    for _ in range(3):  # warm-up, interleaved
        for fn in live.values():
            with torch.no_grad():
                fn(*inputs)
    torch.cuda.synchronize()
    for i in range(repeats):
        if time.perf_counter() > deadline and i >= 5:
            break
        for name, fn in live.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.no_grad():
                start.record()
                fn(*inputs)
                end.record()
            end.synchronize()
            res[name]["ms"].append(start.elapsed_time(end))
    for name, r in res.items():
        if "ms" in r:
            r["median"] = statistics.median(r["ms"]) if r["ms"] else float("nan")
            r["n"] = len(r["ms"])
    for name, e in engines.items():
        if isinstance(e, Exception):
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:150]}"}
    return res


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| model | eager ms | inductor ms | kiln ms | kiln/eager | kiln/inductor | kiln max err | n |",
             "|---|---|---|---|---|---|---|---|"]
    for model, r in rows:
        def ms(e):
            x = r.get(e, {})
            return f"{x['median']:.3f}" if "median" in x else ("error" if "error" in x else "-")

        def ratio(a, b):
            if "median" in r.get(a, {}) and "median" in r.get(b, {}):
                return f"{r[a]['median'] / r[b]['median']:.2f}x"
            return "-"
        kerr = f"{r['kiln']['err']:.2e}" if "err" in r.get("kiln", {}) else "-"
        n = r.get("kiln", {}).get("n", "-")
        lines.append(f"| {model} | {ms('eager')} | {ms('inductor')} | {ms('kiln')} | {ratio('kiln', 'eager')} | "
                     f"{ratio('kiln', 'inductor')} | {kerr} | {n} |")
    for model, r in rows:
        for e, x in r.items():
            if "error" in x:
                lines.append(f"{model} / {e}: {x['error']}")
    return "\n".join(lines)


def _tune(text: str) -> "str | float":
    """none | fast | max, or seconds per kernel."""
    try:
        return float(text)
    except ValueError:
        return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="no device: build everything ahead, stop before running")
    ap.add_argument("--small", action="store_true", help="small model configurations")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tune", default="2", type=_tune,
                    help="Kiln's per-kernel tuning budget on the device (kiln.compile's tune=)")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run")
    ap.add_argument("--arch", default=None, help="SM to build for with --dry-run (default: the device's, else sm_90)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    have_gpu = torch.cuda.is_available()
    log(f"torch {torch.__version__}, CUDA build: {torch.version.cuda}, device: "
        f"{torch.cuda.get_device_name() if have_gpu else 'none'}")
    if not have_gpu and not args.dry_run:
        log("No CUDA device is usable from torch (torch.cuda.is_available() is False). This torch is "
            f"{'a CPU-only build' if torch.version.cuda is None else 'a CUDA build, but no device or driver is visible'}; "
            "the GPU benchmark needs a CUDA build of torch and an NVIDIA GPU. Nothing was measured. "
            "(--dry-run builds every kernel ahead of time without a device.)")
        return 3
    from kiln.models import get

    rows = []
    for name in args.models:
        if time.perf_counter() > deadline:
            log(f"{name}: skipped (time budget of {args.budget:.0f} s spent)")
            continue
        full, small = MODELS[name]
        kw = small if args.small else full
        log(f"{name} {kw}")
        model, inputs = get(name, **kw)
        if have_gpu and not args.dry_run:
            model = model.cuda()
            inputs = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs)
        engines = build_engines(model, tuple(inputs), args.dry_run, args.arch, args.tune)
        if args.dry_run:
            ok = not isinstance(engines.get("kiln"), Exception)
            log(f"  dry run: {'ready' if ok else 'FAILED'} (device step skipped)")
            rows.append((name, {}))
            continue
        rows.append((name, time_engines(engines, tuple(inputs), args.repeats, deadline)))
    log("")
    log(table(rows))
    log(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
