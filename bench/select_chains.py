"""Build time of one generated kernel over a chain of selects, with and without the bounds.

A chain of ``--op`` nodes (ReLU, clamp or leaky ReLU: forms that read their operand more
than once, under selects) is rendered and built as one TensorIR kernel group, as the
partitioner would fuse it. Each build runs in a fresh process with an empty compile cache:
once as Kiln renders it (``codegen.tvm_expr_size``'s bounds store operands to stages of their
own), once with the bounds lifted (``--unbounded``: the expression written out whole). Per
chain length: seconds to render and build, the largest stage's select depth and tree size,
and how many stages were stored for the bounds; each output is checked against torch.

    python -m kiln.bench.select_chains [--op relu|clamp|leaky] [--links 4,6,8] [--unbounded]
                                       [--timeout 300]

Without the bounds a long chain builds for a long time: ``--timeout`` stops a build that
runs past it (reported as such).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
import torch
from kiln.codegen import tvm as tvm_codegen, tvm_expr_size
from kiln.codegen.schedules_cpu import schedule_group
from kiln.codegen.tvm_runtime import GeneratedKernel
from kiln.ir import GraphBuilder, OpKind
from kiln.ir import attrs as A
from kiln.passes.partition import KernelGroup
from kiln.runtime.module_cache import build_in_memory
from kiln.target import host_cpu

op, links, bounded = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if not bounded:
    tvm_expr_size.MAX_SELECT_DEPTH = tvm_expr_size.MAX_EXPRESSION_NODES = 10 ** 9
b = GraphBuilder("chain")
x = b.input("x", (64, 256))
v = x
for _ in range(links):
    if op == "relu":
        v = b.add(OpKind.RELU, v)
    elif op == "clamp":
        v = b.add(OpKind.CLAMP, v, attrs=A.ClampAttrs(-0.5, 0.5))
    else:
        v = b.add(OpKind.LEAKY_RELU, v, attrs=A.LeakyReluAttrs(0.1))
g = b.build([v])
group = KernelGroup(0, "injective", list(g.nodes), list(g.inputs), list(g.outputs))
outs = tvm_codegen.render(group)[1]
bodies = [e for t in tvm_expr_size.stages(outs) for e in getattr(t.op, "body", [])]
cfg = schedule_group.tune_space.default()
t0 = time.perf_counter()
kernel = GeneratedKernel(build_in_memory(group, cfg, host_cpu(), 1), group, "chain", cfg, True)
seconds = time.perf_counter() - t0
xs = torch.randn(64, 256)
ref = xs
for _ in range(links):
    ref = torch.relu(ref) if op == "relu" else ref.clamp(-0.5, 0.5) if op == "clamp" else torch.nn.functional.leaky_relu(ref, 0.1)
print(json.dumps({"seconds": seconds, "match": bool(torch.allclose(kernel([xs]), ref)),
                  "depth": max(tvm_expr_size.select_depth(e) for e in bodies),
                  "nodes": max(tvm_expr_size.expression_nodes(e, 10 ** 9) for e in bodies),
                  "stored": len(tvm_expr_size.kept_stages(outs))}))
"""


def _run(op: str, links: int, bounded: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-chains-") as cache:
        env = dict(os.environ, KILN_CACHE_DIR=cache)
        try:
            p = subprocess.run([sys.executable, "-c", _CHILD, op, str(links), "1" if bounded else "0"],
                               capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"timed_out": True}
    if p.returncode != 0:
        raise RuntimeError(f"the {op} x{links} build failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiln.bench.select_chains", description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=["relu", "clamp", "leaky"], default="relu")
    ap.add_argument("--links", default="4,6,8", help="chain lengths, comma-separated")
    ap.add_argument("--unbounded", action="store_true", help="also build each chain with the bounds lifted")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before a build is stopped")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    modes = [("bounded", True)] + ([("unbounded", False)] if args.unbounded else [])
    rows = []
    print(f"| {args.op} chain | " + " | ".join(f"{m} s | depth | nodes | stored" for m, _ in modes) + " |")
    print("|---|" + "---|---|---|---|" * len(modes))
    for links in (int(k) for k in args.links.split(",")):
        row = {"links": links}
        cells = []
        for name, bounded in modes:
            r = row[name] = _run(args.op, links, bounded, args.timeout)
            if r.get("timed_out"):
                cells.append(f"> {args.timeout:.0f} (stopped) | | |")
                continue
            if not r["match"]:
                raise SystemExit(f"the {args.op} x{links} kernel ({name}) does not match torch")
            cells.append(f"{r['seconds']:.2f} | {r['depth']} | {r['nodes']} | {r['stored']}")
        rows.append(row)
        print(f"| {links} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"op": args.op, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
