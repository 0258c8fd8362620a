"""The machine's measured roofline: peak fp32 GEMM throughput and memory bandwidth.

Measured once per thread count and cached (``<KILN_CACHE_DIR>/bench``),
because the kernel benchmarks report every result as a fraction of these two numbers.

    python -m kiln.bench.machine [--rounds 5] [--threads 1,2]

prints the ceilings themselves, measured afresh in interleaved rounds (these machines are
shared, and a round that ran in a busy moment shows it): the register-only throughput of the
fp32 FMA units and of the AMX-BF16 tiles (``kiln._C.compute_peak_gflops``), an fp32 GEMM
(``torch.mm``, 1024^3) and a 64 MB copy, per thread count, and what the extra threads add.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _best(fn, repeats: int) -> float:
    from kiln.kernels.timing import best_seconds

    return best_seconds([fn], repeats, warmup=1)[0]


def measure(threads: int) -> dict:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = 1024
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        gemm_s = _best(lambda: torch.mm(a, b, out=c), 10)
        src = torch.empty(64 * 1024 * 1024 // 4)  # 64 MB: far beyond the caches
        dst = torch.empty_like(src)
        copy_s = _best(lambda: dst.copy_(src), 10)
    finally:
        torch.set_num_threads(old)
    return {"threads": threads, "peak_gflops": 2 * n ** 3 / gemm_s / 1e9,
            "bandwidth_gbs": 2 * src.numel() * 4 / copy_s / 1e9, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


def roofline(threads: int | None = None, refresh: bool = False) -> dict:
    threads = threads or torch.get_num_threads()
    from kiln.options import cache_subdir

    path = os.path.join(cache_subdir("bench"), f"machine-{threads}t.json")
    if not refresh and os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("threads") == threads and data.get("peak_gflops", 0) > 0:
                return data
        except (OSError, ValueError):
            pass  # a corrupt cache entry is re-measured
    data = measure(threads)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one
    return data


def ceilings(threads: int) -> dict:
    """One round of every ceiling at ``threads`` threads (FMA / AMX: None where not built or
    not present)."""
    from kiln import _C

    try:
        fma = _C.compute_peak_gflops("fma", threads, 1_000_000)
    except RuntimeError:  # built without AVX-512
        fma = None
    amx = _C.compute_peak_gflops("amx_bf16", threads, 200_000) if _C.amx_bf16_supported() else None
    m = measure(threads)
    return {"fma": fma, "amx_bf16": amx, "gemm": m["peak_gflops"], "copy": m["bandwidth_gbs"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="The machine's compute and memory ceilings, per thread count.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = ap.parse_args(argv)
    counts = [int(t) for t in args.threads.split(",")]
    rounds: dict[int, list[dict]] = {t: [] for t in counts}
    for _ in range(args.rounds):
        for t in counts:
            rounds[t].append(ceilings(t))
    cols = [("fma", "FMA fp32 GFLOP/s"), ("amx_bf16", "AMX bf16 GFLOP/s"), ("gemm", "fp32 GEMM GFLOP/s"),
            ("copy", "copy GB/s")]
    print(f"median of {args.rounds} interleaved rounds (min-max)")
    print("| threads | " + " | ".join(c for _, c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    med = {}
    for t in counts:
        cells = []
        for k, _ in cols:
            vals = [r[k] for r in rounds[t] if r[k] is not None]
            med[t, k] = statistics.median(vals) if vals else None
            cells.append(f"{med[t, k]:.0f} ({min(vals):.0f}-{max(vals):.0f})" if vals else "n/a")
        print(f"| {t} | " + " | ".join(cells) + " |")
    base = counts[0]
    for t in counts[1:]:
        gains = ", ".join(f"{k} {med[t, k] / med[base, k]:.2f}x" for k, _ in cols
                          if med[t, k] and med[base, k])
        print(f"{t} threads over {base}: {gains}")


if __name__ == "__main__":
    main()
