"""Compile time, cold and warm, each in a fresh process: Kiln vs Inductor.

* kiln cold: an empty compile cache (a new temporary KILN_CACHE_DIR);
* kiln warm: a new process with the cache the cold run filled;
* inductor cold: ``torch.compile`` with freezing and its caches off, first call.

The figure is the seconds spent in the compile call (plus the first call for Inductor,
which compiles lazily), not interpreter start-up or imports (torch._dynamo, which both
need, is imported before either timer starts).

    python -m kiln.bench.compile_time [resnet18 bert lstm] [--tune fast]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time, torch
import kiln
name, engine, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(1)
model, inputs = kiln.models.get(name)
if engine == "kiln":
    # torch.export imports torch._dynamo (1.5-2 s) on first use; the Inductor child imports
    # it before its timer (torch._inductor.config does), so this one does too
    import torch._dynamo  # noqa: F401
    t = time.perf_counter()
    fast = kiln.compile(model, inputs, **opts)
    fast(*inputs)  # kiln.compile builds the plan eagerly; the call checks it runs
    c = fast.compiled[0]
    print(json.dumps({"seconds": time.perf_counter() - t, "cache_hit": bool(c.report.cache_hit)}))
else:
    import torch._inductor.config as cfg
    cfg.freezing = True
    cfg.fx_graph_cache = False
    cfg.autotune_local_cache = False
    t = time.perf_counter()
    fn = torch.compile(model)
    with torch.no_grad():
        fn(*inputs)
    print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def _run(name: str, engine: str, env: dict, opts: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, name, engine, json.dumps(opts)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(name: str, opts: dict, inductor: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, KILN_CACHE_DIR=cache, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"))
        row = {"model": name, "kiln_cold": _run(name, "kiln", env, opts), "kiln_warm": _run(name, "kiln", env, opts)}
        if inductor:
            row["inductor_cold"] = _run(name, "inductor", env, opts)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["resnet18", "bert", "lstm"])
    ap.add_argument("--tune", default=None, help="kiln.compile tune= option (when the build supports it)")
    ap.add_argument("--no-inductor", action="store_true")
    args = ap.parse_args(argv)
    opts = {"tune": args.tune} if args.tune else {}
    print("| model | kiln cold (s) | kiln warm, new process (s) | warm cache hit | inductor cold (s) | kiln cold / inductor |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, opts, not args.no_inductor)
        cold, warm, ind = r["kiln_cold"], r["kiln_warm"], r.get("inductor_cold", {})
        fmt = lambda d: f"{d['seconds']:.2f}" if "seconds" in d else f"error: {d.get('error', '-')}"  # noqa: E731
        ratio = f"{cold['seconds'] / ind['seconds']:.2f}" if "seconds" in cold and "seconds" in ind else "-"
        print(f"| {name} | {fmt(cold)} | {fmt(warm)} | {warm.get('cache_hit', '-')} | "
              f"{fmt(ind) if ind else '-'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
