"""``kiln bench suite-dynamo``: the model suite through ``torch.compile(model, backend="kiln")``.

The same models as ``kiln bench suite`` (``bench/suite_models.py``, fp32, batch 1), each
compiled the way a ``torch.compile`` user gets Kiln: Dynamo captures the graphs (breaking
where it must), hands each to Kiln's backend with the parameters lifted as inputs, and Kiln
compiles it on its first call. Per model:

* **pass**: every output tensor against eager's, max abs error within ``1e-4`` of its scale
  (``kiln.bench.suite.compare``);
* **graphs / breaks**: how many graphs Dynamo handed to Kiln and how many graph breaks it
  made, with the reasons (Dynamo's own ``graph_break`` counters);
* **fallbacks**: the ATen ops that run in PyTorch inside Kiln's compiled graphs;
* **compile**: the first call (Dynamo's capture plus Kiln's compiles; caches empty);
* **latency**: eager and the compiled model's medians, timed interleaved in one process.

Each model runs in its own process (fresh caches; a crash or an out-of-memory kill costs one
row); ``--quick`` runs the tiny configs in this process, correctness only (CI).

    python -m kiln.bench.suite_dynamo [--only bert,resnet] [--quick] [--repeats N] [--json F]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

TOL = 1e-4


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--only", help="comma-separated model names (default: all; see kiln.bench.suite_models)")
    ap.add_argument("--quick", action="store_true", help="tiny configs, correctness only, in this process (CI)")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per engine (default 10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--worker", help=argparse.SUPPRESS)


def run_model(name: str, quick: bool = False, repeats: int = 10, threads: int = 1) -> dict:
    """One model through ``torch.compile(backend="kiln")``; never raises."""
    import torch

    from kiln.bench import suite_models
    from kiln.bench.suite import _short, compare
    from kiln.dynamo import kiln_backend

    row = {"model": name, "suite": suite_models.BY_NAME[name].suite, "status": "error", "graphs": 0,
           "breaks": 0, "break_reasons": {}, "fallbacks": {}, "latency_ms": {}}
    try:
        torch.set_num_threads(threads)
        model, inputs = suite_models.build(name, quick=quick)
        with torch.no_grad():
            ref = model(*inputs)
        compiled_graphs = []

        def backend(gm, example_inputs):  # Kiln's backend, keeping each graph's compiled model in view
            run = kiln_backend(gm, example_inputs)
            compiled_graphs.append(run)
            return run

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        opt = torch.compile(model, backend=backend)
        t = time.perf_counter()
        with torch.no_grad():
            got = opt(*inputs)
        row["compile_s"] = time.perf_counter() - t
        breaks = collections.Counter()
        for reason, n in torch._dynamo.utils.counters["graph_break"].items():
            breaks[str(reason).splitlines()[0][:160]] += n
        row["graphs"] = len(compiled_graphs)
        row["breaks"] = sum(breaks.values())
        row["break_reasons"] = dict(breaks.most_common())
        fb = collections.Counter()
        for run in compiled_graphs:
            cm = getattr(run, "kiln", None)
            for c in getattr(cm, "compiled", []) or []:
                fb.update(op for op, _scope, _why in c.report.fallbacks)
        row["fallbacks"] = dict(fb.most_common())
        cmp = compare(got, ref)
        row.update(rel_err=cmp["rel"], max_err=cmp["err"])
        if "why" in cmp:
            row["error"] = cmp["why"]
        row["status"] = "pass" if cmp["rel"] <= TOL else "fail"
        if not quick:
            from kiln.kernels.timing import interleaved

            fns = {"eager": lambda: model(*inputs), "kiln_dynamo": lambda: opt(*inputs)}
            res = interleaved(list(fns.values()), repeats, warmup=2, rotate=True)
            row["latency_ms"] = {e: r.median * 1e3 for e, r in zip(fns, res) if r.samples}
    except Exception as e:  # noqa: BLE001  (a model that fails is a failed row)
        row["error"] = _short(e)
        row["traceback"] = traceback.format_exc(limit=8)
    return row


def _isolated(name: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-suite-dynamo-") as cache:
        env = dict(os.environ, KILN_CACHE_DIR=cache, KILN_PROGRESS="0")
        cmd = [sys.executable, "-m", "kiln.bench.suite_dynamo", "--worker", name, "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        except subprocess.TimeoutExpired:
            return {"model": name, "status": "error", "error": "timed out"}
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            tail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
            return {"model": name, "status": "error", "error": f"worker exit {r.returncode} ({tail[:200]})"}
        return json.loads(lines[-1])


def markdown(rows: list) -> str:
    out = ["| model | status | rel err | graphs | graph breaks | fallbacks | compile s | eager ms | "
           "kiln (torch.compile) ms | speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    speedups = []
    for r in rows:
        lat = r.get("latency_ms", {})
        sp = lat["eager"] / lat["kiln_dynamo"] if "eager" in lat and "kiln_dynamo" in lat else None
        if sp and r["status"] == "pass":
            speedups.append(sp)
        why = "; ".join(f"{k} x{n}" for k, n in r.get("break_reasons", {}).items())
        fb = ", ".join(f"{k} x{n}" for k, n in r.get("fallbacks", {}).items()) or "none"
        out.append(f"| {r['model']} | {r['status']}{' (' + r['error'] + ')' if r.get('error') else ''} | "
                   f"{r.get('rel_err', float('nan')):.1e} | {r.get('graphs', 0)} | {r.get('breaks', 0)}"
                   f"{' (' + why + ')' if why else ''} | {fb} | {r.get('compile_s', float('nan')):.1f} | "
                   f"{lat.get('eager', float('nan')):.2f} | {lat.get('kiln_dynamo', float('nan')):.2f} | "
                   f"{'—' if sp is None else f'{sp:.2f}x'} |")
    passed = sum(r["status"] == "pass" for r in rows)
    unbroken = sum(r["status"] == "pass" and r.get("breaks", 0) == 0 for r in rows)
    geo = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None
    out.append("")
    out.append(f"torch.compile(backend=\"kiln\"): pass {passed}/{len(rows)}; no graph break {unbroken}/{len(rows)}"
               + (f"; geomean {geo:.2f}x vs eager over {len(speedups)} timed" if geo else ""))
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(prog="kiln bench suite-dynamo", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    return cmd(args)


def cmd(args) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    from kiln.bench import suite_models

    if args.worker:
        print(json.dumps(run_model(args.worker, False, args.repeats, args.threads)), flush=True)
        return 0
    names = args.only.split(",") if args.only else [m.name for m in suite_models.MODELS]
    unknown = [n for n in names if n not in suite_models.BY_NAME]
    if unknown:
        raise SystemExit(f"unknown suite models {unknown}; known: {', '.join(suite_models.BY_NAME)}")
    rows = []
    for name in names:
        print(f"[kiln bench suite-dynamo] {name}", file=sys.stderr, flush=True)
        rows.append(run_model(name, True, args.repeats, args.threads) if args.quick else _isolated(name, args))
    sys.stdout.write(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
