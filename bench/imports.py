"""Import time: what a new process pays for Kiln's modules before it can load or compile.

Each run is a fresh process that imports torch (not counted), freezes the collector's
generations as ``kiln.load`` does (``gc.freeze()``), then times, in order:

* ``import kiln`` (the package: options, target, errors);
* load: the modules ``kiln.load`` needs (the artifact reader, the runtime, the kernel
  registry with every kernel module);
* compile: what ``kiln.compile`` needs on top (the API, the driver, the pass pipeline, the
  torch frontend).

Two builds of Kiln's records are compared in the same run, their processes alternating:
``record`` (``kiln.ir.record``: classes built without compiling code) and ``dataclass`` (the
same classes built by ``dataclasses.dataclass`` with the same arguments, as before
``kiln.ir.record``: the child puts a stand-in for the ``kiln.ir.record`` module in ``sys.modules``
before ``import kiln``). Medians over ``--runs`` processes per build, after an untimed first
process per build writes the bytecode.

    python -m kiln.bench.imports [--runs 7] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import gc, json, sys, time
import torch
gc.freeze()
if sys.argv[1] == "dataclass":  # kiln.ir.record stood in for before the package is imported
    import dataclasses, types

    def as_dataclass(cls=None, /, *, eq=True, order=False, frozen=True, slots=True):
        wrap = dataclasses.dataclass(frozen=frozen, eq=eq, order=order, slots=slots)
        return wrap if cls is None else wrap(cls)
    sys.modules["kiln.ir.record"] = types.SimpleNamespace(record=as_dataclass)
t0 = time.perf_counter()
import kiln
t1 = time.perf_counter()
import kiln.artifact, kiln.runtime.restore
from kiln.kernels.registry import all_kernels
all_kernels()
t2 = time.perf_counter()
import kiln.api, kiln.driver, kiln.passes.pipeline, kiln.frontends.torch_export
t3 = time.perf_counter()
print(json.dumps({"kiln": t1 - t0, "load": t2 - t1, "compile": t3 - t2}))
"""
BUILDS = ("record", "dataclass")
PHASES = ("kiln", "load", "compile")


def _child(build: str) -> dict:
    # bytecode is written (and then read) as an installed package's is, whatever the caller's setting
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    p = subprocess.run([sys.executable, "-c", _CHILD, build], capture_output=True, text=True, timeout=300, env=env)
    if p.returncode != 0:
        raise SystemExit(f"the {build} child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiln.bench.imports", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="fresh processes per build (default 7)")
    ap.add_argument("--json", help="also write the runs and medians to this file")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    for b in BUILDS:  # untimed: writes the bytecode
        _child(b)
    runs: dict[str, list[dict]] = {b: [] for b in BUILDS}
    for i in range(args.runs):
        for b in (BUILDS if i % 2 == 0 else BUILDS[::-1]):
            runs[b].append(_child(b))
    med = {b: {p: statistics.median(r[p] for r in runs[b]) for p in PHASES} for b in BUILDS}
    print(f"median of {args.runs} fresh processes per build, ms (torch imported before, untimed)")
    print(f"{'records built by':<18}" + "".join(f"{p:>12}" for p in (*PHASES, "total")))
    for b in BUILDS:
        total = sum(med[b].values())
        print(f"{b:<18}" + "".join(f"{med[b][p] * 1e3:>12.1f}" for p in PHASES) + f"{total * 1e3:>12.1f}")
    ratio = {p: med["dataclass"][p] / med["record"][p] for p in PHASES}
    print(f"{'dataclass/record':<18}" + "".join(f"{ratio[p]:>11.2f}x" for p in PHASES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "median": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
