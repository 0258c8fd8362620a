"""Compile time, cold and warm, each in a fresh process: Kiln vs Inductor.

* kiln cold: an empty compile cache (a new temporary KILN_CACHE_DIR);
* kiln warm: a new process with the cache the cold run filled;
* kiln tuned: a new process with the tuning database the cold run filled and nothing else
  (no compile, import or generated-module cache): what compiling another model with the same
  layers costs, or this one after its compile-cache entry was evicted -- kernel choice takes
  the database's recorded winners instead of measuring;
* inductor cold: ``torch.compile`` with freezing and its caches off, first call.

The figure is the seconds spent in the compile call (plus the first call for Inductor,
which compiles lazily), not interpreter start-up or imports (torch._dynamo, which both
need, is imported before either timer starts).

    python -m kiln.bench.compile_time [resnet18 bert lstm] [--tune fast] [--dynamic] [--batch N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time, torch
import kiln
name, engine, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(1)
batch = opts.pop("batch", None)
model, inputs = kiln.models.get(name, **({"batch": batch} if batch else {}))
if engine == "kiln":
    # torch.export imports torch._dynamo (1.5-2 s) on first use; the Inductor child imports
    # it before its timer (torch._inductor.config does), so this one does too
    import torch._dynamo  # noqa: F401
    t = time.perf_counter()
    fast = kiln.compile(model, inputs, **opts)
    fast(*inputs)  # kiln.compile builds the plan eagerly; the call checks it runs
    print(json.dumps({"seconds": time.perf_counter() - t, "cache_hit": fast.report.compile_cache_hit}))
else:
    import torch._inductor.config as cfg
    cfg.freezing = True
    cfg.fx_graph_cache = False
    cfg.autotune_local_cache = False
    t = time.perf_counter()
    fn = torch.compile(model, dynamic=opts.get("dynamic"))
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
        shutil.rmtree(os.path.join(cache, "compile"), ignore_errors=True)  # the tuning database stays
        row["kiln_tuned"] = _run(name, "kiln", env, opts)
        if inductor:
            row["inductor_cold"] = _run(name, "inductor", env, opts)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["resnet18", "bert", "lstm"])
    ap.add_argument("--tune", default=None, help="kiln.compile tune= option (when the build supports it)")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--dynamic", action="store_true", help="kiln.compile(dynamic=True); Inductor dynamic=True")
    ap.add_argument("--batch", type=int, help="the example inputs' batch size (default: the model's)")
    args = ap.parse_args(argv)
    opts = {"tune": args.tune} if args.tune else {}
    if args.dynamic:
        opts["dynamic"] = True
    if args.batch:
        opts["batch"] = args.batch
    print("| model | kiln cold (s) | kiln warm, new process (s) | warm cache hit | kiln, tuning database only (s) "
          "| inductor cold (s) | kiln cold / inductor |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, opts, not args.no_inductor)
        cold, warm, tuned, ind = r["kiln_cold"], r["kiln_warm"], r["kiln_tuned"], r.get("inductor_cold", {})
        fmt = lambda d: f"{d['seconds']:.2f}" if "seconds" in d else f"error: {d.get('error', '-')}"  # noqa: E731
        ratio = f"{cold['seconds'] / ind['seconds']:.2f}" if "seconds" in cold and "seconds" in ind else "-"
        print(f"| {name} | {fmt(cold)} | {fmt(warm)} | {warm.get('cache_hit', '-')} | {fmt(tuned)} | "
              f"{fmt(ind) if ind else '-'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
