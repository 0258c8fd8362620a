"""Is kernel choice stable? ``python -m kiln.bench.stability [MODEL ...]``

Compiles each example model in ``--processes`` fresh processes (each with its own empty
cache directory, so nothing is reused: every kernel choice is measured again), then times
the plans they chose against each other in one process, interleaved, and reports the
spread of their end-to-end medians (target: within 5%) and how many different kernel sets
the processes chose. ``--shared-db`` gives the processes one tuning database (the earlier
winners break ties, as on a user's machine after the first compile); without it each
process starts from nothing.

How the plans meet in one process: each child's compile cache (``<dir>/compile``: the
recorded kernel choices and generated modules) is copied in turn into the measuring
process's own cache directory, and ``kiln.compile`` builds the plan from it without
measuring anything.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

TARGET_SPREAD = 0.05


def _child_compile(model: str, threads: int, precision: str, out: str) -> None:
    import torch

    import kiln
    from kiln import models

    torch.set_num_threads(threads)
    m, inputs = models.get(model)
    compiled = kiln.compile(m, inputs, precision=precision)
    with open(out, "w") as f:
        json.dump({"node_kernels": [k for _, k in compiled.report.node_kernels]}, f)


def _child_measure(model: str, threads: int, precision: str, dirs: list[str], repeats: int, out: str) -> None:
    import torch

    import kiln
    from kiln import models
    from kiln.kernels.timing import interleaved
    from kiln.options import cache_subdir

    torch.set_num_threads(threads)
    m, inputs = models.get(model)
    mine = cache_subdir("compile")
    fns = []
    for d in dirs:
        shutil.rmtree(mine)
        shutil.copytree(os.path.join(d, "compile"), mine)
        compiled = kiln.compile(m, inputs, precision=precision)
        compiled(*inputs)  # builds the plan from the copied choices
        assert compiled.report.compile_cache_hit, "the child's recorded choices were not used"
        fns.append(lambda c=compiled: c(*inputs))
    timed = interleaved(fns, repeats, warmup=1, rotate=True)
    with open(out, "w") as f:
        json.dump({"median_ms": [t.median * 1e3 for t in timed]}, f)


def _run(args: list[str], cache_dir: str, db: str | None) -> None:
    from kiln.options import child_environment

    env = child_environment(KILN_CACHE_DIR=cache_dir, KILN_PROGRESS="0", **({"KILN_TUNING_DB": db} if db else {}))
    p = subprocess.run([sys.executable, "-m", "kiln.bench.stability", *args], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{p.stderr[-3000:]}")


def bench(model: str, processes: int, threads: int, precision: str, repeats: int, shared_db: bool, log) -> dict:
    root = tempfile.mkdtemp(prefix="kiln-stability-")
    try:
        db = os.path.join(root, "tuning.sqlite") if shared_db else None
        dirs, sets = [], []
        for i in range(processes):
            d = os.path.join(root, f"p{i}")
            out = os.path.join(root, f"p{i}.json")
            log(f"{model}: compile {i + 1}/{processes} in a fresh process")
            _run(["--child-compile", model, "--threads", str(threads), "--precision", precision, "--out", out], d, db)
            with open(out) as f:
                sets.append(json.load(f)["node_kernels"])
            dirs.append(d)
        out = os.path.join(root, "measure.json")
        log(f"{model}: timing the {processes} plans interleaved")
        _run(["--child-measure", model, "--threads", str(threads), "--precision", precision, "--repeats",
              str(repeats), "--out", out, *dirs], os.path.join(root, "measure"), None)
        with open(out) as f:
            med = json.load(f)["median_ms"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    distinct = {tuple(s) for s in sets}
    differing = sorted({k for s in sets for k in s} - set.intersection(*(set(s) for s in sets)))
    return {"model": model, "threads": threads, "precision": precision, "median_ms": med,
            "spread": max(med) / min(med) - 1, "kernel_sets": len(distinct), "differing_kernels": differing,
            "median_of_medians": statistics.median(med)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | precision | threads | end-to-end ms per process | spread | kernel sets | within 5% |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['threads']} | "
                     + ", ".join(f"{m:.2f}" for m in r["median_ms"])
                     + f" | {r['spread']:.1%} | {r['kernel_sets']} | {'yes' if r['spread'] <= TARGET_SPREAD else 'no'} |")
    diffs = [(r["model"], r["differing_kernels"]) for r in rows if r["differing_kernels"]]
    if diffs:
        lines += ["", "Kernels not chosen by every process:"] + [f"- {m}: {', '.join(d)}" for m, d in diffs]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiln.bench.stability", description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=None, help="example model names (default: resnet18 bert lstm)")
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--shared-db", action="store_true", help="one tuning database for all the processes")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--child-compile", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--child-measure", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_compile:
        _child_compile(a.child_compile, a.threads, a.precision, a.out)
        return 0
    if a.child_measure:
        _child_measure(a.child_measure, a.threads, a.precision, a.models, a.repeats, a.out)
        return 0
    rows = [bench(m, a.processes, a.threads, a.precision, a.repeats, a.shared_db,
                  lambda msg: print(f"[stability] {msg}", file=sys.stderr, flush=True))
            for m in (a.models or ["resnet18", "bert", "lstm"])]
    sys.stdout.write(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
