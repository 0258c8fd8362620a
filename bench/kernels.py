"""``kiln bench kernels``: every kernel Kiln can pick for a target, against the torch
reference, on the shapes the example models really run (or ``--shapes``).

Reports median time and spread (25th-75th percentile), GFLOP/s, GB/s and the fraction
of the machine's roofline: attainable time = max(FLOPs / peak, bytes / bandwidth) over
measured time, with peak and bandwidth measured on this machine (bench/machine.py). The
header also gives the register-only fp32 FMA ceiling of the thread count, measured at the
start of the run (``kiln._C.compute_peak_gflops``): no fp32 kernel's GFLOP/s can pass it.
"""
from __future__ import annotations

import json
import statistics

import torch

from kiln.ir import GraphBuilder, Node, OpKind
from kiln.ir.cost import node_bytes, node_flops


def model_nodes(quick: bool, precision: str = "fp32") -> list[tuple[str, Node, list]]:
    """(model, node, constants) for each distinct op x shape in the optimized example models
    (compiled in ``precision``: with bf16 their GEMMs, convolutions and attention are bf16)."""
    from kiln import models
    from kiln.frontends.torch_export import export_program, from_exported
    from kiln.options import CompileOptions
    from kiln.passes.pipeline import run_pipeline

    specs = {"resnet18": {"image": 64} if quick else {}, "bert": {"layers": 1, "seq": 32} if quick else {"layers": 1},
             "lstm": {"seq": 16} if quick else {}}
    seen, out = set(), []
    for name, kw in specs.items():
        model, inputs = models.get(name, **kw)
        g = run_pipeline(from_exported(export_program(model, inputs), name).graph,
                         CompileOptions(precision=precision)).graph
        for n in g.nodes:
            if n.op in (OpKind.RESHAPE, OpKind.SLICE, OpKind.PERMUTE, OpKind.TO_LAYOUT):
                continue  # views and layout glue: nothing to compute
            key = (n.op, n.attrs, tuple(None if v is None else repr(v.type) for v in n.inputs))
            if key in seen:
                continue
            seen.add(key)
            out.append((name, n, [None if v is None else g.constants.get(v) for v in n.inputs]))
    return out


def gemm_nodes(shapes: list[str]) -> list[tuple[str, Node, list]]:
    """``MxKxN`` strings -> LINEAR nodes (x: MxK, weight: NxK) with random weights."""
    out = []
    for s in shapes:
        m, k, n = (int(x) for x in s.lower().split("x"))
        b = GraphBuilder("gemm")
        w = torch.randn(n, k)
        node_out = b.add(OpKind.LINEAR, b.input("x", (m, k)), b.const(w))
        g = b.build([node_out])
        out.append(("--shapes", g.nodes[0], [None, w]))
    return out


def _inputs(node: Node, consts: list) -> list:
    from kiln.kernels.choice import random_like  # the values kernel choice times on

    return [None if v is None else (c if c is not None else random_like(v)) for v, c in zip(node.inputs, consts)]


def _time(fn, ins, attrs, repeats: int) -> list[float]:
    from kiln.kernels.timing import interleaved

    with torch.no_grad():
        fn(ins, attrs)  # warm-up, outside the timer: an error here is the kernel's own, and reported
    ts = interleaved([lambda: fn(ins, attrs)], repeats)[0].samples
    if not ts:
        raise RuntimeError("the kernel failed while being timed")
    return ts


def run(target: str = "cpu", quick: bool = False, op: str | None = None, shapes: list[str] | None = None,
        repeats: int | None = None, threads: int | None = None, precision: str = "fp32") -> dict:
    from kiln.kernels.registry import candidates, select_kernel
    from kiln.progress import progress

    from .machine import roofline

    if threads:
        torch.set_num_threads(threads)
    roof = dict(roofline())
    from kiln import _C

    try:
        roof["fma_gflops"] = _C.compute_peak_gflops("fma", torch.get_num_threads(), 1_000_000)
    except RuntimeError:  # built without AVX-512: no ceiling to show
        pass
    repeats = repeats or (5 if quick else 20)
    nodes = gemm_nodes(shapes) if shapes else model_nodes(quick, precision)
    if op:
        nodes = [x for x in nodes if x[1].op.value == op]
    rows = []
    for model, n, consts in progress(nodes, desc="kernels", unit="node"):
        kernels = {k.name: k for k in candidates(n, target)}
        ref = select_kernel(n, "reference")
        kernels.setdefault(ref.name, ref)
        flops, nbytes = node_flops(n), node_bytes(n)
        ins = _inputs(n, consts)
        shape = " ".join("x".join(str(d) for d in v.type.shape) for v in n.inputs if v is not None)
        for name, k in kernels.items():
            try:
                ts = _time(k.bind(n, consts), ins, n.attrs, repeats)
            except Exception as e:  # a kernel that fails is reported, not hidden
                rows.append({"model": model, "op": n.op.value, "shape": shape, "kernel": name, "error": str(e)})
                continue
            med = statistics.median(ts)
            q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [min(ts), med, max(ts)]
            attainable = max(flops / (roof["peak_gflops"] * 1e9), nbytes / (roof["bandwidth_gbs"] * 1e9))
            rows.append({"model": model, "op": n.op.value, "shape": shape, "kernel": name,
                         "median_us": med * 1e6, "p25_us": q[0] * 1e6, "p75_us": q[-1] * 1e6,
                         "gflops": flops / med / 1e9, "gbs": nbytes / med / 1e9,
                         "roofline": attainable / med if med > 0 else 0.0, "flops": flops, "bytes": nbytes})
    return {"target": target, "precision": precision, "threads": torch.get_num_threads(), "machine": roof,
            "rows": rows}


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"target {result['target']}, {result.get('precision', 'fp32')}, {result['threads']} thread(s); machine: "
             f"{m['peak_gflops']:.0f} GFLOP/s fp32 GEMM, {m['bandwidth_gbs']:.1f} GB/s copy"
             + (f", fp32 FMA ceiling {m['fma_gflops']:.0f} GFLOP/s now" if "fma_gflops" in m else ""),
             f"{'op':<20}{'shape':<34}{'kernel':<26}{'median us':>10}{'spread us':>16}{'GFLOP/s':>9}{'GB/s':>7}"
             f"{'roofline':>9}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['op']:<20}{r['shape'][:33]:<34}{r['kernel']:<26}  FAILED: {r['error'][:60]}")
            continue
        spread = f"{r['p25_us']:.0f}-{r['p75_us']:.0f}"
        lines.append(f"{r['op']:<20}{r['shape'][:33]:<34}{r['kernel']:<26}{r['median_us']:>10.1f}{spread:>16}"
                     f"{r['gflops']:>9.1f}{r['gbs']:>7.1f}{r['roofline'] * 100:>8.0f}%")
    return "\n".join(lines) + "\n"


def write_csv(result: dict, path: str) -> None:
    import csv

    keys = ["model", "op", "shape", "kernel", "median_us", "p25_us", "p75_us", "gflops", "gbs", "roofline",
            "flops", "bytes", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: r.get(k, "") for k in keys})


def plot(result: dict, path: str) -> None:
    """Roofline plot: each kernel at (arithmetic intensity, GFLOP/s) under the machine's roof."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["machine"]
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [0.01, 1000]
    ridge = m["peak_gflops"] / m["bandwidth_gbs"]
    ax.plot([xs[0], ridge, xs[1]], [xs[0] * m["bandwidth_gbs"], m["peak_gflops"], m["peak_gflops"]], "k-", lw=1.5,
            label="roofline")
    for r in result["rows"]:
        if "error" in r or not r["flops"] or not r["bytes"]:
            continue
        ax.scatter(r["flops"] / r["bytes"], r["gflops"], s=18,
                   marker="o" if r["kernel"].startswith("reference") else "^",
                   label=None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"Kiln kernels, {result['target']}, {result['threads']} thread(s) (o reference, ^ Kiln)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
