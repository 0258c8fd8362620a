"""``kiln bench elementwise``: a generated fused elementwise kernel against the machine's
measured memory bandwidth and against torch eager running the same chain.

The default chain (``--op affine_relu``) is ``relu(x * w + b)`` over N floats (default 16M):
three ops, three inputs read and one output written, 16 bytes per element when fused.
Fused, the kernel's attainable time is ``bytes N / bandwidth``, with the bandwidth measured
on this machine (bench/machine.py, a large copy). The copy is also timed inside the run,
interleaved with the kernels, and that figure is the denominator: the machine is shared
and its bandwidth drifts. Eager torch runs three kernels and moves 40 bytes per element.
The other ``--op`` choices are one transcendental op (exp, tanh, sigmoid, erf, silu, gelu,
gelu_tanh: 8 bytes per element, one torch kernel in eager), which measure Kiln's vectorized
math (codegen/tvm_math.py) against torch's; ``--n`` takes several sizes for a sweep.
Engines are interleaved round by round and every figure is a median; the fraction of
bandwidth is reported whatever it is.

Timed variants: ``kiln kernel`` is the generated function writing into a preallocated
output (the roofline figure); ``kiln step`` is the plan step as a compiled model runs it
(it allocates its output); ``torch eager`` is the chain as users write it.
"""
from __future__ import annotations

import json
import statistics
import time

BYTES_PER_ELEMENT_FUSED = 16  # affine_relu: x, w, b read + y written, fp32


# op -> (inputs, the Kiln op kind of a one-op chain, GELU approximation, bytes per element
# fused). Plain data, so the CLI can list the choices without importing torch.
CHAINS = {
    "affine_relu": (3, None, None, BYTES_PER_ELEMENT_FUSED),
    "exp": (1, "EXP", None, 8),
    "tanh": (1, "TANH", None, 8),
    "sigmoid": (1, "SIGMOID", None, 8),
    "erf": (1, "ERF", None, 8),
    "silu": (1, "SILU", None, 8),
    "gelu": (1, "GELU", "none", 8),
    "gelu_tanh": (1, "GELU", "tanh", 8),
}


def _eager(op: str):
    """The chain as users write it in torch."""
    import torch
    import torch.nn.functional as F

    if op == "affine_relu":
        return lambda x, w, b: torch.relu(x * w + b)
    _, kind, approx, _ = CHAINS[op]
    if kind == "GELU":
        return lambda x: F.gelu(x, approximate=approx)
    return {"EXP": torch.exp, "TANH": torch.tanh, "SIGMOID": torch.sigmoid, "ERF": torch.erf, "SILU": F.silu}[kind]


def chain_graph(n: int, op: str = "affine_relu"):
    from kiln.ir import GraphBuilder, OpKind
    from kiln.ir import attrs as A

    n_in, kind, approx, _ = CHAINS[op]
    g = GraphBuilder(op)
    ins = [g.input(name, (n,)) for name in "xwb"[:n_in]]
    if kind is None:
        x, w, b = ins
        out = g.add(OpKind.RELU, g.add(OpKind.ADD, g.add(OpKind.MUL, x, w), b))
    else:
        out = g.add(OpKind[kind], ins[0], attrs=A.GeluAttrs(A.GeluApprox(approx)) if approx else None)
    return g.build([out])


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(n: int = 16 * 1024 * 1024, repeats: int = 10, threads: int | None = None, tune="fast",
        op: str = "affine_relu") -> dict:
    from kiln.runtime.generated import generated_kernel
    from kiln.passes.partition import partition
    from kiln.target import host_cpu

    import torch

    from .machine import roofline

    threads = threads or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n_in, _, _, bytes_per_element = CHAINS[op]
        eager = _eager(op)
        graph = chain_graph(n, op)
        (group,) = partition(graph).groups
        t0 = time.perf_counter()
        kernel = generated_kernel(group, graph, host_cpu(), threads, tune)
        codegen_s = time.perf_counter() - t0
        # inputs span the transcendental ops' interesting range (saturation, underflow)
        ins = [torch.randn(n) * (4.0 if n_in == 1 else 1.0) for _ in range(n_in)]
        out = torch.empty(n)
        # a wrong kernel has no speed: checked against the chain in float64 (torch's own float32
        # GELU is about as far off it, 1e-6, as Kiln's)
        expected = eager(*(t.double() for t in ins))
        got = kernel(ins)
        if not torch.allclose(got.double(), expected, rtol=1e-5, atol=2e-6):
            raise AssertionError(f"the generated {op} kernel disagrees with torch")
        src, dst = torch.empty(n), torch.empty(n)
        engines = {
            "copy (bandwidth)": lambda: dst.copy_(src),
            "kiln kernel": lambda: kernel.func(*ins, out),
            "kiln step": lambda: kernel(ins),
            "torch eager": lambda: eager(*ins),
        }
        times: dict[str, list[float]] = {k: [] for k in engines}
        with torch.no_grad():
            for fn in engines.values():
                fn()  # warm-up
            for _ in range(repeats):  # interleaved: every engine once per round
                for name, fn in engines.items():
                    times[name].append(_time(fn))
        cached_bw = roofline(threads)["bandwidth_gbs"]
    finally:
        torch.set_num_threads(old)
    fused_bytes = bytes_per_element * n
    bw = 2 * 4 * n / statistics.median(times.pop("copy (bandwidth)")) / 1e9
    res = {"op": op, "bytes_per_element": bytes_per_element, "n": n, "threads": threads, "tune": str(tune), "config": kernel.config, "codegen_s": codegen_s,
           "machine_bandwidth_gbs": bw, "cached_roofline_bandwidth_gbs": cached_bw, "engines": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        res["engines"][name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                                "effective_gbs": fused_bytes / med / 1e9,
                                "fraction_of_bandwidth": fused_bytes / med / 1e9 / bw}
    return res


def table(res: dict) -> str:
    what = "relu(x * w + b)" if res["op"] == "affine_relu" else f"{res['op']}(x)"
    gbs_head = f"GB/s ({res['bytes_per_element']} B/elem)"
    lines = [f"{what} over {res['n']:,} fp32, {res['threads']} thread(s); bandwidth (copy, this run) "
             f"{res['machine_bandwidth_gbs']:.1f} GB/s (cached roofline: {res['cached_roofline_bandwidth_gbs']:.1f}); schedule {res['config']} (tune={res['tune']}, "
             f"{res['codegen_s']:.2f}s to tune/build)",
             f"{'engine':<14}{'median ms':>11}{'min ms':>9}{gbs_head:>18}{'of bandwidth':>14}"]
    for name, e in res["engines"].items():
        lines.append(f"{name:<14}{e['median_ms']:>11.2f}{e['min_ms']:>9.2f}{e['effective_gbs']:>18.1f}"
                     f"{e['fraction_of_bandwidth']:>13.0%}")
    k, t = res["engines"]["kiln kernel"], res["engines"]["torch eager"]
    lines.append(f"kiln kernel vs torch eager: {t['median_ms'] / k['median_ms']:.2f}x (eager time / kernel time)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="kiln bench elementwise", description=__doc__.splitlines()[0])
    add_arguments(p)
    return main_with(p.parse_args(argv))


def add_arguments(p) -> None:
    p.add_argument("--op", default="affine_relu", choices=sorted(CHAINS),
                   help="the chain: affine_relu = relu(x * w + b) (default), or one transcendental op")
    p.add_argument("--n", type=int, nargs="+", default=[16 * 1024 * 1024],
                   help="elements (default 16M); several values run a size sweep")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int)
    p.add_argument("--tune", default="fast", help="none, fast, max or seconds")
    p.add_argument("--json", metavar="FILE")


def main_with(a) -> int:
    results = []
    for n in a.n:
        res = run(n, a.repeats, a.threads, a.tune, a.op)
        print(table(res), end="")
        results.append(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
