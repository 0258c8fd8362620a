"""``kiln bench elementwise``: a generated fused elementwise kernel against the machine's
measured memory bandwidth and against torch eager running the same chain.

The chain is ``relu(x * w + b)`` over N floats (default 16M): three ops, three inputs read
and one output written, 16 bytes per element when fused. Fused, the kernel's attainable
time is ``16 N / bandwidth``, with the bandwidth measured on this machine (bench/machine.py,
a large copy). The copy is also timed inside the run, interleaved with the kernels, and
that figure is the denominator: the machine is shared and its bandwidth drifts. Eager torch runs three kernels and moves 40 bytes per element. Engines are
interleaved round by round and every figure is a median; the fraction of bandwidth is
reported whatever it is.

Timed variants: ``kiln kernel`` is the generated function writing into a preallocated
output (the roofline figure); ``kiln step`` is the plan step as a compiled model runs it
(it allocates its output); ``torch eager`` is the chain as users write it.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

BYTES_PER_ELEMENT_FUSED = 16  # x, w, b read + y written, fp32


def chain_graph(n: int):
    from kiln.ir import GraphBuilder, OpKind

    g = GraphBuilder("relu_mul_add")
    x, w, b = g.input("x", (n,)), g.input("w", (n,)), g.input("b", (n,))
    return g.build([g.add(OpKind.RELU, g.add(OpKind.ADD, g.add(OpKind.MUL, x, w), b))])


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(n: int = 16 * 1024 * 1024, repeats: int = 10, threads: int | None = None, tune="fast") -> dict:
    from kiln.kernels.generated import generated_kernel
    from kiln.passes.partition import partition
    from kiln.target import host_cpu

    from .machine import roofline

    threads = threads or torch.get_num_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        graph = chain_graph(n)
        (group,) = partition(graph).groups
        t0 = time.perf_counter()
        kernel = generated_kernel(group, graph, host_cpu(), threads, tune)
        codegen_s = time.perf_counter() - t0
        x, w, b = (torch.randn(n) for _ in range(3))
        out = torch.empty(n)
        expected = torch.relu(x * w + b)
        got = kernel([x, w, b])
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):  # a wrong kernel has no speed
            raise AssertionError("the generated kernel disagrees with torch")
        src, dst = torch.empty(n), torch.empty(n)
        engines = {
            "copy (bandwidth)": lambda: dst.copy_(src),
            "kiln kernel": lambda: kernel.func(x, w, b, out),
            "kiln step": lambda: kernel([x, w, b]),
            "torch eager": lambda: torch.relu(x * w + b),
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
    fused_bytes = BYTES_PER_ELEMENT_FUSED * n
    bw = 2 * 4 * n / statistics.median(times.pop("copy (bandwidth)")) / 1e9
    res = {"n": n, "threads": threads, "tune": str(tune), "config": kernel.config, "codegen_s": codegen_s,
           "machine_bandwidth_gbs": bw, "cached_roofline_bandwidth_gbs": cached_bw, "engines": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        res["engines"][name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                                "effective_gbs": fused_bytes / med / 1e9,
                                "fraction_of_bandwidth": fused_bytes / med / 1e9 / bw}
    return res


def table(res: dict) -> str:
    lines = [f"relu(x * w + b) over {res['n']:,} fp32, {res['threads']} thread(s); bandwidth (copy, this run) "
             f"{res['machine_bandwidth_gbs']:.1f} GB/s (cached roofline: {res['cached_roofline_bandwidth_gbs']:.1f}); schedule {res['config']} (tune={res['tune']}, "
             f"{res['codegen_s']:.2f}s to tune/build)",
             f"{'engine':<14}{'median ms':>11}{'min ms':>9}{'GB/s (16 B/elem)':>18}{'of bandwidth':>14}"]
    for name, e in res["engines"].items():
        lines.append(f"{name:<14}{e['median_ms']:>11.2f}{e['min_ms']:>9.2f}{e['effective_gbs']:>18.1f}"
                     f"{e['fraction_of_bandwidth']:>13.0%}")
    k, t = res["engines"]["kiln kernel"], res["engines"]["torch eager"]
    lines.append(f"kiln kernel vs torch eager: {t['median_ms'] / k['median_ms']:.2f}x faster")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="kiln bench elementwise", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16 * 1024 * 1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int)
    p.add_argument("--tune", default="fast")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    res = run(a.n, a.repeats, a.threads, a.tune)
    print(table(res), end="")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
